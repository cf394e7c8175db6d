#include "host/process_watch.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/deadlines.h"
#include "../../support/child_process.h"
#include "../../support/temp_dir.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"

namespace ndq {
namespace {

using Child = ::ndq::testing::ChildProcess;
using ::ndq::testing::TempDir;
using ::testing::MatchesRegex;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

using ::ndq::testing::kGenerous;

Child Sleeper() { return Child({"/bin/sleep", "30"}); }

// Closes a pidfd when the test ends.
struct Fd {
  explicit Fd(int fd) : fd(fd) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int fd;
};

int OpenPidfd(const Child& child) {
  absl::StatusOr<int> fd = OpenVerifiedPidfd(child.pid(), 0);
  EXPECT_TRUE(fd.ok()) << fd.status();
  return fd.value_or(-1);
}

bool WaitUntil(const std::function<bool()>& done, absl::Duration timeout = kGenerous) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!done()) {
    if (absl::Now() >= deadline) return false;
    absl::SleepFor(absl::Milliseconds(1));
  }
  return true;
}

size_t OpenFdCount() {
  size_t n = 0;
  for ([[maybe_unused]] const auto& entry : fs::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

TEST(ReadProcStat, FieldsAreNumberedAsInProc5EvenWithParenthesesInTheName) {
  // The command name is the file name exec'd: this one has ") (" and spaces in it.
  TempDir dir;
  fs::create_symlink("/bin/sleep", dir / "x) (y z");
  Child child({dir / "x) (y z", "30"});
  ASSERT_GT(child.pid(), 0);
  std::optional<std::vector<std::string>> fields = ReadProcStat(child.pid());
  ASSERT_TRUE(fields.has_value());
  ASSERT_GE(fields->size(), 53u) << "proc(5) lists 52 fields";
  EXPECT_EQ((*fields)[1], absl::StrCat(child.pid()));
  // Field 3 is the state: one letter of proc(5)'s list. A child just exec'd may
  // be in any of them (D while the loader pages in its binary under load).
  EXPECT_THAT((*fields)[3], MatchesRegex("[RSDZTtWXxKPI]"));
  EXPECT_EQ((*fields)[4], absl::StrCat(::getpid())) << "field 4 is the parent";
  EXPECT_EQ((*fields)[22], absl::StrCat(ProcessStartTicks(child.pid()).value_or(0)));
}

TEST(ReadProcStat, FieldTwoIsTheCommandNameInParentheses) {
  TempDir dir;
  fs::create_symlink("/bin/sleep", dir / "x) (y z");
  Child child({dir / "x) (y z", "30"});
  ASSERT_GT(child.pid(), 0);
  std::optional<std::vector<std::string>> fields = ReadProcStat(child.pid());
  ASSERT_TRUE(fields.has_value());
  ASSERT_GE(fields->size(), 3u);
  EXPECT_EQ((*fields)[2], "(x) (y z)");
}

TEST(ReadProcStat, AReapedProcessIsGone) {
  Child child({"/bin/true"});
  ASSERT_GT(child.pid(), 0);
  child.Wait();
  EXPECT_FALSE(ReadProcStat(child.pid()).has_value());
  EXPECT_FALSE(ProcessStartTicks(child.pid()).has_value());
}

TEST(ProcessStartTicks, CountsTicksSinceBootUpToNow) {
  double uptime_s = 0;
  std::ifstream("/proc/uptime") >> uptime_s;
  Child child = Sleeper();
  ASSERT_GT(child.pid(), 0);
  std::optional<uint64_t> ticks = ProcessStartTicks(child.pid());
  ASSERT_TRUE(ticks.has_value());
  const double started_s = static_cast<double>(*ticks) / static_cast<double>(::sysconf(_SC_CLK_TCK));
  // Started just now: after the uptime read above, and well within a second of it.
  EXPECT_GE(started_s, uptime_s - 1);
  EXPECT_LE(started_s, uptime_s + 5);
  EXPECT_LE(ProcessStartTicks(::getpid()).value_or(UINT64_MAX), *ticks) << "we started before our child";
  EXPECT_EQ(ProcessStartTicks(child.pid()), ticks) << "the same process, the same start";
}

TEST(OpenVerifiedPidfd, ARunningChildWithItsStartTimeOpens) {
  Child child = Sleeper();
  const std::optional<uint64_t> ticks = ProcessStartTicks(child.pid());
  ASSERT_TRUE(ticks.has_value());
  absl::StatusOr<int> fd = OpenVerifiedPidfd(child.pid(), *ticks);
  ASSERT_TRUE(fd.ok()) << fd.status();
  Fd closer(*fd);
  EXPECT_FALSE(PidfdExited(*fd));
  absl::StatusOr<int> unchecked = OpenVerifiedPidfd(child.pid(), 0);
  ASSERT_TRUE(unchecked.ok()) << unchecked.status();
  ::close(*unchecked);
}

// A live process with the right pid but another start time stands for a reused pid.
TEST(OpenVerifiedPidfd, AnotherStartTimeMeansThePidWasReused) {
  Child child = Sleeper();
  const std::optional<uint64_t> ticks = ProcessStartTicks(child.pid());
  ASSERT_TRUE(ticks.has_value());
  const size_t fds_before = OpenFdCount();
  absl::StatusOr<int> fd = OpenVerifiedPidfd(child.pid(), *ticks + 1);
  ASSERT_FALSE(fd.ok());
  EXPECT_EQ(fd.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(fd.status().message(), HasSubstr("another process"));
  EXPECT_EQ(OpenFdCount(), fds_before) << "the rejected pidfd is closed";
}

TEST(OpenVerifiedPidfd, AReapedChildIsNotFound) {
  Child child({"/bin/sh", "-c", "exit 3"});
  ASSERT_GT(child.pid(), 0);
  const int status = child.Wait();
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 3);
  absl::StatusOr<int> fd = OpenVerifiedPidfd(child.pid(), 0);
  ASSERT_FALSE(fd.ok());
  EXPECT_EQ(fd.status().code(), absl::StatusCode::kNotFound);
}

TEST(OpenVerifiedPidfd, PidsThatNameNoProcessAreInvalid) {
  for (pid_t pid : {0, -1, -12345}) {
    absl::StatusOr<int> fd = OpenVerifiedPidfd(pid, 0);
    ASSERT_FALSE(fd.ok()) << pid;
    EXPECT_EQ(fd.status().code(), absl::StatusCode::kInvalidArgument) << pid;
  }
}

// A zombie is still "the process": it can be opened (its start time checks
// out) and reads as exited at once, before anyone reaps it.
TEST(OpenVerifiedPidfd, AnExitedButUnreapedChildOpensAndReadsAsExited) {
  Child child({"/bin/sh", "-c", "exit 3"});
  ASSERT_GT(child.pid(), 0);
  child.WaitExited();
  const std::optional<uint64_t> ticks = ProcessStartTicks(child.pid());
  ASSERT_TRUE(ticks.has_value());
  absl::StatusOr<int> fd = OpenVerifiedPidfd(child.pid(), *ticks);
  ASSERT_TRUE(fd.ok()) << fd.status();
  Fd closer(*fd);
  EXPECT_TRUE(PidfdExited(*fd));
  const int status = child.Wait();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 3);
  EXPECT_TRUE(PidfdExited(*fd)) << "and stays exited once reaped";
}

TEST(SignalPidfd, DeliversTheSignalToThatProcess) {
  Child child = Sleeper();
  Fd pidfd(OpenPidfd(child));
  EXPECT_FALSE(PidfdExited(pidfd.fd));
  ASSERT_TRUE(SignalPidfd(pidfd.fd, SIGTERM).ok());
  EXPECT_TRUE(WaitUntil([&] { return PidfdExited(pidfd.fd); }));
  const int status = child.Wait();
  EXPECT_TRUE(WIFSIGNALED(status));
  EXPECT_EQ(WTERMSIG(status), SIGTERM);
}

TEST(SignalPidfd, SignalZeroProbesALiveProcessWithoutHarm) {
  Child child = Sleeper();
  Fd pidfd(OpenPidfd(child));
  EXPECT_TRUE(SignalPidfd(pidfd.fd, 0).ok());
  EXPECT_FALSE(PidfdExited(pidfd.fd));
}

TEST(SignalPidfd, AReapedProcessIsNotFound) {
  Child child = Sleeper();
  Fd pidfd(OpenPidfd(child));
  ASSERT_EQ(::kill(child.pid(), SIGKILL), 0);
  child.Wait();
  const absl::Status status = SignalPidfd(pidfd.fd, SIGTERM);
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound) << status;
}

