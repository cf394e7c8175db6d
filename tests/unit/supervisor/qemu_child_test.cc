// StartChild and ResolveUser with real child processes. Placement is checked
// with stand-ins where that needs no privilege: a cgroup.procs file is any
// file the child writes its pid to. Switching users and entering a network
// namespace need root and are skipped without it; neither leaves anything
// behind (the namespace is held by a helper process that the test kills).
#include "../../../src/supervisor/qemu_child.h"

#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "../../support/temp_dir.h"
#include "supervisor_test_util.h"

namespace ndq::supervisor {
namespace {

// What the plugin does for the supervisor (SupervisorArgv's --user-ids): the
// user's ids and groups from the user database.
bool ResolveUser(const char* name, RunAs* out, ErrorText* error) {
  const passwd* pw = ::getpwnam(name);
  if (pw == nullptr) return false;
  gid_t groups[kMaxUserGroups];
  int count = kMaxUserGroups;
  if (::getgrouplist(name, pw->pw_gid, groups, &count) < 0) return false;
  std::string ids = std::to_string(pw->pw_uid) + ":" + std::to_string(pw->pw_gid) + ":";
  for (int i = 0; i < count; ++i) ids += (i == 0 ? "" : ",") + std::to_string(groups[i]);
  return ParseUserIds(name, ids.c_str(), out, error);
}

using ::ndq::testing::TempDir;
using namespace ::ndq::supervisor::test_util;

// An argv for ChildSetup, owning its strings.
class Argv {
 public:
  Argv(std::initializer_list<std::string> args) : args_(args) {
    for (std::string& a : args_) ptrs_.push_back(a.data());
    ptrs_.push_back(nullptr);
  }
  char* const* get() const { return ptrs_.data(); }

