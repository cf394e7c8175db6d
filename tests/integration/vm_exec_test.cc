// `nomad alloc exec` into a VM end to end: the real plugin over gRPC, its
// supervisor, QEMU (TCG) and the test guest running the real qemu-ga from
// Debian's qemu-guest-agent (guest-qga.qcow2). ExecTask and
// ExecTaskStreaming are called the way Nomad's client calls them.
#include <filesystem>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../support/guest_task.h"
#include "../support/plugin_harness.h"
#include "../support/temp_dir.h"
#include "../support/test_guest.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace ndq {
namespace {

using ::ndq::testing::FakeAlloc;
using ::ndq::testing::FreePort;
using ::ndq::testing::Guest;
using ::ndq::testing::PluginHarness;
using ::ndq::testing::StartTestGuest;
using ::ndq::testing::TempDir;
using ::ndq::testing::TestGuestDir;
using ::ndq::testing::WaitUntil;
using ::ndq::testing::ExecOnce;
using ::ndq::testing::ExecOutcome;
using ::testing::HasSubstr;
using json = nlohmann::json;



// A streamed exec as Nomad's client runs it: setup, stdin frames (closed
// unless `keep_stdin_open`), then frames until the exit, then the stream
// ends. `beside`, when set, runs on a thread of its own during the call and
// may cancel it.
ExecOutcome ExecStreamed(PluginHarness& harness, const std::string& id, const std::vector<std::string>& argv,
                         const std::vector<std::string>& stdin_frames = {}, bool keep_stdin_open = false,
                         const std::function<void(grpc::ClientContext*)>& beside = nullptr) {
  auto context = harness.client().NewContext(absl::Seconds(120));
  auto stream = harness.driver().ExecTaskStreaming(context.get());
  driverpb::ExecTaskStreamingRequest frame;
  frame.mutable_setup()->set_task_id(id);
  for (const std::string& arg : argv) frame.mutable_setup()->add_command(arg);
  stream->Write(frame);
  for (const std::string& data : stdin_frames) {
    frame.Clear();
    frame.mutable_stdin()->set_data(data);
    stream->Write(frame);
  }
  if (!keep_stdin_open) {
    frame.Clear();
    frame.mutable_stdin()->set_close(true);
    stream->Write(frame);
  }
  std::thread canceller;
  if (beside) canceller = std::thread([&] { beside(context.get()); });
  ExecOutcome outcome;
  driverpb::ExecTaskStreamingResponse reply;
  while (stream->Read(&reply)) {
    ++outcome.frames;
    outcome.out += reply.stdout().data();
    outcome.err += reply.stderr().data();
    outcome.stdout_closed |= reply.stdout().close();
    outcome.stderr_closed |= reply.stderr().close();
    if (reply.exited()) {
      outcome.exit_code = reply.result().exit_code();
      outcome.signal = reply.result().signal();
      stream->WritesDone();  // as Nomad's client: done once it has the exit
    }
  }
  outcome.status = stream->Finish();
  if (canceller.joinable()) canceller.join();
  return outcome;
}

// The guest's processes whose command line contains `needle` (busybox ps).
std::string GuestProcesses(PluginHarness& harness, const std::string& id, const std::string& needle) {
  ExecOutcome ps = ExecOnce(harness, id, {"/bin/sh", "-c", "ps -o pid,args | grep -F -- \"$0\" | grep -v grep", needle});
  return ps.out;
}

class VmExecTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(TestGuestDir().ok()) << TestGuestDir().status();
    state_dir_ = state_.path() + "/s";
    harness_ = std::make_unique<PluginHarness>(state_dir_, json{{"image_paths", {*TestGuestDir()}}});
  }
  void TearDown() override {
    ::ndq::testing::KillVmsUnder(state_dir_);
    harness_.reset();
  }

  TempDir state_;
  std::string state_dir_;
  std::unique_ptr<PluginHarness> harness_;
};

