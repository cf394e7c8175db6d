// `nomad alloc exec` into a VM: a command run in the guest through the task's
// guest agent (qemu-guest-agent's guest-exec), with Nomad's deadline and
// cancellation. The gRPC side is driver/exec_service.
#pragma once

#include <functional>

#include "base/timeouts.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "qemu/guest_exec.h"
#include "vm/vm_task.h"

namespace ndq {

struct TaskExecOptions {
  absl::Time deadline = absl::InfiniteFuture();  // Nomad's exec timeout
  std::function<bool()> cancelled;               // true once Nomad's call ended
  GuestExec::OutputHandler on_output;            // output as the agent hands it over
};

// How long exec waits for the guest agent to answer before it reports that
// there is none: a running agent answers in milliseconds.
inline constexpr absl::Duration kExecAgentConnect = timeouts::kExecAgentConnect;

// Runs `request` in `task`'s guest and waits for it. FailedPrecondition when
// the task has exited or runs without guest_agent, Unavailable when its agent
// does not answer, NotFound when the guest has no such program. A command
// still running at the deadline or when cancelled is killed in the guest
// (DeadlineExceeded, Cancelled), so the agent forgets it.
// ExecInTask's errors that come before the command (it connects the agent).
absl::Status CheckExecTarget(VmTask& task);

absl::StatusOr<GuestExecResult> ExecInTask(VmTask& task, const GuestExecRequest& request,
                                           const TaskExecOptions& options);

}  // namespace ndq