 private:
  std::vector<std::string> args_;
  std::vector<char*> ptrs_;
};

// A started child's output and wait status.
struct Finished {
  std::string out;
  std::string err;
  int status = -1;
};

// Starts `setup` with its stdout and stderr on pipes (unless the setup names
// its own), collects both and reaps the child. *pid: the pid StartChild returned.
Finished RunChild(ChildSetup setup, pid_t* pid, ErrorText* error) {
  Pipe out, err;
  if (setup.stdout_fd == -1) setup.stdout_fd = out.write_end();
  if (setup.stderr_fd == -1) setup.stderr_fd = err.write_end();
  *pid = StartChild(setup, error);
  out.CloseWrite();
  err.CloseWrite();
  Finished f;
  if (*pid <= 0) return f;
  f.out = ReadToEof(out.read_end());
  f.err = ReadToEof(err.read_end());
  f.status = WaitChild(*pid);
  return f;
}

std::string Canonical(const std::string& path) { return std::filesystem::canonical(path).string(); }

std::string Link(const std::string& path) {
  std::error_code ec;
  return std::filesystem::read_symlink(path, ec).string();
}

// "SigBlk:\t0000000000010000" as a number.
uint64_t SignalBits(const std::string& status, const std::string& key) {
  return std::stoull(StatusField(status, key), nullptr, 16);
}
uint64_t Bit(int sig) { return uint64_t{1} << (sig - 1); }

std::set<std::string> Words(const std::string& text) {
  std::istringstream in(text);
  std::set<std::string> words;
  for (std::string w; in >> w;) words.insert(w);
  return words;
}

TEST(QemuChild, RunsArgvWithStdinFromDevNullAndTheGivenOutputs) {
  const Argv argv = {"/bin/sh", "-c", "readlink /proc/self/fd/0; echo \"$0|$1\"; echo to-stderr >&2", "a r g",
                     "--"};
  ChildSetup setup;
  setup.argv = argv.get();
  pid_t pid = -1;
  ErrorText error;
  const Finished f = RunChild(setup, &pid, &error);
  ASSERT_GT(pid, 0) << error.text;
  EXPECT_TRUE(error.empty());
  EXPECT_EQ(f.out, "/dev/null\na r g|--\n");
  EXPECT_EQ(f.err, "to-stderr\n");
  EXPECT_TRUE(WIFEXITED(f.status) && WEXITSTATUS(f.status) == 0) << f.status;
}

// The supervisor ignores SIGINT, SIGHUP and SIGPIPE and blocks what its
// signalfd reads; ignored dispositions and the mask survive exec, so without
// the reset a VM could not be stopped with SIGTERM.
TEST(QemuChild, StartsWithDefaultSignalDispositionsAndAnEmptyMask) {
  const int ignored[] = {SIGINT, SIGHUP, SIGPIPE, SIGUSR1};
  struct sigaction ignore {};
  ignore.sa_handler = SIG_IGN;
  struct sigaction saved[sizeof ignored / sizeof ignored[0]] = {};
  for (size_t i = 0; i < sizeof ignored / sizeof ignored[0]; ++i) {
    ASSERT_EQ(::sigaction(ignored[i], &ignore, &saved[i]), 0);
  }
  sigset_t block, saved_mask;
  sigemptyset(&block);
  sigaddset(&block, SIGTERM);
  sigaddset(&block, SIGUSR2);
  ASSERT_EQ(::pthread_sigmask(SIG_BLOCK, &block, &saved_mask), 0);
  const std::string own = ReadFileText("/proc/self/status");

  const Argv argv = {"/bin/cat", "/proc/self/status"};
  ChildSetup setup;
  setup.argv = argv.get();
  pid_t pid = -1;
  ErrorText error;
  const Finished f = RunChild(setup, &pid, &error);

  ::pthread_sigmask(SIG_SETMASK, &saved_mask, nullptr);
  for (size_t i = 0; i < sizeof ignored / sizeof ignored[0]; ++i) ::sigaction(ignored[i], &saved[i], nullptr);

  // The test's own state did carry what the child must not inherit.
  ASSERT_NE(SignalBits(own, "SigIgn") & Bit(SIGUSR1), 0u) << own;
  ASSERT_NE(SignalBits(own, "SigBlk") & Bit(SIGUSR2), 0u) << own;
  ASSERT_GT(pid, 0) << error.text;
  ASSERT_FALSE(StatusField(f.out, "SigIgn").empty()) << f.out;
  EXPECT_EQ(SignalBits(f.out, "SigIgn"), 0u) << f.out;
  EXPECT_EQ(SignalBits(f.out, "SigBlk"), 0u) << f.out;
}

// Fds 3.. open without close-on-exec (QEMU's disk images) reach the child,
// unless the setup says to close them (swtpm); only that range is closed.
TEST(QemuChild, PassedFdsReachTheChildUnlessItIsToldToCloseThem) {
  TempDir dir;
  const int disk = ::open((dir / "disk.img").c_str(), O_RDWR | O_CREAT, 0600);  // inheritable, like a passed image
  const int other = ::open((dir / "other").c_str(), O_RDWR | O_CREAT, 0600);
  ASSERT_GE(disk, kFirstPassedFd);
  ASSERT_GT(other, disk);
  const std::string script = "readlink /proc/$$/fd/" + std::to_string(disk) + " || echo closed; readlink /proc/$$/fd/" +
                             std::to_string(other) + " || echo closed";
  const Argv argv = {"/bin/sh", "-c", script};
  const std::string disk_path = Canonical(dir / "disk.img");
  const std::string other_path = Canonical(dir / "other");

  ChildSetup setup;
  setup.argv = argv.get();
  pid_t pid = -1;
  ErrorText error;
  const Finished kept = RunChild(setup, &pid, &error);
  ASSERT_GT(pid, 0) << error.text;
  EXPECT_EQ(kept.out, disk_path + "\n" + other_path + "\n");

  setup.close_passed_fds = disk - kFirstPassedFd + 1;  // 3 .. disk
  const Finished closed = RunChild(setup, &pid, &error);
  ASSERT_GT(pid, 0) << error.text;
  EXPECT_EQ(closed.out, "closed\n" + other_path + "\n");
  ::close(disk);
  ::close(other);
}

// Each cgroup.procs gets the child's own pid, in decimal, before the exec: the
// program already runs inside its cgroups.
TEST(QemuChild, WritesItsOwnPidToEachCgroupBeforeExec) {
  TempDir dir;
  const std::string procs[] = {dir / "memory.procs", dir / "cpu.procs"};
  ChildSetup setup;
  for (const std::string& p : procs) {
    setup.cgroup_fds[setup.cgroup_count] = ::open(p.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    ASSERT_GE(setup.cgroup_fds[setup.cgroup_count], 0);
    ++setup.cgroup_count;
  }
  const Argv argv = {"/bin/sh", "-c", "echo $$; cat \"$0\"", procs[0]};
  setup.argv = argv.get();
  pid_t pid = -1;
  ErrorText error;
  const Finished f = RunChild(setup, &pid, &error);
  for (int i = 0; i < setup.cgroup_count; ++i) ::close(setup.cgroup_fds[i]);
  ASSERT_GT(pid, 0) << error.text;
  EXPECT_EQ(f.out, std::to_string(pid) + "\n" + std::to_string(pid));
  for (const std::string& p : procs) EXPECT_EQ(ReadFileText(p), std::to_string(pid)) << p;
}

// Placement that fails must fail the start, with the child reaped and the
// program never run: a QEMU outside its cgroup or namespace is not started.
class QemuChildFailure : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_FALSE(dir_.path().empty()); }

