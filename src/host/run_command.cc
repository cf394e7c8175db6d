#include "host/run_command.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "base/error_kind.h"
#include "absl/strings/str_split.h"

extern char** environ;

namespace ndq {
namespace {

constexpr size_t kMaxOutput = 1 << 20;

int RemainingMs(absl::Time deadline) {
  const absl::Duration left = deadline - absl::Now();
  return left <= absl::ZeroDuration() ? 0 : static_cast<int>(absl::ToInt64Milliseconds(left)) + 1;
}

// Whether `pid` exits by `deadline` (not reaped here). Without a pidfd
// (very old kernels) it is waited for as before, without a limit.
bool ExitsBy(pid_t pid, absl::Time deadline) {
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (pidfd < 0) return true;
  pollfd pfd = {pidfd, POLLIN, 0};
  int ready;
  while ((ready = ::poll(&pfd, 1, RemainingMs(deadline))) < 0 && errno == EINTR) {
  }
  ::close(pidfd);
  return ready != 0;
}

}  // namespace

absl::StatusOr<CommandResult> RunCommand(const std::vector<std::string>& argv, absl::Duration timeout) {
  if (argv.empty()) return absl::InvalidArgumentError("empty command");
  int out[2];
  if (::pipe2(out, O_CLOEXEC) != 0) return absl::InternalError(absl::StrCat("pipe: ", std::strerror(errno)));

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, out[1], STDERR_FILENO);
  absl::StatusOr<pid_t> spawned = SpawnWithDefaultSignals(argv, &actions);
  posix_spawn_file_actions_destroy(&actions);
  ::close(out[1]);
  if (!spawned.ok()) {
    ::close(out[0]);
    return spawned.status();
  }
  const pid_t pid = *spawned;

  CommandResult result;
  const absl::Time deadline = absl::Now() + timeout;
  bool timed_out = false;
  char buf[4096];
  while (true) {
    pollfd pfd = {out[0], POLLIN, 0};
    const int ready = ::poll(&pfd, 1, RemainingMs(deadline));
    if (ready < 0 && errno == EINTR) continue;
    if (ready == 0) {
      timed_out = true;
      break;
    }
    const ssize_t n = ::read(out[0], buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    result.output.append(buf, std::min(static_cast<size_t>(n), kMaxOutput - result.output.size()));
  }
  ::close(out[0]);
  // Output closed is not the end: a command may close it and go on running.
  if (!timed_out && !ExitsBy(pid, deadline)) timed_out = true;
  if (timed_out) ::kill(pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (timed_out) {
    return absl::DeadlineExceededError(
        absl::StrCat(argv[0], " did not finish within ", absl::FormatDuration(timeout)));
  }
  if (WIFEXITED(status)) result.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) result.signal = WTERMSIG(status);
  return result;
}

absl::StatusOr<pid_t> SpawnWithDefaultSignals(const std::vector<std::string>& argv,
                                              const posix_spawn_file_actions_t* actions, short extra_flags) {
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none, defaults;
  sigemptyset(&none);
  sigfillset(&defaults);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &defaults);
  posix_spawnattr_setflags(&attr, static_cast<short>(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | extra_flags));
  std::vector<std::string> storage = argv;
  std::vector<char*> args;
  for (std::string& a : storage) args.push_back(a.data());
  args.push_back(nullptr);
  pid_t pid = -1;
  const int rc = ::posix_spawn(&pid, argv[0].c_str(), actions, &attr, args.data(), environ);
  posix_spawnattr_destroy(&attr);
  // A missing binary is not there next time either; EAGAIN or ENOMEM may pass.
  if (rc != 0) return ErrnoError(absl::StrCat("cannot run ", argv[0]), rc);
  return pid;
}

std::string FindOnPath(const std::string& name) {
  const char* path = std::getenv("PATH");
  for (absl::string_view dir : absl::StrSplit(path != nullptr ? path : "", ':', absl::SkipEmpty())) {
    const std::string candidate = absl::StrCat(dir, "/", name);
    struct stat st;
    // A directory has the execute bit too; like which(1), only files count.
    if (::stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(candidate.c_str(), X_OK) == 0) {
      return candidate;
    }
  }
  return "";
}

}  // namespace ndq
