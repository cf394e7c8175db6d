// The TaskEvents stream end to end: the real plugin launched as Nomad launches
// it, real QEMU under TCG booting the test guest, and what an operator sees in
// the task's events: start, QEMU's own events (reset, pause, resume, power
// off, panic), stop and escalation, exit, in the order they happened.
#include <signal.h>

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../support/event_recorder.h"
#include "../support/guest_task.h"
#include "../support/plugin_harness.h"
#include "../support/temp_dir.h"
#include "../support/test_guest.h"
#include "absl/strings/match.h"
#include "host/process_watch.h"
#include "qemu/guest_agent_client.h"
#include "qemu/qmp_client.h"
#include "vm/vm_task.h"

namespace ndq {
namespace {

using ::ndq::testing::AddTaskPort;
using ::ndq::testing::CheckInOrder;
using ::ndq::testing::EventRecorder;
using ::ndq::testing::FakeAlloc;
using ::ndq::testing::Guest;
using ::ndq::testing::HttpGet;
using ::ndq::testing::ProcessAlive;
using ::ndq::testing::RecordOf;
using ::ndq::testing::WaitUntil;
using ::ndq::testing::FreePort;
using ::ndq::testing::kGuestBootTimeout;
using ::ndq::testing::PluginHarness;
using ::ndq::testing::ReadFile;
using ::ndq::testing::RecordedEvent;
using ::ndq::testing::TempDir;
using ::ndq::testing::TestGuestDir;
using ::ndq::testing::WaitForFileToContain;
using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::Not;

// Events follow what they report within this; generous for a loaded 2-core machine.
constexpr absl::Duration kEventTimeout = absl::Seconds(30);

// The process state letter from /proc/PID/stat ("S", "R", "T" for stopped...).
std::string ProcessState(pid_t pid) {
  auto fields = ReadProcStat(pid);
  return fields && fields->size() > 3 ? (*fields)[3] : "";
}

int CountOf(const std::string& text, const std::string& needle) {
  int n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + needle.size())) ++n;
  return n;
}

// Fails with the task's events when they are not in this order.
#define EXPECT_EVENTS_IN_ORDER(recorder, id, ...) \
  EXPECT_EQ(CheckInOrder((recorder).Messages(id), __VA_ARGS__), "")

class TaskEventsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(TestGuestDir().ok()) << TestGuestDir().status();
    plugin_config_["image_paths"].push_back(*TestGuestDir());
    state_dir_ = state_.path() + "/s";
    harness_ = std::make_unique<PluginHarness>(state_dir_, plugin_config_);
  }
  void TearDown() override {
    ::ndq::testing::KillVmsUnder(state_dir_);
    harness_.reset();
  }

  // Starts `variant` with graceful shutdown and an http port; waits for boot.
  driverpb::TaskHandle StartGuest(FakeAlloc& alloc, const std::string& variant, int http_port,
                                  nlohmann::json extra = nlohmann::json::object()) {
    return ::ndq::testing::StartTestGuest(*harness_, alloc, Guest(variant), http_port, extra);
  }

  driverpb::TaskState StateOf(const std::string& id) {
    driverpb::InspectTaskResponse inspect;
    const grpc::Status status = harness_->Inspect(id, &inspect);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return inspect.task().state();
  }

  TempDir state_;
  std::string state_dir_;
  nlohmann::json plugin_config_ = {{"image_paths", nlohmann::json::array()}};
  std::unique_ptr<PluginHarness> harness_;
};

TEST_F(TaskEventsTest, GracefulStopIsReportedInOrder) {
  EventRecorder events(harness_->client());
  FakeAlloc alloc("web");
  const driverpb::TaskHandle handle = StartGuest(alloc, "guest.qcow2", FreePort());
  const std::string id = handle.config().id();
  ASSERT_TRUE(harness_->Stop(id, absl::Seconds(20)).ok());
  ASSERT_TRUE(events.WaitFor(id, "VM powered off", kEventTimeout)) << events.All();

  EXPECT_EVENTS_IN_ORDER(events, id,
                         {absl::StrCat("Started QEMU (pid ", RecordOf(handle).qemu_pid, ")"),
                          "Sent ACPI powerdown", "Guest powered off (reason: guest-shutdown)", "VM powered off"});
  const std::vector<std::string> messages = events.Messages(id);
  EXPECT_EQ(messages.back(), "VM powered off") << "the exit comes last";
  EXPECT_THAT(messages, Not(Contains(HasSubstr("did not power off"))));

  // QEMU's events carry what QEMU said as annotations.
  bool annotated = false;
  for (const RecordedEvent& e : events.Events()) {
    if (e.task_id == id && absl::StartsWith(e.message, "Guest powered off")) {
      EXPECT_EQ(e.annotations.at("qmp_event"), "SHUTDOWN");
      EXPECT_EQ(e.annotations.at("guest"), "true");
      EXPECT_EQ(e.annotations.at("reason"), "guest-shutdown");
      annotated = true;
    }
  }
  EXPECT_TRUE(annotated);
}