TEST_F(VmExecTest, CommandsRunInTheGuestThroughItsAgent) {
  FakeAlloc alloc("vm");
  const driverpb::TaskHandle handle =
      StartTestGuest(*harness_, alloc, Guest("guest-qga.qcow2"), FreePort(), {{"guest_agent", true}});
  const std::string id = handle.config().id();

  // ExecTask (script checks): output and exit code.
  ExecOutcome echo = ExecOnce(*harness_, id, {"echo", "hello", "from the guest"});
  ASSERT_TRUE(echo.status.ok()) << echo.status.error_message();
  EXPECT_EQ(echo.out, "hello from the guest\n");
  EXPECT_EQ(echo.exit_code, 0);
  ExecOutcome failing = ExecOnce(*harness_, id, {"/bin/sh", "-c", "echo oops >&2; exit 3"});
  ASSERT_TRUE(failing.status.ok()) << failing.status.error_message();
  EXPECT_EQ(failing.exit_code, 3);
  EXPECT_EQ(failing.err, "oops\n");

  // Streamed: 1 MiB on stdout and some stderr, in 64 KiB frames, then both closed, then the exit.
  ExecOutcome big = ExecStreamed(
      *harness_, id, {"/bin/sh", "-c", "yes 0123456789abcde | head -c 1048576; echo to-stderr >&2"});
  ASSERT_TRUE(big.status.ok()) << big.status.error_message();
  EXPECT_EQ(big.out.size(), 1048576u);
  EXPECT_EQ(big.out.substr(0, 32), "0123456789abcde\n0123456789abcde\n");
  EXPECT_EQ(big.out.find_first_not_of("0123456789abcde\n"), std::string::npos);
  EXPECT_EQ(big.err, "to-stderr\n");
  EXPECT_GE(big.frames, 16 + 4);
  EXPECT_TRUE(big.stdout_closed && big.stderr_closed);
  EXPECT_EQ(big.exit_code, 0);

  // stdin piped through in several frames, whole.
  std::string input;
  for (int i = 0; i < 2000; ++i) absl::StrAppend(&input, "line ", i, "\n");
  std::vector<std::string> frames;
  for (size_t at = 0; at < input.size(); at += 4096) frames.push_back(input.substr(at, 4096));
  ExecOutcome piped = ExecStreamed(*harness_, id, {"/bin/sh", "-c", "cat; echo end"}, frames);
  ASSERT_TRUE(piped.status.ok()) << piped.status.error_message();
  EXPECT_EQ(piped.out, input + "end\n");

  // A terminal that never closes stdin: the command starts once input pauses.
  ExecOutcome open_stdin = ExecStreamed(*harness_, id, {"/bin/echo", "ran"}, {}, /*keep_stdin_open=*/true);
  ASSERT_TRUE(open_stdin.status.ok()) << open_stdin.status.error_message();
  EXPECT_EQ(open_stdin.out, "ran\n");

  // A program the guest lacks.
  ExecOutcome missing = ExecOnce(*harness_, id, {"/no/such/program"});
  EXPECT_EQ(missing.status.error_code(), grpc::StatusCode::NOT_FOUND) << missing.status.error_message();
  // Streamed, past the start, as a shell says it: 127 and the reason on stderr.
  ExecOutcome missing_streamed = ExecStreamed(*harness_, id, {"/no/such/program"});
  ASSERT_TRUE(missing_streamed.status.ok()) << missing_streamed.status.error_message();
  EXPECT_EQ(missing_streamed.exit_code, 127);
  EXPECT_THAT(missing_streamed.err, HasSubstr("/no/such/program"));

  // Nomad's exec timeout: the command is killed in the guest.
  const absl::Time before = absl::Now();
  ExecOutcome slow = ExecOnce(*harness_, id, {"sleep", "601"}, absl::Seconds(1));
  EXPECT_EQ(slow.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << slow.status.error_message();
  EXPECT_LT(absl::Now() - before, absl::Seconds(15));
  EXPECT_TRUE(WaitUntil([&] { return GuestProcesses(*harness_, id, "sleep 601").empty(); }, absl::Seconds(10)));

  // The stream ends (the user pressed ^C): the command is killed in the guest.
  bool seen_running = false;
  ExecOutcome cancelled = ExecStreamed(*harness_, id, {"sleep", "602"}, {}, false, [&](grpc::ClientContext* call) {
    seen_running = WaitUntil([&] { return !GuestProcesses(*harness_, id, "sleep 602").empty(); }, absl::Seconds(20));
    call->TryCancel();
  });
  EXPECT_TRUE(seen_running);
  EXPECT_EQ(cancelled.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(WaitUntil([&] { return GuestProcesses(*harness_, id, "sleep 602").empty(); }, absl::Seconds(10)))
      << GuestProcesses(*harness_, id, "sleep 602");

  // Nothing any of these started is left in the guest.
  EXPECT_EQ(GuestProcesses(*harness_, id, "0123456789abcde"), "");
  EXPECT_EQ(GuestProcesses(*harness_, id, "cat; echo end"), "");

  // Once the task has stopped, exec says so.
  ASSERT_TRUE(harness_->Stop(id, absl::Seconds(30)).ok());
  ExecOutcome stopped = ExecOnce(*harness_, id, {"true"});
  EXPECT_EQ(stopped.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(stopped.status.error_message(), HasSubstr("has exited"));
  ASSERT_TRUE(harness_->Destroy(id, false).ok());
  EXPECT_EQ(ExecOnce(*harness_, id, {"true"}).status.error_code(), grpc::StatusCode::NOT_FOUND);
}

// A task without guest_agent, and one whose guest runs no agent: a clear
// error at once, not a hang.
TEST_F(VmExecTest, WithoutAnAnsweringAgentExecFailsAtOnce) {
  FakeAlloc no_agent_alloc("plain");
  FakeAlloc silent_alloc("silent");
  for (FakeAlloc* alloc : {&no_agent_alloc, &silent_alloc}) alloc->AddOverlay(Guest("guest-hang.qcow2"));
  driverpb::TaskHandle plain, silent;
  ASSERT_TRUE(harness_->Start(no_agent_alloc.Task(::ndq::testing::GuestConfig({{"port_map", json::array()}})), &plain)
                  .ok());
  ASSERT_TRUE(harness_
                  ->Start(silent_alloc.Task(::ndq::testing::GuestConfig(
                              {{"port_map", json::array()}, {"guest_agent", true}})),
                          &silent)
                  .ok());

  ExecOutcome without = ExecStreamed(*harness_, plain.config().id(), {"true"});
  EXPECT_EQ(without.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(without.status.error_message(), HasSubstr("guest_agent = true"));

  const absl::Time before = absl::Now();
  ExecOutcome unanswered = ExecOnce(*harness_, silent.config().id(), {"true"});
  EXPECT_EQ(unanswered.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(unanswered.status.error_message(), HasSubstr("does not answer"));
  EXPECT_LT(absl::Now() - before, absl::Seconds(10));

  for (const auto* handle : {&plain, &silent}) {
    EXPECT_TRUE(harness_->Destroy(handle->config().id(), true).ok());
  }
}

}  // namespace
}  // namespace ndq
