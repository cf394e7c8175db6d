// nomad-qemu-supervisor as real processes: /bin/sh scripts stand in for QEMU in
// most cases, the real qemu-system-x86_64 (TCG, paused) in one. Every test
// parses exit.json with the plugin-side parser, so a partial or invalid record
// fails it. Also the plugin side of the contract (supervisor_protocol.h).
#include "qemu_driver/supervisor_protocol.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/base/config.h"
#include "absl/strings/str_join.h"

#include "../support/temp_dir.h"
#include "../support/test_guest.h"

namespace ndq::supervisor {
namespace {

using ::ndq::testing::ReadFile;
using ::ndq::testing::TempDir;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::StartsWith;
using Clock = std::chrono::steady_clock;

constexpr char kSupervisor[] = NDQ_SUPERVISOR_BINARY;
constexpr char kQemu[] = "/usr/bin/qemu-system-x86_64";
constexpr char kSwtpm[] = "/usr/bin/swtpm";
constexpr auto kTimeout = std::chrono::seconds(20);
// QEMU start-up under TCG on a loaded 2-core machine.
constexpr auto kQemuTimeout = std::chrono::seconds(60);

#if defined(ABSL_HAVE_ADDRESS_SANITIZER) || defined(ABSL_HAVE_THREAD_SANITIZER)
constexpr bool kSanitized = true;  // the sanitizer runtime dwarfs the supervisor's own memory
#else
constexpr bool kSanitized = false;
#endif

int PidfdOpen(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }

// True once `fd` (a pidfd) reports that its process exited, within `timeout`.
bool WaitPidfd(int fd, Clock::duration timeout) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    pollfd p = {fd, POLLIN, 0};
    const int n = ::poll(&p, 1, static_cast<int>(std::max<int64_t>(left, 0)));
    if (n > 0) return true;
    if (n == 0 || errno != EINTR) return false;
  }
}

// Checks `done` every 5 ms until it holds or `timeout` passes.
bool WaitFor(const std::function<bool()>& done, Clock::duration timeout = kTimeout) {
  const auto deadline = Clock::now() + timeout;
  while (!done()) {
    if (Clock::now() > deadline) return false;
    ::usleep(5000);
  }
  return true;
}

bool Exists(const std::string& path) { return ::access(path.c_str(), F_OK) == 0; }

// Writes `content` to `path` whole, as the plugin's atomic writes leave it.
void WriteFile(const std::string& path, const std::string& content) {
  const std::string temp = path + ".tmp";
  std::ofstream(temp, std::ios::binary | std::ios::trunc) << content;
  ASSERT_EQ(::rename(temp.c_str(), path.c_str()), 0) << path;
}

std::vector<std::string> ListDir(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) names.push_back(entry.path().filename());
  std::sort(names.begin(), names.end());
  return names;
}

// The value of a "Key:\tvalue" line in /proc/PID/status, "" when absent.
std::string ProcStatus(pid_t pid, const std::string& key) {
  std::istringstream in(ReadFile("/proc/" + std::to_string(pid) + "/status"));
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(key + ":", 0) == 0) {
      const size_t start = line.find_first_not_of(" \t", key.size() + 1);
      return start == std::string::npos ? "" : line.substr(start);
    }
  }
  return "";
}

// A signal mask line (SigBlk, SigIgn, SigCgt) of /proc/PID/status; 0 once the process is gone.
uint64_t SignalMask(pid_t pid, const std::string& key) {
  const std::string hex = ProcStatus(pid, key);
  return hex.empty() ? 0 : std::stoull(hex, nullptr, 16);
}
uint64_t Bit(int sig) { return uint64_t{1} << (sig - 1); }

// The argv of a live process; empty for a zombie or a process that is gone.
std::vector<std::string> Cmdline(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/cmdline", std::ios::binary);
  std::vector<std::string> args;
  for (std::string arg; std::getline(in, arg, '\0');) args.push_back(arg);
  return args;
}

// Live processes with `arg` as one whole argument.
std::vector<pid_t> ProcessesWithArg(const std::string& arg) {
  std::vector<pid_t> pids;
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    const std::string name = entry.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    const std::vector<std::string> args = Cmdline(std::stoi(name));
    if (std::find(args.begin(), args.end(), arg) != args.end()) pids.push_back(std::stoi(name));
  }
  return pids;
}

// "Pss:   241 kB" from /proc/PID/smaps_rollup, in kB.
long SmapsRollupKb(pid_t pid, const std::string& key) {
  std::istringstream in(ReadFile("/proc/" + std::to_string(pid) + "/smaps_rollup"));
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(key + ":", 0) == 0) return std::stol(line.substr(key.size() + 1));
  }
  return -1;
}

// Reads a FIFO opened with O_NONBLOCK until its writer closes it.
std::string ReadFifoToEof(int fd, Clock::duration timeout = kTimeout) {
  const auto deadline = Clock::now() + timeout;
  std::string data;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) {
      ADD_FAILURE() << "FIFO not closed by its writer in time; read so far: " << data;
      return data;
    }
    pollfd p = {fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left)) <= 0) continue;
    char buf[4096];
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n == 0) return data;  // poll reports a FIFO's hangup only after a writer came and went
    if (n > 0) data.append(buf, static_cast<size_t>(n));
  }
}

// Replaces the current (forked) process with argv in the state the plugin
// itself runs in: SIGTERM blocked, SIGINT and SIGPIPE ignored, output to `log`.
[[noreturn]] void ExecLikeThePlugin(char* const* argv, const char* log) {
  const int fd = ::open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
  const int null_fd = ::open("/dev/null", O_RDONLY);
  if (fd < 0 || null_fd < 0 || ::dup2(null_fd, 0) < 0 || ::dup2(fd, 1) < 0 || ::dup2(fd, 2) < 0) ::_exit(126);
  ::signal(SIGINT, SIG_IGN);
  ::signal(SIGPIPE, SIG_IGN);
  sigset_t term;
  sigemptyset(&term);
  sigaddset(&term, SIGTERM);
  ::sigprocmask(SIG_BLOCK, &term, nullptr);
  ::execv(argv[0], argv);
  ::_exit(127);
}

class SupervisorTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // Orphaned supervisors and QEMUs become our children, so TearDown reaps them.
    ASSERT_EQ(::prctl(PR_SET_CHILD_SUBREAPER, 1), 0);
  }

  void SetUp() override {
    ASSERT_FALSE(state_.path().empty());
    ASSERT_FALSE(logs_.path().empty());
    // Left open across exec on purpose: the supervisor must not pass it on.
    inherited_fd_ = ::open("/dev/null", O_RDONLY);
  }

  void TearDown() override {
    // The QEMU first, while its supervisor (its parent) is still known.
    std::string error;
    if (const std::optional<pid_t> qemu = ReadQemuPid(state_.path(), &error); qemu && OwnProcess(*qemu)) Track(*qemu);
    for (const Tracked& t : tracked_) ::syscall(SYS_pidfd_send_signal, t.pidfd, SIGKILL, nullptr, 0);
    for (const Tracked& t : tracked_) {
      EXPECT_TRUE(WaitPidfd(t.pidfd, kTimeout)) << "pid " << t.pid << " did not die";
      ::close(t.pidfd);
    }
    while (::waitpid(-1, nullptr, WNOHANG) > 0) {
    }
    ::close(inherited_fd_);
  }

  std::string Out() const { return logs_ / "stdout"; }
  std::string Err() const { return logs_ / "stderr"; }
  std::string Log() const { return state_ / kLogFile; }

  std::vector<std::string> Argv(const std::vector<std::string>& qemu_argv, const std::string& user = "") const {
    return SupervisorArgv(kSupervisor, state_.path(), Out(), Err(), user, qemu_argv);
  }
  static std::vector<std::string> Shell(const std::string& script) { return {"/bin/sh", "-c", script}; }

  // Starts the supervisor as our child, the way the plugin will.
  pid_t Spawn(const std::vector<std::string>& argv) {
    std::vector<char*> args = CArgs(argv);
    const std::string log = Log();
    const pid_t pid = ::fork();
    if (pid == 0) ExecLikeThePlugin(args.data(), log.c_str());
    EXPECT_GT(pid, 0);
    Track(pid);
    return pid;
  }

  // Starts the supervisor from an intermediate process that stays alive until
  // killed, like a plugin that crashes later. Sets *intermediate.
  pid_t SpawnThroughIntermediate(const std::vector<std::string>& argv, pid_t* intermediate) {
    std::vector<char*> args = CArgs(argv);
    const std::string log = Log();
    int report[2];
    EXPECT_EQ(::pipe2(report, O_CLOEXEC), 0);
    *intermediate = ::fork();
    if (*intermediate == 0) {
      const pid_t sup = ::fork();
      if (sup == 0) ExecLikeThePlugin(args.data(), log.c_str());
      if (::write(report[1], &sup, sizeof sup) != sizeof sup) ::_exit(1);
      for (;;) ::pause();
    }
    Track(*intermediate);
    ::close(report[1]);
    pid_t sup = -1;
    pollfd p = {report[0], POLLIN, 0};
    EXPECT_EQ(::poll(&p, 1, 20000), 1);
    EXPECT_EQ(::read(report[0], &sup, sizeof sup), static_cast<ssize_t>(sizeof sup));
    ::close(report[0]);
    if (sup > 0) Track(sup);
    return sup;
  }

  // The wait status of our child `pid`, or nullopt if it is still running at the deadline.
  std::optional<int> WaitExit(pid_t pid, Clock::duration timeout = kTimeout) {
    for (const Tracked& t : tracked_) {
      if (t.pid != pid) continue;
      if (!WaitPidfd(t.pidfd, timeout)) return std::nullopt;
      int status = 0;
      if (::waitpid(pid, &status, 0) != pid) return std::nullopt;
      return status;
    }
    ADD_FAILURE() << "pid " << pid << " is not tracked";
    return std::nullopt;
  }

  // Expects the supervisor to exit with `code` in time.
  void ExpectSupervisorExit(pid_t sup, int code, Clock::duration timeout = kTimeout) {
    const std::optional<int> status = WaitExit(sup, timeout);
    ASSERT_TRUE(status.has_value()) << "supervisor still running; log:\n" << ReadFile(Log());
    ASSERT_TRUE(WIFEXITED(*status)) << "status " << *status;
    EXPECT_EQ(WEXITSTATUS(*status), code) << ReadFile(Log());
  }

  // exit.json through the plugin's parser; a failure if absent or invalid.
  ExitRecord Record() const {
    std::string error;
    const std::optional<ExitRecord> record = ReadExitRecord(state_.path(), &error);
    if (!record) {
      ADD_FAILURE() << "no valid exit record: " << (error.empty() ? "file missing" : error) << "\nfile: "
                    << ReadFile(state_ / kExitFile);
      ExitRecord none;
      none.error = "<no record>";
      return none;
    }
    return *record;
  }

  // Waits for qemu.pid and tracks that process; -1 on timeout.
  pid_t WaitQemuPid() {
    std::optional<pid_t> pid;
    std::string error;
    const bool written = WaitFor([&] { return (pid = ReadQemuPid(state_.path(), &error)).has_value(); });
    EXPECT_TRUE(written) << "no qemu.pid (" << error << "); log:\n" << ReadFile(Log());
    if (!written) return -1;
    Track(*pid);
    return *pid;
  }

  bool LogContains(const std::string& text) const { return ReadFile(Log()).find(text) != std::string::npos; }

  void ExpectStateFiles(std::vector<std::string> names) const {
    std::sort(names.begin(), names.end());
    EXPECT_EQ(ListDir(state_.path()), names);
  }

  // Killed (if still running) and waited for at TearDown.
  void Track(pid_t pid) {
    for (const Tracked& t : tracked_) {
      if (t.pid == pid) return;
    }
    const int fd = PidfdOpen(pid);
    if (fd >= 0) tracked_.push_back({pid, fd});
  }

  TempDir state_;
  TempDir logs_;

 private:
  struct Tracked {
    pid_t pid;
    int pidfd;
  };

  static std::vector<char*> CArgs(const std::vector<std::string>& argv) {
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    return args;
  }


  // Guards TearDown against killing an unrelated process that reused a pid.
  bool OwnProcess(pid_t pid) const {
    const std::string ppid = ProcStatus(pid, "PPid");
    if (ppid.empty()) return false;
    const pid_t parent = std::stoi(ppid);
    if (parent == ::getpid()) return true;
    return std::any_of(tracked_.begin(), tracked_.end(), [&](const Tracked& t) { return t.pid == parent; });
  }

  std::vector<Tracked> tracked_;
  int inherited_fd_ = -1;
};

