#include "swtpm.h"

#include <limits.h>
#include <poll.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>

#include "log.h"
#include "signal_fd.h"

namespace ndq::supervisor {
namespace {

// swtpm creates its socket within ~0.1 s; the margin is for a loaded host.
constexpr int kStartTimeoutMs = 5000;
// swtpm writes its state and exits at once on SIGTERM.
constexpr int kStopTimeoutMs = 2000;
// Without inotify (out of instances), look for the socket this often.
constexpr int kRecheckMs = 10;

int64_t MonotonicMs() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

// The command line, in fixed buffers (the supervisor does not allocate).
// No --flags startup-clear: QEMU's firmware sends TPM2_Startup itself.
struct SwtpmCommand {
  char tpmstate[PATH_MAX + 32];
  char ctrl[PATH_MAX + 48];
  char* argv[9];
};

void BuildCommand(const SwtpmOptions& opts, SwtpmCommand* c) {
  std::snprintf(c->tpmstate, sizeof c->tpmstate, "dir=%s,mode=0600", opts.state_dir);
  std::snprintf(c->ctrl, sizeof c->ctrl, "type=unixio,path=%s,mode=0600", opts.socket);
  // --terminate: swtpm also ends by itself when QEMU closes the connection.
  const char* const argv[] = {opts.path, "socket",  "--tpm2",    "--tpmstate", c->tpmstate,
                              "--ctrl",  c->ctrl,   "--terminate", nullptr};
  static_assert(sizeof argv / sizeof argv[0] == sizeof c->argv / sizeof c->argv[0]);
  for (size_t i = 0; i < sizeof argv / sizeof argv[0]; ++i) c->argv[i] = const_cast<char*>(argv[i]);
}

// lstat: a link planted in the socket's directory is not swtpm's socket.
bool IsSocket(const char* path) {
  struct stat st {};
  return ::lstat(path, &st) == 0 && S_ISSOCK(st.st_mode);
}

// An inotify fd watching the socket's directory for new entries, or -1.
int WatchDirectoryOf(const char* path) {
  char dir[PATH_MAX];
  const char* slash = std::strrchr(path, '/');
  if (slash == nullptr) {
    std::snprintf(dir, sizeof dir, ".");
  } else {
    const int len = slash == path ? 1 : static_cast<int>(slash - path);
    std::snprintf(dir, sizeof dir, "%.*s", len, path);
  }
  const int fd = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  if (fd < 0) return -1;
  if (::inotify_add_watch(fd, dir, IN_CREATE | IN_MOVED_TO | IN_ONLYDIR) < 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

void DrainInotify(int fd) {
  alignas(inotify_event) char buf[4096];
  while (::read(fd, buf, sizeof buf) > 0) {
  }
}

// "exited with code 1", "was killed by signal 9".
void DescribeStatus(int status, char* out, size_t cap) {
  if (WIFEXITED(status)) {
    std::snprintf(out, cap, "exited with code %d", WEXITSTATUS(status));
  } else {
    std::snprintf(out, cap, "was killed by signal %d", WTERMSIG(status));
  }
}

// Waits for the control socket. False with *error set when swtpm exits first
// (then *reaped), the time is up, or a SIGTERM arrives.
bool WaitForSocket(const char* socket, pid_t pid, int signal_fd, bool* reaped, ErrorText* error) {
  // Watching before the first look: a socket created in between is not missed.
  const int watch = WatchDirectoryOf(socket);
  const int64_t deadline = MonotonicMs() + kStartTimeoutMs;
  bool ready = false;
  for (;;) {
    if (IsSocket(socket)) {
      ready = true;
      break;
    }
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) {
      *reaped = true;
      char how[64];
      DescribeStatus(status, how, sizeof how);
      error->Set("swtpm failed to start: it %s before creating its control socket %s (its output is in %s)", how,
                 socket, kLogFile);
      break;
    }
    const int64_t left = deadline - MonotonicMs();
    if (left <= 0) {
      error->Set("swtpm failed to start: no control socket %s after %d ms", socket, kStartTimeoutMs);
      break;
    }
    pollfd fds[2] = {{signal_fd, POLLIN, 0}, {watch, POLLIN, 0}};
    const int timeout = static_cast<int>(watch >= 0 || left < kRecheckMs ? left : kRecheckMs);
    if (::poll(fds, watch >= 0 ? 2 : 1, timeout) <= 0) continue;
    if ((fds[0].revents & POLLIN) != 0 && DrainSignals(signal_fd)) {
      error->Set("swtpm failed to start: SIGTERM while waiting for its control socket %s", socket);
      break;
    }
    if (watch >= 0 && fds[1].revents != 0) DrainInotify(watch);
  }
  if (watch >= 0) ::close(watch);
  return ready;
}

// A wait status no process ends with: the child could not be waited for.
constexpr int kStatusUnknown = -1;

// Waits up to `timeout_ms` for `pid` to exit; true with *status once reaped
// (kStatusUnknown when it was no child of ours to reap).
bool WaitForExit(pid_t pid, int signal_fd, int timeout_ms, int* status) {
  const int64_t deadline = MonotonicMs() + timeout_ms;
  for (;;) {
    const pid_t r = ::waitpid(pid, status, WNOHANG);
    if (r == pid) return true;
    if (r < 0 && errno != EINTR) {  // not our child any more: nothing left to reap
      Log("swtpm pid %d: waitpid: %s", static_cast<int>(pid), std::strerror(errno));
      *status = kStatusUnknown;
      return true;
    }
    const int64_t left = deadline - MonotonicMs();
    if (left <= 0) return false;
    // Each SIGCHLD makes the signalfd readable; a SIGTERM now changes nothing.
    pollfd pfd = {signal_fd, POLLIN, 0};
    if (::poll(&pfd, 1, static_cast<int>(left)) > 0) DrainSignals(signal_fd);
  }
}

}  // namespace

bool CheckSwtpmOptions(const SwtpmOptions& opts, ErrorText* error) {
  const int given = (opts.path != nullptr) + (opts.state_dir != nullptr) + (opts.socket != nullptr);
  if (given == 0) return true;
  if (given != 3) {
    error->Set("%s, %s and %s go together", kArgSwtpm, kArgSwtpmState, kArgSwtpmSocket);
    return false;
  }
  for (const char* path : {opts.state_dir, opts.socket}) {
    if (std::strchr(path, ',') != nullptr) {
      error->Set("swtpm path \"%s\" contains a comma, which swtpm's options cannot carry", path);
      return false;
    }
  }
  if (std::strlen(opts.state_dir) >= PATH_MAX || std::strlen(opts.path) >= PATH_MAX) {
    error->Set("%s or %s is longer than PATH_MAX", kArgSwtpm, kArgSwtpmState);
    return false;
  }
  if (std::strlen(opts.socket) >= sizeof(sockaddr_un{}.sun_path)) {
    error->Set("%s %s is longer than a unix socket path can be", kArgSwtpmSocket, opts.socket);
    return false;
  }
  return true;
}

pid_t StartSwtpm(const SwtpmOptions& opts, const ChildSetup& qemu_setup, int passed_fds, int signal_fd,
                 ErrorText* error) {
  static SwtpmCommand command;
  BuildCommand(opts, &command);
  ChildSetup setup = qemu_setup;  // the same cgroups, network namespace and user
  setup.argv = command.argv;
  // Its messages are for the operator, not the job: supervisor.log, beside ours.
  setup.stdout_fd = STDERR_FILENO;
  setup.stderr_fd = STDERR_FILENO;
  setup.close_passed_fds = passed_fds;
  // A socket left by an earlier run would look ready before swtpm listens.
  if (::unlink(opts.socket) == 0) Log("removed a stale swtpm socket %s", opts.socket);

  const int64_t started = MonotonicMs();
  ErrorText why;
  const pid_t pid = StartChild(setup, &why);
  if (pid < 0) {
    error->Set("swtpm failed to start: %s", why.text);
    return -1;
  }
  bool reaped = false;
  if (!WaitForSocket(opts.socket, pid, signal_fd, &reaped, error)) {
    if (!reaped) {
      ::kill(pid, SIGKILL);
      while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
      }
    }
    return -1;
  }
  Log("swtpm running as pid %d; control socket %s ready after %lld ms", static_cast<int>(pid), opts.socket,
      static_cast<long long>(MonotonicMs() - started));
  return pid;
}

void StopSwtpm(pid_t swtpm, int signal_fd) {
  if (swtpm <= 0) return;
  int status = 0;
  // With --terminate it may have ended already, when QEMU hung up.
  const pid_t reaped = ::waitpid(swtpm, &status, WNOHANG);
  if (reaped < 0) {
    Log("swtpm pid %d: waitpid: %s", static_cast<int>(swtpm), std::strerror(errno));
    return;
  }
  if (reaped == 0) {
    ::kill(swtpm, SIGTERM);
    if (!WaitForExit(swtpm, signal_fd, kStopTimeoutMs, &status)) {
      Log("swtpm pid %d still running %d ms after SIGTERM; sending SIGKILL", static_cast<int>(swtpm),
          kStopTimeoutMs);
      ::kill(swtpm, SIGKILL);
      while (::waitpid(swtpm, &status, 0) < 0 && errno == EINTR) {
      }
    }
  }
  if (status == kStatusUnknown) return;  // said by WaitForExit; no exit code to report
  char how[64];
  DescribeStatus(status, how, sizeof how);
  Log("swtpm pid %d %s", static_cast<int>(swtpm), how);
}

}  // namespace ndq::supervisor
