#include "vm/task_exec.h"

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "base/timeouts.h"
#include "nomadplugin/hclog.h"

namespace ndq {
namespace {

namespace log = nomadplugin::hclog;

// The task's agent session, with exec's wording for why there is none.
absl::StatusOr<std::shared_ptr<GuestAgentClient>> ExecAgent(VmTask& task) {
  absl::StatusOr<std::shared_ptr<GuestAgentClient>> agent = task.GuestAgent(kExecAgentConnect);
  if (!agent.ok() && absl::IsFailedPrecondition(agent.status())) {
    return absl::FailedPreconditionError(
        absl::StrCat("exec runs commands through the guest agent: ", agent.status().message()));
  }
  return agent;
}

}  // namespace

absl::Status CheckExecTarget(VmTask& task) { return ExecAgent(task).status(); }

absl::StatusOr<GuestExecResult> ExecInTask(VmTask& task, const GuestExecRequest& request,
                                           const TaskExecOptions& options) {
  absl::StatusOr<std::shared_ptr<GuestAgentClient>> agent = ExecAgent(task);
  if (!agent.ok()) return agent.status();
  absl::StatusOr<GuestExec> exec =
      GuestExec::Start(**agent, request, std::min(GuestAgentClient::kDefaultTimeout,
                                                  std::max(options.deadline - absl::Now(), absl::Milliseconds(1))));
  if (!exec.ok()) {
    if (GuestAgentSessionBroken(exec.status())) task.DropGuestAgent(*agent);
    return exec.status();
  }
  absl::StatusOr<GuestExecResult> result = exec->Wait(options.deadline, options.cancelled, options.on_output);
  if (result.ok()) return result;
  if (absl::IsCancelled(result.status()) || absl::IsDeadlineExceeded(result.status())) {
    // The agent keeps a command's record until its exit is collected: kill and collect it.
    absl::Status killed = exec->Kill(timeouts::kQmpCommand);
    if (!killed.ok()) {
      log::Warn("exec: could not kill the command in the guest",
                {{"task_id", task.id()}, {"pid", std::to_string(exec->pid())}, {"error", std::string(killed.message())}});
    }
    if (absl::IsDeadlineExceeded(result.status())) {
      return absl::DeadlineExceededError(absl::StrCat("exec of ", request.argv[0],
                                                      " ran past its timeout and was killed in the guest"));
    }
    return absl::CancelledError(absl::StrCat("exec of ", request.argv[0], " was cancelled and killed in the guest"));
  }
  if (GuestAgentSessionBroken(result.status())) task.DropGuestAgent(*agent);
  return result.status();
}

}  // namespace ndq