TEST_F(TaskEventsTest, EscalationIsReportedInOrder) {
  EventRecorder events(harness_->client());
  FakeAlloc alloc("stubborn");
  const driverpb::TaskHandle handle = StartGuest(alloc, "guest-noacpi.qcow2", FreePort());
  const std::string id = handle.config().id();
  ASSERT_TRUE(harness_->Stop(id, absl::Seconds(2)).ok());
  driverpb::WaitTaskResponse wait;
  ASSERT_TRUE(harness_->Wait(id, &wait, absl::Seconds(10)).ok());
  EXPECT_EQ(wait.result().exit_code(), 0) << "QEMU exits 0 on SIGTERM: " << wait.err();
  ASSERT_TRUE(events.WaitFor(id, "VM powered off", kEventTimeout)) << events.All();

  EXPECT_EVENTS_IN_ORDER(events, id,
                         {"Started QEMU (pid ", "Sent ACPI powerdown", "Guest did not power off within 2s; sending SIGTERM",
                          "QEMU is shutting the VM down at the host's request (reason: host-signal)",
                          "VM powered off"});
  EXPECT_EQ(events.Messages(id).back(), "VM powered off");
  EXPECT_THAT(events.Messages(id), Not(Contains(HasSubstr("Guest powered off"))));
}

TEST_F(TaskEventsTest, SigtstpPausesTheVmAndSigcontResumesIt) {
  EventRecorder events(harness_->client());
  FakeAlloc alloc("pausable");
  const int port = FreePort();
  const driverpb::TaskHandle handle = StartGuest(alloc, "guest.qcow2", port);
  const std::string id = handle.config().id();
  const pid_t qemu_pid = RecordOf(handle).qemu_pid;
  ASSERT_THAT(HttpGet(port), HasSubstr("test guest"));

  // SIGTSTP pauses the vCPUs through QMP; QEMU's process keeps running.
  ASSERT_TRUE(harness_->Signal(id, "SIGTSTP").ok());
  ASSERT_TRUE(events.WaitFor(id, "VM paused", kEventTimeout)) << events.All();
  EXPECT_EQ(StateOf(id), driverpb::RUNNING);
  EXPECT_NE(ProcessState(qemu_pid), "T") << "QEMU itself must not be stopped";
  EXPECT_EQ(HttpGet(port, /*max_seconds=*/2), "") << "a paused guest cannot answer";

  ASSERT_TRUE(harness_->Signal(id, "SIGCONT").ok());
  ASSERT_TRUE(events.WaitFor(id, "VM resumed", kEventTimeout)) << events.All();
  EXPECT_TRUE(WaitUntil([&] { return HttpGet(port).find("test guest") != std::string::npos; }, absl::Seconds(30)))
      << "the guest serves again after resuming";
  EXPECT_EVENTS_IN_ORDER(events, id, {"Started QEMU", "VM paused", "VM resumed"});

  // SIGSTOP still stops QEMU's process; SIGCONT brings it back as well.
  ASSERT_TRUE(harness_->Signal(id, "SIGSTOP").ok());
  ASSERT_TRUE(WaitUntil([&] { return ProcessState(qemu_pid) == "T"; }, absl::Seconds(10)));
  ASSERT_TRUE(harness_->Signal(id, "SIGCONT").ok());
  EXPECT_TRUE(WaitUntil([&] { return ProcessState(qemu_pid) != "T"; }, absl::Seconds(10)));
  EXPECT_TRUE(WaitUntil([&] { return HttpGet(port).find("test guest") != std::string::npos; }, absl::Seconds(30)));

  // A paused VM is resumed before a graceful stop, so the guest powers off.
  ASSERT_TRUE(harness_->Signal(id, "SIGTSTP").ok());
  ASSERT_TRUE(events.WaitForCount(id, "VM paused", 2, kEventTimeout)) << events.All();
  ASSERT_TRUE(harness_->Stop(id, absl::Seconds(20)).ok());
  driverpb::WaitTaskResponse wait;
  ASSERT_TRUE(harness_->Wait(id, &wait, absl::Seconds(10)).ok());
  EXPECT_EQ(wait.result().exit_code(), 0) << wait.err();
  ASSERT_TRUE(events.WaitFor(id, "VM powered off", kEventTimeout)) << events.All();
  EXPECT_EVENTS_IN_ORDER(events, id,
                         {"VM paused", "VM resumed", "VM paused", "VM resumed", "Sent ACPI powerdown",
                          "Guest powered off", "VM powered off"});
  EXPECT_THAT(events.Messages(id), Not(Contains(HasSubstr("did not power off"))));
}

