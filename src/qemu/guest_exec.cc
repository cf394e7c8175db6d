#include "base/timeouts.h"
#include "qemu/guest_exec.h"

#include <algorithm>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace ndq {
namespace {

using nlohmann::json;

// The largest guest-exec-status reply qemu-ga 7.2 can send: both streams at
// its limit, base64-encoded, plus the other fields.
constexpr size_t Base64Size(size_t n) { return (n + 2) / 3 * 4; }
constexpr size_t kMaxStatusReply = 2 * Base64Size(GuestExec::kAgentOutputLimit) + (4 << 10);

// Cancellation is looked at this often while waiting between polls.
constexpr absl::Duration kCancelCheck = timeouts::kGuestExecCancelCheck;

absl::Status CheckRequest(const GuestExecRequest& request) {
  if (request.argv.empty() || request.argv[0].empty()) {
    return absl::InvalidArgumentError("guest exec: no program given (argv is empty)");
  }
  // qemu-ga hands these to exec as C strings: a NUL would silently cut them.
  for (const std::string& arg : request.argv) {
    if (arg.find('\0') != std::string::npos) {
      return absl::InvalidArgumentError("guest exec: an argument contains a NUL byte");
    }
  }
  for (const std::string& var : request.env) {
    if (var.find('\0') != std::string::npos || var.find('=') == std::string::npos || var[0] == '=') {
      return absl::InvalidArgumentError(
          absl::StrCat("guest exec: environment entry \"", absl::CHexEscape(var), "\" is not NAME=VALUE"));
    }
  }
  if (request.stdin_data.size() > GuestExec::kMaxStdin) {
    return absl::InvalidArgumentError(absl::StrCat("guest exec: stdin data of ", request.stdin_data.size(),
                                                   " bytes is over the limit of ", GuestExec::kMaxStdin));
  }
  return absl::OkStatus();
}

json ExecArguments(const GuestExecRequest& request) {
  json args = {{"path", request.argv[0]}, {"capture-output", request.capture_output}};
  if (request.argv.size() > 1) args["arg"] = std::vector<std::string>(request.argv.begin() + 1, request.argv.end());
  if (!request.env.empty()) args["env"] = request.env;
  if (!request.stdin_data.empty()) args["input-data"] = absl::Base64Escape(request.stdin_data);
  return args;
}

// One stream's data and truncation flag from a guest-exec-status reply.
absl::Status DecodeStream(const json& reply, const char* data_key, const char* truncated_key, std::string* data,
                          bool* truncated) {
  auto it = reply.find(data_key);
  if (it != reply.end()) {
    if (!it->is_string() || !absl::Base64Unescape(it->get_ref<const std::string&>(), data)) {
      return absl::DataLossError(absl::StrCat("guest-exec-status: ", data_key, " is not base64"));
    }
  }
  auto flag = reply.find(truncated_key);
  *truncated = flag != reply.end() && flag->is_boolean() && flag->get<bool>();
  return absl::OkStatus();
}

absl::StatusOr<GuestExecResult> ParseResult(const json& reply) {
  GuestExecResult result;
  auto code = reply.find("exitcode");
  auto signal = reply.find("signal");
  if (code != reply.end() && code->is_number_integer()) {
    result.exited = true;
    result.exit_code = code->get<int>();
  } else if (signal != reply.end() && signal->is_number_integer()) {
    result.signal = signal->get<int>();
  }
  GuestExecOutput& out = result.output;
  absl::Status status = DecodeStream(reply, "out-data", "out-truncated", &out.stdout_data, &out.stdout_truncated);
  if (status.ok()) {
    status = DecodeStream(reply, "err-data", "err-truncated", &out.stderr_data, &out.stderr_truncated);
  }
  if (!status.ok()) return status;
  return result;
}

void Deliver(const GuestExec::OutputHandler& on_output, int stream, absl::string_view data) {
  for (size_t at = 0; at < data.size(); at += GuestExec::kOutputChunk) {
    on_output(stream, data.substr(at, GuestExec::kOutputChunk));
  }
}

// Sleeps until `until`, returning early with Cancelled or DeadlineExceeded.
absl::Status Pause(absl::Time until, absl::Time deadline, const std::function<bool()>& cancelled, int64_t pid) {
  while (true) {
    if (cancelled && cancelled()) {
      return absl::CancelledError(absl::StrCat("guest exec: stopped waiting for guest process ", pid));
    }
    const absl::Time now = absl::Now();
    if (now >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("guest exec: guest process ", pid, " still runs at the deadline"));
    }
    if (now >= until) return absl::OkStatus();
    absl::SleepFor(std::min({until - now, deadline - now, kCancelCheck}));
  }
}

}  // namespace

