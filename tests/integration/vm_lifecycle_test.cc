// The VM lifecycle end to end: the real plugin binary launched as Nomad
// launches it, the real supervisor, real QEMU under TCG booting the test guest.
#include <pwd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <signal.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../support/guest_task.h"
#include "../support/plugin_harness.h"
#include "../support/temp_dir.h"
#include "../support/test_guest.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "host/process_watch.h"
#include "qemu_driver/supervisor_protocol.h"
#include "vm/vm_task.h"

namespace ndq {
namespace {

using ::ndq::testing::AddGroupPort;
using ::ndq::testing::AddTaskPort;
using ::ndq::testing::FakeAlloc;
using ::ndq::testing::Guest;
using ::ndq::testing::HttpGet;
using ::ndq::testing::ProcessAlive;
using ::ndq::testing::RecordOf;
using ::ndq::testing::WaitUntil;
using ::ndq::testing::FreePort;
using ::ndq::testing::kGuestBootTimeout;
using ::ndq::testing::PluginHarness;
using ::ndq::testing::ProcessesMentioning;
using ::ndq::testing::ReadFile;
using ::ndq::testing::TempDir;
using ::ndq::testing::TestGuestDir;
using ::ndq::testing::WaitForFileToContain;
using ::testing::HasSubstr;
using ::testing::Not;

class VmLifecycleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(TestGuestDir().ok()) << TestGuestDir().status();
    // Task disks are overlays on the cached guest images: their backing files
    // must be in an allowed directory.
    plugin_config_["image_paths"].push_back(*TestGuestDir());
    state_dir_ = state_.path() + "/s";
    harness_ = std::make_unique<PluginHarness>(state_dir_, plugin_config_);
  }
  void TearDown() override {
    // Whatever a test left running is killed, and nothing may survive it.
    ::ndq::testing::KillVmsUnder(state_dir_);
    harness_.reset();
  }

  // Starts `variant` with graceful shutdown and an http port; waits for boot.
  driverpb::TaskHandle StartGuest(FakeAlloc& alloc, const std::string& variant, int http_port,
                                  nlohmann::json extra = nlohmann::json::object()) {
    return ::ndq::testing::StartTestGuest(*harness_, alloc, Guest(variant), http_port, extra);
  }

  TempDir state_;
  std::string state_dir_;
  nlohmann::json plugin_config_ = {{"image_paths", nlohmann::json::array()}};
  std::unique_ptr<PluginHarness> harness_;
};

TEST_F(VmLifecycleTest, ServesThroughPortMapAndStopsGracefully) {
  FakeAlloc alloc("web");
  const int port = FreePort();
  const driverpb::TaskHandle handle = StartGuest(alloc, "guest.qcow2", port);
  const std::string id = handle.config().id();
  const DriverStateRecord record = RecordOf(handle);
  EXPECT_EQ(handle.state(), driverpb::RUNNING);
  EXPECT_TRUE(ProcessAlive(record.qemu_pid));

  // The serial console is the task's stdout; the page comes through hostfwd.
  EXPECT_THAT(ReadFile(alloc.stdout_path()), HasSubstr("GUEST-READY"));
  EXPECT_THAT(HttpGet(port), HasSubstr("nomad-driver-qemu test guest"));

  const grpc::Status stopped = harness_->Stop(id, absl::Seconds(20));
  const absl::Time stop_returned = absl::Now();
  ASSERT_TRUE(stopped.ok()) << stopped.error_message();
  driverpb::WaitTaskResponse wait;
  ASSERT_TRUE(harness_->Wait(id, &wait, absl::Seconds(5)).ok());
  EXPECT_EQ(wait.result().exit_code(), 0) << wait.err();
  EXPECT_EQ(wait.result().signal(), 0);
  EXPECT_EQ(wait.err(), "");

  // Stop returns within 1 s of the guest powering off.
  std::string problem;
  auto exit = supervisor::ReadExitRecord(record.state_dir, &problem);
  ASSERT_TRUE(exit.has_value()) << problem;
  EXPECT_LT(stop_returned - absl::FromUnixMillis(exit->exited_at_ms), absl::Seconds(1));

  driverpb::InspectTaskResponse inspect;
  ASSERT_TRUE(harness_->Inspect(id, &inspect).ok());
  EXPECT_EQ(inspect.task().state(), driverpb::EXITED);

  EXPECT_TRUE(harness_->Stop(id, absl::Seconds(5)).ok()) << "StopTask is idempotent";
  ASSERT_TRUE(harness_->Destroy(id, false).ok());
  EXPECT_FALSE(std::filesystem::exists(record.state_dir));
  EXPECT_FALSE(ProcessAlive(record.qemu_pid));
  EXPECT_FALSE(ProcessAlive(record.supervisor_pid));
}

