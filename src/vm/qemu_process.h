// QEMU's process as its supervisor reports it: the pid the supervisor writes
// to its state dir, checked to be a live process and held by a pidfd, so a
// reused pid is never signalled. One lookup for a task's QEMU and a pooled one.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "base/unique_fd.h"

namespace ndq {

struct QemuProcess {
  pid_t pid = -1;
  uint64_t start_ticks = 0;  // with pid, names the one process
  UniqueFd pidfd;
};

// Waits until `deadline` for the supervisor's pid file in `state_dir` (giving
// up as soon as the supervisor behind `supervisor_pidfd` exits), reads QEMU's
// pid and opens a pidfd verified against the process's start time.
absl::StatusOr<QemuProcess> FindSupervisedQemu(const std::string& state_dir, int supervisor_pidfd, absl::Time deadline);

}  // namespace ndq
