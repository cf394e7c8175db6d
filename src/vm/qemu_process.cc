#include "vm/qemu_process.h"

#include <optional>

#include "host/process_watch.h"
#include "qemu_driver/supervisor_protocol.h"

namespace ndq {

absl::StatusOr<QemuProcess> FindSupervisedQemu(const std::string& state_dir, int supervisor_pidfd,
                                               absl::Time deadline) {
  if (absl::Status there = WaitForPathOrExit(state_dir, supervisor::kPidFile, supervisor_pidfd, deadline);
      !there.ok()) {
    return there;
  }
  std::string problem;
  std::optional<pid_t> pid = supervisor::ReadQemuPid(state_dir, &problem);
  if (!pid) return absl::InternalError(problem);
  QemuProcess qemu;
  qemu.pid = *pid;
  qemu.start_ticks = ProcessStartTicks(*pid).value_or(0);
  absl::StatusOr<int> pidfd = OpenVerifiedPidfd(*pid, qemu.start_ticks);
  if (!pidfd.ok()) return pidfd.status();
  qemu.pidfd.reset(*pidfd);
  return qemu;
}

}  // namespace ndq
