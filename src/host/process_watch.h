// Watching processes that may not be our children (a restarted plugin finds
// its VMs' supervisors already running): pidfds, start-time checks against pid
// reuse, and one epoll thread that reports exits as they happen.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace ndq {

// The fields of /proc/PID/stat, numbered as in proc(5): fields[1] is the pid,
// fields[3] the state, fields[22] the start time. nullopt when the process is gone.
std::optional<std::vector<std::string>> ReadProcStat(pid_t pid);

// The process's start time in clock ticks since boot (/proc/PID/stat field 22),
// which together with the pid names one process for the machine's uptime.
std::optional<uint64_t> ProcessStartTicks(pid_t pid);

// A pidfd for `pid`, verified to still be the process that started at
// `start_ticks` (0: no check). NotFound when it has exited or the pid was reused.
absl::StatusOr<int> OpenVerifiedPidfd(pid_t pid, uint64_t start_ticks);

// Sends `signal` through a pidfd, so a reused pid can never be hit.
absl::Status SignalPidfd(int pidfd, int signal);

// True once the process behind `pidfd` has exited.
bool PidfdExited(int pidfd);

// Waits for `dir`/`name` to appear (inotify, no polling), or for the process
// behind `pidfd` to exit first (FailedPrecondition), or `deadline` (DeadlineExceeded).
absl::Status WaitForPathOrExit(const std::string& dir, const std::string& name, int pidfd, absl::Time deadline);

class ExitWatcher {
 public:
  ExitWatcher();
  ~ExitWatcher();
  ExitWatcher(const ExitWatcher&) = delete;
  ExitWatcher& operator=(const ExitWatcher&) = delete;

  // Calls `on_exit` once, on the watcher's thread, when the process behind
  // `pidfd` exits (at once if it already has). The watcher dups `pidfd`.
  absl::Status Watch(int pidfd, std::function<void()> on_exit);

 private:
  void Loop();

  int epoll_fd_ = -1;
  int wake_fd_ = -1;  // eventfd that ends Loop
  absl::Mutex mu_;
  uint64_t next_key_ ABSL_GUARDED_BY(mu_) = 1;
  struct Entry {
    int fd;
    std::function<void()> on_exit;
  };
  std::map<uint64_t, Entry> entries_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace ndq