  // Expects StartChild to fail with `expected` and leave nothing behind.
  void ExpectFailure(ChildSetup setup, const std::string& expected) {
    const Argv argv = {"/bin/sh", "-c", "echo ran > \"$0\"", Marker()};
    if (setup.argv == nullptr) setup.argv = argv.get();
    pid_t pid = 0;
    ErrorText error;
    RunChild(setup, &pid, &error);
    EXPECT_EQ(pid, -1);
    EXPECT_EQ(std::string(error.text), expected);
    EXPECT_EQ(::access(Marker().c_str(), F_OK), -1) << "the program ran";
    EXPECT_TRUE(NoChildLeft()) << "the failed child was not reaped";
  }

  std::string Marker() const { return dir_ / "ran"; }
  TempDir dir_;
};

TEST_F(QemuChildFailure, ACgroupThatCannotBeJoinedStopsTheStart) {
  const int read_only = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  ASSERT_GE(read_only, 0);
  ChildSetup setup;
  setup.cgroup_fds[0] = read_only;
  setup.cgroup_count = 1;
  ExpectFailure(setup, std::string("join the VM's cgroup: ") + std::strerror(EBADF));
  ::close(read_only);
}

TEST_F(QemuChildFailure, ANetnsThatIsNoNamespaceStopsTheStart) {
  const int not_a_namespace = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  ASSERT_GE(not_a_namespace, 0);
  ChildSetup setup;
  setup.netns_fd = not_a_namespace;
  ExpectFailure(setup, std::string("enter the network namespace: ") + std::strerror(EINVAL));
  ::close(not_a_namespace);
}

TEST_F(QemuChildFailure, AnExecFailureNamesTheProgram) {
  const Argv argv = {"/nonexistent/qemu-system-x86_64", "-m", "512"};
  ChildSetup setup;
  setup.argv = argv.get();
  ExpectFailure(setup, std::string("exec /nonexistent/qemu-system-x86_64: ") + std::strerror(ENOENT));
}

// argv[0] is a path: a bare name is looked up in the working directory, never in PATH.
TEST_F(QemuChildFailure, Argv0IsAPathNotSearchedInPath) {
  const int saved_cwd = ::open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  ASSERT_GE(saved_cwd, 0);
  ASSERT_EQ(::chdir(dir_.path().c_str()), 0);  // nothing named "sh" here
  const Argv argv = {"sh", "-c", "exit 0"};
  ChildSetup setup;
  setup.argv = argv.get();
  ExpectFailure(setup, std::string("exec sh: ") + std::strerror(ENOENT));
  EXPECT_EQ(::fchdir(saved_cwd), 0);
  ::close(saved_cwd);
}

// A setup that names no output fds fails rather than running QEMU without them.
TEST_F(QemuChildFailure, NoOutputFdsStopTheStart) {
  const Argv argv = {"/bin/sh", "-c", "echo ran > \"$0\"", Marker()};
  ChildSetup setup;
  setup.argv = argv.get();
  ErrorText error;
  EXPECT_EQ(StartChild(setup, &error), -1);
  EXPECT_EQ(std::string(error.text), std::string("redirect stdout/stderr: ") + std::strerror(EBADF));
  EXPECT_EQ(::access(Marker().c_str(), F_OK), -1) << "the program ran";
  EXPECT_TRUE(NoChildLeft());
}

TEST(QemuChild, EntersTheGivenNetworkNamespace) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to make a network namespace";
  // A helper holds a fresh namespace while the test uses it.
  Pipe ready;
  const pid_t holder = ::fork();
  ASSERT_GE(holder, 0);
  if (holder == 0) {
    const char ok = ::unshare(CLONE_NEWNET) == 0 ? 'y' : 'n';
    if (::write(ready.write_end(), &ok, 1) != 1) ::_exit(1);
    ready.CloseWrite();  // the test reads to end of file
    for (;;) ::pause();
  }
  ready.CloseWrite();
  const std::string answer = ReadToEof(ready.read_end());
  if (answer != "y") {
    ::kill(holder, SIGKILL);
    WaitChild(holder);
    GTEST_SKIP() << "unshare(CLONE_NEWNET) failed here";
  }
  const std::string ns_path = "/proc/" + std::to_string(holder) + "/ns/net";
  const int ns = ::open(ns_path.c_str(), O_RDONLY | O_CLOEXEC);
  const std::string theirs = Link(ns_path);
  ASSERT_GE(ns, 0);