TEST_F(VmLifecycleTest, GracefulStopGoesThroughTheGuestAgentWhenEnabled) {
  FakeAlloc alloc("agent");
  const driverpb::TaskHandle handle = StartGuest(alloc, "guest.qcow2", FreePort(), {{"guest_agent", true}});
  ASSERT_FALSE(RecordOf(handle).guest_agent_socket.empty());
  ASSERT_TRUE(harness_->Stop(handle.config().id(), absl::Seconds(20)).ok());
  driverpb::WaitTaskResponse wait;
  ASSERT_TRUE(harness_->Wait(handle.config().id(), &wait, absl::Seconds(5)).ok());
  EXPECT_EQ(wait.result().exit_code(), 0) << wait.err();
  EXPECT_TRUE(harness_->process().WaitForStderrLine(
      [](const std::string& line) { return line.find("guest agent asked to power off") != std::string::npos; },
      absl::Seconds(5)))
      << "the stop must have used the guest agent, not ACPI";
}

// Percent of one core used by the VM over `samples` one-second intervals
// (the last sample), and the stream's RSS; the stream ends when the VM exits.
struct StatsSeen {
  double percent = -1;
  uint64_t rss = 0;
  double total_ticks = 0;
};

StatsSeen ReadStats(PluginHarness& harness, const std::string& id, int samples) {
  auto context = harness.client().NewContext(absl::Seconds(60));
  driverpb::TaskStatsRequest request;
  request.set_task_id(id);
  request.mutable_collection_interval()->set_seconds(1);
  auto reader = harness.driver().TaskStats(context.get(), request);
  StatsSeen seen;
  driverpb::TaskStatsResponse response;
  for (int i = 0; i < samples && reader->Read(&response); ++i) {
    seen.percent = response.stats().agg_resource_usage().cpu().percent();
    seen.total_ticks = response.stats().agg_resource_usage().cpu().total_ticks();
    seen.rss = response.stats().agg_resource_usage().memory().rss();
  }
  context->TryCancel();
  reader->Finish();
  return seen;
}

