#include "host/vm_host.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/str_cat.h"
#include "base/error_kind.h"
#include "base/unique_fd.h"
#include "host/run_command.h"
#include "qemu_driver/supervisor_protocol.h"

namespace ndq {

absl::StatusOr<std::optional<TaskCgroup>> SystemVmHost::CreateCgroup(const std::string& parent,
                                                                     const std::string& name,
                                                                     const std::string& nomad_cgroup,
                                                                     const CgroupLimits& limits) {
  return cgroups_->Create(parent, name, nomad_cgroup, limits);
}

void SystemVmHost::RemoveCgroup(const TaskCgroup& cgroup) { RemoveTaskCgroup(cgroup); }

absl::StatusOr<pid_t> SystemVmHost::SpawnSupervisor(const std::vector<std::string>& argv, int state_fd,
                                                    const std::vector<int>& image_fds) {
  UniqueFd log(::openat(state_fd, supervisor::kLogFile, O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (!log.valid()) return ErrnoError(absl::StrCat("cannot open ", supervisor::kLogFile), errno);
  // Moved above the target numbers first, so no dup2 below overwrites a
  // source that is still to be moved.
  std::vector<UniqueFd> high;
  for (int fd : image_fds) {
    high.emplace_back(::fcntl(fd, F_DUPFD_CLOEXEC, supervisor::kFirstPassedFd + supervisor::kMaxPassedFds));
    if (!high.back().valid()) return ErrnoError("cannot duplicate an image descriptor", errno);
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, log.get(), STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, log.get(), STDERR_FILENO);
  for (size_t i = 0; i < high.size(); ++i) {
    posix_spawn_file_actions_adddup2(&actions, high[i].get(), supervisor::kFirstPassedFd + static_cast<int>(i));
  }
  absl::StatusOr<pid_t> pid = SpawnWithDefaultSignals(argv, &actions, POSIX_SPAWN_SETSID);
  posix_spawn_file_actions_destroy(&actions);
  if (!pid.ok()) {
    return WithKind(
        absl::FailedPreconditionError(absl::StrCat("cannot start the VM supervisor: ", pid.status().message())),
        KindOf(pid.status()));
  }
  return pid;
}

void SystemVmHost::KillSupervisor(pid_t pid) {
  ::kill(pid, SIGKILL);
  int status;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
}

}  // namespace ndq