TEST(SignalPidfd, ABadSignalOrDescriptorIsAnErrorButNotNotFound) {
  Child child = Sleeper();
  Fd pidfd(OpenPidfd(child));
  const absl::Status bad_signal = SignalPidfd(pidfd.fd, 100000);
  EXPECT_FALSE(bad_signal.ok());
  EXPECT_NE(bad_signal.code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(PidfdExited(pidfd.fd)) << "nothing was delivered";

  TempDir dir;
  std::ofstream(dir / "file") << "x";
  Fd file(::open((dir / "file").c_str(), O_RDONLY | O_CLOEXEC));
  for (int fd : {-1, file.fd}) {
    const absl::Status status = SignalPidfd(fd, SIGTERM);
    EXPECT_FALSE(status.ok()) << fd;
    EXPECT_NE(status.code(), absl::StatusCode::kNotFound) << fd;
  }
}

class WaitForPath : public ::testing::Test {
 protected:
  // A shell that runs `script` with $0 set to the watched directory.
  Child Shell(const std::string& script) { return Child({"/bin/sh", "-c", script, dir_.path()}); }
  TempDir dir_;
};

TEST_F(WaitForPath, APathThatIsAlreadyThereIsFoundAtOnce) {
  std::ofstream(dir_ / "ready") << "";
  Child child = Sleeper();
  Fd pidfd(OpenPidfd(child));
  EXPECT_TRUE(WaitForPathOrExit(dir_.path(), "ready", pidfd.fd, absl::Now() + kGenerous).ok());
  // Even with the deadline gone: what is there is there.
  EXPECT_TRUE(WaitForPathOrExit(dir_.path(), "ready", pidfd.fd, absl::Now() - absl::Seconds(1)).ok());
}

TEST_F(WaitForPath, AFileCreatedWhileWaitingIsSeen) {
  Child child = Shell("sleep 0.1; : > \"$0/ready\"; exec sleep 30");
  Fd pidfd(OpenPidfd(child));
  const absl::Time start = absl::Now();
  const absl::Status status = WaitForPathOrExit(dir_.path(), "ready", pidfd.fd, start + kGenerous);
  EXPECT_TRUE(status.ok()) << status;
  EXPECT_LT(absl::Now() - start, kGenerous);
}

// The supervisor writes its files to "<name>.tmp" and renames them.
TEST_F(WaitForPath, AFileRenamedIntoPlaceIsSeen) {
  Child child = Shell("echo 42 > \"$0/qemu.pid.tmp\"; sleep 0.1; mv \"$0/qemu.pid.tmp\" \"$0/qemu.pid\"; exec sleep 30");
  Fd pidfd(OpenPidfd(child));
  const absl::Status status = WaitForPathOrExit(dir_.path(), "qemu.pid", pidfd.fd, absl::Now() + kGenerous);
  EXPECT_TRUE(status.ok()) << status;
  EXPECT_TRUE(fs::exists(dir_ / "qemu.pid"));
}

TEST_F(WaitForPath, AProcessThatExitsWithoutCreatingItEndsTheWaitAtOnce) {
  Child child = Shell(": > \"$0/something-else\"; exit 3");
  Fd pidfd(OpenPidfd(child));
  const absl::Time start = absl::Now();
  const absl::Status status = WaitForPathOrExit(dir_.path(), "ready", pidfd.fd, start + absl::Seconds(60));
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
  EXPECT_LT(absl::Now() - start, kGenerous) << "not left to the deadline";
  const int wait_status = child.Wait();
  EXPECT_TRUE(WIFEXITED(wait_status) && WEXITSTATUS(wait_status) == 3);
}

// Writing the file is the last thing it does: the file counts, not the exit.
TEST_F(WaitForPath, AProcessThatCreatesItAndExitsAtOnceStillCounts) {
  Child child = Shell(": > \"$0/ready\"");
  Fd pidfd(OpenPidfd(child));
  child.WaitExited();
  const absl::Status status = WaitForPathOrExit(dir_.path(), "ready", pidfd.fd, absl::Now() + kGenerous);
  EXPECT_TRUE(status.ok()) << status;
}

TEST_F(WaitForPath, ALiveProcessThatNeverCreatesItRunsIntoTheDeadline) {
  Child child = Sleeper();
  Fd pidfd(OpenPidfd(child));
  const absl::Time start = absl::Now();
  const absl::Status status = WaitForPathOrExit(dir_.path(), "ready", pidfd.fd, start + absl::Milliseconds(150));
  const absl::Duration waited = absl::Now() - start;
  EXPECT_EQ(status.code(), absl::StatusCode::kDeadlineExceeded) << status;
  EXPECT_THAT(status.message(), HasSubstr(dir_ / "ready"));
  EXPECT_GE(waited, absl::Milliseconds(150));
  EXPECT_LT(waited, kGenerous);
  EXPECT_FALSE(PidfdExited(pidfd.fd));
}

TEST_F(WaitForPath, AMissingDirectoryIsAnErrorNotATimeout) {
  Child child = Sleeper();
  Fd pidfd(OpenPidfd(child));
  const absl::Time start = absl::Now();
  const absl::Status status = WaitForPathOrExit(dir_ / "gone", "ready", pidfd.fd, start + absl::Seconds(60));
  EXPECT_EQ(status.code(), absl::StatusCode::kInternal) << status;
  EXPECT_THAT(status.message(), HasSubstr(dir_ / "gone"));
  EXPECT_LT(absl::Now() - start, kGenerous);
}

// Records which callbacks ran, in order, and on which thread.
class Exits {
 public:
  std::function<void()> Callback(int id) {
    return [this, id] {
      absl::MutexLock lock(&mu_);
      order_.push_back(id);
      threads_.push_back(std::this_thread::get_id());
    };
  }
  bool WaitForCount(size_t n) {
    absl::MutexLock lock(&mu_);
    auto reached = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return order_.size() >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&reached), kGenerous);
  }
  std::vector<int> order() {
    absl::MutexLock lock(&mu_);
    return order_;
  }
  std::vector<std::thread::id> threads() {
    absl::MutexLock lock(&mu_);
    return threads_;
  }

 private:
  absl::Mutex mu_;
  std::vector<int> order_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread::id> threads_ ABSL_GUARDED_BY(mu_);
};