  const Argv argv = {"/bin/readlink", "/proc/self/ns/net"};
  ChildSetup setup;
  setup.argv = argv.get();
  setup.netns_fd = ns;
  pid_t pid = -1;
  ErrorText error;
  const Finished f = RunChild(setup, &pid, &error);
  ::close(ns);
  ::kill(holder, SIGKILL);
  WaitChild(holder);
  ASSERT_GT(pid, 0) << error.text;
  EXPECT_NE(theirs, Link("/proc/self/ns/net"));
  EXPECT_EQ(f.out, theirs + "\n");
}

// The user's ids, and its own supplementary groups only: none of root's are kept.
TEST(QemuChild, RunsAsTheResolvedUserWithOnlyItsGroups) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to switch users";
  RunAs nobody;
  ErrorText error;
  ASSERT_TRUE(ResolveUser("nobody", &nobody, &error)) << error.text;
  ASSERT_NE(nobody.uid, 0u);
  int count = 64;
  std::vector<gid_t> groups(static_cast<size_t>(count));
  ASSERT_GE(::getgrouplist("nobody", nobody.gid, groups.data(), &count), 0);
  std::set<std::string> expected_groups;
  for (int i = 0; i < count; ++i) expected_groups.insert(std::to_string(groups[static_cast<size_t>(i)]));

  const Argv argv = {"/bin/cat", "/proc/self/status"};
  ChildSetup setup;
  setup.argv = argv.get();
  setup.run_as = nobody;
  pid_t pid = -1;
  const Finished f = RunChild(setup, &pid, &error);
  ASSERT_GT(pid, 0) << error.text;
  const std::string uid = std::to_string(nobody.uid), gid = std::to_string(nobody.gid);
  EXPECT_EQ(StatusField(f.out, "Uid"), uid + "\t" + uid + "\t" + uid + "\t" + uid) << f.out;
  EXPECT_EQ(StatusField(f.out, "Gid"), gid + "\t" + gid + "\t" + gid + "\t" + gid) << f.out;
  EXPECT_EQ(Words(StatusField(f.out, "Groups")), expected_groups) << f.out;
}