absl::StatusOr<GuestExec> GuestExec::Start(GuestAgentClient& agent, const GuestExecRequest& request,
                                           absl::Duration timeout) {
  absl::Status valid = CheckRequest(request);
  if (!valid.ok()) return valid;
  absl::StatusOr<json> reply = agent.Execute("guest-exec", ExecArguments(request), timeout);
  if (!reply.ok()) {
    const std::string what = absl::StrCat("guest exec of ", request.argv[0], ": ", reply.status().message());
    if (QmpErrorClass(reply.status()).empty()) return absl::Status(reply.status().code(), what);
    // glib's spawn error, e.g. Failed to execute child process "x" (No such file or directory).
    if (absl::StrContains(reply.status().message(), "No such file or directory")) return absl::NotFoundError(what);
    return absl::FailedPreconditionError(what);
  }
  auto pid = reply->find("pid");
  if (!reply->is_object() || pid == reply->end() || !pid->is_number_integer()) {
    return absl::DataLossError(absl::StrCat("guest exec of ", request.argv[0], ": the agent answered without a pid: ",
                                            reply->dump()));
  }
  return GuestExec(&agent, pid->get<int64_t>());
}

absl::StatusOr<json> GuestExec::QueryStatus(absl::Time deadline) {
  const absl::Duration left = std::min(deadline - absl::Now(), GuestAgentClient::kDefaultTimeout);
  if (left <= absl::ZeroDuration()) {
    return absl::DeadlineExceededError(absl::StrCat("guest exec: guest process ", pid_, " still runs at the deadline"));
  }
  ++status_calls_;
  absl::StatusOr<json> reply = agent_->Execute("guest-exec-status", {{"pid", pid_}}, left, kMaxStatusReply);
  if (!reply.ok()) {
    if (QmpErrorClass(reply.status()).empty()) return reply.status();
    // qemu-ga forgets a command once its exit was reported, and all of them when it restarts.
    return absl::NotFoundError(absl::StrCat("guest exec: the guest agent no longer knows process ", pid_, " (",
                                            reply.status().message(), ")"));
  }
  auto exited = reply->is_object() ? reply->find("exited") : reply->end();
  if (exited == reply->end() || !exited->is_boolean()) {
    return absl::DataLossError(absl::StrCat("guest-exec-status for process ", pid_, ": no \"exited\" in ",
                                            reply->dump().substr(0, 200)));
  }
  return reply;
}

absl::StatusOr<GuestExecResult> GuestExec::Wait(absl::Time deadline, const std::function<bool()>& cancelled,
                                                const OutputHandler& on_output) {
  if (finished_) {
    return absl::FailedPreconditionError(absl::StrCat("guest exec: process ", pid_, " was already collected"));
  }
  absl::Duration delay = kFirstPollDelay;
  while (true) {
    if (cancelled && cancelled()) {
      return absl::CancelledError(absl::StrCat("guest exec: stopped waiting for guest process ", pid_));
    }
    absl::StatusOr<json> reply = QueryStatus(deadline);
    if (!reply.ok()) return reply.status();
    if (reply->at("exited").get<bool>()) {
      finished_ = true;
      absl::StatusOr<GuestExecResult> result = ParseResult(*reply);
      if (result.ok() && on_output) {
        Deliver(on_output, 1, result->output.stdout_data);
        Deliver(on_output, 2, result->output.stderr_data);
      }
      return result;
    }
    absl::Status paused = Pause(absl::Now() + delay, deadline, cancelled, pid_);
    if (!paused.ok()) return paused;
    delay = std::min(delay * 2, kMaxPollDelay);
  }
}

absl::Status GuestExec::Kill(absl::Duration timeout) {
  if (finished_) return absl::OkStatus();
  const absl::Time deadline = absl::Now() + timeout;
  absl::StatusOr<json> reply = QueryStatus(deadline);
  if (!reply.ok()) return reply.status();
  if (reply->at("exited").get<bool>()) {
    finished_ = true;
    return absl::OkStatus();
  }
  // The shell's own kill: unlike /bin/kill (procps) it is in every guest with a /bin/sh.
  GuestExecRequest kill_request;
  kill_request.argv = {"/bin/sh", "-c", absl::StrCat("kill -KILL ", pid_)};
  absl::StatusOr<GuestExec> killer = Start(*agent_, kill_request, deadline - absl::Now());
  if (!killer.ok()) {
    return absl::Status(killer.status().code(),
                        absl::StrCat("guest exec: cannot kill process ", pid_, ": ", killer.status().message()));
  }
  absl::StatusOr<GuestExecResult> killed = killer->Wait(deadline);
  if (!killed.ok()) return killed.status();
  // A failed kill is fine if the command ended meanwhile; collecting it tells.
  absl::Duration wait = killed->exited && killed->exit_code == 0 ? deadline - absl::Now() : absl::ZeroDuration();
  absl::StatusOr<GuestExecResult> ended = Wait(absl::Now() + std::max(wait, absl::Milliseconds(100)));
  if (ended.ok()) return absl::OkStatus();
  if (killed->exited && killed->exit_code == 0) return ended.status();
  return absl::FailedPreconditionError(absl::StrCat("guest exec: kill -KILL ", pid_, " failed in the guest (exit ",
                                                    killed->exit_code, ", signal ", killed->signal,
                                                    "): ", killed->output.stderr_data));
}

}  // namespace ndq