TEST_F(SupervisorTest, RecordsTheExitCode) {
  const int64_t before = std::chrono::duration_cast<std::chrono::milliseconds>(
                             std::chrono::system_clock::now().time_since_epoch()).count();
  const pid_t sup = Spawn(Argv(Shell("exit 7")));
  ExpectSupervisorExit(sup, kExitOk);
  const ExitRecord r = Record();
  EXPECT_EQ(r.exit_code, 7);
  EXPECT_EQ(r.signal, 0);
  EXPECT_FALSE(r.core_dumped);
  EXPECT_EQ(r.error, "");
  EXPECT_EQ(r.stderr_tail, "");
  EXPECT_GE(r.started_at_ms, before);
  EXPECT_LE(r.started_at_ms, r.exited_at_ms);
  EXPECT_LE(r.exited_at_ms, before + 60'000);
  // Temp files never outlive a write.
  ExpectStateFiles({kExitFile, kPidFile, kLogFile});
  EXPECT_TRUE(LogContains("QEMU running as pid"));
  EXPECT_TRUE(LogContains("exited with code 7"));
}

TEST_F(SupervisorTest, RecordsAKillBySignal) {
  const pid_t sup = Spawn(Argv(Shell("exec sleep 600")));
  const pid_t qemu = WaitQemuPid();
  ASSERT_GT(qemu, 0);
  ASSERT_EQ(::kill(qemu, SIGKILL), 0);
  ExpectSupervisorExit(sup, kExitOk);
  const ExitRecord r = Record();
  EXPECT_EQ(r.exit_code, -1);
  EXPECT_EQ(r.signal, SIGKILL);
  EXPECT_FALSE(r.core_dumped);
  EXPECT_EQ(r.error, "");
  EXPECT_TRUE(LogContains("killed by signal 9"));
}

TEST_F(SupervisorTest, CopiesStderrAndKeepsItsTailAsValidJson) {
  // 10000 bytes, then quotes, a backslash, control characters, an invalid
  // UTF-8 byte (\377) and a valid two-byte character (é).
  const pid_t sup = Spawn(Argv(Shell(
      R"(head -c 10000 /dev/zero | tr '\0' x >&2; printf 'a"b\\c\t\001\377\303\251\n' >&2; exit 3)")));
  ExpectSupervisorExit(sup, kExitOk);
  const std::string special = "a\"b\\c\t\001\377\303\251\n";
  EXPECT_EQ(ReadFile(Err()), std::string(10000, 'x') + special);
  const ExitRecord r = Record();
  EXPECT_EQ(r.exit_code, 3);
  // The last 4096 bytes, with the invalid byte replaced by U+FFFD.
  EXPECT_EQ(r.stderr_tail, std::string(kStderrTailBytes - special.size(), 'x') + "a\"b\\c\t\001\xEF\xBF\xBD\xC3\xA9\n");
  const std::string raw = ReadFile(state_ / kExitFile);
  EXPECT_THAT(raw, HasSubstr(R"("stderr_tail":"xxx)"));
  EXPECT_THAT(raw, HasSubstr(R"(a\"b\\c\t\u0001\ufffd)"));
}

TEST_F(SupervisorTest, DropsACharacterCutInHalfAtTheStartOfTheTail) {
  // "x" + 2048 two-byte characters + "y" = 4098 bytes: the last 4096 begin in
  // the middle of the first "é".
  const pid_t sup = Spawn(Argv(Shell(
      R"(printf x >&2; i=0; while [ $i -lt 2048 ]; do printf '\303\251' >&2; i=$((i+1)); done; printf y >&2)")));
  ExpectSupervisorExit(sup, kExitOk);
  std::string expected;
  for (int i = 0; i < 2047; ++i) expected += "\xC3\xA9";
  EXPECT_EQ(Record().stderr_tail, expected + "y");
}

// Both outputs are pipes copied to the files, so each keeps a tail: stdout's
// (the guest's serial console) explains a boot that never finished.
TEST_F(SupervisorTest, StdoutAndStderrArePipesCopiedWithTheirTails) {
  // readlink shows what the "QEMU" shell's fds really are.
  const pid_t sup =
      Spawn(Argv(Shell("echo hello; readlink /proc/$$/fd/0 /proc/$$/fd/1; readlink /proc/$$/fd/2; echo to-stderr >&2")));
  ExpectSupervisorExit(sup, kExitOk);
  std::istringstream out(ReadFile(Out()));
  std::string hello, in_target, out_target, err_target;
  std::getline(out, hello);
  std::getline(out, in_target);
  std::getline(out, out_target);
  std::getline(out, err_target);
  EXPECT_EQ(hello, "hello");
  EXPECT_EQ(in_target, "/dev/null");
  EXPECT_THAT(out_target, StartsWith("pipe:"));
  EXPECT_THAT(err_target, StartsWith("pipe:"));
  EXPECT_EQ(ReadFile(Err()), "to-stderr\n");
  EXPECT_EQ(Record().stderr_tail, "to-stderr\n");
  EXPECT_EQ(Record().stdout_tail, ReadFile(Out()));
  struct stat st {};
  ASSERT_EQ(::stat(Out().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0640u);
}

// The stdout tail is a fixed ring: a guest printing without end costs the
// supervisor 4 KiB, and the record keeps the last of it.
TEST_F(SupervisorTest, StdoutTailKeepsTheLastBytes) {
  const pid_t sup = Spawn(Argv(Shell(
      R"(i=0; while [ $i -lt 2000 ]; do echo "line $i"; i=$((i+1)); done; printf 'last')")));
  ExpectSupervisorExit(sup, kExitOk);
  const std::string tail = Record().stdout_tail;
  EXPECT_EQ(tail.size(), kStdoutTailBytes);
  EXPECT_THAT(tail, ::testing::EndsWith("line 1999\nlast"));
  EXPECT_THAT(ReadFile(Out()), StartsWith("line 0\nline 1\n"));
}

TEST_F(SupervisorTest, AppendsToExistingOutputFiles) {
  { std::ofstream(Out()) << "earlier\n"; }
  const pid_t sup = Spawn(Argv(Shell("echo later")));
  ExpectSupervisorExit(sup, kExitOk);
  EXPECT_EQ(ReadFile(Out()), "earlier\nlater\n");
  EXPECT_EQ(Record().exit_code, 0);
}

TEST_F(SupervisorTest, ExecFailureIsRecordedWithoutHanging) {
  const pid_t sup = Spawn(Argv({"/nonexistent/qemu-system-x86_64", "-S"}));
  ExpectSupervisorExit(sup, kExitCouldNotRun);
  const ExitRecord r = Record();
  EXPECT_EQ(r.exit_code, kCouldNotRunExitCode);
  EXPECT_EQ(r.signal, 0);
  EXPECT_EQ(r.error, "exec /nonexistent/qemu-system-x86_64: No such file or directory");
  ExpectStateFiles({kExitFile, kLogFile});
  EXPECT_TRUE(LogContains("could not run QEMU: exec"));
}

TEST_F(SupervisorTest, UnknownUserIsRecorded) {
  const pid_t sup = Spawn(Argv(Shell("exit 0"), "ndq-no-such-user"));
  ExpectSupervisorExit(sup, kExitCouldNotRun);
  const ExitRecord r = Record();
  EXPECT_EQ(r.exit_code, kCouldNotRunExitCode);
  // The plugin's lookup found no ids (SupervisorArgv leaves --user-ids out).
  EXPECT_EQ(r.error, "user \"ndq-no-such-user\" does not exist (the plugin found no ids for it)");
  ExpectStateFiles({kExitFile, kLogFile});
}

TEST_F(SupervisorTest, RunsQemuAsTheGivenUser) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to switch users";
  const pid_t sup = Spawn(Argv(Shell("id -u; id -g; id -G"), "nobody"));
  ExpectSupervisorExit(sup, kExitOk);
  EXPECT_EQ(Record().exit_code, 0);
  // Debian's nobody: uid 65534, primary group nogroup (65534), no others.
  EXPECT_EQ(ReadFile(Out()), "65534\n65534\n65534\n");
}

TEST_F(SupervisorTest, QemuJoinsItsCgroupsAndNetworkNamespaceBeforeExec) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root for cgroups and namespaces";
  // A real v1 memory cgroup (this host's hierarchy) and a fresh network
  // namespace, compared by inode with what the child sees.
  const std::string cgroup = "/sys/fs/cgroup/memory/ndq-supervisor-test-" + std::to_string(::getpid());
  if (::mkdir(cgroup.c_str(), 0755) != 0) GTEST_SKIP() << "no writable v1 memory hierarchy: " << std::strerror(errno);
  const std::string netns = "ndq-supervisor-test-" + std::to_string(::getpid());
  ASSERT_EQ(std::system(("ip netns add " + netns).c_str()), 0);
  struct stat ns {};
  ASSERT_EQ(::stat(("/var/run/netns/" + netns).c_str(), &ns), 0);
  Placement placement{{cgroup + "/cgroup.procs"}, "/var/run/netns/" + netns};
  const pid_t sup = Spawn(SupervisorArgv(kSupervisor, state_.path(), Out(), Err(), "",
                                         Shell("grep memory: /proc/self/cgroup; readlink /proc/self/ns/net"), placement));
  ExpectSupervisorExit(sup, kExitOk);
  ::rmdir(cgroup.c_str());
  EXPECT_EQ(std::system(("ip netns del " + netns).c_str()), 0);
  EXPECT_EQ(Record().exit_code, 0) << Record().error;
  EXPECT_THAT(ReadFile(Out()), HasSubstr(cgroup.substr(std::strlen("/sys/fs/cgroup/memory")) + "\n"));
  EXPECT_THAT(ReadFile(Out()), HasSubstr("net:[" + std::to_string(ns.st_ino) + "]\n"));
}

TEST_F(SupervisorTest, MissingNamespaceOrCgroupIsRecordedWithoutStartingQemu) {
  Placement no_netns{{}, "/var/run/netns/ndq-no-such-namespace"};
  pid_t sup = Spawn(SupervisorArgv(kSupervisor, state_.path(), Out(), Err(), "", Shell("echo ran"), no_netns));
  ExpectSupervisorExit(sup, kExitCouldNotRun);
  EXPECT_EQ(Record().error, "network namespace /var/run/netns/ndq-no-such-namespace: No such file or directory");
  Placement no_cgroup{{"/sys/fs/cgroup/memory/ndq-no-such-cgroup/cgroup.procs"}, ""};
  sup = Spawn(SupervisorArgv(kSupervisor, state_.path(), Out(), Err(), "", Shell("echo ran"), no_cgroup));
  ExpectSupervisorExit(sup, kExitCouldNotRun);
  EXPECT_THAT(Record().error, HasSubstr("cgroup /sys/fs/cgroup/memory/ndq-no-such-cgroup/cgroup.procs: "));
  EXPECT_EQ(ReadFile(Out()), "") << "QEMU must not have run";
}

// --pooled (a warm pool's QEMU, vm/warm_pool.h): no output destination until
// the handover; what QEMU wrote before it waits in the pipes and reaches the
// task's files after it, in order.
TEST_F(SupervisorTest, PooledOutputWaitsInThePipesUntilItsHandover) {
  Placement pooled;
  pooled.pooled = true;
  const std::string go = state_ / "go";
  const pid_t sup = Spawn(SupervisorArgv(kSupervisor, state_.path(), "", "", "",
                                         Shell("echo before; echo err-before >&2; while [ ! -e " + go +
                                               " ]; do sleep 0.01; done; echo after; echo err-after >&2; exit 3"),
                                         pooled));
  ASSERT_GT(WaitQemuPid(), 0);
  EXPECT_FALSE(Exists(Out())) << "no destination before the handover";
  // A malformed handover (one line) is refused; the output keeps waiting.
  WriteFile(state_ / kHandoverFile, Out() + "\n");
  ASSERT_EQ(::kill(sup, kHandoverSignal), 0);
  ASSERT_TRUE(WaitFor([&] { return LogContains(std::string(kHandoverFile) + " unreadable or malformed"); }))
      << ReadFile(Log());
  EXPECT_FALSE(Exists(Out()));
  WriteFile(state_ / kHandoverFile, Out() + "\n" + Err() + "\n");
  ASSERT_EQ(::kill(sup, kHandoverSignal), 0);
  ASSERT_TRUE(WaitFor([&] { return ReadFile(Out()) == "before\n" && ReadFile(Err()) == "err-before\n"; }))
      << ReadFile(Log());
  WriteFile(go, "");
  ExpectSupervisorExit(sup, kExitOk);
  EXPECT_EQ(ReadFile(Out()), "before\nafter\n");
  EXPECT_EQ(ReadFile(Err()), "err-before\nerr-after\n");
  EXPECT_EQ(Record().exit_code, 3);
  EXPECT_TRUE(LogContains("handed over: stdout to " + Out() + ", stderr to " + Err())) << ReadFile(Log());
}

// A pooled QEMU that ends before any handover: its output is in the exit
// record's tails, and the supervisor does not wait for a reader that cannot come.
TEST_F(SupervisorTest, PooledQemuEndingBeforeItsHandoverKeepsItsOutputInTheRecord) {
  Placement pooled;
  pooled.pooled = true;
  const pid_t sup = Spawn(SupervisorArgv(kSupervisor, state_.path(), "", "", "",
                                         Shell("echo pooled-out; echo pooled-err >&2; exit 4"), pooled));
  ExpectSupervisorExit(sup, kExitOk, std::chrono::seconds(3));
  const ExitRecord r = Record();
  EXPECT_EQ(r.exit_code, 4);
  EXPECT_EQ(r.stdout_tail, "pooled-out\n");
  EXPECT_EQ(r.stderr_tail, "pooled-err\n");
  EXPECT_FALSE(Exists(Out()));
}

TEST_F(SupervisorTest, UnopenableOutputIsRecorded) {
  const pid_t sup =
      Spawn(SupervisorArgv(kSupervisor, state_.path(), Out(), logs_ / "missing-dir/stderr", "", Shell("exit 0")));
  ExpectSupervisorExit(sup, kExitCouldNotRun);
  const ExitRecord r = Record();
  EXPECT_EQ(r.exit_code, kCouldNotRunExitCode);
  EXPECT_EQ(r.error, "open stderr " + (logs_ / "missing-dir/stderr") + ": No such file or directory");
}

TEST_F(SupervisorTest, UsageErrorsExitTwoWithoutARecord) {
  const std::string missing_dir = state_ / "missing";
  const std::vector<std::vector<std::string>> cases = {
      {kSupervisor, "--stdout", Out(), "--stderr", Err(), "--", "/bin/true"},
      {kSupervisor, "--state-dir", state_.path(), "--stdout", Out(), "--stderr", Err()},
      {kSupervisor, "--state-dir", state_.path(), "--stdout", Out(), "--stderr", Err(), "--"},
      {kSupervisor, "--state-dir", state_.path(), "--stdout", Out(), "--stderr", Err(), "--bogus", "--", "/bin/true"},
      {kSupervisor, "--state-dir", state_.path(), "--stdout", Out(), "--stderr"},
      SupervisorArgv(kSupervisor, missing_dir, Out(), Err(), "", {"/bin/true"}),
      {kSupervisor, "--state-dir", state_.path(), "--pooled", "--stdout", Out(), "--", "/bin/true"},
  };
  const std::vector<std::string> messages = {"--state-dir is required",
                                             "no QEMU command after \"--\"",
                                             "no QEMU command after \"--\"",
                                             "unknown argument \"--bogus\"",
                                             "--stderr needs a non-empty value",
                                             "state directory " + missing_dir + ": No such file or directory",
                                             "--pooled takes no --stdout or --stderr: they come at handover"};
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(messages[i]);
    const pid_t sup = Spawn(cases[i]);
    ExpectSupervisorExit(sup, kExitUsage);
    EXPECT_TRUE(LogContains("nomad-qemu-supervisor: " + messages[i] + "\nusage: ")) << ReadFile(Log());
    EXPECT_FALSE(Exists(state_ / kExitFile));
  }
}

TEST_F(SupervisorTest, OwnSessionAndSignalStateAndNoInheritedFds) {
  const pid_t sup = Spawn(Argv(Shell("exec sleep 600")));
  const pid_t qemu = WaitQemuPid();
  ASSERT_GT(qemu, 0);
  ASSERT_TRUE(WaitFor([&] { return ReadFile("/proc/" + std::to_string(qemu) + "/comm") == "sleep\n"; }));
  // Detached from our session and process group.
  EXPECT_EQ(::getsid(sup), sup);
  EXPECT_EQ(::getpgid(sup), sup);
  EXPECT_NE(::getsid(sup), ::getsid(0));
  // The supervisor: only SIGTERM, SIGCHLD and SIGUSR1 (a pooled VM's
  // handover) blocked, taken through its signalfd (we spawned it with SIGTERM
  // blocked for itself), SIGINT/SIGHUP/SIGPIPE ignored.
  EXPECT_EQ(SignalMask(sup, "SigBlk"), Bit(SIGTERM) | Bit(SIGCHLD) | Bit(SIGUSR1));
  const uint64_t ignored = Bit(SIGINT) | Bit(SIGHUP) | Bit(SIGPIPE);
  EXPECT_EQ(SignalMask(sup, "SigIgn") & ignored, ignored);
  // QEMU: nothing blocked or ignored, and only stdin/stdout/stderr open.
  EXPECT_EQ(SignalMask(qemu, "SigBlk"), 0u);
  EXPECT_EQ(SignalMask(qemu, "SigIgn"), 0u);
  // Waited for: right after the exec, sleep's dynamic loader and locale set-up
  // briefly hold files of their own as fd 3; an inherited fd would stay.
  const std::string qemu_fds = "/proc/" + std::to_string(qemu) + "/fd";
  EXPECT_TRUE(WaitFor([&] { return ListDir(qemu_fds) == std::vector<std::string>{"0", "1", "2"}; }))
      << absl::StrJoin(ListDir(qemu_fds), " ");
  // The supervisor holds: 0-2, state dir, signalfd, --stdout, stdout pipe, --stderr, stderr pipe.
  EXPECT_EQ(ListDir("/proc/" + std::to_string(sup) + "/fd").size(), 9u);
  // Dies of SIGINT although the supervisor ignores it.
  ASSERT_EQ(::kill(qemu, SIGINT), 0);
  ExpectSupervisorExit(sup, kExitOk);
  EXPECT_EQ(Record().signal, SIGINT);
}

TEST_F(SupervisorTest, SurvivesTheDeathOfItsSpawner) {
  const std::string go = logs_ / "go";
  ASSERT_EQ(::mkfifo(go.c_str(), 0600), 0);
  pid_t intermediate = -1;
  const pid_t sup = SpawnThroughIntermediate(Argv(Shell("read line < " + go + "; exit 5")), &intermediate);
  ASSERT_GT(sup, 0);
  ASSERT_GT(WaitQemuPid(), 0);
  EXPECT_EQ(::getsid(sup), sup);
  EXPECT_EQ(ProcStatus(sup, "PPid"), std::to_string(intermediate));

  ASSERT_EQ(::kill(intermediate, SIGKILL), 0);
  const std::optional<int> mid_status = WaitExit(intermediate);
  ASSERT_TRUE(mid_status.has_value());
  EXPECT_TRUE(WIFSIGNALED(*mid_status));
  // Reparented (to us, the subreaper), still running, not a zombie.
  ASSERT_TRUE(WaitFor([&] { return ProcStatus(sup, "PPid") == std::to_string(::getpid()); }));
  const std::string state = ProcStatus(sup, "State");
  EXPECT_TRUE(!state.empty() && state[0] != 'Z' && state[0] != 'X') << state;
  EXPECT_FALSE(Exists(state_ / kExitFile));

  // Let the "QEMU" finish; the orphaned supervisor still records it.
  int writer = -1;
  ASSERT_TRUE(WaitFor([&] { return (writer = ::open(go.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC)) >= 0; }));
  ASSERT_EQ(::write(writer, "go\n", 3), 3);
  ::close(writer);
  ExpectSupervisorExit(sup, kExitOk);
  EXPECT_EQ(Record().exit_code, 5);
}

TEST_F(SupervisorTest, KillingTheSupervisorKillsQemu) {
  const pid_t sup = Spawn(Argv(Shell("exec sleep 600")));
  const pid_t qemu = WaitQemuPid();
  ASSERT_GT(qemu, 0);
  const int qemu_fd = PidfdOpen(qemu);
  ASSERT_GE(qemu_fd, 0);
  ASSERT_EQ(::kill(sup, SIGKILL), 0);
  EXPECT_TRUE(WaitPidfd(qemu_fd, kTimeout)) << "QEMU outlived its supervisor";
  ::close(qemu_fd);
  EXPECT_FALSE(Exists(state_ / kExitFile));
}

TEST_F(SupervisorTest, ForwardsSigtermAndWaitsForQemuToFinish) {
  // The "QEMU" handles SIGTERM itself: says so and exits 9.
  const pid_t sup = Spawn(Argv(Shell("trap 'kill $!; echo got-term >&2; exit 9' TERM; sleep 600 & echo ready; wait")));
  ASSERT_TRUE(WaitFor([&] { return ReadFile(Out()) == "ready\n"; })) << ReadFile(Log());
  ASSERT_EQ(::kill(sup, SIGTERM), 0);
  ExpectSupervisorExit(sup, kExitOk);
  const ExitRecord r = Record();
  EXPECT_EQ(r.exit_code, 9);
  EXPECT_EQ(r.signal, 0);
  EXPECT_EQ(r.stderr_tail, "got-term\n");
  EXPECT_TRUE(LogContains("SIGTERM from pid " + std::to_string(::getpid()) + ": forwarding to QEMU"));
}

TEST_F(SupervisorTest, ForwardedSigtermKillsADefaultChild) {
  const pid_t sup = Spawn(Argv(Shell("exec sleep 600")));
  ASSERT_GT(WaitQemuPid(), 0);
  ASSERT_EQ(::kill(sup, SIGTERM), 0);
  ExpectSupervisorExit(sup, kExitOk);
  const ExitRecord r = Record();
  EXPECT_EQ(r.exit_code, -1);
  EXPECT_EQ(r.signal, SIGTERM);
}

TEST_F(SupervisorTest, QemuStartsBeforeItsFifoReadersAndTheyGetEverything) {
  ASSERT_EQ(::mkfifo(Out().c_str(), 0600), 0);
  ASSERT_EQ(::mkfifo(Err().c_str(), 0600), 0);
  const std::string go = state_ / "go";
  ASSERT_EQ(::mkfifo(go.c_str(), 0600), 0);
  // The child writes at once, then waits until the test lets it exit.
  const pid_t sup = Spawn(Argv(Shell("echo to-stdout; echo to-stderr >&2; read x < '" + go + "'; exit 4")));
  // QEMU does not wait for Nomad's log reader: it runs (its pid is recorded)
  // while neither FIFO has a reader yet.
  ASSERT_TRUE(WaitFor([&] { return LogContains("waiting for a reader on stdout FIFO " + Out()); }));
  ASSERT_GT(WaitQemuPid(), 0);
  const int out = ::open(Out().c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  ASSERT_GE(out, 0);
  const int err = ::open(Err().c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  ASSERT_GE(err, 0);
  ASSERT_TRUE(WaitFor([&] { return LogContains("stdout FIFO " + Out() + " has a reader"); }));
  ASSERT_TRUE(WaitFor([&] { return LogContains("stderr FIFO " + Err() + " has a reader"); }));
  std::ofstream(go) << "\n";
  // What the child wrote before the readers came reached them.
  EXPECT_EQ(ReadFifoToEof(out), "to-stdout\n");
  EXPECT_EQ(ReadFifoToEof(err), "to-stderr\n");
  ::close(out);
  ::close(err);
  ExpectSupervisorExit(sup, kExitOk);
  const ExitRecord r = Record();
  EXPECT_EQ(r.exit_code, 4);
  EXPECT_EQ(r.stderr_tail, "to-stderr\n");
}

TEST_F(SupervisorTest, AChildThatExitsBeforeAnyReaderCameIsRecordedWithItsTail) {
  ASSERT_EQ(::mkfifo(Out().c_str(), 0600), 0);
  const pid_t sup = Spawn(Argv(Shell("echo last-words >&2; exit 3")));
  ASSERT_TRUE(WaitFor([&] { return LogContains("waiting for a reader on stdout FIFO"); }));
  // Exited, no reader ever: a SIGTERM ends the short wait for one, and the
  // exit is recorded with what QEMU said.
  const pid_t qemu = WaitQemuPid();
  ASSERT_GT(qemu, 0);
  ASSERT_TRUE(WaitFor([&] { return ::kill(qemu, 0) != 0; }));  // exited and reaped
  ASSERT_EQ(::kill(sup, SIGTERM), 0);
  ExpectSupervisorExit(sup, kExitOk);
  const ExitRecord r = Record();
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_EQ(r.stderr_tail, "last-words\n");
}

TEST_F(SupervisorTest, RemovesAStaleRecordBeforeStarting) {
  { std::ofstream(state_ / kExitFile) << R"({"exit_code":1,"signal":0,"core_dumped":false,"started_at":1,)"
                                         R"("exited_at":2,"stderr_tail":"","error":"old"})"; }
  { std::ofstream(state_ / kPidFile) << "1\n"; }
  { std::ofstream(state_ / (std::string(kExitFile) + kTempSuffix)) << "{\"exit_co"; }
  const std::string go = logs_ / "go";
  ASSERT_EQ(::mkfifo(go.c_str(), 0600), 0);
  const pid_t sup = Spawn(Argv(Shell("read line < " + go + "; exit 0")));
  ASSERT_TRUE(WaitFor([&] { return LogContains("QEMU running as pid"); }));
  // While the new QEMU runs, a restarted plugin must not find the old record.
  ExpectStateFiles({kLogFile, kPidFile});
  std::string error;
  EXPECT_NE(ReadQemuPid(state_.path(), &error), std::optional<pid_t>(1));
  int writer = -1;
  ASSERT_TRUE(WaitFor([&] { return (writer = ::open(go.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC)) >= 0; }));
  ASSERT_EQ(::write(writer, "go\n", 3), 3);
  ::close(writer);
  ExpectSupervisorExit(sup, kExitOk);
  EXPECT_EQ(Record().error, "");
}

// The real thing: a paused TCG QEMU. Measures the supervisor's memory while it
// supervises, then stops QEMU through the supervisor's SIGTERM forwarding.
TEST_F(SupervisorTest, SupervisesRealQemuInUnderFourMegabytes) {
  if (::access(kQemu, X_OK) != 0) GTEST_SKIP() << kQemu << " not installed";
  const pid_t sup = Spawn(Argv({kQemu, "-machine", "accel=tcg", "-S", "-nodefaults", "-display", "none"}));
  const pid_t qemu = WaitQemuPid();
  ASSERT_GT(qemu, 0);
  ASSERT_TRUE(WaitFor([&] { return LogContains("QEMU running as pid"); }, kQemuTimeout));
  // QEMU catches SIGTERM once initialized; before that, SIGTERM simply kills it.
  ASSERT_TRUE(WaitFor([&] { return (SignalMask(qemu, "SigCgt") & Bit(SIGTERM)) != 0; }, kQemuTimeout));
  std::error_code ec;
  EXPECT_EQ(std::filesystem::read_symlink("/proc/" + std::to_string(qemu) + "/exe", ec).string(), kQemu);

  const long rss_kb = std::stol(ProcStatus(sup, "VmRSS"));
  const long hwm_kb = std::stol(ProcStatus(sup, "VmHWM"));
  const long pss_kb = SmapsRollupKb(sup, "Pss");
  std::cout << "[ MEASURE  ] supervisor VmRSS " << rss_kb << " kB, VmHWM " << hwm_kb << " kB, Pss " << pss_kb
            << " kB" << (kSanitized ? " (sanitizer build)" : "") << std::endl;
  RecordProperty("supervisor_vmrss_kb", std::to_string(rss_kb));
  RecordProperty("supervisor_pss_kb", std::to_string(pss_kb));
  if (!kSanitized) {
    EXPECT_LT(rss_kb, 4096);  // the goal is 2048
    EXPECT_LT(hwm_kb, 4096);
  }

  // QEMU handles SIGTERM itself: it says so on stderr and exits 0.
  ASSERT_EQ(::kill(sup, SIGTERM), 0);
  ExpectSupervisorExit(sup, kExitOk, kQemuTimeout);
  const ExitRecord r = Record();
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(r.signal, 0);
  EXPECT_EQ(r.error, "");
  EXPECT_THAT(r.stderr_tail, HasSubstr("terminating on signal 15 from pid " + std::to_string(sup)));
  EXPECT_EQ(ReadFile(Out()), "");  // -nodefaults: no serial console
}

// --- swtpm beside QEMU ---

class SwtpmTest : public SupervisorTest {
 protected:
  void SetUp() override {
    SupervisorTest::SetUp();
    if (::access(kSwtpm, X_OK) != 0) GTEST_SKIP() << kSwtpm << " not installed (Debian package swtpm)";
    ASSERT_FALSE(tpm_.path().empty());
  }

  std::string Socket() const { return tpm_ / "ctrl.sock"; }
  // The argument only our swtpm has: its --tpmstate value names this test's directory.
  std::string TpmStateArg() const { return "dir=" + tpm_.path() + ",mode=0600"; }
  std::vector<pid_t> Swtpms() const { return ProcessesWithArg(TpmStateArg()); }

  std::vector<std::string> TpmArgv(const std::vector<std::string>& qemu_argv, const std::string& swtpm = kSwtpm) {
    Placement placement;
    placement.swtpm_path = swtpm;
    placement.swtpm_state_dir = tpm_.path();
    placement.swtpm_socket = Socket();
    return SupervisorArgv(kSupervisor, state_.path(), Out(), Err(), "", qemu_argv, placement);
  }

  // Waits for our swtpm and tracks it (TearDown kills it if a test left it).
  pid_t WaitSwtpmPid() {
    std::vector<pid_t> pids;
    EXPECT_TRUE(WaitFor([&] { return (pids = Swtpms()).size() == 1; })) << pids.size() << " swtpm processes";
    if (pids.size() != 1) return -1;
    Track(pids[0]);
    return pids[0];
  }

  TempDir tpm_;
};

TEST_F(SwtpmTest, RunsWhileQemuRunsAndIsGoneBeforeTheRecord) {
  const std::string go = logs_ / "go";
  ASSERT_EQ(::mkfifo(go.c_str(), 0600), 0);
  // The stand-in QEMU finds the socket at once: it existed before QEMU started.
  const pid_t sup = Spawn(TpmArgv(Shell("test -S " + Socket() + " || exit 1; read line < " + go + "; exit 7")));
  ASSERT_GT(WaitQemuPid(), 0);
  const pid_t swtpm = WaitSwtpmPid();
  ASSERT_GT(swtpm, 0);
  EXPECT_EQ(ProcStatus(swtpm, "PPid"), std::to_string(sup));
  EXPECT_THAT(Cmdline(swtpm), ElementsAre(kSwtpm, "socket", "--tpm2", "--tpmstate", TpmStateArg(), "--ctrl",
                                          "type=unixio,path=" + Socket() + ",mode=0600", "--terminate"));
  // Its output goes to supervisor.log; the job's stdout and stderr are QEMU's alone.
  std::error_code ec;
  const std::string fds = "/proc/" + std::to_string(swtpm) + "/fd/";
  EXPECT_EQ(std::filesystem::read_symlink(fds + "1", ec).string(), Log());
  EXPECT_EQ(std::filesystem::read_symlink(fds + "2", ec).string(), Log());
  EXPECT_TRUE(LogContains("control socket " + Socket() + " ready after "));

  int writer = -1;
  ASSERT_TRUE(WaitFor([&] { return (writer = ::open(go.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC)) >= 0; }));
  ASSERT_EQ(::write(writer, "go\n", 3), 3);
  ::close(writer);
  ExpectSupervisorExit(sup, kExitOk);
  EXPECT_EQ(Record().exit_code, 7);
  // Stopped and reaped before exit.json was written: no waiting needed here.
  EXPECT_THAT(Swtpms(), ::testing::IsEmpty());
  EXPECT_TRUE(LogContains("swtpm pid " + std::to_string(swtpm) + " exited with code 0"));
}

TEST_F(SwtpmTest, AFailingSwtpmIsRecordedAndQemuNeverRuns) {
  const pid_t sup = Spawn(TpmArgv(Shell("echo ran"), "/bin/false"));
  ExpectSupervisorExit(sup, kExitCouldNotRun);
  ExitRecord r = Record();
  EXPECT_EQ(r.exit_code, kCouldNotRunExitCode);
  EXPECT_EQ(r.error, "swtpm failed to start: it exited with code 1 before creating its control socket " + Socket() +
                         " (its output is in supervisor.log)");
  EXPECT_EQ(ReadFile(Out()), "") << "QEMU must not have run";
  EXPECT_FALSE(Exists(state_ / kPidFile));

  const pid_t missing = Spawn(TpmArgv(Shell("echo ran"), "/nonexistent/swtpm"));
  ExpectSupervisorExit(missing, kExitCouldNotRun);
  EXPECT_EQ(Record().error, "swtpm failed to start: exec /nonexistent/swtpm: No such file or directory");
  EXPECT_EQ(ReadFile(Out()), "");
}

TEST_F(SwtpmTest, AnSwtpmThatNeverListensIsKilledAfterTheTimeout) {
  // Runs, but never creates the socket; the supervisor gives up after 5 s.
  const std::string fake = logs_ / "swtpm";
  { std::ofstream(fake) << "#!/bin/sh\nexec sleep 600\n"; }
  ASSERT_EQ(::chmod(fake.c_str(), 0755), 0);
  const pid_t sup = Spawn(TpmArgv(Shell("echo ran"), fake));
  ExpectSupervisorExit(sup, kExitCouldNotRun);
  EXPECT_EQ(Record().error, "swtpm failed to start: no control socket " + Socket() + " after 5000 ms");
  EXPECT_EQ(ReadFile(Out()), "");
  EXPECT_THAT(ProcessesWithArg(TpmStateArg()), ::testing::IsEmpty()) << "the stuck swtpm was left running";
}

TEST_F(SwtpmTest, BadSwtpmOptionsAreUsageErrors) {
  const std::vector<std::string> base = {kSupervisor, "--state-dir", state_.path(), "--stdout", Out(),
                                         "--stderr", Err()};
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--swtpm", kSwtpm, "--", "/bin/true"}, "--swtpm, --swtpm-state and --swtpm-socket go together"},
      {{"--swtpm", kSwtpm, "--swtpm-state", "/a,b", "--swtpm-socket", "/s", "--", "/bin/true"},
       "swtpm path \"/a,b\" contains a comma"},
      {{"--swtpm", kSwtpm, "--swtpm-state", "/a", "--swtpm-socket", "/" + std::string(120, 's'), "--", "/bin/true"},
       "is longer than a unix socket path can be"},
  };
  for (const auto& [extra, message] : cases) {
    SCOPED_TRACE(message);
    std::vector<std::string> argv = base;
    argv.insert(argv.end(), extra.begin(), extra.end());
    const pid_t sup = Spawn(argv);
    ExpectSupervisorExit(sup, kExitUsage);
    EXPECT_TRUE(LogContains(message)) << ReadFile(Log());
  }
}

TEST_F(SwtpmTest, SwtpmRunsAsQemusUserInQemusCgroupWithoutItsFds) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to switch users and make cgroups";
  const std::string cgroup = "/sys/fs/cgroup/memory/ndq-swtpm-test-" + std::to_string(::getpid());
  if (::mkdir(cgroup.c_str(), 0755) != 0) GTEST_SKIP() << "no writable v1 memory hierarchy: " << std::strerror(errno);
  // The plugin's part: the TPM directory belongs to the VM's user.
  ASSERT_EQ(::chown(tpm_.path().c_str(), 65534, 65534), 0);
  const std::string go = tpm_ / "go";  // where the "QEMU", as nobody, can reach it
  ASSERT_EQ(::mkfifo(go.c_str(), 0666), 0);
  Placement placement;
  placement.cgroup_procs = {cgroup + "/cgroup.procs"};
  placement.swtpm_path = kSwtpm;
  placement.swtpm_state_dir = tpm_.path();
  placement.swtpm_socket = Socket();
  const pid_t sup = Spawn(SupervisorArgv(kSupervisor, state_.path(), Out(), Err(), "nobody",
                                         Shell("test -S " + Socket() + " && read line < " + go), placement));
  ASSERT_GT(WaitQemuPid(), 0);
  const pid_t swtpm = WaitSwtpmPid();
  ASSERT_GT(swtpm, 0);
  EXPECT_THAT(ProcStatus(swtpm, "Uid"), StartsWith("65534\t65534\t65534"));
  EXPECT_THAT(ReadFile("/proc/" + std::to_string(swtpm) + "/cgroup"),
              HasSubstr(cgroup.substr(std::strlen("/sys/fs/cgroup/memory")) + "\n"));
  struct stat st {};
  ASSERT_EQ(::stat(Socket().c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, 65534u);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  // 0-2 and swtpm's own; nothing of the supervisor's or the job's outputs.
  for (const std::string& fd : ListDir("/proc/" + std::to_string(swtpm) + "/fd")) {
    std::error_code ec;
    const std::string target = std::filesystem::read_symlink("/proc/" + std::to_string(swtpm) + "/fd/" + fd, ec);
    EXPECT_NE(target, Out());
    EXPECT_NE(target, Err());
  }

  int writer = -1;
  ASSERT_TRUE(WaitFor([&] { return (writer = ::open(go.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC)) >= 0; }));
  ASSERT_EQ(::write(writer, "go\n", 3), 3);
  ::close(writer);
  ExpectSupervisorExit(sup, kExitOk);
  EXPECT_EQ(Record().exit_code, 0) << Record().error;
  EXPECT_THAT(Swtpms(), ::testing::IsEmpty());
  EXPECT_TRUE(WaitFor([&] { return ::rmdir(cgroup.c_str()) == 0; })) << std::strerror(errno);
}

TEST_F(SwtpmTest, KillingTheSupervisorKillsSwtpm) {
  const pid_t sup = Spawn(TpmArgv(Shell("exec sleep 30")));
  ASSERT_GT(WaitQemuPid(), 0);
  const pid_t swtpm = WaitSwtpmPid();
  ASSERT_GT(swtpm, 0);
  const int swtpm_fd = PidfdOpen(swtpm);
  ASSERT_GE(swtpm_fd, 0);
  ASSERT_EQ(::kill(sup, SIGKILL), 0);
  EXPECT_TRUE(WaitPidfd(swtpm_fd, kTimeout)) << "swtpm outlived its supervisor";
  ::close(swtpm_fd);
  EXPECT_TRUE(WaitFor([&] { return Swtpms().empty(); }));
}

// Writes one QMP command to `fd` and returns the reply line that carries
// "return" or "error" (events before it are skipped); "" on timeout.
std::string QmpCommand(int fd, const std::string& command) {
  const std::string line = command + "\n";
  if (::write(fd, line.data(), line.size()) != static_cast<ssize_t>(line.size())) return "";
  std::string buffer;
  const auto deadline = Clock::now() + kQemuTimeout;
  while (Clock::now() < deadline) {
    for (size_t nl; (nl = buffer.find('\n')) != std::string::npos; buffer.erase(0, nl + 1)) {
      const std::string reply = buffer.substr(0, nl);
      if (reply.find("\"return\"") != std::string::npos || reply.find("\"error\"") != std::string::npos) return reply;
    }
    pollfd p = {fd, POLLIN, 0};
    if (::poll(&p, 1, 1000) <= 0) continue;
    char buf[4096];
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) return "";
    buffer.append(buf, static_cast<size_t>(n));
  }
  return "";
}

// The real pair: a paused TCG QEMU with a TIS TPM on swtpm's socket.
TEST_F(SwtpmTest, RealQemuGetsItsTpmAndSwtpmEndsWithIt) {
  if (::access(kQemu, X_OK) != 0) GTEST_SKIP() << kQemu << " not installed";
  const std::string qmp = state_ / "qmp.sock";
  const pid_t sup = Spawn(TpmArgv({kQemu, "-machine", "accel=tcg", "-S", "-nodefaults", "-display", "none",
                                   "-qmp", "unix:" + qmp + ",server=on,wait=off",
                                   "-chardev", "socket,id=chrtpm,path=" + Socket(),
                                   "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                                   "-device", "tpm-tis,tpmdev=tpm0"}));
  ASSERT_GT(WaitQemuPid(), 0);
  const pid_t swtpm = WaitSwtpmPid();
  ASSERT_GT(swtpm, 0);

  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, qmp.c_str(), sizeof addr.sun_path - 1);
  ASSERT_TRUE(WaitFor([&] { return ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0; },
                      kQemuTimeout)) << ReadFile(Log()) << ReadFile(Err());
  EXPECT_THAT(QmpCommand(fd, R"({"execute":"qmp_capabilities"})"), HasSubstr(R"("return": {})"));
  const std::string tpm = QmpCommand(fd, R"({"execute":"query-tpm"})");
  EXPECT_THAT(tpm, HasSubstr(R"("model": "tpm-tis")"));
  EXPECT_THAT(tpm, HasSubstr(R"("type": "emulator")"));
  EXPECT_THAT(tpm, HasSubstr(R"("id": "tpm0")"));
  std::cout << "[ QMP      ] query-tpm: " << tpm << std::endl;

  EXPECT_THAT(QmpCommand(fd, R"({"execute":"quit"})"), HasSubstr(R"("return")"));
  ::close(fd);
  ExpectSupervisorExit(sup, kExitOk, kQemuTimeout);
  const ExitRecord r = Record();
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(r.error, "");
  EXPECT_THAT(Swtpms(), ::testing::IsEmpty());
}

// --- The plugin's side of the contract ---

TEST(SupervisorProtocol, BuildsTheDocumentedArgv) {
  EXPECT_THAT(SupervisorArgv("/bin/sup", "/state", "/out", "/err", "", {"/usr/bin/qemu", "-S"}),
              ElementsAre("/bin/sup", "--state-dir", "/state", "--stdout", "/out", "--stderr", "/err", "--",
                          "/usr/bin/qemu", "-S"));
  EXPECT_THAT(SupervisorArgv("/bin/sup", "/state", "/out", "/err", "vm", {"/usr/bin/qemu"}),
              ElementsAre("/bin/sup", "--state-dir", "/state", "--stdout", "/out", "--stderr", "/err", "--user", "vm",
                          "--", "/usr/bin/qemu"));
  EXPECT_THAT(SupervisorArgv("/bin/sup", "/state", "/out", "/err", "", {"/usr/bin/qemu"},
                             Placement{{"/cg/memory/x/cgroup.procs", "/cg/cpu/x/cgroup.procs"}, "/var/run/netns/a"}),
              ElementsAre("/bin/sup", "--state-dir", "/state", "--stdout", "/out", "--stderr", "/err", "--cgroup",
                          "/cg/memory/x/cgroup.procs", "--cgroup", "/cg/cpu/x/cgroup.procs", "--netns",
                          "/var/run/netns/a", "--", "/usr/bin/qemu"));
}

TEST(SupervisorProtocol, ParsesARecordAndIgnoresUnknownFields) {
  std::string error;
  const std::optional<ExitRecord> r = ParseExitRecord(
      R"({"exit_code":-1,"signal":6,"core_dumped":true,"started_at":1700000000000,"exited_at":1700000000123,)"
      R"("stderr_tail":"boom\n","error":"","added_later":[1,2]})",
      &error);
  ASSERT_TRUE(r.has_value()) << error;
  EXPECT_EQ(r->exit_code, -1);
  EXPECT_EQ(r->signal, 6);
  EXPECT_TRUE(r->core_dumped);
  EXPECT_EQ(r->started_at_ms, 1700000000000);
  EXPECT_EQ(r->exited_at_ms, 1700000000123);
  EXPECT_EQ(r->stderr_tail, "boom\n");
  EXPECT_EQ(r->error, "");
}

TEST(SupervisorProtocol, RejectsBrokenRecords) {
  const std::string good =
      R"({"exit_code":0,"signal":0,"core_dumped":false,"started_at":1,"exited_at":2,"stderr_tail":"","error":""})";
  std::string error;
  ASSERT_TRUE(ParseExitRecord(good, &error).has_value()) << error;
  const std::vector<std::pair<std::string, std::string>> cases = {
      {good.substr(0, good.size() / 2), "not valid JSON"},
      {"[1,2]", "not a JSON object"},
      {R"({"signal":0,"core_dumped":false,"started_at":1,"exited_at":2,"stderr_tail":"","error":""})",
       R"("exit_code" missing)"},
      {R"({"exit_code":"0","signal":0,"core_dumped":false,"started_at":1,"exited_at":2,"stderr_tail":"","error":""})",
       R"("exit_code" missing or not an integer)"},
      {R"({"exit_code":4294967296,"signal":0,"core_dumped":false,"started_at":1,"exited_at":2,"stderr_tail":"",)"
       R"("error":""})",
       R"("exit_code" out of range)"},
      {R"({"exit_code":0,"signal":0,"core_dumped":0,"started_at":1,"exited_at":2,"stderr_tail":"","error":""})",
       R"("core_dumped" missing or not a boolean)"},
      {R"({"exit_code":0,"signal":0,"core_dumped":false,"started_at":1,"exited_at":2,"stderr_tail":""})",
       R"("error" missing or not a string)"},
  };
  for (const auto& [text, message] : cases) {
    EXPECT_FALSE(ParseExitRecord(text, &error).has_value()) << text;
    EXPECT_THAT(error, HasSubstr(message)) << text;
  }
}

TEST(SupervisorProtocol, ReadsStateFilesAndTellsMissingFromBroken) {
  TempDir dir;
  std::string error = "stale";
  EXPECT_FALSE(ReadExitRecord(dir.path(), &error).has_value());
  EXPECT_EQ(error, "");  // not there yet
  EXPECT_FALSE(ReadQemuPid(dir.path(), &error).has_value());
  EXPECT_EQ(error, "");

  { std::ofstream(dir / kPidFile) << "4242\n"; }
  EXPECT_EQ(ReadQemuPid(dir.path(), &error), std::optional<pid_t>(4242));
  for (const char* bad : {"", "\n", "12a\n", "42", "-5\n", "0\n", "99999999999\n"}) {
    { std::ofstream(dir / kPidFile) << bad; }
    EXPECT_FALSE(ReadQemuPid(dir.path(), &error).has_value()) << bad;
    EXPECT_THAT(error, HasSubstr("not a pid")) << bad;
  }

  { std::ofstream(dir / kExitFile) << "{\"exit_code\":"; }
  EXPECT_FALSE(ReadExitRecord(dir.path(), &error).has_value());
  EXPECT_THAT(error, HasSubstr(dir / kExitFile));
  EXPECT_THAT(error, HasSubstr("not valid JSON"));
}

}  // namespace
}  // namespace ndq::supervisor
