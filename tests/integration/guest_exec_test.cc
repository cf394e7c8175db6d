// GuestExec against the real qemu-guest-agent (Debian 12's qemu-ga 7.2), run
// on the host on a unix socket: the same protocol it speaks inside a VM, so no
// VM is needed. The commands it runs are host processes we can see in /proc.
#include "qemu/guest_exec.h"

#include <signal.h>

#include <atomic>
#include <filesystem>
#include <functional>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "qemu/guest_agent_client.h"
#include "../support/child_process.h"
#include "../support/plugin_harness.h"
#include "../support/temp_dir.h"
#include "../support/eventually.h"

namespace ndq {
namespace {

constexpr char kQemuGa[] = "/usr/sbin/qemu-ga";
constexpr absl::Duration kGuestDeadline = absl::Seconds(20);

using testing::ProcessesMentioning;
using ::ndq::testing::Eventually;

class GuestExecTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(kQemuGa)) GTEST_SKIP() << kQemuGa << " is missing: run scripts/setup.sh";
    ASSERT_FALSE(dir_.path().empty());
    const std::string socket = dir_ / "qga.sock";
    // -t and -f keep its state file and pidfile out of /var/run.
    agent_process_ = std::make_unique<testing::ChildProcess>(std::vector<std::string>{
        kQemuGa, "-m", "unix-listen", "-p", socket, "-t", dir_.path(), "-f", dir_ / "qga.pid", "-l", dir_ / "qga.log"});
    ASSERT_GT(agent_process_->pid(), 0);
    // Connect retries until the socket appears, up to its timeout.
    auto agent = GuestAgentClient::Connect(socket, kGuestDeadline, agent_process_->pid());
    ASSERT_TRUE(agent.ok()) << agent.status();
    agent_ = std::move(*agent);
  }
  // The agent before its process: the ChildProcess kills and reaps qemu-ga.
  void TearDown() override {
    agent_.reset();
    agent_process_.reset();
  }

  absl::StatusOr<GuestExecResult> Run(const GuestExecRequest& request,
                                      const GuestExec::OutputHandler& on_output = nullptr) {
    absl::StatusOr<GuestExec> exec = GuestExec::Start(*agent_, request);
    if (!exec.ok()) return exec.status();
    return exec->Wait(absl::Now() + kGuestDeadline, nullptr, on_output);
  }

  testing::TempDir dir_;
  std::unique_ptr<testing::ChildProcess> agent_process_;
  std::unique_ptr<GuestAgentClient> agent_;
};

GuestExecRequest Command(std::vector<std::string> argv) {
  GuestExecRequest request;
  request.argv = std::move(argv);
  return request;
}

TEST_F(GuestExecTest, EchoExitsZeroWithItsOutput) {
  auto result = Run(Command({"/bin/echo", "hi"}));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(result->exited);
  EXPECT_EQ(result->exit_code, 0);
  EXPECT_EQ(result->signal, 0);
  EXPECT_EQ(result->output.stdout_data, "hi\n");
  EXPECT_EQ(result->output.stderr_data, "");
  EXPECT_FALSE(result->output.stdout_truncated);
}

TEST_F(GuestExecTest, ArgumentsReachTheProgramAsTheyAreWithoutAShell) {
  auto result = Run(Command({"/bin/echo", "a  b", "$HOME", "*", "'q'"}));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->output.stdout_data, "a  b $HOME * 'q'\n");
}

// qemu-ga 7.2 reports the exit only once stdout and stderr are closed: a
// background child that keeps them holds the result back until it ends.
TEST_F(GuestExecTest, AChildHoldingTheOutputDelaysTheResult) {
  const absl::Time start = absl::Now();
  auto result = Run(Command({"/bin/sh", "-c", "sleep 0.7 & echo x"}));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->output.stdout_data, "x\n");
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(600));
}

TEST_F(GuestExecTest, ProgramsAreFoundOnThePathAndEnvReplacesTheEnvironment) {
  GuestExecRequest request = Command({"env"});
  request.env = {"A=B", "C=with spaces"};
  auto result = Run(request);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->output.stdout_data, "A=B\nC=with spaces\n");
}

