// Handing a pooled QEMU (vm/warm_pool.h) to a task, in two steps that run
// in the start pipeline's launch and restore stages:
//   1. its slot directory becomes the task's state directory (one rename in
//      the same state root; the supervisor and QEMU keep their open dirs and
//      sockets, and the task's rollback and DestroyTask remove it as any);
//   2. the task's parts are attached while the guest is still paused: the
//      task's overlay on top of the boot disk (add-fd, blockdev-add,
//      blockdev-snapshot), its port forwards (hostfwd_add), QEMU moved into
//      the task's cgroup, the output handed to Nomad's log paths (the
//      supervisor's handover file and SIGUSR1); then the guest resumes.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "qemu/vm_spec.h"
#include "vm/warm_pool.h"

namespace ndq {

absl::Status MoveSlotInto(PooledVm& vm, const std::string& state_dir);

struct TaskParts {
  int overlay_fd = -1;  // the task's overlay (ours), in its task dir
  std::vector<PortForward> forwards;
  std::vector<std::string> cgroup_procs;  // cgroup.procs files; empty: no cgroup
  std::string stdout_path, stderr_path;
};

// Step 2, through `qmp` (the pooled VM's session, now the task's); `state_dir`
// is where step 1 moved the slot.
absl::Status AttachTaskParts(QmpClient& qmp, const PooledVm& vm, const std::string& state_dir, const TaskParts& parts);

// The HMP rule for one forward ("tcp:127.0.0.1:8080-:80"); InvalidArgument
// for anything but an IPv4 address or "" and tcp/udp.
absl::StatusOr<std::string> HostForwardRule(const PortForward& forward);

// Adds or removes one forward on QEMU's user network (user.0) through HMP,
// the rule checked first (HostForwardRule). The pool's warm-up uses both.
absl::Status AddHostForward(QmpClient& qmp, const PortForward& forward);
absl::Status RemoveHostForward(QmpClient& qmp, const PortForward& forward);

}  // namespace ndq
