#include "host/run_command.h"

#include "base/error_kind.h"

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/deadlines.h"
#include "../../support/temp_dir.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"

namespace ndq {
namespace {

using ::ndq::testing::TempDir;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
namespace fs = std::filesystem;

using ::ndq::testing::kGenerous;

TEST(RunCommand, CollectsTheOutputAndExitCodeOfASuccessfulCommand) {
  absl::StatusOr<CommandResult> result = RunCommand({"/bin/echo", "hello", "world"}, kGenerous);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->exit_code, 0);
  EXPECT_EQ(result->signal, 0);
  EXPECT_EQ(result->output, "hello world\n");
}

TEST(RunCommand, AFailingCommandIsAResultWithItsExitCodeNotAnError) {
  absl::StatusOr<CommandResult> result = RunCommand({"/bin/sh", "-c", "echo giving up; exit 3"}, kGenerous);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->exit_code, 3);
  EXPECT_EQ(result->signal, 0);
  EXPECT_EQ(result->output, "giving up\n");
}

TEST(RunCommand, StdoutAndStderrArriveTogetherInTheOrderWritten) {
  absl::StatusOr<CommandResult> result =
      RunCommand({"/bin/sh", "-c", "echo one; echo two >&2; echo three; echo four >&2"}, kGenerous);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->output, "one\ntwo\nthree\nfour\n");
}

TEST(RunCommand, ACommandKilledByASignalReportsTheSignal) {
  absl::StatusOr<CommandResult> result = RunCommand({"/bin/sh", "-c", "echo bye; kill -TERM $$"}, kGenerous);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->exit_code, -1);
  EXPECT_EQ(result->signal, SIGTERM);
  EXPECT_EQ(result->output, "bye\n");
}

TEST(RunCommand, TheCommandReadsAnEmptyStdin) {
  // cat would hang on an inherited terminal or pipe; /dev/null ends it at once.
  absl::StatusOr<CommandResult> result = RunCommand({"/bin/cat"}, kGenerous);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->exit_code, 0);
  EXPECT_THAT(result->output, IsEmpty());
}

TEST(RunCommand, AMissingBinaryIsReportedAsNotFound) {
  TempDir dir;
  absl::StatusOr<CommandResult> result = RunCommand({dir / "qemu-img", "info"}, kGenerous);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(result.status().message(), HasSubstr(dir / "qemu-img"));
}

// Neither heals on a retry: both are refused, not "the host ran short".
TEST(RunCommand, AFileThatCannotBeExecutedIsRefused) {
  TempDir dir;
  std::ofstream(dir / "not-executable") << "#!/bin/sh\necho ran\n";
  ::chmod((dir / "not-executable").c_str(), 0644);
  for (const std::string& path : {dir / "not-executable", dir.path()}) {
    absl::StatusOr<CommandResult> result = RunCommand({path}, kGenerous);
    ASSERT_FALSE(result.ok()) << path << " ran: " << result->output;
    EXPECT_EQ(result.status().code(), absl::StatusCode::kPermissionDenied) << path;
    EXPECT_EQ(KindOf(result.status()), ErrorKind::kRefused) << path;
  }
}

TEST(RunCommand, AnEmptyCommandIsInvalid) {
  absl::StatusOr<CommandResult> result = RunCommand({}, kGenerous);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
}

// The hung helper is killed and reaped: it neither runs on nor stays a zombie.
TEST(RunCommand, AHungCommandIsKilledAtTheDeadline) {
  TempDir dir;
  const std::string pid_file = dir / "pid";
  const absl::Time start = absl::Now();
  absl::StatusOr<CommandResult> result =
      RunCommand({"/bin/sh", "-c", "echo $$ > \"$0\"; exec sleep 30", pid_file}, absl::Milliseconds(300));
  const absl::Duration took = absl::Now() - start;
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(result.status().message(), HasSubstr("/bin/sh"));
  EXPECT_GE(took, absl::Milliseconds(300));
  EXPECT_LT(took, kGenerous);

  std::string pid_text;
  std::ifstream(pid_file) >> pid_text;
  pid_t pid = 0;
  ASSERT_TRUE(absl::SimpleAtoi(pid_text, &pid)) << "the command wrote its pid: \"" << pid_text << "\"";
  EXPECT_FALSE(fs::exists(absl::StrCat("/proc/", pid))) << "pid " << pid << " is still there";
  errno = 0;
  EXPECT_EQ(::waitpid(pid, nullptr, WNOHANG), -1);
  EXPECT_EQ(errno, ECHILD) << "already reaped";
}

