// CheckSwtpmOptions, and StartSwtpm/StopSwtpm with /bin/sh stand-ins for
// swtpm: each makes its "control socket" by renaming a socket file the test
// bound beforehand into place, which needs nothing but coreutils. The signal
// set-up is the supervisor's: SIGTERM and SIGCHLD read from a signalfd.
#include "../../../src/supervisor/swtpm.h"

#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/temp_dir.h"
#include "supervisor_test_util.h"

namespace ndq::supervisor {
namespace {

using ::ndq::testing::TempDir;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;
using namespace ::ndq::supervisor::test_util;

constexpr size_t kSunPathBytes = sizeof(sockaddr_un{}.sun_path);

// --- the options ---

SwtpmOptions Options(const char* path, const char* state_dir, const char* socket) {
  SwtpmOptions opts;
  opts.path = path;
  opts.state_dir = state_dir;
  opts.socket = socket;
  return opts;
}

TEST(SwtpmOptions, NoneOfThemMeansNoTpm) {
  ErrorText error;
  EXPECT_TRUE(CheckSwtpmOptions(SwtpmOptions{}, &error));
  EXPECT_TRUE(error.empty());
}

TEST(SwtpmOptions, OneOrTwoOfTheThreeAreRefused) {
  const char* p = "/usr/bin/swtpm";
  const char* d = "/run/t/tpm";
  const char* s = "/run/t/tpm.sock";
  const std::string expected =
      std::string(kArgSwtpm) + ", " + kArgSwtpmState + " and " + kArgSwtpmSocket + " go together";
  for (const SwtpmOptions& opts : {Options(p, nullptr, nullptr), Options(nullptr, d, nullptr),
                                   Options(nullptr, nullptr, s), Options(p, d, nullptr), Options(p, nullptr, s),
                                   Options(nullptr, d, s)}) {
    ErrorText error;
    EXPECT_FALSE(CheckSwtpmOptions(opts, &error));
    EXPECT_EQ(std::string(error.text), expected);
  }
  ErrorText error;
  EXPECT_TRUE(CheckSwtpmOptions(Options(p, d, s), &error)) << error.text;
}

// swtpm splits its option values on commas: a comma in the state directory or
// socket would change what swtpm is told. The binary is argv[0], not an
// option value, so it may have one.
TEST(SwtpmOptions, ACommaIsRefusedInTheStateDirAndSocketButNotTheBinary) {
  for (const SwtpmOptions& opts : {Options("/usr/bin/swtpm", "/run/t,mode=0666", "/run/t/tpm.sock"),
                                   Options("/usr/bin/swtpm", "/run/t/tpm", "/run/t/x,mode=0666")}) {
    ErrorText error;
    EXPECT_FALSE(CheckSwtpmOptions(opts, &error));
    EXPECT_THAT(std::string(error.text), HasSubstr("contains a comma"));
    EXPECT_THAT(std::string(error.text), HasSubstr(",mode=0666\""));
  }
  ErrorText error;
  EXPECT_TRUE(CheckSwtpmOptions(Options("/opt/swtpm,v2/swtpm", "/run/t/tpm", "/run/t/tpm.sock"), &error))
      << error.text;
}

// QEMU and swtpm must be able to bind and connect to it: the longest path a
// sockaddr_un holds (with its NUL) passes, one byte more does not.
TEST(SwtpmOptions, TheSocketPathMustFitASockaddrUn) {
  const std::string longest = "/" + std::string(kSunPathBytes - 2, 's');
  const std::string too_long = longest + "s";
  ErrorText error;
  EXPECT_TRUE(CheckSwtpmOptions(Options("/usr/bin/swtpm", "/run/t/tpm", longest.c_str()), &error)) << error.text;
  EXPECT_FALSE(CheckSwtpmOptions(Options("/usr/bin/swtpm", "/run/t/tpm", too_long.c_str()), &error));
  EXPECT_THAT(std::string(error.text), HasSubstr(too_long));
}

// The state directory goes into a fixed command-line buffer.
TEST(SwtpmOptions, AStateDirOrBinaryOfPathMaxIsRefused) {
  const std::string longest = "/" + std::string(PATH_MAX - 2, 'd');
  const std::string too_long = longest + "d";
  ErrorText error;
  EXPECT_TRUE(CheckSwtpmOptions(Options("/usr/bin/swtpm", longest.c_str(), "/run/t/tpm.sock"), &error))
      << error.text;
  EXPECT_FALSE(CheckSwtpmOptions(Options("/usr/bin/swtpm", too_long.c_str(), "/run/t/tpm.sock"), &error));
  EXPECT_FALSE(CheckSwtpmOptions(Options(too_long.c_str(), "/run/t/tpm", "/run/t/tpm.sock"), &error));
}

// --- starting and stopping ---

// Leaves a unix socket file at `path` (the listening socket itself is closed).
void MakeSocketFile(const std::string& path) {
  const int sock = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(sock, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  ASSERT_LT(path.size(), sizeof addr.sun_path);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  ASSERT_EQ(::bind(sock, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0) << path << ": " << std::strerror(errno);
  ::close(sock);
}

bool IsSocket(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode);
}

bool Exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

class SwtpmProcess : public SignalFdTest {
 protected:
  void SetUp() override {
    SignalFdTest::SetUp();
    if (HasFatalFailure()) return;
    ASSERT_FALSE(dir_.path().empty());
    ASSERT_EQ(::mkdir(state_.c_str(), 0700), 0);
  }

  void TearDown() override {
    for (const pid_t pid : started_) {
      if (::waitpid(pid, nullptr, WNOHANG) == 0) {  // a failed test left it running
        ::kill(pid, SIGKILL);
        ::waitpid(pid, nullptr, 0);
      }
    }
    SignalFdTest::TearDown();
  }

  // The stand-in swtpm: a shell script with `body`.
  void WriteFake(const std::string& body) {
    ASSERT_TRUE(WriteFileText(fake_, "#!/bin/sh\n" + body + "\n"));
    ASSERT_EQ(::chmod(fake_.c_str(), 0755), 0);
  }
  // Shell text that makes the control socket appear at once, complete.
  std::string CreateSocket() {
    MakeSocketFile(dir_ / "premade.sock");
    return "mv " + (dir_ / "premade.sock") + " " + socket_;
  }

  // StartSwtpm with the supervisor's stderr (its log) pointed at log_.
  pid_t Start(const ChildSetup& qemu_setup = {}, int passed_fds = 0) {
    const int log = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    EXPECT_GE(log, 0);
    pid_t pid;
    {
      ScopedStderr to_log(log);
      pid = StartSwtpm(Options(fake_.c_str(), state_.c_str(), socket_.c_str()), qemu_setup, passed_fds,
                       signal_fd_, &error_);
    }
    ::close(log);
    if (pid > 0) started_.push_back(pid);
    return pid;
  }

  void Stop(pid_t pid) {
    const int log = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    EXPECT_GE(log, 0);
    {
      ScopedStderr to_log(log);
      StopSwtpm(pid, signal_fd_);
    }
    ::close(log);
  }

  std::string Log() const { return ReadFileText(log_); }

  TempDir dir_;
  const std::string state_ = dir_ / "tpm";
  const std::string socket_ = dir_ / "ctrl.sock";
  const std::string fake_ = dir_ / "fake-swtpm";
  const std::string log_ = dir_ / "supervisor.log";
  ErrorText error_;
  std::vector<pid_t> started_;
};

TEST_F(SwtpmProcess, StartsWithTheDocumentedArgvAndIsReadyOnceItsSocketExists) {
  WriteFake("printf '%s\\n' \"$@\" > " + (dir_ / "args") + "\n" + CreateSocket() + "\nexec sleep 600");
  const pid_t pid = Start();
  ASSERT_GT(pid, 0) << error_.text;
  EXPECT_TRUE(error_.empty());
  EXPECT_TRUE(IsSocket(socket_));
  // No --flags startup-clear: QEMU's firmware starts the TPM itself.
  EXPECT_THAT(Lines(ReadFileText(dir_ / "args")),
              ElementsAre("socket", "--tpm2", "--tpmstate", "dir=" + state_ + ",mode=0600", "--ctrl",
                          "type=unixio,path=" + socket_ + ",mode=0600", "--terminate"));
  EXPECT_THAT(Log(), HasSubstr("swtpm running as pid " + std::to_string(pid) + "; control socket " + socket_ +
                               " ready after "));

  Stop(pid);
  EXPECT_TRUE(NoChildLeft()) << "swtpm was not reaped";
  EXPECT_THAT(Log(), HasSubstr("swtpm pid " + std::to_string(pid) + " was killed by signal " +
                               std::to_string(SIGTERM)));
}

// swtpm's messages are for the operator: the supervisor's log, never the job's
// stdout or stderr; and it holds none of QEMU's disk images. It joins QEMU's
// cgroups (a cgroup.procs stand-in gets its pid).
TEST_F(SwtpmProcess, IsPlacedLikeQemuButWithoutQemusOutputsOrPassedFds) {
  const int disk = ::open((dir_ / "disk.img").c_str(), O_RDWR | O_CREAT, 0600);  // inheritable, like a passed image
  const int other = ::open((dir_ / "other").c_str(), O_RDWR | O_CREAT, 0600);
  ASSERT_GE(disk, kFirstPassedFd);
  ASSERT_GT(other, disk);
  const int procs = ::open((dir_ / "cgroup.procs").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
  ASSERT_GE(procs, 0);
  Pipe job_stdout, job_stderr;

  const std::string fds = dir_ / "fds";
  WriteFake("echo swtpm-stdout-line\necho swtpm-stderr-line >&2\nreadlink /proc/self/fd/0\n"
            "{ readlink /proc/$$/fd/" + std::to_string(disk) + " || echo closed; echo --; readlink /proc/$$/fd/" +
            std::to_string(other) + "; } > " + fds + " 2>/dev/null\n" + CreateSocket() + "\nexec sleep 600");
  ChildSetup qemu;
  qemu.stdout_fd = job_stdout.write_end();
  qemu.stderr_fd = job_stderr.write_end();
  qemu.cgroup_fds[0] = procs;
  qemu.cgroup_count = 1;
  const pid_t pid = Start(qemu, disk - kFirstPassedFd + 1);
  ::close(procs);
  ASSERT_GT(pid, 0) << error_.text;

  EXPECT_EQ(ReadFileText(dir_ / "cgroup.procs"), std::to_string(pid));
  const std::vector<std::string> links = Lines(ReadFileText(fds));
  ASSERT_EQ(links.size(), 3u) << ReadFileText(fds);
  EXPECT_NE(links[0], std::filesystem::canonical(dir_ / "disk.img").string()) << "swtpm holds a disk image";
  EXPECT_EQ(links[2], std::filesystem::canonical(dir_ / "other").string()) << "the check sees inherited fds";
  EXPECT_THAT(Log(), HasSubstr("swtpm-stdout-line\n"));
  EXPECT_THAT(Log(), HasSubstr("swtpm-stderr-line\n"));
  EXPECT_THAT(Log(), HasSubstr("/dev/null\n"));  // its stdin

  Stop(pid);
  ::close(disk);
  ::close(other);
  job_stdout.CloseWrite();
  job_stderr.CloseWrite();
  EXPECT_EQ(ReadToEof(job_stdout.read_end()), "");
  EXPECT_EQ(ReadToEof(job_stderr.read_end()), "");
}

// A socket left by an earlier run would look ready before swtpm listens.
TEST_F(SwtpmProcess, RemovesAStaleSocketInsteadOfTakingItForReadiness) {
  MakeSocketFile(socket_);
  WriteFake("exit 3");
  EXPECT_EQ(Start(), -1);
  EXPECT_EQ(std::string(error_.text), "swtpm failed to start: it exited with code 3 before creating its control socket " +
                                          socket_ + " (its output is in " + kLogFile + ")");
  EXPECT_FALSE(Exists(socket_));
  EXPECT_THAT(Log(), HasSubstr("removed a stale swtpm socket " + socket_));
  EXPECT_TRUE(NoChildLeft()) << "the exited swtpm was not reaped";
}

// Only a socket at the path itself counts: a link there (to a real socket) is
// not swtpm's, whoever made it.
TEST_F(SwtpmProcess, ALinkToASocketIsNotItsControlSocket) {
  MakeSocketFile(dir_ / "elsewhere.sock");
  WriteFake("ln -s " + (dir_ / "elsewhere.sock") + " " + socket_ + "\nexit 4");
  EXPECT_EQ(Start(), -1);
  EXPECT_THAT(std::string(error_.text), HasSubstr("it exited with code 4 before creating its control socket"));
  EXPECT_TRUE(NoChildLeft());
}

// A SIGTERM for the supervisor while swtpm starts calls the start off at once
// (not after the start timeout), with no swtpm left running.
TEST_F(SwtpmProcess, ASigtermWhileWaitingCallsTheStartOffAndKillsSwtpm) {
  WriteFake("exec sleep 600");
  QueueSigterm();
  EXPECT_EQ(Start(), -1);
  EXPECT_EQ(std::string(error_.text), "swtpm failed to start: SIGTERM while waiting for its control socket " + socket_);
  EXPECT_TRUE(NoChildLeft()) << "the swtpm was left running or unreaped";
}

// With --terminate swtpm ends by itself when QEMU hangs up; stopping it then
// only reaps it and records how it really ended.
TEST_F(SwtpmProcess, StoppingAnSwtpmThatAlreadyEndedReapsIt) {
  const std::string go = dir_ / "go";
  ASSERT_EQ(::mkfifo(go.c_str(), 0600), 0);
  // Held open read-write until the stand-in is gone: its read finds a writer
  // at once and ends when the test writes (the line stays in the FIFO while
  // the test holds it open), so it exits only once the start is over.
  const int go_fd = ::open(go.c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(go_fd, 0);
  WriteFake(CreateSocket() + "\nread line < " + go + "\nexit 6");
  const pid_t pid = Start();
  ASSERT_GT(pid, 0) << error_.text;
  ASSERT_EQ(::write(go_fd, "go\n", 3), 3);
  siginfo_t info{};
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  ASSERT_GE(pidfd, 0);
  pollfd p = {pidfd, POLLIN, 0};
  const int exited = ::poll(&p, 1, static_cast<int>(std::chrono::milliseconds(kTimeout).count()));
  ::close(pidfd);
  ::close(go_fd);
  ASSERT_EQ(exited, 1) << "it did not exit";
  ASSERT_EQ(::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOWAIT), 0);  // exited, still unreaped

  Stop(pid);
  EXPECT_TRUE(NoChildLeft());
  EXPECT_THAT(Log(), HasSubstr("swtpm pid " + std::to_string(pid) + " exited with code 6"));
  EXPECT_THAT(Log(), Not(HasSubstr("SIGKILL")));
}

// One that ignores SIGTERM is killed after the stop timeout, so stopping
// always ends with no swtpm left.
TEST_F(SwtpmProcess, AnSwtpmThatIgnoresSigtermIsKilled) {
  WriteFake("trap '' TERM\n" + CreateSocket() + "\nexec sleep 600");  // the ignored SIGTERM survives exec
  const pid_t pid = Start();
  ASSERT_GT(pid, 0) << error_.text;
  Stop(pid);
  EXPECT_TRUE(NoChildLeft());
  EXPECT_THAT(Log(), HasSubstr("after SIGTERM; sending SIGKILL"));
  EXPECT_THAT(Log(), HasSubstr("swtpm pid " + std::to_string(pid) + " was killed by signal " +
                               std::to_string(SIGKILL)));
}

}  // namespace
}  // namespace ndq::supervisor