// The child is SIGKILLed when the process that started it dies. Run as another
// user when root: changing credentials clears the parent-death signal, so it
// must be set after the switch.
TEST(QemuChild, DiesWithTheProcessThatStartedIt) {
  RunAs run_as;
  ErrorText error;
  if (::geteuid() == 0) {
    ASSERT_TRUE(ResolveUser("nobody", &run_as, &error)) << error.text;
  }
  // The orphan is reparented to us, so we can see how it ended.
  ASSERT_EQ(::prctl(PR_SET_CHILD_SUBREAPER, 1), 0);
  const Argv argv = {"/bin/sleep", "600"};
  const int null_fd = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
  ASSERT_GE(null_fd, 0);
  Pipe report;
  const pid_t starter = ::fork();
  ASSERT_GE(starter, 0);
  if (starter == 0) {
    ChildSetup setup;
    setup.argv = argv.get();
    setup.stdout_fd = null_fd;
    setup.stderr_fd = null_fd;
    setup.run_as = run_as;
    ErrorText why;
    const pid_t pid = StartChild(setup, &why);
    const ssize_t n = ::write(report.write_end(), &pid, sizeof pid);
    ::_exit(pid > 0 && n == static_cast<ssize_t>(sizeof pid) ? 0 : 1);
  }
  report.CloseWrite();
  ::close(null_fd);
  const std::string reported = ReadToEof(report.read_end());
  const int starter_status = WaitChild(starter);
  pid_t child = -1;
  if (reported.size() == sizeof child) std::memcpy(&child, reported.data(), sizeof child);
  const int status = child > 0 ? WaitChild(child) : -1;  // -1: still alive at the deadline (then killed)
  ::prctl(PR_SET_CHILD_SUBREAPER, 0);

  ASSERT_TRUE(WIFEXITED(starter_status) && WEXITSTATUS(starter_status) == 0) << starter_status;
  ASSERT_GT(child, 0);
  ASSERT_NE(status, -1) << "the child outlived the process that started it";
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << status;
}

// --user-ids as the plugin writes them (SupervisorArgv).
TEST(ParseUserIds, TakesUidGidAndGroups) {
  RunAs run_as;
  ErrorText error;
  ASSERT_TRUE(ParseUserIds("qemu", "107:110:110,36,4294967294", &run_as, &error)) << error.text;
  EXPECT_STREQ(run_as.name, "qemu");
  EXPECT_EQ(run_as.uid, 107u);
  EXPECT_EQ(run_as.gid, 110u);
  ASSERT_EQ(run_as.group_count, 3);
  EXPECT_EQ(run_as.groups[1], 36u);
  EXPECT_EQ(run_as.groups[2], 4294967294u);
  RunAs no_groups;
  ASSERT_TRUE(ParseUserIds("qemu", "107:110:", &no_groups, &error)) << error.text;
  EXPECT_EQ(no_groups.group_count, 0);
}

TEST(ParseUserIds, MalformedIdsAreRefusedAndNamed) {
  std::string many = "1:1:";
  for (int i = 0; i <= kMaxUserGroups; ++i) many += std::to_string(i) + ",";
  many.pop_back();
  for (const std::string& bad : {std::string(""), std::string("107"), std::string("a:b"), std::string("107:110:x"),
                                 std::string("-1:0:"), std::string("107:110:1,,2"), std::string("4294967295:0:"),
                                 std::string("99999999999:0:"), many}) {
    RunAs run_as;
    ErrorText error;
    EXPECT_FALSE(ParseUserIds("qemu", bad.c_str(), &run_as, &error)) << bad;
    EXPECT_NE(std::string(error.text).find("--user-ids"), std::string::npos) << error.text;
    EXPECT_EQ(run_as.name, nullptr);
  }
}

}  // namespace
}  // namespace ndq::supervisor