TEST_F(TaskEventsTest, GuestRebootIsReportedAndTheVmKeepsRunning) {
  EventRecorder events(harness_->client());
  FakeAlloc alloc("rebooter");
  const int port = FreePort();
  const driverpb::TaskHandle handle = StartGuest(
      alloc, "guest.qcow2", port, {{"args", {"-fw_cfg", "name=opt/guest/mode,string=reboot-once"}}});
  const std::string id = handle.config().id();
  ASSERT_TRUE(events.WaitFor(id, "Guest reset (guest-initiated, reason: guest-reset)", kGuestBootTimeout))
      << events.All() << "\nserial console:\n" << ReadFile(alloc.stdout_path());
  for (const RecordedEvent& e : events.Events()) {
    if (e.task_id == id && absl::StartsWith(e.message, "Guest reset")) {
      EXPECT_EQ(e.annotations.at("qmp_event"), "RESET");
      EXPECT_EQ(e.annotations.at("guest"), "true");
      EXPECT_EQ(e.annotations.at("reason"), "guest-reset");
    }
  }

  // The guest boots again and goes on serving; the task never stopped.
  ASSERT_TRUE(WaitForFileToContain(alloc.stdout_path(), "GUEST-REBOOTED", kGuestBootTimeout))
      << ReadFile(alloc.stdout_path());
  EXPECT_EQ(StateOf(id), driverpb::RUNNING);
  EXPECT_TRUE(WaitUntil([&] { return HttpGet(port).find("test guest") != std::string::npos; }, absl::Seconds(30)));
  EXPECT_EQ(CountOf(ReadFile(alloc.stdout_path()), "GUEST-READY"), 2);
  EXPECT_THAT(events.Messages(id), Not(Contains(HasSubstr("VM powered off"))));
  EXPECT_THAT(events.Messages(id), Not(Contains(HasSubstr("VM exited"))));

  ASSERT_TRUE(harness_->Stop(id, absl::Seconds(20)).ok());
  ASSERT_TRUE(events.WaitFor(id, "VM powered off", kEventTimeout)) << events.All();
  EXPECT_EVENTS_IN_ORDER(events, id,
                         {"Started QEMU", "Guest reset", "Sent ACPI powerdown", "Guest powered off", "VM powered off"});
}

TEST_F(TaskEventsTest, EverySubscriberGetsEveryEventInTheSameOrder) {
  EventRecorder first(harness_->client());
  EventRecorder second(harness_->client());
  FakeAlloc alloc("shared");
  const driverpb::TaskHandle handle = StartGuest(alloc, "guest.qcow2", FreePort());
  const std::string id = handle.config().id();
  ASSERT_TRUE(harness_->Signal(id, "SIGTSTP").ok());
  ASSERT_TRUE(harness_->Signal(id, "SIGCONT").ok());
  ASSERT_TRUE(harness_->Stop(id, absl::Seconds(20)).ok());
  ASSERT_TRUE(first.WaitFor(id, "VM powered off", kEventTimeout)) << first.All();
  ASSERT_TRUE(second.WaitFor(id, "VM powered off", kEventTimeout)) << second.All();

  const std::vector<std::string> seen = first.Messages(id);
  EXPECT_EQ(second.Messages(id), seen);
  EXPECT_EQ(CheckInOrder(seen, {"Started QEMU", "VM paused", "VM resumed", "Sent ACPI powerdown",
                                "Guest powered off", "VM powered off"}),
            "");
  // Both streams were subscribed before anything happened, so they carry the
  // same events of every task, in the same order.
  auto lines = [](const std::vector<RecordedEvent>& all) {
    std::vector<std::string> out;
    for (const RecordedEvent& e : all) out.push_back(e.task_id + ": " + e.message);
    return out;
  };
  EXPECT_EQ(lines(first.Events()), lines(second.Events()));
}

TEST_F(TaskEventsTest, GuestPanicIsReported) {
  EventRecorder events(harness_->client());
  FakeAlloc alloc("panic");
  const driverpb::TaskHandle handle = StartGuest(
      alloc, "guest-panic.qcow2", FreePort(), {{"args", {"-device", "pvpanic", "-action", "panic=exit-failure"}}});
  const std::string id = handle.config().id();
  driverpb::WaitTaskResponse wait;
  ASSERT_TRUE(harness_->Wait(id, &wait, absl::Seconds(60)).ok());
  EXPECT_EQ(wait.result().exit_code(), 1);
  ASSERT_TRUE(events.WaitFor(id, "VM exited", kEventTimeout)) << events.All();
  EXPECT_EVENTS_IN_ORDER(events, id,
                         {"Started QEMU", "Guest kernel panicked (action: poweroff)",
                          "Guest powered off (reason: guest-panic)", "VM exited: QEMU exited with code 1"});
}