// CPU time the kernel has charged to a process (user + system), in seconds.
double ProcessCpuSeconds(pid_t pid) {
  const std::string stat = ReadFile("/proc/" + std::to_string(pid) + "/stat");
  const size_t close = stat.rfind(')');
  if (close == std::string::npos) return -1;
  std::vector<std::string> fields = absl::StrSplit(stat.substr(close + 2), ' ');
  // After "pid (comm) ": state is field 3, utime 14 and stime 15.
  if (fields.size() < 13) return -1;
  double utime = 0, stime = 0;
  if (!absl::SimpleAtod(fields[11], &utime) || !absl::SimpleAtod(fields[12], &stime)) return -1;
  return (utime + stime) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

// What the stats say is checked against the kernel's own accounting over the
// same window, not against a fixed figure: on a loaded host a spinning vCPU
// gets less than a core, and the stats must say so too.
TEST_F(VmLifecycleTest, StatsShowABusyVcpuAsAboutOneCore) {
  FakeAlloc busy("busy"), idle("idle");
  const driverpb::TaskHandle busy_handle = StartGuest(busy, "guest-busy.qcow2", FreePort());
  const driverpb::TaskHandle idle_handle = StartGuest(idle, "guest.qcow2", FreePort());
  const pid_t busy_qemu = RecordOf(busy_handle).qemu_pid;
  const double cpu_before = ProcessCpuSeconds(busy_qemu);
  const absl::Time window_start = absl::Now();
  const StatsSeen hot = ReadStats(*harness_, busy_handle.config().id(), 3);
  const double kernel_percent =
      100 * (ProcessCpuSeconds(busy_qemu) - cpu_before) / absl::ToDoubleSeconds(absl::Now() - window_start);
  const StatsSeen cold = ReadStats(*harness_, idle_handle.config().id(), 3);
  ASSERT_GE(cpu_before, 0);
  EXPECT_NEAR(hot.percent, kernel_percent, 25) << "a TCG guest spinning one vCPU";
  EXPECT_GT(kernel_percent, 30) << "sanity: the busy guest does spin";
  EXPECT_LT(hot.percent, 140);
  EXPECT_GT(hot.percent, cold.percent + 15);
  EXPECT_LT(cold.percent, 40);
  EXPECT_GT(hot.total_ticks, 0);
  EXPECT_GT(hot.rss, 20u << 20);
  ASSERT_TRUE(harness_->Stop(busy_handle.config().id(), absl::Seconds(20)).ok());
  // A stream on an exited task ends at once.
  EXPECT_EQ(ReadStats(*harness_, busy_handle.config().id(), 1).percent, -1);
}

TEST_F(VmLifecycleTest, GroupNetworkPortsAreForwardedToo) {
  FakeAlloc alloc("web");
  const int port = FreePort();
  alloc.AddOverlay(Guest("guest.qcow2"));
  driverpb::TaskConfig task = alloc.Task({{"image_path", "local/disk.qcow2"},
                                          {"drive_interface", "virtio"},
                                          {"port_map", {{{"www", 80}}}}});
  AddGroupPort(&task, "www", port);
  driverpb::TaskHandle handle;
  ASSERT_TRUE(harness_->Start(task, &handle).ok());
  ASSERT_TRUE(WaitForFileToContain(alloc.stdout_path(), "GUEST-READY", kGuestBootTimeout));
  EXPECT_THAT(HttpGet(port), HasSubstr("nomad-driver-qemu test guest"));
  ASSERT_TRUE(harness_->Stop(task.id(), absl::Seconds(5)).ok());
}

TEST_F(VmLifecycleTest, GuestIgnoringAcpiIsKilledAfterTheTimeout) {
  FakeAlloc alloc("stubborn");
  const driverpb::TaskHandle handle = StartGuest(alloc, "guest-noacpi.qcow2", FreePort());
  const DriverStateRecord record = RecordOf(handle);
  const absl::Duration kill_timeout = absl::Seconds(3);
  const absl::Time start = absl::Now();
  ASSERT_TRUE(harness_->Stop(handle.config().id(), kill_timeout).ok());
  const absl::Duration took = absl::Now() - start;
  EXPECT_GE(took, kill_timeout);
  EXPECT_LT(took, kill_timeout + absl::Seconds(1));
  EXPECT_FALSE(ProcessAlive(record.qemu_pid));
  EXPECT_TRUE(WaitUntil([&] { return !ProcessAlive(record.supervisor_pid); }, absl::Seconds(5)));
  driverpb::WaitTaskResponse wait;
  ASSERT_TRUE(harness_->Wait(handle.config().id(), &wait, absl::Seconds(5)).ok());
  EXPECT_TRUE(ProcessesMentioning(state_dir_).empty());
}

TEST_F(VmLifecycleTest, VmsSurvivePluginCrashAndAreRecovered) {
  FakeAlloc a("a"), b("b"), c("c");
  const driverpb::TaskHandle ha = StartGuest(a, "guest.qcow2", FreePort());
  const driverpb::TaskHandle hb = StartGuest(b, "guest.qcow2", FreePort());
  // c powers itself off 2 s after it is ready: while the plugin is down.
  const driverpb::TaskHandle hc = StartGuest(
      c, "guest.qcow2", FreePort(), {{"args", {"-fw_cfg", "name=opt/guest/mode,string=selfoff", "-fw_cfg",
                                              "name=opt/guest/selfoff,string=2"}}});

  harness_->process().Signal(SIGKILL);
  ASSERT_TRUE(harness_->process().WaitExit(absl::Seconds(5)).ok());
  const DriverStateRecord rc = RecordOf(hc);
  ASSERT_TRUE(WaitUntil([&] { return std::filesystem::exists(rc.state_dir + "/" + supervisor::kExitFile); },
                        absl::Seconds(60)));
  EXPECT_TRUE(ProcessAlive(RecordOf(ha).qemu_pid));
  EXPECT_TRUE(ProcessAlive(RecordOf(hb).qemu_pid));

  ASSERT_NO_FATAL_FAILURE(harness_->Restart());
  for (const auto* h : {&ha, &hb, &hc}) {
    const grpc::Status status = harness_->Recover(*h);
    ASSERT_TRUE(status.ok()) << status.error_message();
  }
  driverpb::WaitTaskResponse wait;
  ASSERT_TRUE(harness_->Wait(hc.config().id(), &wait, absl::Seconds(5)).ok());
  EXPECT_EQ(wait.result().exit_code(), 0) << wait.err();

  for (const auto* h : {&ha, &hb}) {
    ASSERT_TRUE(harness_->Stop(h->config().id(), absl::Seconds(20)).ok());
    driverpb::WaitTaskResponse done;
    ASSERT_TRUE(harness_->Wait(h->config().id(), &done, absl::Seconds(5)).ok());
    EXPECT_EQ(done.result().exit_code(), 0) << done.err();
    EXPECT_FALSE(ProcessAlive(RecordOf(*h).qemu_pid));
  }
}

TEST_F(VmLifecycleTest, GuestKernelPanicIsAFailure) {
  FakeAlloc alloc("panic");
  const driverpb::TaskHandle handle = StartGuest(
      alloc, "guest-panic.qcow2", FreePort(), {{"args", {"-device", "pvpanic", "-action", "panic=exit-failure"}}});
  driverpb::WaitTaskResponse wait;
  ASSERT_TRUE(harness_->Wait(handle.config().id(), &wait, absl::Seconds(60)).ok());
  EXPECT_EQ(wait.result().exit_code(), 1);
  EXPECT_THAT(wait.err(), HasSubstr("QEMU exited with code 1"));
}

TEST_F(VmLifecycleTest, KilledQemuIsReportedWithItsSignal) {
  FakeAlloc alloc("victim");
  const driverpb::TaskHandle handle = StartGuest(alloc, "guest.qcow2", FreePort());
  ::kill(RecordOf(handle).qemu_pid, SIGKILL);
  driverpb::WaitTaskResponse wait;
  ASSERT_TRUE(harness_->Wait(handle.config().id(), &wait, absl::Seconds(10)).ok());
  EXPECT_EQ(wait.result().signal(), SIGKILL);
  EXPECT_EQ(wait.result().exit_code(), 128 + SIGKILL);
  EXPECT_THAT(wait.err(), HasSubstr("killed by SIGKILL"));
}

TEST_F(VmLifecycleTest, SigpwrPowersTheGuestOffAndDestroyNeedsForce) {
  FakeAlloc alloc("sig");
  const driverpb::TaskHandle handle = StartGuest(alloc, "guest.qcow2", FreePort());
  const std::string id = handle.config().id();
  const grpc::Status refused = harness_->Destroy(id, false);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(refused.error_message(), HasSubstr("still running"));

  ASSERT_TRUE(harness_->Signal(id, "SIGPWR").ok());
  driverpb::WaitTaskResponse wait;
  ASSERT_TRUE(harness_->Wait(id, &wait, absl::Seconds(20)).ok());
  EXPECT_EQ(wait.result().exit_code(), 0);
  EXPECT_EQ(harness_->Signal(id, "SIGTERM").error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  ASSERT_TRUE(harness_->Destroy(id, false).ok());
}

// A force destroy kills at once: no powerdown first, not even for a VM that
// asks for a graceful shutdown through a guest agent that never answers (the
// agent alone would take its 2 s connect timeout).
TEST_F(VmLifecycleTest, ForcedDestroyKillsARunningVm) {
  FakeAlloc alloc("forced");
  const driverpb::TaskHandle handle = StartGuest(alloc, "guest-noacpi.qcow2", FreePort(),
                                                 {{"graceful_shutdown", true}, {"guest_agent", true}});
  const DriverStateRecord record = RecordOf(handle);
  const absl::Time start = absl::Now();
  ASSERT_TRUE(harness_->Destroy(handle.config().id(), true).ok());
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  EXPECT_FALSE(ProcessAlive(record.qemu_pid));
  EXPECT_FALSE(std::filesystem::exists(record.state_dir));
}

// Every bad input is refused with an error that names the problem, and leaves
// no process, socket or state directory behind.
class BadInputTest : public VmLifecycleTest {
 protected:
  void SetUp() override {
    plugin_config_ = {{"image_paths", {allowed_.path()}}};
    VmLifecycleTest::SetUp();
    alloc_.AddOverlay(Guest("guest.qcow2"));
  }

  void ExpectRefused(const driverpb::TaskConfig& task, const std::string& message) {
    const grpc::Status status = harness_->Start(task, nullptr);
    EXPECT_FALSE(status.ok());
    EXPECT_THAT(status.error_message(), HasSubstr(message));
    EXPECT_TRUE(ProcessesMentioning(state_dir_).empty());
    EXPECT_THAT(::ndq::testing::VmStateLeft(state_dir_), ::testing::IsEmpty()) << "state left behind in " << state_dir_;
    EXPECT_THAT(::ndq::testing::CgroupsUnder(harness_->cgroup_parent()), ::testing::IsEmpty()) << "cgroups left behind";
  }

  nlohmann::json Config(nlohmann::json extra = nlohmann::json::object()) {
    nlohmann::json config = {{"image_path", "local/disk.qcow2"}};
    for (const auto& [k, v] : extra.items()) config[k] = v;
    return config;
  }

  TempDir allowed_;
  FakeAlloc alloc_{"bad"};
};

TEST_F(BadInputTest, MissingImage) {
  ExpectRefused(alloc_.Task(Config({{"image_path", "local/nope.qcow2"}})), "is not an existing file inside");
}

TEST_F(BadInputTest, ImageOutsideTheAllowedPaths) {
  TempDir elsewhere;
  const std::string image = elsewhere / "x.qcow2";
  std::filesystem::copy_file(Guest("guest.qcow2"), image);
  ExpectRefused(alloc_.Task(Config({{"image_path", image}})), "image_path");
}

TEST_F(BadInputTest, SymlinkEscape) {
  std::filesystem::create_symlink("/etc/shadow", alloc_.task_dir() + "/local/evil.img");
  ExpectRefused(alloc_.Task(Config({{"image_path", "local/evil.img"}})), "\"local/evil.img\"");
  // The answer names the job's own path, never where the link leads.
  const grpc::Status status = harness_->Start(alloc_.Task(Config({{"image_path", "local/evil.img"}})), nullptr);
  EXPECT_THAT(status.error_message(), Not(HasSubstr("shadow")));
}

TEST_F(BadInputTest, BackingFileOutsideTheAllowedPaths) {
  // A disk in the task dir whose backing file is a host file: reading the
  // guest's disk would read that file.
  const std::string evil = alloc_.task_dir() + "/local/evil.qcow2";
  auto out = RunCommand({"/usr/bin/qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "/etc/shadow",
                         evil, "1M"},
                        absl::Seconds(30));
  ASSERT_TRUE(out.ok() && out->exit_code == 0);
  ExpectRefused(alloc_.Task(Config({{"image_path", "local/evil.qcow2"}})), "its backing file \"/etc/shadow\" is refused");
}

TEST_F(BadInputTest, DotDotEscape) {
  ExpectRefused(alloc_.Task(Config({{"image_path", "../../../../../../etc/passwd"}})), "image_path");
}

TEST_F(BadInputTest, DisallowedArgument) {
  plugin_config_["args_allowlist"] = {"-smp"};
  ASSERT_NO_FATAL_FAILURE(harness_ = std::make_unique<PluginHarness>(state_dir_, plugin_config_));
  ExpectRefused(alloc_.Task(Config({{"args", {"-smp", "1", "-device", "e1000"}}})), "-device");
}

TEST_F(BadInputTest, DisallowedEmulator) {
  plugin_config_["emulators_allowlist"] = {"aarch64"};
  ASSERT_NO_FATAL_FAILURE(harness_ = std::make_unique<PluginHarness>(state_dir_, plugin_config_));
  ExpectRefused(alloc_.Task(Config()), "x86_64");
}

TEST_F(BadInputTest, UnknownPortLabel) {
  driverpb::TaskConfig task = alloc_.Task(Config({{"port_map", {{{"http", 80}}}}}));
  AddTaskPort(&task, "ssh", FreePort());
  ExpectRefused(task, "http");
}

TEST_F(BadInputTest, MemoryTooSmall) {
  ExpectRefused(alloc_.Task(Config(), /*memory_mb=*/64), "memory");
}

TEST_F(BadInputTest, ZeroOrNegativeCpus) {
  ExpectRefused(alloc_.Task(Config({{"cpus", 0}})), "task config \"cpus\": 0 is out of range");
  ExpectRefused(alloc_.Task(Config({{"cpus", -2}})), "task config \"cpus\": -2 is out of range");
}

TEST_F(BadInputTest, MalformedInstanceType) {
  ExpectRefused(alloc_.Task(Config({{"instance_type", "large"}})), "is not of the form c<cpus>m<memory MB>");
  ExpectRefused(alloc_.Task(Config({{"instance_type", "c2m4096"}}), /*memory_mb=*/1024),
                "at most the task's reserved memory (1024 MB)");
}

TEST_F(BadInputTest, UnsupportedDriveInterface) {
  ExpectRefused(alloc_.Task(Config({{"drive_interface", "nvme"}})), "drive_interface");
}

TEST_F(BadInputTest, QemuRefusingItsArguments) {
  ExpectRefused(alloc_.Task(Config({{"args", {"-no-such-option"}}})), "-no-such-option");
}

TEST_F(BadInputTest, DuplicateTaskId) {
  const driverpb::TaskConfig task = alloc_.Task(Config({{"drive_interface", "virtio"}}));
  ASSERT_TRUE(harness_->Start(task, nullptr).ok());
  const grpc::Status again = harness_->Start(task, nullptr);
  EXPECT_FALSE(again.ok());
  EXPECT_THAT(again.error_message(), HasSubstr("already started"));
  ASSERT_TRUE(harness_->Stop(task.id(), absl::Seconds(1)).ok());
  ASSERT_TRUE(harness_->Destroy(task.id(), false).ok());
}

}  // namespace
}  // namespace ndq

