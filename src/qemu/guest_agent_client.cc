#include "qemu/guest_agent_client.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "nomadplugin/bounded_json.h"
#include "nomadplugin/hclog.h"
#include "qemu/control_socket.h"

namespace ndq {
namespace {

using nlohmann::json;
using control_socket::ConnectUnix;
using control_socket::Dump;
using control_socket::Errno;
using control_socket::ErrorReplyStatus;
using control_socket::kMaxJsonDepth;
using control_socket::PollMs;
using control_socket::Preview;
using control_socket::SendAll;

// The agent's framing byte: sent to reset its parser, and sent back before a
// guest-sync-delimited reply.
constexpr char kSentinel = '\xff';
constexpr absl::Duration kSyncResendInterval = timeouts::kAgentSyncResend;

int64_t RandomSyncId() {
  // Positive and well inside 2^31 so any agent parses it as a plain integer.
  thread_local std::mt19937 gen{std::random_device{}()};
  return std::uniform_int_distribution<int64_t>(1, (int64_t{1} << 31) - 1)(gen);
}

}  // namespace

GuestAgentClient::GuestAgentClient(int fd, std::string peer) : fd_(fd), peer_(std::move(peer)) {}

GuestAgentClient::~GuestAgentClient() { ::close(fd_); }

void GuestAgentClient::Close() { ::shutdown(fd_, SHUT_RDWR); }

absl::StatusOr<std::unique_ptr<GuestAgentClient>> GuestAgentClient::Connect(const std::string& socket_path,
                                                                            absl::Duration timeout, pid_t served_by) {
  const absl::Time deadline = absl::Now() + timeout;
  absl::StatusOr<int> fd = ConnectUnix(socket_path, "guest agent", timeout, served_by);
  if (!fd.ok()) return fd.status();
  return Adopt(*fd, absl::StrCat("guest agent socket ", socket_path),
               std::max(deadline - absl::Now(), absl::ZeroDuration()));
}

absl::StatusOr<std::unique_ptr<GuestAgentClient>> GuestAgentClient::Adopt(int fd, const std::string& peer,
                                                                          absl::Duration timeout) {
  std::unique_ptr<GuestAgentClient> client(new GuestAgentClient(fd, peer));
  absl::Status status = client->Sync(timeout);
  if (!status.ok()) return status;
  return client;
}

absl::Status GuestAgentClient::Timeout(absl::string_view what, absl::Duration timeout) const {
  return absl::DeadlineExceededError(absl::StrCat(
      peer_, ": no ", what, " from the guest agent within ", absl::FormatDuration(timeout),
      ". Is qemu-guest-agent running in the guest on the virtio-serial port org.qemu.guest_agent.0? "
      "(It only starts late in the guest's boot.)"));
}

absl::Status GuestAgentClient::SendLocked(const std::string& data, absl::Time deadline) {
  bool partial = false;
  absl::Status status = SendAll(fd_, data, deadline, peer_, deadline - absl::Now(), &partial);
  // A half-sent command is harmless here: the next sync's 0xFF resets the agent's parser.
  if (!status.ok()) in_sync_ = false;
  return status;
}

absl::Status GuestAgentClient::FillLocked(absl::Time deadline, absl::string_view waiting_for) {
  if (eof_) {
    return absl::UnavailableError(absl::StrCat(peer_, ": the connection is closed (the VM exited?)"));
  }
  while (true) {
    pollfd pfd{fd_, POLLIN, 0};
    const int ready = ::poll(&pfd, 1, PollMs(deadline));
    if (ready < 0 && errno == EINTR) continue;
    if (ready == 0) {
      if (absl::Now() < deadline) continue;
      in_sync_ = false;
      // The public caller rewrites this with its own timeout.
      return absl::DeadlineExceededError(waiting_for);
    }
    char chunk[64 << 10];
    const ssize_t n = ::recv(fd_, chunk, sizeof chunk, MSG_DONTWAIT);
    if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
    if (n <= 0) {
      eof_ = true;
      in_sync_ = false;
      return absl::UnavailableError(absl::StrCat(peer_, ": QEMU closed the connection while waiting for ",
                                                 waiting_for, " (the VM exited?)"));
    }
    input_.append(chunk, static_cast<size_t>(n));
    if (input_.size() > max_line_) {
      // Only a misbehaving guest sends this much; keep the tail, drop sync.
      input_.erase(0, input_.size() - max_line_);
      in_sync_ = false;
      trimmed_ = true;
    }
    return absl::OkStatus();
  }
}

absl::StatusOr<std::string> GuestAgentClient::ReadLineLocked(absl::Time deadline) {
  size_t nl;
  size_t scanned = 0;  // a long reply arrives in many pieces: search each byte once
  trimmed_ = false;
  while ((nl = input_.find('\n', scanned)) == std::string::npos || trimmed_) {
    // Over the bound, or the head of this line was dropped to stay in it: a
    // newline found now would end a line that is not the one the guest sent.
    if (input_.size() >= max_line_ || trimmed_) {
      input_.clear();
      in_sync_ = false;
      return absl::DataLossError(absl::StrCat(peer_, ": the guest agent sent over ", max_line_,
                                              " bytes without a line break"));
    }
    scanned = input_.size();
    absl::Status status = FillLocked(deadline, "reply");
    if (!status.ok()) return status;
  }
  std::string line = input_.substr(0, nl);
  input_.erase(0, nl + 1);
  if (!line.empty() && line.back() == '\r') line.pop_back();
  return line;
}

absl::Status GuestAgentClient::SkipToSentinelLocked(absl::Time deadline) {
  size_t pos;
  while ((pos = input_.find(kSentinel)) == std::string::npos) {
    input_.clear();
    absl::Status status = FillLocked(deadline, "guest-sync-delimited reply");
    if (!status.ok()) return status;
  }
  input_.erase(0, pos + 1);
  return absl::OkStatus();
}

absl::Status GuestAgentClient::EnsureSyncedLocked(absl::Time deadline, absl::Duration timeout) {
  if (in_sync_) return absl::OkStatus();
  absl::Status status = SyncLocked(deadline);
  if (absl::IsDeadlineExceeded(status)) return Timeout("answer to guest-sync-delimited", timeout);
  return status;
}

absl::Status GuestAgentClient::Sync(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  absl::Status status = SyncLocked(absl::Now() + timeout);
  if (absl::IsDeadlineExceeded(status)) return Timeout("answer to guest-sync-delimited", timeout);
  return status;
}

absl::Status GuestAgentClient::SyncLocked(absl::Time deadline) {
  in_sync_ = false;
  // Whatever arrived before this sync answers something nobody waits for any more.
  input_.clear();
  // Bytes sent while the guest end of the channel is being (re)opened can be
  // lost, so the request is repeated until the agent shows signs of life. Only
  // the newest id counts: the agent answers in order, so after its reply
  // nothing stale can follow.
  std::vector<int64_t> ids;
  bool agent_answered = false;
  absl::Time next_send = absl::Now();
  while (true) {
    if (!agent_answered && absl::Now() >= next_send) {
      ids.push_back(RandomSyncId());
      const json request = {{"execute", "guest-sync-delimited"}, {"arguments", {{"id", ids.back()}}}};
      // The leading 0xFF makes the agent discard any partial command it holds
      // (qemu-ga also reports it as a stray byte; that error precedes the sentinel).
      absl::Status status = SendLocked(std::string(1, kSentinel) + Dump(request) + "\n", deadline);
      if (!status.ok()) return status;
      next_send = absl::Now() + kSyncResendInterval;
    }
    const absl::Time wait_until = agent_answered ? deadline : std::min(deadline, next_send);
    absl::Status status = SkipToSentinelLocked(wait_until);
    absl::StatusOr<std::string> line = status.ok() ? ReadLineLocked(wait_until) : status;
    if (absl::IsDeadlineExceeded(line.status()) && absl::Now() < deadline) continue;  // time to resend
    if (!line.ok()) return line.status();
    // Anything else after a sentinel is a stale reply; skip it.
    const json reply = nomadplugin::ParseJsonBounded(*line, kMaxJsonDepth);
    if (!reply.is_object()) continue;
    auto ret = reply.find("return");
    if (ret == reply.end() || !ret->is_number_integer()) continue;
    const int64_t id = ret->get<int64_t>();
    if (id == ids.back()) {
      in_sync_ = true;
      return absl::OkStatus();
    }
    if (std::find(ids.begin(), ids.end(), id) != ids.end()) agent_answered = true;
  }
}

absl::StatusOr<json> GuestAgentClient::Execute(const std::string& command, const json& arguments,
                                               absl::Duration timeout, size_t max_reply_bytes) {
  if (!arguments.is_null() && !arguments.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("guest agent command ", command, ": arguments must be a JSON object, got ",
                     arguments.type_name()));
  }
  const absl::Time deadline = absl::Now() + timeout;
  absl::MutexLock lock(&mu_);
  if (absl::Status synced = EnsureSyncedLocked(deadline, timeout); !synced.ok()) return synced;
  json request = {{"execute", command}};
  if (!arguments.is_null()) request["arguments"] = arguments;
  absl::Status status = SendLocked(Dump(request) + "\n", deadline);
  if (!status.ok()) return status;
  max_line_ = std::max(max_reply_bytes, kMaxReplyBytes);
  absl::StatusOr<std::string> line = ReadLineLocked(deadline);
  // Delimited lines answer syncs, never commands: leftovers of an earlier sync.
  while (line.ok() && line->find(kSentinel) != std::string::npos) line = ReadLineLocked(deadline);
  max_line_ = kMaxReplyBytes;
  if (!line.ok()) {
    if (absl::IsDeadlineExceeded(line.status())) {
      return absl::DeadlineExceededError(absl::StrCat(peer_, ": the guest agent did not answer ", command,
                                                      " within ", absl::FormatDuration(timeout)));
    }
    return line.status();
  }
  const json reply = nomadplugin::ParseJsonBounded(*line, kMaxJsonDepth);
  if (reply.is_object()) {
    auto ret = reply.find("return");
    if (ret != reply.end()) return *ret;
    auto error = reply.find("error");
    if (error != reply.end()) return ErrorReplyStatus("the guest agent", command, *error);
  }
  in_sync_ = false;
  return absl::DataLossError(
      absl::StrCat(peer_, ": the guest agent answered ", command, " with something that is not a reply: ",
                   Preview(*line)));
}