TEST_F(TaskEventsTest, QemuEventsAreRelayedAgainAfterAPluginRestart) {
  FakeAlloc alloc("survivor");
  const int port = FreePort();
  const driverpb::TaskHandle handle = StartGuest(alloc, "guest.qcow2", port, {{"guest_agent", true}});
  const std::string id = handle.config().id();
  const DriverStateRecord record = RecordOf(handle);

  harness_->process().Signal(SIGKILL);
  ASSERT_TRUE(harness_->process().WaitExit(absl::Seconds(5)).ok());
  ASSERT_NO_FATAL_FAILURE(harness_->Restart());
  EventRecorder events(harness_->client());
  ASSERT_TRUE(harness_->Recover(handle).ok());
  ASSERT_TRUE(events.WaitFor(id, "Reattached to the running VM", kEventTimeout)) << events.All();
  // The relay reconnects on its own, without any request for this task.
  ASSERT_TRUE(harness_->process().WaitForStderrLine(
      [](const std::string& line) { return line.find("QMP session reopened after recovery") != std::string::npos; },
      absl::Seconds(10)));

  // The guest reboots itself (asked through its agent, not through QMP).
  {
    absl::StatusOr<std::unique_ptr<GuestAgentClient>> agent =
        GuestAgentClient::Connect(record.guest_agent_socket, absl::Seconds(30));
    ASSERT_TRUE(agent.ok()) << agent.status();
    // The agent does not answer a reboot it goes ahead with.
    (*agent)->Shutdown("reboot", absl::Seconds(2)).IgnoreError();
  }
  ASSERT_TRUE(events.WaitFor(id, "Guest reset (guest-initiated", kGuestBootTimeout)) << events.All();
  ASSERT_TRUE(WaitUntil([&] { return CountOf(ReadFile(alloc.stdout_path()), "GUEST-READY") >= 2; },
                        kGuestBootTimeout))
      << ReadFile(alloc.stdout_path());
  EXPECT_EQ(StateOf(id), driverpb::RUNNING);

  ASSERT_TRUE(harness_->Stop(id, absl::Seconds(20)).ok());
  ASSERT_TRUE(events.WaitFor(id, "VM powered off", kEventTimeout)) << events.All();
  EXPECT_EVENTS_IN_ORDER(events, id,
                         {"Reattached", "Guest reset", "Asked the guest agent to shut down", "Guest powered off",
                          "VM powered off"});
}

// The texts themselves, for every relayed QMP event and a few it skips.
TEST(DescribeQmpEventTest, TextsAndAnnotations) {
  auto describe = [](const std::string& name, nlohmann::json data) {
    QmpEvent event;
    event.name = name;
    event.data = std::move(data);
    std::optional<TaskEventText> text = DescribeQmpEvent(event);
    return text ? text->message : "(not relayed)";
  };
  EXPECT_EQ(describe("RESET", {{"guest", true}, {"reason", "guest-reset"}}),
            "Guest reset (guest-initiated, reason: guest-reset)");
  EXPECT_EQ(describe("RESET", {{"guest", false}, {"reason", "host-qmp-system-reset"}}),
            "Guest reset (host-initiated, reason: host-qmp-system-reset)");
  EXPECT_EQ(describe("RESET", nlohmann::json::object()), "Guest reset");
  EXPECT_EQ(describe("STOP", nlohmann::json::object()), "VM paused");
  EXPECT_EQ(describe("RESUME", nlohmann::json::object()), "VM resumed");
  EXPECT_EQ(describe("SHUTDOWN", {{"guest", true}, {"reason", "guest-shutdown"}}),
            "Guest powered off (reason: guest-shutdown)");
  EXPECT_EQ(describe("SHUTDOWN", {{"guest", false}, {"reason", "host-signal"}}),
            "QEMU is shutting the VM down at the host's request (reason: host-signal)");
  EXPECT_EQ(describe("SHUTDOWN", nlohmann::json::object()), "VM shut down");
  EXPECT_EQ(describe("GUEST_PANICKED", {{"action", "pause"}, {"info", {{"type", "hyper-v"}}}}),
            "Guest kernel panicked (action: pause)");
  EXPECT_EQ(describe("POWERDOWN", nlohmann::json::object()), "(not relayed)");
  EXPECT_EQ(describe("RTC_CHANGE", {{"offset", 5}}), "(not relayed)");

  QmpEvent reset;
  reset.name = "RESET";
  reset.data = {{"guest", true}, {"reason", "guest-reset"}};
  const std::map<std::string, std::string> want = {{"qmp_event", "RESET"}, {"guest", "true"}, {"reason", "guest-reset"}};
  EXPECT_EQ(DescribeQmpEvent(reset)->annotations, want);
}

}  // namespace
}  // namespace ndq
