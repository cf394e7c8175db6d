// A VmHost for unit tests: cgroups that exist only in its books, and a
// "supervisor" that is a real but idle process (sleep), so pidfds, waits and
// kills behave as on a host while no VM runs. Either call can be made to fail.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <cerrno>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "host/run_command.h"
#include "host/vm_host.h"

namespace ndq::testing {

class FakeVmHost : public VmHost {
 public:
  ~FakeVmHost() override {
    for (pid_t pid : live_supervisors()) KillSupervisor(pid);
  }

  // The next CreateCgroup / SpawnSupervisor fails with this (OK: succeeds).
  void FailCgroupWith(absl::Status error) {
    absl::MutexLock lock(&mu_);
    cgroup_error_ = std::move(error);
  }
  void FailSpawnWith(absl::Status error) {
    absl::MutexLock lock(&mu_);
    spawn_error_ = std::move(error);
  }

  std::set<std::string> live_cgroups() const {
    absl::MutexLock lock(&mu_);
    return live_cgroups_;
  }
  std::set<pid_t> live_supervisors() const {
    absl::MutexLock lock(&mu_);
    return live_supervisors_;
  }
  int cgroups_made() const {
    absl::MutexLock lock(&mu_);
    return cgroups_made_;
  }
  int supervisors_spawned() const {
    absl::MutexLock lock(&mu_);
    return supervisors_spawned_;
  }
  // The argv of the last supervisor started.
  std::vector<std::string> last_argv() const {
    absl::MutexLock lock(&mu_);
    return last_argv_;
  }

  absl::StatusOr<std::optional<TaskCgroup>> CreateCgroup(const std::string& parent, const std::string& name,
                                                         const std::string&, const CgroupLimits&) override {
    absl::MutexLock lock(&mu_);
    if (!cgroup_error_.ok()) return cgroup_error_;
    TaskCgroup cgroup;
    cgroup.version = CgroupVersion::kV2;
    const std::string dir = "/nonexistent-fake-cgroup/" + parent + "/" + name;
    for (const char* controller : {"memory", "cpu", "pids"}) cgroup.dirs[controller] = dir;
    cgroup.created = {dir};
    live_cgroups_.insert(dir);
    ++cgroups_made_;
    return std::optional<TaskCgroup>(cgroup);
  }

  void RemoveCgroup(const TaskCgroup& cgroup) override {
    absl::MutexLock lock(&mu_);
    for (const std::string& dir : cgroup.created) live_cgroups_.erase(dir);
  }

  absl::StatusOr<pid_t> SpawnSupervisor(const std::vector<std::string>& argv, int, const std::vector<int>&) override {
    {
      absl::MutexLock lock(&mu_);
      if (!spawn_error_.ok()) return spawn_error_;
      last_argv_ = argv;
    }
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    absl::StatusOr<pid_t> pid = SpawnWithDefaultSignals({"/bin/sleep", "60"}, &actions);
    posix_spawn_file_actions_destroy(&actions);
    if (!pid.ok()) return pid.status();
    absl::MutexLock lock(&mu_);
    live_supervisors_.insert(*pid);
    ++supervisors_spawned_;
    return pid;
  }

  void KillSupervisor(pid_t pid) override {
    ::kill(pid, SIGKILL);
    while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
    }
    absl::MutexLock lock(&mu_);
    live_supervisors_.erase(pid);
  }

 private:
  mutable absl::Mutex mu_;
  absl::Status cgroup_error_ ABSL_GUARDED_BY(mu_);
  absl::Status spawn_error_ ABSL_GUARDED_BY(mu_);
  std::set<std::string> live_cgroups_ ABSL_GUARDED_BY(mu_);
  std::set<pid_t> live_supervisors_ ABSL_GUARDED_BY(mu_);
  int cgroups_made_ ABSL_GUARDED_BY(mu_) = 0;
  int supervisors_spawned_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::string> last_argv_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ndq::testing
