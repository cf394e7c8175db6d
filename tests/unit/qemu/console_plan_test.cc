// The console and boot watch planner (qemu/console_plan.h) called directly.
// vm_spec_test covers the common cases through PlanVm; these check the
// socket path limit at its edge, the boot_timeout bounds, hostile values, and
// what the planner takes from the spec planned before it.
#include "qemu/console_plan.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/un.h>

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "policy/task_config.h"
#include "policy/task_request.h"
#include "qemu/vm_spec.h"

namespace ndq {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

// The limit is the kernel's, not a choice.
static_assert(kMaxUnixSocketPath == sizeof(sockaddr_un::sun_path) - 1);

// The longer of the two socket names, after the task dir.
constexpr char kSerialTail[] = "/console/serial.sock";

// Task "web" of an allocation; the spec as PlanVm has it when the console is
// planned (no guest agent, no forwards). Plan() starts from a fresh copy of
// `before_` and returns the problems joined, as PlanVm reports them.
class ConsolePlanning : public ::testing::Test {
 protected:
  ConsolePlanning() {
    task_.alloc_dir = "/var/lib/nomad/alloc/0123";
    task_.identity.name = "web";
  }

  std::string Plan() {
    spec_ = before_;
    std::vector<std::string> problems;
    PlanConsole(config_, task_, spec_, problems);
    return absl::StrJoin(problems, "; ");
  }

  // A task dir of exactly `size` bytes ("/aaa.../web").
  void TaskDirOfSize(size_t size) {
    task_.alloc_dir = "/" + std::string(size - std::strlen("//web"), 'a');
    ASSERT_EQ(task_.task_dir().size(), size);
  }

  // A TCP forward of the port_map label, as PlanVm plans one.
  void Forward(const std::string& label, const std::string& host_ip, int host_port, int guest_port) {
    config_.port_map[label] = guest_port;
    before_.port_forwards.push_back(PortForward{label, "tcp", host_ip, host_port, guest_port});
    before_.port_forwards.push_back(PortForward{label, "udp", host_ip, host_port, guest_port});
  }

