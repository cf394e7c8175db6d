// The warm pool's pure parts and its bookkeeping without QEMU: the pooled
// QEMU's argv (per-task values blanked, paused after loading), the forwards
// a handover adds (hostile values refused before they reach HMP), and what
// adoption does with slots it cannot use. The pool with real QEMUs is in
// tests/integration/vm_warm_start_test.cc.
#include "vm/warm_pool.h"

#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../fakes/fake_vm_host.h"
#include "../../support/temp_dir.h"
#include "../../support/warm_spec.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "host/process_watch.h"
#include "vm/pool_handover.h"

namespace ndq {
namespace {

using ::ndq::testing::FakeVmHost;
using ::ndq::testing::TempDir;
using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using json = nlohmann::json;

VmSpec TaskSpec() { return ::ndq::testing::WarmTaskSpec("web-task-name", 25123); }

QemuFiles RestoreFiles() {
  QemuFiles files;
  files.boot = {DiskNode{"qcow2", false, 3}, DiskNode{"qcow2", true, 4}, DiskNode{"qcow2", true, 5}};
  files.warm_mode = WarmMode::kRestore;
  files.warm_memory = 6;
  files.warm_state = 7;
  return files;
}

TEST(PooledQemuArgv, KeepsNothingOfTheTaskButItsVmAndStartsPaused) {
  const std::vector<std::string> argv = PooledQemuArgv(PoolSpec(TaskSpec()), RestoreFiles(), "/run/ndq/pool/p1/run");
  const std::string all = absl::StrJoin(argv, " ");
  EXPECT_THAT(argv, Contains("guest=warm-pool"));
  EXPECT_THAT(all, Not(HasSubstr("web-task-name")));
  EXPECT_THAT(all, Not(HasSubstr("hostfwd")));
  EXPECT_THAT(all, Not(HasSubstr("/alloc/")));  // no console socket, no task path
  EXPECT_THAT(argv, Contains("user,id=user.0")) << "the user network stays, for the forwards added at handover";
  EXPECT_THAT(argv, Contains("socket,id=qmp0,path=/run/ndq/pool/p1/run/qmp.sock,server=on,wait=off"));
  EXPECT_THAT(argv, Contains("socket,path=/run/ndq/pool/p1/run/qga.sock,server=on,wait=off,id=qga0"));
  EXPECT_THAT(argv, Contains("memory-backend-file,id=warm-ram,size=256M,mem-path=/proc/self/fd/6,share=off"));
  EXPECT_THAT(all, HasSubstr("-incoming defer"));
  EXPECT_EQ(argv.back(), "-S");
  // The boot disk's top node is the one the handover puts the task's overlay on.
  EXPECT_THAT(argv, Contains(absl::StrCat("driver=qcow2,node-name=", kPoolBootNode, ",file=", kPoolBootNode,
                                          "-file,backing=image0-b1")));
}

// Whichever task's restore left the recipe, the pooled QEMU is the same (its
// NIC's MAC comes from the template's state, as for every restore).
TEST(PoolSpec, TwoTasksOfOneJobGetTheSamePooledQemu) {
  const VmSpec other = ::ndq::testing::WarmTaskSpec("another-alloc", 31000);
  EXPECT_EQ(PooledQemuArgv(PoolSpec(TaskSpec()), RestoreFiles(), "/r"), PooledQemuArgv(PoolSpec(other), RestoreFiles(), "/r"));
}

TEST(HostForwardRule, NomadsForwardsBecomeHmpRules) {
  EXPECT_EQ(*HostForwardRule({"http", "tcp", "127.0.0.1", 25123, 80}), "tcp:127.0.0.1:25123-:80");
  EXPECT_EQ(*HostForwardRule({"dns", "udp", "", 5353, 53}), "udp::5353-:53");
}

// The rule is spliced into an HMP command line, where a space or newline
// would start another command: only an IPv4 address, tcp/udp and real ports pass.
TEST(HostForwardRule, HostileValuesNeverReachTheMonitor) {
  const std::vector<PortForward> hostile = {
      {"http", "tcp", "127.0.0.1 quit", 25123, 80},  {"http", "tcp", "127.0.0.1\nquit", 25123, 80},
      {"http", "tcp", "::1", 25123, 80},              {"http", "tcp", "localhost", 25123, 80},
      {"http", "sctp", "127.0.0.1", 25123, 80},        {"http", "tcp quit", "127.0.0.1", 25123, 80},
      {"http", "tcp", "127.0.0.1", 0, 80},             {"http", "tcp", "127.0.0.1", 70000, 80},
      {"http", "tcp", "127.0.0.1", 25123, -1},         {"http", "tcp", "127.0.0.1", 25123, 65536}};
  for (const PortForward& forward : hostile) {
    absl::StatusOr<std::string> rule = HostForwardRule(forward);
    EXPECT_EQ(rule.status().code(), absl::StatusCode::kInvalidArgument) << forward.host_ip << " " << forward.protocol;
    EXPECT_THAT(rule.status().message(), HasSubstr("port_map \"http\""));
  }
}

class WarmPoolAdoption : public ::testing::Test {
 protected:
  std::string Slot(const std::string& name) {
    const std::string dir = state_.path() + "/pool/" + name;
    std::filesystem::create_directories(dir + "/run");
    return dir;
  }
  TempDir state_;
  FakeVmHost host_;
};

TEST_F(WarmPoolAdoption, WithoutAdoptionNothingIsTaken) {
  WarmPool pool(&host_);
  EXPECT_EQ(pool.Take("k"), nullptr);
  EXPECT_EQ(pool.Ready(), 0);
}

// Slots that never got ready, whose processes are gone, or whose manifest
// names a process that is not the one it started (a reused pid: here this
// very test) are removed, and nothing is killed by pid alone.
TEST_F(WarmPoolAdoption, UnusableSlotsAreRemovedWithoutKillingAStranger) {
  Slot("no-manifest");
  std::ofstream(Slot("never-ready") + "/slot.json") << json{{"key", "k"}, {"ready", false}}.dump();
  std::ofstream(Slot("garbage") + "/slot.json") << "{not json";
  std::ofstream(Slot("reused-pid") + "/slot.json")
      << json{{"key", "k"},
              {"ready", true},
              {"template_dir", state_.path()},
              {"supervisor_pid", ::getpid()},
              {"supervisor_start_ticks", ProcessStartTicks(::getpid()).value_or(0) + 1},
              {"qemu_pid", ::getpid()},
              {"qemu_start_ticks", 1}}
             .dump();
  WarmPool pool(&host_);
  pool.ExpectAdoption();
  pool.Adopt(state_.path());
  std::vector<std::string> left;
  for (const auto& entry : std::filesystem::directory_iterator(state_.path() + "/pool")) left.push_back(entry.path());
  EXPECT_THAT(left, IsEmpty());
  EXPECT_EQ(pool.Ready(), 0);
  EXPECT_EQ(pool.Take("k"), nullptr);
}

}  // namespace
}  // namespace ndq