namespace ndq {
namespace {

// QEMU as an unprivileged qemu_user, under its seccomp sandbox: it boots from
// an image in a directory its user cannot read (the driver passes it the open
// files), serves through port_map and stops gracefully.
class LeastPrivilegeTest : public VmLifecycleTest {
 protected:
  static constexpr char kUser[] = "ndq-qemu-test";
  void SetUp() override {
    if (::getpwnam(kUser) == nullptr) {
      auto added = RunCommand({"/usr/sbin/useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", kUser},
                              absl::Seconds(30));
      ASSERT_TRUE(added.ok() && added->exit_code == 0) << (added.ok() ? added->output : "");
    }
    ASSERT_TRUE(TestGuestDir().ok());
    ::chmod(images_.path().c_str(), 0700);  // root's alone
    std::filesystem::copy_file(Guest("guest.qcow2"), images_.path() + "/guest.qcow2");
    plugin_config_ = {{"image_paths", {images_.path()}}, {"qemu_user", kUser}};
    // As /run is: QEMU's user may pass through to its run/ directory.
    ::chmod(state_.path().c_str(), 0711);
    state_dir_ = state_.path() + "/s";
    harness_ = std::make_unique<PluginHarness>(state_dir_, plugin_config_);
  }
  TempDir images_;
};

TEST_F(LeastPrivilegeTest, QemuRunsAsQemuUserSandboxedWithoutReadingTheImageDirectory) {
  FakeAlloc alloc("least");
  // As Nomad's alloc dirs are: others may pass through (QEMU's user reaches
  // its console sockets in the task dir); local/, with the overlay, stays root's.
  ::chmod(alloc.alloc_dir().c_str(), 0711);
  ::chmod((alloc.task_dir() + "/local").c_str(), 0700);
  const int port = FreePort();
  const driverpb::TaskHandle handle = ::ndq::testing::StartTestGuest(
      *harness_, alloc, images_.path() + "/guest.qcow2", port, {{"console", true}});
  const DriverStateRecord record = RecordOf(handle);
  ASSERT_GT(record.qemu_pid, 0);
  const std::string status = ReadFile("/proc/" + std::to_string(record.qemu_pid) + "/status");
  const passwd* user = ::getpwnam(kUser);
  ASSERT_NE(user, nullptr);
  EXPECT_THAT(status, HasSubstr("Uid:\t" + std::to_string(user->pw_uid) + "\t"));
  EXPECT_THAT(status, HasSubstr("Seccomp:\t2"));
  EXPECT_THAT(ReadFile("/proc/" + std::to_string(record.qemu_pid) + "/cmdline"), Not(HasSubstr("guest.qcow2")));
  // Its user cannot read the image, nor the overlay in the task dir.
  for (const std::string& path : {images_.path() + "/guest.qcow2", alloc.task_dir() + "/local/disk.qcow2"}) {
    auto readable = RunCommand({"/usr/sbin/runuser", "-u", kUser, "--", "/usr/bin/test", "-r", path}, absl::Seconds(30));
    ASSERT_TRUE(readable.ok());
    EXPECT_NE(readable->exit_code, 0) << kUser << " can read " << path;
  }
  // The state directory is root's; only run/ (its sockets) is QEMU's.
  struct stat st;
  ASSERT_EQ(::stat(record.state_dir.c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, 0u);
  ASSERT_EQ(::stat((record.state_dir + "/run").c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, user->pw_uid);
  EXPECT_THAT(::ndq::testing::HttpGet(port), HasSubstr("test guest"));
  // The console: QEMU's user made its sockets in the task dir's console/
  // (which is that user's, 0700), and wrote the screendump the plugin copied
  // into alloc/logs (root's).
  for (const char* socket : {"/console/serial.sock", "/console/vnc.sock"}) {
    ASSERT_EQ(::lstat((alloc.task_dir() + socket).c_str(), &st), 0) << socket;
    EXPECT_TRUE(S_ISSOCK(st.st_mode));
    EXPECT_EQ(st.st_uid, user->pw_uid);
  }
  ASSERT_EQ(::stat((alloc.task_dir() + "/console").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  ASSERT_TRUE(harness_->Signal(handle.config().id(), "SIGUSR2").ok());
  bool screenshot = false;
  for (const auto& entry : std::filesystem::directory_iterator(alloc.alloc_dir() + "/alloc/logs")) {
    if (entry.path().filename().string().rfind("least.screenshot.", 0) == 0) {
      screenshot = ReadFile(entry.path()).rfind("\x89PNG", 0) == 0;
      ASSERT_EQ(::stat(entry.path().c_str(), &st), 0);
      EXPECT_EQ(st.st_uid, 0u);
    }
  }
  EXPECT_TRUE(screenshot);
  ASSERT_TRUE(harness_->Stop(handle.config().id(), absl::Seconds(30)).ok());
  EXPECT_FALSE(std::filesystem::exists(alloc.task_dir() + "/console"));
  driverpb::WaitTaskResponse wait;
  ASSERT_TRUE(harness_->Wait(handle.config().id(), &wait, absl::Seconds(30)).ok());
  EXPECT_EQ(wait.result().exit_code(), 0);
  EXPECT_EQ(wait.result().signal(), 0) << "powered off by the guest, not killed";
  ASSERT_TRUE(harness_->Destroy(handle.config().id(), false).ok());
}

// A unix socket another daemon serves; counts who connects to it.
class ForeignSocket {
 public:
  explicit ForeignSocket(const std::string& path) : path_(path) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
    EXPECT_EQ(::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    EXPECT_EQ(::listen(fd_, 16), 0);
  }
  ~ForeignSocket() { ::close(fd_); }
  // Connections made to it so far.
  int Connections() {
    int total = 0;
    for (int conn; (conn = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC)) >= 0;) {
      ++total;
      ::close(conn);
    }
    return total;
  }

 private:
  std::string path_;
  int fd_ = -1;
};

// QEMU's user may write in one place only: the run/ directory with its
// sockets. Everything it plants there (links to a host file, a link from the
// QMP socket's name to another daemon's socket) changes nothing outside,
// through a start, a plugin restart with recovery, a stop and a destroy.
TEST_F(LeastPrivilegeTest, LinksPlantedByQemusUserChangeNothingOutside) {
  TempDir outside;
  const std::string victim = outside.path() + "/victim";
  std::ofstream(victim) << "original\n";
  ::chmod(victim.c_str(), 0644);
  ::chmod(outside.path().c_str(), 0755);  // reachable for QEMU's user, as any daemon's socket directory
  ForeignSocket daemon(outside.path() + "/daemon.sock");
  FakeAlloc alloc("planted");
  alloc.AddOverlay(images_.path() + "/guest.qcow2");
  driverpb::TaskConfig task = alloc.Task(
      {{"image_path", "local/disk.qcow2"}, {"graceful_shutdown", true}, {"guest_agent", true}});
  driverpb::TaskHandle handle;
  ASSERT_TRUE(harness_->Start(task, &handle).ok());
  const DriverStateRecord record = RecordOf(handle);
  const std::string run = record.state_dir + "/run";
  auto as_user = [&](const std::string& script) {
    auto ran = RunCommand({"/usr/sbin/runuser", "-u", kUser, "--", "/bin/sh", "-c", script}, absl::Seconds(30));
    EXPECT_TRUE(ran.ok());
    return ran.ok() ? ran->exit_code : -1;
  };
  // The state directory itself is not the user's to write.
  EXPECT_NE(as_user("ln -s '" + victim + "' '" + record.state_dir + "/supervisor.log.new'"), 0);
  // In run/: every name root might use, and the QMP socket swapped for a link.
  const std::string daemon_path = outside.path() + "/daemon.sock";
  std::string plant = "cd '" + run + "' && rm -f qmp.sock qga.sock && ln -s '" + daemon_path + "' qmp.sock && ln -s '" +
                      daemon_path + "' qga.sock";
  for (const char* name : {"supervisor.log", "exit.json", "pid", "driver-state.json", "x.tmp", "serial.log"}) {
    plant += std::string(" && ln -sf '") + victim + "' " + name;
  }
  ASSERT_EQ(as_user(plant), 0);

  ASSERT_NO_FATAL_FAILURE(harness_->Restart());
  ASSERT_TRUE(harness_->Recover(handle).ok());
  // The powerdown cannot go through QMP now; the stop escalates to a kill.
  ASSERT_TRUE(harness_->Stop(handle.config().id(), absl::Seconds(2)).ok());
  driverpb::WaitTaskResponse wait;
  ASSERT_TRUE(harness_->Wait(handle.config().id(), &wait, absl::Seconds(30)).ok());
  ASSERT_TRUE(harness_->Destroy(handle.config().id(), true).ok());

  EXPECT_EQ(ReadFile(victim), "original\n");
  struct stat st;
  ASSERT_EQ(::lstat(victim.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0644u);
  EXPECT_EQ(st.st_uid, 0u);
  EXPECT_EQ(daemon.Connections(), 0) << "the plugin connected to a socket QEMU does not serve";
  EXPECT_FALSE(ProcessAlive(record.qemu_pid));
}

}  // namespace
}  // namespace ndq