TEST(ExitWatcher, ReportsAnExitOnceOnItsOwnThread) {
  Exits exits;
  Child child = Sleeper();
  Fd pidfd(OpenPidfd(child));
  {
    ExitWatcher watcher;
    ASSERT_TRUE(watcher.Watch(pidfd.fd, exits.Callback(1)).ok());
    EXPECT_EQ(exits.order().size(), 0u) << "still running";
    ASSERT_TRUE(SignalPidfd(pidfd.fd, SIGKILL).ok());
    ASSERT_TRUE(exits.WaitForCount(1));
  }
  EXPECT_EQ(exits.order(), std::vector<int>{1});
  ASSERT_EQ(exits.threads().size(), 1u);
  EXPECT_NE(exits.threads()[0], std::this_thread::get_id());
  const int status = child.Wait();
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
}

TEST(ExitWatcher, AProcessThatHasAlreadyExitedIsReportedAtOnce) {
  Exits exits;
  Child child({"/bin/sh", "-c", "exit 3"});
  Fd pidfd(OpenPidfd(child));
  child.WaitExited();
  ExitWatcher watcher;
  ASSERT_TRUE(watcher.Watch(pidfd.fd, exits.Callback(1)).ok());
  EXPECT_TRUE(exits.WaitForCount(1));
}