// qemu-ga 7.2 keeps up to 16 MiB (16777216 bytes) of each stream. 1 MiB comes
// back whole; 20,000,000 bytes come back as the first 16777216 with
// out-truncated, and the command still exits 0 (the agent drains the rest).
TEST_F(GuestExecTest, OneMebibyteComesBackWhole) {
  std::vector<std::pair<int, size_t>> chunks;
  auto result = Run(Command({"/bin/sh", "-c", "head -c 1048576 /dev/zero; echo err >&2"}),
                    [&](int stream, absl::string_view chunk) { chunks.emplace_back(stream, chunk.size()); });
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->exit_code, 0);
  EXPECT_EQ(result->output.stdout_data, std::string(1 << 20, '\0'));
  EXPECT_FALSE(result->output.stdout_truncated);
  EXPECT_EQ(result->output.stderr_data, "err\n");
  EXPECT_FALSE(result->output.stderr_truncated);
  // Streamed at the end in chunks, stdout first.
  ASSERT_EQ(chunks.size(), (1u << 20) / GuestExec::kOutputChunk + 1);
  for (size_t i = 0; i + 1 < chunks.size(); ++i) EXPECT_EQ(chunks[i], std::make_pair(1, GuestExec::kOutputChunk));
  EXPECT_EQ(chunks.back(), std::make_pair(2, size_t{4}));
}

TEST_F(GuestExecTest, OutputOverTheAgentsLimitIsTruncated) {
  auto result = Run(Command({"/bin/sh", "-c", "head -c 20000000 /dev/zero; echo err >&2"}));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->exit_code, 0);
  EXPECT_EQ(result->output.stdout_data.size(), GuestExec::kAgentOutputLimit);
  EXPECT_EQ(GuestExec::kAgentOutputLimit, 16777216u);
  EXPECT_TRUE(result->output.stdout_truncated);
  EXPECT_EQ(result->output.stderr_data, "err\n");
  EXPECT_FALSE(result->output.stderr_truncated);
}

TEST_F(GuestExecTest, ExitCodeIsReported) {
  auto result = Run(Command({"/bin/sh", "-c", "exit 3"}));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(result->exited);
  EXPECT_EQ(result->exit_code, 3);
}

TEST_F(GuestExecTest, StdinDataIsFedToTheCommand) {
  GuestExecRequest request = Command({"/bin/cat"});
  request.stdin_data = "piped\n";
  auto result = Run(request);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->output.stdout_data, "piped\n");
}

TEST_F(GuestExecTest, WithoutStdinDataTheCommandReadsEndOfFile) {
  auto result = Run(Command({"/bin/cat"}));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->exit_code, 0);
  EXPECT_EQ(result->output.stdout_data, "");
}

TEST_F(GuestExecTest, WithoutCaptureNoOutputComesBack) {
  GuestExecRequest request = Command({"/bin/echo", "hi"});
  request.capture_output = false;
  auto result = Run(request);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->exit_code, 0);
  EXPECT_EQ(result->output.stdout_data, "");
}

TEST_F(GuestExecTest, CancelledWaitReturnsAndKillLeavesNoProcess) {
  // An unusual duration, so /proc shows only ours.
  const std::string marker = "30.0424242";
  auto exec = GuestExec::Start(*agent_, Command({"/bin/sleep", marker}));
  ASSERT_TRUE(exec.ok()) << exec.status();
  ASSERT_TRUE(Eventually([&] { return !ProcessesMentioning("sleep " + marker).empty(); }, kGuestDeadline));
  EXPECT_EQ(ProcessesMentioning("sleep " + marker), std::vector<pid_t>{static_cast<pid_t>(exec->pid())});

  std::atomic<bool> cancel{false};
  const absl::Time cancel_at = absl::Now() + absl::Milliseconds(300);
  const absl::Time start = absl::Now();
  auto result = exec->Wait(absl::Now() + kGuestDeadline, [&] { return cancel || absl::Now() >= cancel_at; });
  const absl::Duration took = absl::Now() - start;
  EXPECT_TRUE(absl::IsCancelled(result.status())) << result.status();
  EXPECT_LT(took, absl::Seconds(5));  // cancelled after 300 ms, not after 30 s
  EXPECT_FALSE(exec->finished());

  ASSERT_TRUE(exec->Kill().ok());
  EXPECT_TRUE(exec->finished());
  // The agent reaps its children: once Kill collected the exit, it is gone.
  EXPECT_TRUE(ProcessesMentioning("sleep " + marker).empty());
  EXPECT_FALSE(std::filesystem::exists(absl::StrCat("/proc/", exec->pid())));
  EXPECT_TRUE(exec->Kill().ok()) << "killing a collected command again is a no-op";
  EXPECT_TRUE(absl::IsFailedPrecondition(exec->Wait(absl::Now() + kGuestDeadline).status()));
}