  TaskConfig config_;
  TaskRequest task_;
  VmSpec before_;
  VmSpec spec_;
};

void ExpectNoWatch(const BootWatchPlan& watch) {
  EXPECT_EQ(watch.timeout, absl::ZeroDuration());
  EXPECT_FALSE(watch.guest_agent);
  EXPECT_EQ(watch.port_label, "");
  EXPECT_EQ(watch.host_ip, "");
  EXPECT_EQ(watch.host_port, 0);
  EXPECT_EQ(watch.guest_port, 0);
}

// --- the console ------------------------------------------------------------------

// A guest agent alone starts no watch: only boot_timeout asks for one.
TEST_F(ConsolePlanning, NothingAskedNothingPlanned) {
  before_.guest_agent = true;
  EXPECT_EQ(Plan(), "");
  EXPECT_FALSE(spec_.console.enabled);
  EXPECT_EQ(spec_.console.dir, "");
  EXPECT_EQ(spec_.console.vnc_socket, "");
  ExpectNoWatch(spec_.boot_watch);
}

// serial.sock is the longer name, so it is the one that must fit.
TEST_F(ConsolePlanning, TheLongerSocketPathMustFitInSunPath) {
  config_.console = true;
  const size_t longest_dir = kMaxUnixSocketPath - std::strlen(kSerialTail);
  TaskDirOfSize(longest_dir);
  EXPECT_EQ(Plan(), "");
  EXPECT_EQ(spec_.console.serial_socket.size(), kMaxUnixSocketPath);
  EXPECT_EQ(spec_.console.serial_socket, task_.task_dir() + kSerialTail);

  TaskDirOfSize(longest_dir + 1);
  ASSERT_LE(task_.task_dir().size() + std::strlen("/console/vnc.sock"), kMaxUnixSocketPath)
      << "only the serial socket is over the limit here";
  EXPECT_EQ(Plan(), absl::StrCat("task config \"console\": the console socket \"", task_.task_dir(), kSerialTail,
                                 "\" is 108 bytes long, over the unix socket limit of 107; use a shorter Nomad "
                                 "data_dir (or task name)"));
}

TEST_F(ConsolePlanning, TheSocketLimitAppliesOnlyWithAConsole) {
  TaskDirOfSize(300);
  EXPECT_EQ(Plan(), "");
  EXPECT_FALSE(spec_.console.enabled);
}

// QEMU's -vnc would read "unix:/a=b/..." as key=value; '=' anywhere in the
// task dir before a comma is refused, not only in the task name.
TEST_F(ConsolePlanning, AnEqualsSignInTheAllocDirIsRefused) {
  config_.console = true;
  task_.alloc_dir = "/var/lib/nomad=x/alloc/0123";
  EXPECT_EQ(Plan(),
            "task config \"console\": the task directory \"/var/lib/nomad=x/alloc/0123/web\" holds an '=', "
            "which QEMU's -vnc cannot take in a socket path");
}

// The command line doubles commas, so they are carried as they are.
TEST_F(ConsolePlanning, CommasInTheTaskDirAreCarriedAsTheyAre) {
  config_.console = true;
  task_.alloc_dir = "/var/lib/nomad,x/alloc";
  task_.identity.name = "web,vnc=tcp";
  EXPECT_EQ(Plan(), "");
  EXPECT_TRUE(spec_.console.enabled);
  EXPECT_EQ(spec_.console.dir, "/var/lib/nomad,x/alloc/web,vnc=tcp/console");
  EXPECT_EQ(spec_.console.serial_socket, "/var/lib/nomad,x/alloc/web,vnc=tcp/console/serial.sock");
  EXPECT_EQ(spec_.console.vnc_socket, "/var/lib/nomad,x/alloc/web,vnc=tcp/console/vnc.sock");
}

// --- boot_timeout --------------------------------------------------------------

TEST_F(ConsolePlanning, BootTimeoutBoundsAreInclusive) {
  before_.guest_agent = true;
  const std::vector<std::pair<std::string, absl::Duration>> inside = {
      {"1s", absl::Seconds(1)}, {"1000ms", absl::Seconds(1)}, {"24h", absl::Hours(24)}, {"86400s", absl::Hours(24)}};
  for (const auto& [text, timeout] : inside) {
    config_.boot_timeout = text;
    EXPECT_EQ(Plan(), "") << text;
    EXPECT_EQ(spec_.boot_watch.timeout, timeout) << text;
  }
  for (const char* outside : {"999ms", "999999999ns", "24h1ns", "86401s"}) {
    config_.boot_timeout = outside;
    EXPECT_EQ(Plan(), absl::StrCat("task config \"boot_timeout\": \"", outside, "\" is out of range; use 1s to 24h"));
    ExpectNoWatch(spec_.boot_watch);
  }
}

// Go's duration syntax, as Nomad's own durations.
TEST_F(ConsolePlanning, BootTimeoutTakesGoDurations) {
  before_.guest_agent = true;
  config_.boot_timeout = "1.5h";
  EXPECT_EQ(Plan(), "");
  EXPECT_EQ(spec_.boot_watch.timeout, absl::Minutes(90));
  config_.boot_timeout = "1h2m3s";
  EXPECT_EQ(Plan(), "");
  EXPECT_EQ(spec_.boot_watch.timeout, absl::Seconds(3723));
}

TEST_F(ConsolePlanning, HostileBootTimeoutsAreRefused) {
  before_.guest_agent = true;
  for (const std::string& bad :
       {std::string("90s\n"), std::string(" 90s"), std::string("90 s"), std::string("90s,guest_agent=true"),
        std::string("1e2s"), std::string("90S"), std::string("-inf"), std::string(10000, '9') + "s"}) {
    config_.boot_timeout = bad;
    EXPECT_THAT(Plan(), StartsWith("task config \"boot_timeout\": \"")) << bad.substr(0, 20);
    ExpectNoWatch(spec_.boot_watch);
  }
}

// The planner takes the agent from the spec (PlanVm's order), not the config.
TEST_F(ConsolePlanning, TheGuestAgentPlannedInTheSpecIsWhatIsWatched) {
  config_.boot_timeout = "30s";
  before_.guest_agent = true;
  EXPECT_EQ(Plan(), "");
  EXPECT_TRUE(spec_.boot_watch.guest_agent);
  EXPECT_EQ(spec_.boot_watch.timeout, absl::Seconds(30));
  EXPECT_EQ(spec_.boot_watch.port_label, "");
  before_.guest_agent = false;
  config_.guest_agent = true;
  EXPECT_THAT(Plan(), StartsWith("task config \"boot_timeout\": needs something that answers"));
  ExpectNoWatch(spec_.boot_watch);
}

// --- boot_ready_port ---------------------------------------------------------------

TEST_F(ConsolePlanning, TheWatchCanWaitForTheAgentAndAPort) {
  Forward("ssh", "10.0.0.5", 22000, 22);
  before_.guest_agent = true;
  config_.boot_timeout = "2m";
  config_.boot_ready_port = "ssh";
  EXPECT_EQ(Plan(), "");
  EXPECT_EQ(spec_.boot_watch.timeout, absl::Minutes(2));
  EXPECT_TRUE(spec_.boot_watch.guest_agent);
  EXPECT_EQ(spec_.boot_watch.port_label, "ssh");
  EXPECT_EQ(spec_.boot_watch.host_ip, "10.0.0.5");
  EXPECT_EQ(spec_.boot_watch.host_port, 22000);
  EXPECT_EQ(spec_.boot_watch.guest_port, 22);
}

// A forward bound on every address keeps an empty host_ip; the watch probes
// 127.0.0.1 then.
TEST_F(ConsolePlanning, AReadyPortOnEveryAddressKeepsNoHostIp) {
  Forward("http", "", 25001, 8080);
  config_.boot_timeout = "20s";
  config_.boot_ready_port = "http";
  EXPECT_EQ(Plan(), "");
  EXPECT_EQ(spec_.boot_watch.port_label, "http");
  EXPECT_EQ(spec_.boot_watch.host_ip, "");
  EXPECT_EQ(spec_.boot_watch.host_port, 25001);
}

// Zero timeout: no watch, even when the port itself was fine.
TEST_F(ConsolePlanning, ARefusedBootTimeoutLeavesNoHalfPlannedWatch) {
  Forward("http", "127.0.0.1", 25001, 80);
  config_.boot_ready_port = "http";
  config_.boot_timeout = "25h";
  EXPECT_THAT(Plan(), HasSubstr("task config \"boot_timeout\": \"25h\" is out of range"));
  ExpectNoWatch(spec_.boot_watch);
  config_.boot_timeout.reset();
  EXPECT_EQ(Plan(), "task config \"boot_ready_port\": needs boot_timeout, the time the port has to answer");
  ExpectNoWatch(spec_.boot_watch);
}

TEST_F(ConsolePlanning, HostileReadyPortLabelsAreRefused) {
  Forward("http", "127.0.0.1", 25001, 80);
  config_.boot_timeout = "20s";
  for (const char* bad : {"http,host=0.0.0.0", "http\n", "HTTP", ""}) {
    config_.boot_ready_port = bad;
    EXPECT_EQ(Plan(), absl::StrCat("task config \"boot_ready_port\": \"", bad,
                                   "\" is not a port_map label; port_map has \"http\""));
    EXPECT_EQ(spec_.boot_watch.port_label, "");
  }
}

}  // namespace
}  // namespace ndq