absl::Status GuestAgentClient::Ping(absl::Duration timeout) { return Execute("guest-ping", nullptr, timeout).status(); }

absl::StatusOr<json> GuestAgentClient::Info(absl::Duration timeout) { return Execute("guest-info", nullptr, timeout); }

absl::Status GuestAgentClient::Shutdown(const std::string& mode, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  absl::MutexLock lock(&mu_);
  if (absl::Status synced = EnsureSyncedLocked(deadline, timeout); !synced.ok()) return synced;
  const json request = {{"execute", "guest-shutdown"}, {"arguments", {{"mode", mode}}}};
  absl::Status status = SendLocked(Dump(request) + "\n", deadline);
  if (!status.ok()) return status;
  in_sync_ = false;
  // guest-shutdown is silent when it succeeds; the agent handles commands in
  // order, so a reply to this sync proves it got past guest-shutdown without
  // error. No leading 0xFF here: qemu-ga answers that byte with a parse error,
  // which would look like a refusal.
  const int64_t id = RandomSyncId();
  const json probe = {{"execute", "guest-sync-delimited"}, {"arguments", {{"id", id}}}};
  status = SendLocked(Dump(probe) + "\n", deadline);
  // The VM going away right after guest-shutdown is success too.
  if (absl::IsUnavailable(status)) return absl::OkStatus();
  if (!status.ok()) return status;
  while (true) {
    absl::StatusOr<std::string> line = ReadLineLocked(deadline);
    if (absl::IsUnavailable(line.status())) return absl::OkStatus();
    if (absl::IsDeadlineExceeded(line.status())) {
      return absl::DeadlineExceededError(absl::StrCat(
          peer_, ": the guest agent neither confirmed nor refused guest-shutdown within ",
          absl::FormatDuration(timeout), "; the guest may still be shutting down"));
    }
    if (!line.ok()) return line.status();
    const bool delimited = line->find(kSentinel) != std::string::npos;
    const std::string body = delimited ? line->substr(line->rfind(kSentinel) + 1) : *line;
    const json reply = nomadplugin::ParseJsonBounded(body, kMaxJsonDepth);
    if (!reply.is_object()) continue;
    auto ret = reply.find("return");
    if (delimited) {
      if (ret != reply.end() && ret->is_number_integer() && ret->get<int64_t>() == id) {
        in_sync_ = true;
        return absl::OkStatus();
      }
      continue;
    }
    auto error = reply.find("error");
    if (error != reply.end()) return ErrorReplyStatus("the guest agent", "guest-shutdown", *error);
    // Some agents do reply to guest-shutdown; that is an acceptance as well.
    if (ret != reply.end()) return absl::OkStatus();
  }
}

}  // namespace ndq