TEST(ExitWatcher, AProcessThatWasAlreadyReapedIsReportedAtOnce) {
  Exits exits;
  Child child({"/bin/sh", "-c", "exit 3"});
  Fd pidfd(OpenPidfd(child));
  child.Wait();
  ExitWatcher watcher;
  ASSERT_TRUE(watcher.Watch(pidfd.fd, exits.Callback(1)).ok());
  EXPECT_TRUE(exits.WaitForCount(1));
}

// The watcher keeps its own copy of the pidfd.
TEST(ExitWatcher, TheCallerMayCloseItsPidfdRightAfterWatch) {
  Exits exits;
  Child child = Sleeper();
  ExitWatcher watcher;
  {
    Fd pidfd(OpenPidfd(child));
    ASSERT_TRUE(watcher.Watch(pidfd.fd, exits.Callback(1)).ok());
  }
  ASSERT_EQ(::kill(child.pid(), SIGKILL), 0);
  EXPECT_TRUE(exits.WaitForCount(1));
}

TEST(ExitWatcher, SeveralProcessesAreEachReportedAsTheyExit) {
  Exits exits;
  std::vector<std::unique_ptr<Child>> children;
  std::vector<std::unique_ptr<Fd>> pidfds;
  ExitWatcher watcher;
  for (int i = 0; i < 3; ++i) {
    children.push_back(std::make_unique<Child>(std::vector<std::string>{"/bin/sleep", "30"}));
    pidfds.push_back(std::make_unique<Fd>(OpenPidfd(*children.back())));
    ASSERT_TRUE(watcher.Watch(pidfds.back()->fd, exits.Callback(i)).ok());
  }
  // Killed one at a time, each waited for: the reports follow the exits.
  for (int i : {2, 0, 1}) {
    ASSERT_TRUE(SignalPidfd(pidfds[i]->fd, SIGKILL).ok());
    ASSERT_TRUE(exits.WaitForCount(exits.order().size() + 1));
  }
  EXPECT_EQ(exits.order(), (std::vector<int>{2, 0, 1}));
}