TEST_F(GuestExecTest, KillingACommandThatAlreadyEndedIsFine) {
  auto exec = GuestExec::Start(*agent_, Command({"/bin/true"}));
  ASSERT_TRUE(exec.ok()) << exec.status();
  ASSERT_TRUE(Eventually([&] { return !std::filesystem::exists(absl::StrCat("/proc/", exec->pid())); },
                                 kGuestDeadline));
  EXPECT_TRUE(exec->Kill().ok());
  EXPECT_TRUE(exec->finished());
}

TEST_F(GuestExecTest, DeadlineLeavesTheCommandRunning) {
  auto exec = GuestExec::Start(*agent_, Command({"/bin/sleep", "30.0434343"}));
  ASSERT_TRUE(exec.ok()) << exec.status();
  auto result = exec->Wait(absl::Now() + absl::Milliseconds(200));
  EXPECT_TRUE(absl::IsDeadlineExceeded(result.status())) << result.status();
  EXPECT_EQ(ProcessesMentioning("sleep 30.0434343").size(), 1u);
  EXPECT_TRUE(exec->Kill().ok());
  EXPECT_TRUE(ProcessesMentioning("sleep 30.0434343").empty());
}

TEST_F(GuestExecTest, SignalIsReported) {
  auto result = Run(Command({"/bin/sh", "-c", "kill -TERM $$"}));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_FALSE(result->exited);
  EXPECT_EQ(result->signal, SIGTERM);
}

TEST_F(GuestExecTest, NonexistentProgramIsAClearError) {
  auto result = Run(Command({"/nonexistent/program"}));
  EXPECT_TRUE(absl::IsNotFound(result.status())) << result.status();
  EXPECT_NE(result.status().message().find("/nonexistent/program"), std::string::npos) << result.status();
  EXPECT_NE(result.status().message().find("No such file or directory"), std::string::npos) << result.status();
}

TEST_F(GuestExecTest, BadRequestsAreRefusedBeforeTheAgentSeesThem) {
  EXPECT_TRUE(absl::IsInvalidArgument(Run(Command({})).status()));
  GuestExecRequest request = Command({"/bin/true"});
  request.env = {"NOEQUALS"};
  EXPECT_TRUE(absl::IsInvalidArgument(Run(request).status()));
  request.env.clear();
  request.argv.push_back(std::string("a\0b", 3));
  EXPECT_TRUE(absl::IsInvalidArgument(Run(request).status()));
  EXPECT_TRUE(agent_->Ping().ok());
}

// Not a check: prints what one exec costs beside one guest-ping.
TEST_F(GuestExecTest, MeasureRoundTrips) {
  constexpr int kRounds = 50;
  absl::Time start = absl::Now();
  for (int i = 0; i < kRounds; ++i) ASSERT_TRUE(agent_->Ping().ok());
  const absl::Duration ping = (absl::Now() - start) / kRounds;
  int polls = 0;
  start = absl::Now();
  for (int i = 0; i < kRounds; ++i) {
    auto exec = GuestExec::Start(*agent_, Command({"/bin/true"}));
    ASSERT_TRUE(exec.ok()) << exec.status();
    ASSERT_TRUE(exec->Wait(absl::Now() + kGuestDeadline).ok());
    polls += exec->status_calls();
  }
  const absl::Duration exec = (absl::Now() - start) / kRounds;
  std::cout << "guest-ping: " << absl::FormatDuration(ping) << " per call; exec of /bin/true: "
            << absl::FormatDuration(exec) << " per command, " << static_cast<double>(polls) / kRounds
            << " guest-exec-status calls each\n";
}

}  // namespace
}  // namespace ndq