TEST(RunCommand, AHungCommandThatClosedItsOutputIsStillKilledAtTheDeadline) {
  const absl::Time start = absl::Now();
  // Bounded at 3 s, so with the bug this fails instead of hanging the suite.
  absl::StatusOr<CommandResult> result =
      RunCommand({"/bin/sh", "-c", "exec >/dev/null 2>&1; exec sleep 3"}, absl::Milliseconds(300));
  const absl::Duration took = absl::Now() - start;
  EXPECT_EQ(result.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_LT(took, absl::Seconds(2));
}

// A chatty helper must be drained (else it blocks on a full pipe and times
// out) while only the first MiB is kept.
TEST(RunCommand, OutputBeyondOneMebibyteIsReadButNotKept) {
  absl::StatusOr<CommandResult> result =
      RunCommand({"/bin/sh", "-c", "head -c 3145728 /dev/zero | tr '\\0' x; echo; echo end >&2"}, kGenerous);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->exit_code, 0);
  EXPECT_GE(result->output.size(), size_t{1} << 20) << "the first MiB is all there";
  EXPECT_LT(result->output.size(), size_t{3} << 20) << "the rest was dropped";
  EXPECT_EQ(result->output.find_first_not_of('x'), std::string::npos) << "nothing from beyond the cut";
}

TEST(RunCommand, OutputIsCutAtExactlyOneMebibyte) {
  // Writes of 1000 bytes make reads that do not line up with 1 MiB.
  absl::StatusOr<CommandResult> result = RunCommand(
      {"/bin/sh", "-c", "head -c 2000000 /dev/zero | tr '\\0' x | dd bs=1000 iflag=fullblock status=none"},
      kGenerous);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->output.size(), size_t{1} << 20);
}

// Reads SigBlk and SigIgn from /proc/self/status as the command sees them.
struct SignalState {
  uint64_t blocked = 0;
  uint64_t ignored = 0;
};

std::optional<SignalState> ParseSignalState(const std::string& status) {
  SignalState state;
  int found = 0;
  for (absl::string_view line : absl::StrSplit(status, '\n')) {
    uint64_t* field = absl::ConsumePrefix(&line, "SigBlk:") ? &state.blocked
                      : absl::ConsumePrefix(&line, "SigIgn:") ? &state.ignored
                                                              : nullptr;
    if (field == nullptr) continue;
    if (!absl::SimpleHexAtoi(absl::StripAsciiWhitespace(line), field)) return std::nullopt;
    ++found;
  }
  if (found != 2) return std::nullopt;
  return state;
}

uint64_t Bit(int signal) { return uint64_t{1} << (signal - 1); }

// Restores this thread's signal mask and SIGINT/SIGPIPE handling when the test ends.
class PluginLikeSignals {
 public:
  PluginLikeSignals() {
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &block, &old_mask_);
    struct sigaction ignore {};
    ignore.sa_handler = SIG_IGN;
    sigaction(SIGINT, &ignore, &old_int_);
    sigaction(SIGPIPE, &ignore, &old_pipe_);
  }
  ~PluginLikeSignals() {
    sigaction(SIGPIPE, &old_pipe_, nullptr);
    sigaction(SIGINT, &old_int_, nullptr);
    pthread_sigmask(SIG_SETMASK, &old_mask_, nullptr);
  }

 private:
  sigset_t old_mask_;
  struct sigaction old_int_ {}, old_pipe_ {};
};

// The plugin blocks SIGTERM and ignores SIGINT/SIGPIPE; a child that inherited
// that could not be stopped by SIGTERM and would not die of a broken pipe.
TEST(RunCommand, TheChildStartsWithDefaultSignalsWhateverThePluginSet) {
  PluginLikeSignals plugin_like;
  // This thread really has them now (else the test could not fail).
  std::ifstream self("/proc/thread-self/status");
  const std::string own((std::istreambuf_iterator<char>(self)), std::istreambuf_iterator<char>());
  std::optional<SignalState> ours = ParseSignalState(own);
  ASSERT_TRUE(ours.has_value());
  ASSERT_NE(ours->blocked & Bit(SIGTERM), 0u);
  ASSERT_NE(ours->ignored & Bit(SIGINT), 0u);

  absl::StatusOr<CommandResult> result = RunCommand({"/bin/cat", "/proc/self/status"}, kGenerous);
  ASSERT_TRUE(result.ok()) << result.status();
  std::optional<SignalState> child = ParseSignalState(result->output);
  ASSERT_TRUE(child.has_value()) << result->output;
  EXPECT_EQ(child->blocked, 0u);
  EXPECT_EQ(child->ignored & (Bit(SIGINT) | Bit(SIGPIPE) | Bit(SIGTERM)), 0u);
}

TEST(SpawnWithDefaultSignals, StartsTheProcessAndCanGiveItItsOwnSession) {
  absl::StatusOr<pid_t> pid = SpawnWithDefaultSignals({"/bin/sleep", "30"}, nullptr, POSIX_SPAWN_SETSID);
  ASSERT_TRUE(pid.ok()) << pid.status();
  EXPECT_EQ(::getsid(*pid), *pid) << "it leads a new session";
  EXPECT_NE(::getsid(*pid), ::getsid(0));
  ASSERT_EQ(::kill(*pid, SIGTERM), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(*pid, &status, 0), *pid);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM) << "SIGTERM is not blocked in the child";
}