TEST(ExitWatcher, GoingAwayWithProcessesStillRunningCallsNothingAndLeaksNoFd) {
  Exits exits;
  Child child = Sleeper();
  Fd pidfd(OpenPidfd(child));
  const size_t fds_before = OpenFdCount();
  {
    ExitWatcher watcher;
    ASSERT_TRUE(watcher.Watch(pidfd.fd, exits.Callback(1)).ok());
  }
  EXPECT_EQ(OpenFdCount(), fds_before);
  ASSERT_TRUE(SignalPidfd(pidfd.fd, SIGKILL).ok());
  child.Wait();
  EXPECT_TRUE(exits.order().empty());
}

TEST(ExitWatcher, ADescriptorThatIsNoPidfdIsRefusedWithoutLeaking) {
  Exits exits;
  TempDir dir;
  std::ofstream(dir / "file") << "x";
  Fd file(::open((dir / "file").c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_GE(file.fd, 0);
  ExitWatcher watcher;
  const size_t fds_before = OpenFdCount();
  EXPECT_FALSE(watcher.Watch(file.fd, exits.Callback(1)).ok());
  EXPECT_FALSE(watcher.Watch(-1, exits.Callback(2)).ok());
  EXPECT_EQ(OpenFdCount(), fds_before);
  // The watcher still works afterwards.
  Child child({"/bin/true"});
  Fd pidfd(OpenPidfd(child));
  ASSERT_TRUE(watcher.Watch(pidfd.fd, exits.Callback(3)).ok());
  ASSERT_TRUE(exits.WaitForCount(1));
  EXPECT_EQ(exits.order(), std::vector<int>{3});
}

}  // namespace
}  // namespace ndq
