// Runs a command inside the guest through qemu-guest-agent's guest-exec and
// guest-exec-status, for `nomad alloc exec` into a VM.
//
// What qemu-ga 7.2 does (checked against the real agent, see
// tests/integration/guest_exec_test.cc):
//  - guest-exec spawns argv without a shell; the program is looked up on the
//    agent's PATH when it has no slash. A non-empty env replaces the agent's
//    environment. Without input-data stdin is /dev/null; input-data is written
//    once at start and stdin closed after it. Without capture-output, stdout
//    and stderr are /dev/null.
//  - guest-exec-status only says {"exited": false} while the command runs: the
//    output comes all at once, with the exit, and only after the command's
//    stdout and stderr are closed (a background child holding them delays it).
//  - The agent keeps at most 16 MiB of each stream, drains the rest and sets
//    out-truncated/err-truncated. A stream's data and truncated flag are
//    absent when it wrote nothing.
//  - The first status that reports the exit also makes the agent forget the
//    command: asking again is an error. Until then it keeps the record and the
//    output, so every started command must be waited for or killed.
//  - There is no guest-exec-kill; commands run in the agent's process group.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "base/timeouts.h"
#include "qemu/guest_agent_client.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace ndq {

struct GuestExecRequest {
  std::vector<std::string> argv;  // argv[0] is the program: a path, or a name on the agent's PATH
  std::vector<std::string> env;   // "K=V"; when not empty, the command's whole environment
  std::string stdin_data;         // sent whole at start: qemu-ga 7.2 takes no later input
  bool capture_output = true;
};

struct GuestExecOutput {
  std::string stdout_data;
  std::string stderr_data;
  bool stdout_truncated = false;  // the agent kept only the first kAgentOutputLimit bytes
  bool stderr_truncated = false;
};

struct GuestExecResult {
  bool exited = false;  // ended by itself, with exit_code; otherwise by `signal`
  int exit_code = -1;
  int signal = 0;
  GuestExecOutput output;
};

// One command started in the guest. Not thread-safe; the agent client may be
// shared (its calls are serialized), and must outlive this.
class GuestExec {
 public:
  // What qemu-ga 7.2 keeps of each of stdout and stderr.
  static constexpr size_t kAgentOutputLimit = 16 << 20;
  // Our bound on stdin_data (sent base64 in one JSON line).
  static constexpr size_t kMaxStdin = 16 << 20;
  // Wait's pacing: the first status is asked at once, then after 5 ms,
  // doubling up to 200 ms, so short commands answer fast and long ones cost
  // a few calls a second.
  static constexpr absl::Duration kFirstPollDelay = timeouts::kGuestExecFirstPoll;
  static constexpr absl::Duration kMaxPollDelay = timeouts::kGuestExecMaxPoll;

  // guest-exec. InvalidArgument for a bad request, NotFound when the guest has
  // no such program, FailedPrecondition for other refusals by the agent.
  static absl::StatusOr<GuestExec> Start(GuestAgentClient& agent, const GuestExecRequest& request,
                                         absl::Duration timeout = GuestAgentClient::kDefaultTimeout);

  // Given a stream (1 stdout, 2 stderr) and the next piece of its output.
  using OutputHandler = std::function<void(int stream, absl::string_view chunk)>;
  static constexpr size_t kOutputChunk = 64 << 10;

  // Polls guest-exec-status until the command ends (the result), `deadline`
  // passes (DeadlineExceeded) or `cancelled` returns true (Cancelled, checked
  // every 10 ms). Both leave the command running: Kill it or Wait again.
  // `on_output`, when set, is also given the output in kOutputChunk pieces,
  // stdout first: qemu-ga 7.2 reports none before the exit, so it all comes
  // at the end and how the two streams interleaved is lost.
  absl::StatusOr<GuestExecResult> Wait(absl::Time deadline, const std::function<bool()>& cancelled = nullptr,
                                       const OutputHandler& on_output = nullptr);

  // Ends the command with SIGKILL (through `/bin/sh -c "kill -KILL PID"` in
  // the guest: the agent has no kill command) and collects its exit, so the
  // agent forgets it. OK when it had already ended. Only the command's own
  // process is killed: children it forked live on, holding the output pipes.
  absl::Status Kill(absl::Duration timeout = GuestAgentClient::kDefaultTimeout);

  int64_t pid() const { return pid_; }  // in the guest
  // The agent has reported the end, and so forgotten the command.
  bool finished() const { return finished_; }

  // How many guest-exec-status calls Wait has made (for tests of the pacing).
  int status_calls() const { return status_calls_; }

 private:
  GuestExec(GuestAgentClient* agent, int64_t pid) : agent_(agent), pid_(pid) {}
  // One guest-exec-status reply ({"exited": false} while it runs).
  absl::StatusOr<nlohmann::json> QueryStatus(absl::Time deadline);

  GuestAgentClient* agent_;
  int64_t pid_;
  bool finished_ = false;
  int status_calls_ = 0;
};

}  // namespace ndq
