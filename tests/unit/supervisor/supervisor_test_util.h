// Helpers for the supervisor's unit tests: real files, pipes, signals and
// child processes, and waits with deadlines instead of sleeps.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace ndq::supervisor::test_util {

using Clock = std::chrono::steady_clock;
// Generous: a loaded 2-core CI machine, under a sanitizer.
inline constexpr auto kTimeout = std::chrono::seconds(20);

inline int MillisLeft(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return static_cast<int>(std::max<int64_t>(left, 0));
}

// The whole file, "" when it cannot be read.
inline std::string ReadFileText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

inline bool WriteFileText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  return static_cast<bool>(out);
}

// Sorted names in `dir`.
inline std::vector<std::string> ListDir(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) names.push_back(entry.path().filename());
  std::sort(names.begin(), names.end());
  return names;
}

// Reads `fd` until end of file; a test failure if that does not come in time.
inline std::string ReadToEof(int fd, Clock::duration timeout = kTimeout) {
  const auto deadline = Clock::now() + timeout;
  std::string data;
  for (;;) {
    const int left = MillisLeft(deadline);
    if (left <= 0) {
      ADD_FAILURE() << "no end of file in time; read so far: " << data;
      return data;
    }
    pollfd p = {fd, POLLIN, 0};
    if (::poll(&p, 1, left) <= 0) continue;
    char buf[4096];
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n == 0) return data;
    if (n > 0) {
      data.append(buf, static_cast<size_t>(n));
    } else if (errno != EINTR && errno != EAGAIN) {
      ADD_FAILURE() << "read: " << std::strerror(errno);
      return data;
    }
  }
}

// A close-on-exec pipe, closed when the test ends.
class Pipe {
 public:
  Pipe() {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) == 0) {
      read_ = fds[0];
      write_ = fds[1];
    }
  }
  ~Pipe() {
    CloseRead();
    CloseWrite();
  }
  Pipe(const Pipe&) = delete;
  Pipe& operator=(const Pipe&) = delete;
  int read_end() const { return read_; }
  int write_end() const { return write_; }
  void CloseRead() { Close(&read_); }
  // After handing the write end to a child: the reader then sees end of file when the child is done.
  void CloseWrite() { Close(&write_); }

 private:
  static void Close(int* fd) {
    if (*fd >= 0) ::close(*fd);
    *fd = -1;
  }
  int read_ = -1;
  int write_ = -1;
};

// Points this process's stderr (where the supervisor's Log writes) at `fd`
// until destroyed.
class ScopedStderr {
 public:
  explicit ScopedStderr(int fd) : saved_(::fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 0)) {
    EXPECT_GE(saved_, 0);
    EXPECT_EQ(::dup2(fd, STDERR_FILENO), STDERR_FILENO);
  }
  ~ScopedStderr() {
    if (saved_ >= 0) {
      ::dup2(saved_, STDERR_FILENO);
      ::close(saved_);
    }
  }
  ScopedStderr(const ScopedStderr&) = delete;
  ScopedStderr& operator=(const ScopedStderr&) = delete;

 private:
  int saved_;
};

// umask(0) for the test, so file modes are the code's own and not the environment's.
class ScopedUmask {
 public:
  explicit ScopedUmask(mode_t mask) : saved_(::umask(mask)) {}
  ~ScopedUmask() { ::umask(saved_); }
  ScopedUmask(const ScopedUmask&) = delete;
  ScopedUmask& operator=(const ScopedUmask&) = delete;

 private:
  mode_t saved_;
};

// True when this process has no child left, running or unreaped: whatever a
// test started has been reaped.
inline bool NoChildLeft() {
  errno = 0;
  return ::waitpid(-1, nullptr, WNOHANG) == -1 && errno == ECHILD;
}

// Reaps the child `pid`; its wait status, or -1 if it did not exit in time
// (then it is killed first, so the test never hangs).
inline int WaitChild(pid_t pid, Clock::duration timeout = kTimeout) {
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  bool exited = false;
  if (pidfd >= 0) {
    const auto deadline = Clock::now() + timeout;
    for (int left = MillisLeft(deadline); left > 0 && !exited; left = MillisLeft(deadline)) {
      pollfd p = {pidfd, POLLIN, 0};
      exited = ::poll(&p, 1, left) > 0;
    }
    ::close(pidfd);
  }
  if (!exited) ::kill(pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return exited ? status : -1;
}

// The value of a "Key:\tvalue" line of /proc/<pid>/status text.
inline std::string StatusField(const std::string& status, const std::string& key) {
  std::istringstream in(status);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(key + ":", 0) == 0) {
      const size_t start = line.find_first_not_of(" \t", key.size() + 1);
      return start == std::string::npos ? "" : line.substr(start);
    }
  }
  return "";
}

// The supervisor's signal set-up: SIGTERM and SIGCHLD blocked and read from a
// non-blocking signalfd, which swtpm's start and stop wait on.
class SignalFdTest : public ::testing::Test {
 protected:
  void SetUp() override {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGCHLD);
    ASSERT_EQ(::pthread_sigmask(SIG_BLOCK, &set, &saved_mask_), 0);
    masked_ = true;
    signal_fd_ = ::signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    ASSERT_GE(signal_fd_, 0) << std::strerror(errno);
  }

  void TearDown() override {
    if (signal_fd_ >= 0) {
      // A SIGTERM still pending would kill the test binary once unblocked.
      signalfd_siginfo info[8];
      while (::read(signal_fd_, info, sizeof info) > 0) {
      }
      ::close(signal_fd_);
    }
    if (masked_) ::pthread_sigmask(SIG_SETMASK, &saved_mask_, nullptr);
  }

  // A SIGTERM for this thread, pending (it is blocked) until the code under test reads it.
  static void QueueSigterm() {
    ASSERT_EQ(::syscall(SYS_tgkill, ::getpid(), static_cast<pid_t>(::syscall(SYS_gettid)), SIGTERM), 0) << std::strerror(errno);
  }

  int signal_fd_ = -1;

 private:
  sigset_t saved_mask_{};
  bool masked_ = false;
};

}  // namespace ndq::supervisor::test_util
