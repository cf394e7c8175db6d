// One VM's handle without QEMU: its driver-state record, exit records, QMP
// event wording, and signals through pidfds to a real stand-in process.
#include "vm/vm_task.h"

#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include <fstream>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/child_process.h"
#include "../../support/temp_dir.h"
#include "host/process_watch.h"

namespace ndq {
namespace {

using ::ndq::testing::TempDir;
using ::testing::HasSubstr;

DriverStateRecord FullRecord() {
  DriverStateRecord record;
  record.state_dir = "/run/nomad-driver-qemu/0123456789abcdef";
  record.qmp_socket = record.state_dir + "/run/qmp.sock";
  record.guest_agent_socket = record.state_dir + "/run/qga.sock";
  record.supervisor_pid = 4242;
  record.supervisor_start_ticks = 987654321;
  record.qemu_pid = 4243;
  record.qemu_start_ticks = 987654322;
  record.graceful_shutdown = true;
  record.guest_agent = true;
  record.cached_images = {"/var/cache/nomad-driver-qemu/images/sha256-ab", "/var/cache/nomad-driver-qemu/images/sha256-cd"};
  record.cgroup.version = CgroupVersion::kV2;
  record.cgroup.dirs = {{"memory", "/sys/fs/cgroup/nomad/x"}, {"cpu", "/sys/fs/cgroup/nomad/x"}};
  record.cgroup.created = {"/sys/fs/cgroup/nomad/x"};
  record.memory_limit_bytes = 512 << 20;
  record.started_at = absl::FromUnixSeconds(1790000000);
  record.tap_name = "ndq0123456789ab";
  record.network = AdvertisedNetwork{"10.213.0.57", {{"http", 80}, {"ssh", 22}}, true};
  return record;
}

TEST(DriverStateRecord, EveryFieldSurvivesTheRoundTripThroughNomad) {
  const DriverStateRecord record = FullRecord();
  absl::StatusOr<DriverStateRecord> back = DriverStateRecord::Decode(record.Encode());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->state_dir, record.state_dir);
  EXPECT_EQ(back->qmp_socket, record.qmp_socket);
  EXPECT_EQ(back->guest_agent_socket, record.guest_agent_socket);
  EXPECT_EQ(back->supervisor_pid, record.supervisor_pid);
  EXPECT_EQ(back->supervisor_start_ticks, record.supervisor_start_ticks);
  EXPECT_EQ(back->qemu_pid, record.qemu_pid);
  EXPECT_EQ(back->qemu_start_ticks, record.qemu_start_ticks);
  EXPECT_EQ(back->graceful_shutdown, record.graceful_shutdown);
  EXPECT_EQ(back->guest_agent, record.guest_agent);
  EXPECT_EQ(back->cached_images, record.cached_images);
  EXPECT_EQ(back->cgroup.version, record.cgroup.version);
  EXPECT_EQ(back->cgroup.dirs, record.cgroup.dirs);
  EXPECT_EQ(back->cgroup.created, record.cgroup.created);
  EXPECT_EQ(back->memory_limit_bytes, record.memory_limit_bytes);
  EXPECT_EQ(back->started_at, record.started_at);
  EXPECT_EQ(back->tap_name, record.tap_name);
  EXPECT_EQ(back->network, record.network);
}

// Nomad hands back whatever it stored; a damaged record is an error, never a crash.
TEST(DriverStateRecord, DamagedRecordsAreRefused) {
  const std::string good = FullRecord().Encode();
  for (const std::string& bad : {std::string(""), std::string("not json"), std::string("[]"), std::string("{}"),
                                 good.substr(0, good.size() / 2), std::string("{\"version\": 99}"),
                                 std::string("\xff\xfe\x00", 3)}) {
    absl::StatusOr<DriverStateRecord> decoded = DriverStateRecord::Decode(bad);
    EXPECT_FALSE(decoded.ok()) << bad;
  }
}

TEST(LoadExitResult, NoRecordIsAnErrorNamingTheStateDir) {
  TempDir dir;
  const ExitResult result = LoadExitResult(dir.path());
  EXPECT_FALSE(result.error.empty());
}

QmpEvent Event(const std::string& name, nlohmann::json data = nlohmann::json::object()) {
  QmpEvent event;
  event.name = name;
  event.data = std::move(data);
  return event;
}

TEST(DescribeQmpEvent, GuestAndHostShutdownsReadDifferently) {
  auto guest = DescribeQmpEvent(Event("SHUTDOWN", {{"guest", true}, {"reason", "guest-shutdown"}}));
  ASSERT_TRUE(guest.has_value());
  EXPECT_THAT(guest->message, HasSubstr("Guest powered off"));
  EXPECT_EQ(guest->annotations.at("qmp_event"), "SHUTDOWN");
  auto host = DescribeQmpEvent(Event("SHUTDOWN", {{"guest", false}, {"reason", "host-signal"}}));
  ASSERT_TRUE(host.has_value());
  EXPECT_THAT(host->message, HasSubstr("at the host's request"));
}

TEST(DescribeQmpEvent, OnlyEventsAnOperatorCaresAboutAreRelayed) {
  EXPECT_TRUE(DescribeQmpEvent(Event("RESET", {{"guest", true}, {"reason", "guest-reset"}})).has_value());
  EXPECT_TRUE(DescribeQmpEvent(Event("STOP")).has_value());
  EXPECT_TRUE(DescribeQmpEvent(Event("RESUME")).has_value());
  EXPECT_TRUE(DescribeQmpEvent(Event("GUEST_PANICKED", {{"action", "poweroff"}})).has_value());
  EXPECT_FALSE(DescribeQmpEvent(Event("POWERDOWN")).has_value()) << "the driver reports its own button presses";
  EXPECT_FALSE(DescribeQmpEvent(Event("RTC_CHANGE", {{"offset", 1}})).has_value());
  EXPECT_FALSE(DescribeQmpEvent(Event("")).has_value());
}

// A VmTask whose "QEMU" and "supervisor" are real idle processes.
class VmTaskTest : public ::testing::Test {
 protected:
  std::unique_ptr<VmTask> Make(bool with_processes) {
    DriverStateRecord record = FullRecord();
    record.state_dir = dir_.path();
    UniqueFd supervisor_fd, qemu_fd;
    if (with_processes) {
      record.supervisor_pid = supervisor_.pid();
      record.qemu_pid = qemu_.pid();
      supervisor_fd.reset(*OpenVerifiedPidfd(supervisor_.pid(), 0));
      qemu_fd.reset(*OpenVerifiedPidfd(qemu_.pid(), 0));
    }
    return std::make_unique<VmTask>(TaskIdentity{"alloc/web/1", "web", "alloc"}, record, std::move(supervisor_fd), std::move(qemu_fd), nullptr);
  }
  TempDir dir_;
  testing::ChildProcess supervisor_{{"/bin/sleep", "60"}};
  testing::ChildProcess qemu_{{"/bin/sleep", "60"}};
};

TEST_F(VmTaskTest, SignalReachesQemusProcessThroughItsPidfd) {
  auto vm = Make(true);
  EXPECT_EQ(vm->id(), "alloc/web/1");
  ASSERT_TRUE(vm->Signal(SIGTERM).ok());
  const int status = qemu_.Wait();
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM);
  EXPECT_TRUE(::kill(supervisor_.pid(), 0) == 0) << "only QEMU was signalled";
}

TEST_F(VmTaskTest, WithoutAProcessThereIsNothingToSignalOrPause) {
  auto vm = Make(false);
  EXPECT_EQ(vm->Signal(SIGTERM).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_FALSE(vm->Pause().ok()) << "no QMP session and no QEMU to reach";
}

TEST_F(VmTaskTest, TheExitWakesEveryWaiterAndEndsSignalling) {
  auto vm = Make(true);
  EXPECT_FALSE(vm->WaitFor(absl::Milliseconds(10)).has_value());
  std::optional<ExitResult> seen;
  std::thread waiter([&] { seen = vm->WaitFor(absl::Seconds(30)); });
  ExitResult result;
  result.exit_code = 3;
  vm->MarkExited(result);
  waiter.join();
  ASSERT_TRUE(seen.has_value());
  EXPECT_EQ(seen->exit_code, 3);
  EXPECT_EQ(vm->result()->exit_code, 3);
  const absl::Status late = vm->Signal(SIGTERM);
  EXPECT_EQ(late.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(late.message(), HasSubstr("already exited"));
  EXPECT_TRUE(::kill(qemu_.pid(), 0) == 0) << "an exited task's pid is never signalled";
}

}  // namespace
}  // namespace ndq