TEST(SpawnWithDefaultSignals, WithoutFlagsTheChildStaysInOurSession) {
  absl::StatusOr<pid_t> pid = SpawnWithDefaultSignals({"/bin/sh", "-c", "exit 5"}, nullptr);
  ASSERT_TRUE(pid.ok()) << pid.status();
  int status = 0;
  ASSERT_EQ(::waitpid(*pid, &status, 0), *pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 5);
}

TEST(SpawnWithDefaultSignals, AMissingBinaryIsNotFoundAndLeavesNoChild) {
  absl::StatusOr<pid_t> pid = SpawnWithDefaultSignals({"/nonexistent/qemu-system-x86_64"}, nullptr);
  ASSERT_FALSE(pid.ok());
  EXPECT_EQ(pid.status().code(), absl::StatusCode::kNotFound);
  errno = 0;
  EXPECT_EQ(::waitpid(-1, nullptr, WNOHANG), -1);
  EXPECT_EQ(errno, ECHILD) << "the failed child was reaped";
}

// Sets $PATH for one test and puts it back after.
class ScopedPath {
 public:
  explicit ScopedPath(const char* path) {
    const char* old = std::getenv("PATH");
    if (old != nullptr) old_ = old;
    if (path != nullptr) {
      ::setenv("PATH", path, 1);
    } else {
      ::unsetenv("PATH");
    }
  }
  ~ScopedPath() {
    if (old_) {
      ::setenv("PATH", old_->c_str(), 1);
    } else {
      ::unsetenv("PATH");
    }
  }

 private:
  std::optional<std::string> old_;
};

class FindOnPathTest : public ::testing::Test {
 protected:
  std::string Make(const std::string& dir, const std::string& name, mode_t mode) {
    fs::create_directories(dir);
    const std::string path = dir + "/" + name;
    std::ofstream(path) << "#!/bin/sh\n";
    ::chmod(path.c_str(), mode);
    return path;
  }
  TempDir dir_;
};

TEST_F(FindOnPathTest, TheFirstDirectoryWithTheProgramWins) {
  Make(dir_ / "a", "other", 0755);
  const std::string in_b = Make(dir_ / "b", "qemu-img", 0755);
  Make(dir_ / "c", "qemu-img", 0755);
  ScopedPath path(absl::StrCat(dir_ / "a", ":", dir_ / "b", ":", dir_ / "c").c_str());
  EXPECT_EQ(FindOnPath("qemu-img"), in_b);
}

TEST_F(FindOnPathTest, AFileWithoutExecutePermissionIsSkipped) {
  Make(dir_ / "a", "qemu-img", 0644);
  const std::string runnable = Make(dir_ / "b", "qemu-img", 0755);
  ScopedPath path(absl::StrCat(dir_ / "a", ":", dir_ / "b").c_str());
  EXPECT_EQ(FindOnPath("qemu-img"), runnable);
}

TEST_F(FindOnPathTest, NothingFoundIsEmpty) {
  Make(dir_ / "a", "qemu-img", 0644);
  {
    ScopedPath path(absl::StrCat(dir_ / "a", ":", dir_ / "missing").c_str());
    EXPECT_THAT(FindOnPath("qemu-img"), IsEmpty());
    EXPECT_THAT(FindOnPath("qemu-system-x86_64"), IsEmpty());
  }
  {
    ScopedPath empty("");
    EXPECT_THAT(FindOnPath("sh"), IsEmpty());
  }
  {
    ScopedPath unset(nullptr);
    EXPECT_THAT(FindOnPath("sh"), IsEmpty());
  }
}

// An empty $PATH entry must not make FindOnPath look in the current directory,
// where anyone able to write there could plant a "qemu-img".
TEST_F(FindOnPathTest, AnEmptyPathEntryIsNotTheCurrentDirectory) {
  Make(dir_ / "cwd", "ndq-tool", 0755);
  const std::string tool = Make(dir_ / "b", "ndq-tool", 0755);
  const fs::path old_cwd = fs::current_path();
  fs::current_path(dir_ / "cwd");
  {
    ScopedPath path(absl::StrCat("::", dir_ / "b", ":").c_str());
    EXPECT_EQ(FindOnPath("ndq-tool"), tool);
  }
  {
    ScopedPath path(absl::StrCat(":", dir_ / "empty").c_str());
    EXPECT_THAT(FindOnPath("ndq-tool"), IsEmpty());
  }
  fs::current_path(old_cwd);
}

TEST_F(FindOnPathTest, ADirectoryWithTheProgramsNameIsSkipped) {
  fs::create_directories(dir_ / "a/qemu-img");
  const std::string runnable = Make(dir_ / "b", "qemu-img", 0755);
  ScopedPath path(absl::StrCat(dir_ / "a", ":", dir_ / "b").c_str());
  EXPECT_EQ(FindOnPath("qemu-img"), runnable);
}

}  // namespace
}  // namespace ndq
