#include "qemu/qmp_client.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <map>
#include <utility>

#include "base/timeouts.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
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
using control_socket::CheckServedBy;

// No sane reply comes near this; a peer that sends more without a newline is broken.
constexpr size_t kMaxQmpLine = 64 << 20;

// Sends the first bytes of `data` with `pass_fd` attached (SCM_RIGHTS);
// returns how many bytes went. QEMU takes the fd with the command it arrives with.
absl::StatusOr<size_t> SendWithFd(int fd, absl::string_view data, int pass_fd, absl::string_view peer) {
  iovec iov{const_cast<char*>(data.data()), data.size()};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
  cmsg->cmsg_level = SOL_SOCKET;
  cmsg->cmsg_type = SCM_RIGHTS;
  cmsg->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(cmsg), &pass_fd, sizeof(int));
  for (;;) {
    const ssize_t n = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (n >= 0) return static_cast<size_t>(n);
    if (errno != EINTR) return absl::UnavailableError(absl::StrCat(peer, ": sending a file descriptor failed: ", Errno(errno)));
  }
}

int IntField(const json& object, const char* key) {
  auto it = object.find(key);
  return it != object.end() && it->is_number_integer() ? it->get<int>() : 0;
}

}  // namespace

std::string QmpVersion::ToString() const { return absl::StrCat(major, ".", minor, ".", micro); }


// ---------------------------------------------------------------------------
// QmpClient

struct QmpClient::Session {
  struct Pending {
    std::string command;
    bool done = false;
    absl::StatusOr<json> result;
  };

  Session(int fd, std::string peer) : fd(fd), peer(std::move(peer)) {}
  ~Session() { ::close(fd); }

  void ReadLoop();
  // Returns false when the line is fatal for the session (already ended).
  bool HandleLine(const std::string& line);
  void HandleEvent(const json& message);
  void EndSession(const absl::Status& reason);
  absl::Status SendLine(const std::string& line, absl::Time deadline, int pass_fd = -1);
  absl::StatusOr<json> Execute(const std::string& command, const json& arguments, absl::Duration timeout,
                               int pass_fd = -1);
  void Close();
  // True on the reader thread and while a handler runs on the thread that
  // installed it: there, waiting for the reader would deadlock.
  bool MustNotWait() const {
    const std::thread::id self = std::this_thread::get_id();
    return self == reader_id.load() || self == replaying_on.load();
  }

  const int fd;
  const std::string peer;  // "QMP socket /path" for messages
  std::atomic<std::thread::id> reader_id{};
  std::atomic<std::thread::id> replaying_on{};

  mutable absl::Mutex mu;
  bool greeted ABSL_GUARDED_BY(mu) = false;
  json greeting ABSL_GUARDED_BY(mu);
  bool ended ABSL_GUARDED_BY(mu) = false;
  bool closing ABSL_GUARDED_BY(mu) = false;  // Close() was called
  bool eof ABSL_GUARDED_BY(mu) = false;      // QEMU closed its end
  absl::Status end_reason ABSL_GUARDED_BY(mu);
  int64_t next_id ABSL_GUARDED_BY(mu) = 1;
  std::map<int64_t, Pending*> pending ABSL_GUARDED_BY(mu);
  std::deque<QmpEvent> events ABSL_GUARDED_BY(mu);

  // Held while the handler runs, so replacing it waits for a running call.
  // Taken before mu, never after it.
  absl::Mutex handler_mu ABSL_ACQUIRED_BEFORE(mu);
  std::function<void(const QmpEvent&)> handler ABSL_GUARDED_BY(handler_mu);
  std::deque<QmpEvent> undelivered ABSL_GUARDED_BY(handler_mu);  // while no handler is set

  // Serializes writers so command lines never interleave.
  absl::Mutex write_mu;
  bool write_broken ABSL_GUARDED_BY(write_mu) = false;
};

QmpClient::QmpClient(std::shared_ptr<Session> session) : session_(std::move(session)) {}

absl::StatusOr<std::unique_ptr<QmpClient>> QmpClient::Connect(const std::string& socket_path,
                                                                absl::Duration timeout, pid_t served_by) {
  const absl::Time deadline = absl::Now() + timeout;
  absl::StatusOr<int> fd = ConnectUnix(socket_path, "QMP", timeout, served_by);
  if (!fd.ok()) return fd.status();
  return Adopt(*fd, absl::StrCat("QMP socket ", socket_path), std::max(deadline - absl::Now(), absl::ZeroDuration()));
}

absl::StatusOr<std::unique_ptr<QmpClient>> QmpClient::Adopt(int fd, const std::string& peer, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  auto session = std::make_shared<Session>(fd, peer);
  std::unique_ptr<QmpClient> client(new QmpClient(session));
  client->reader_ = std::thread([session] { session->ReadLoop(); });
  session->reader_id = client->reader_.get_id();
  absl::Status status = client->Handshake(deadline);
  if (!status.ok()) return status;
  return client;
}

absl::Status QmpClient::Handshake(absl::Time deadline) {
  Session& s = *session_;
  json greeting;
  {
    absl::MutexLock lock(&s.mu);
    auto ready = [&s]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) { return s.greeted || s.ended; };
    s.mu.AwaitWithDeadline(absl::Condition(&ready), deadline);
    if (!s.greeted) {
      if (s.ended) return s.end_reason;
      return absl::DeadlineExceededError(absl::StrCat(
          s.peer, ": connected, but QEMU sent no greeting in time. QEMU serves one QMP client per socket: "
                  "is another client still connected?"));
    }
    greeting = s.greeting;
  }
  const json& qmp = greeting["QMP"];
  if (qmp.is_object()) {
    auto version = qmp.find("version");
    if (version != qmp.end() && version->is_object()) {
      auto qemu = version->find("qemu");
      if (qemu != version->end() && qemu->is_object()) {
        version_.major = IntField(*qemu, "major");
        version_.minor = IntField(*qemu, "minor");
        version_.micro = IntField(*qemu, "micro");
      }
      auto package = version->find("package");
      if (package != version->end() && package->is_string()) version_.package = package->get<std::string>();
    }
    auto caps = qmp.find("capabilities");
    if (caps != qmp.end() && caps->is_array()) {
      for (const json& cap : *caps) {
        if (cap.is_string()) offered_capabilities_.push_back(cap.get<std::string>());
      }
    }
  }
  // Until qmp_capabilities QEMU accepts no other command and sends no events.
  return Execute("qmp_capabilities", nullptr, std::max(deadline - absl::Now(), absl::ZeroDuration())).status();
}

QmpClient::~QmpClient() {
  session_->Close();
  if (!reader_.joinable()) return;
  const std::thread::id self = std::this_thread::get_id();
  if (self == reader_.get_id() || self == session_->replaying_on.load()) {
    // Destroyed from inside an event handler: the reader cannot join itself
    // (or may be waiting for the handler to return). It holds the session,
    // sees the shutdown and ends on its own.
    reader_.detach();
    return;
  }
  reader_.join();
}

void QmpClient::Close() { session_->Close(); }

absl::Status QmpClient::CheckServedBy(pid_t qemu_pid) const {
  return ndq::CheckServedBy(session_->fd, session_->peer, qemu_pid);
}

void QmpClient::Session::Close() {
  {
    absl::MutexLock lock(&mu);
    closing = true;
  }
  // Wakes the reader thread out of recv(); it then fails whatever is pending.
  ::shutdown(fd, SHUT_RDWR);
}

bool QmpClient::connected() const {
  absl::MutexLock lock(&session_->mu);
  return !session_->ended;
}

absl::Status QmpClient::disconnect_reason() const {
  absl::MutexLock lock(&session_->mu);
  return session_->ended ? session_->end_reason : absl::OkStatus();
}

void QmpClient::Session::ReadLoop() {
  std::string buffer;
  char chunk[16384];
  absl::Status reason;
  while (true) {
    const ssize_t n = ::recv(fd, chunk, sizeof chunk, 0);
    if (n < 0 && errno == EINTR) continue;
    // A peer that exits with our bytes still unread resets instead of closing.
    if (n < 0 && errno != ECONNRESET) {
      reason = absl::UnavailableError(absl::StrCat(peer, ": read failed: ", Errno(errno)));
      break;
    }
    if (n <= 0) {
      absl::MutexLock lock(&mu);
      if (closing) {
        reason = absl::CancelledError(absl::StrCat(peer, ": the session was closed by the driver"));
      } else {
        eof = true;
        reason = absl::UnavailableError(
            absl::StrCat(peer, ": QEMU closed the connection (the VM exited or QEMU is shutting down)"));
      }
      break;
    }
    buffer.append(chunk, static_cast<size_t>(n));
    size_t start = 0;
    for (size_t nl; (nl = buffer.find('\n', start)) != std::string::npos; start = nl + 1) {
      if (!HandleLine(buffer.substr(start, nl - start))) return;
    }
    buffer.erase(0, start);
    if (buffer.size() > kMaxQmpLine) {
      EndSession(absl::DataLossError(
          absl::StrCat(peer, ": QEMU sent over ", kMaxQmpLine, " bytes without a line break; ending the session")));
      ::shutdown(fd, SHUT_RDWR);
      return;
    }
  }
  EndSession(reason);
}

bool QmpClient::Session::HandleLine(const std::string& raw) {
  absl::string_view line = raw;
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  if (line.empty()) return true;
  bool too_deep = false;
  json message =
      nomadplugin::ParseJsonBounded(std::string_view(line.data(), line.size()), kMaxJsonDepth, &too_deep);
  bool was_greeted;
  {
    absl::MutexLock lock(&mu);
    was_greeted = greeted;
  }
  if (message.is_discarded() || !message.is_object()) {
    // A garbled stream cannot be resynchronized reliably; fail everything now
    // rather than let callers wait for replies that may have been lost.
    absl::Status reason;
    if (too_deep) {
      reason = absl::DataLossError(absl::StrCat(peer, ": QEMU sent a message nested more than ", kMaxJsonDepth,
                                                " levels deep (", Preview(line), "); ending the session"));
    } else if (was_greeted) {
      reason = absl::DataLossError(absl::StrCat(peer, ": QEMU sent a line that is not a JSON object (",
                                                Preview(line), "); ending the session"));
    } else {
      reason = absl::FailedPreconditionError(
          absl::StrCat(peer, " does not speak QMP: it sent \"", Preview(line),
                       "\". Is this the -qmp socket, not a serial console or guest agent socket?"));
    }
    EndSession(reason);
    ::shutdown(fd, SHUT_RDWR);
    return false;
  }
  if (!was_greeted) {
    if (!message.contains("QMP")) {
      EndSession(absl::FailedPreconditionError(absl::StrCat(peer, " does not speak QMP: its first message was ",
                                                            Preview(line), " instead of a QMP greeting")));
      ::shutdown(fd, SHUT_RDWR);
      return false;
    }
    absl::MutexLock lock(&mu);
    greeting = std::move(message);
    greeted = true;
    return true;
  }
  if (message.contains("event")) {
    HandleEvent(message);
    return true;
  }
  const bool is_return = message.contains("return");
  if (!is_return && !message.contains("error")) {
    nomadplugin::hclog::Debug("ignoring unexpected QMP message", {{"peer", peer}, {"message", Preview(line)}});
    return true;
  }
  auto id = message.find("id");
  if (id == message.end() || !id->is_number_integer()) {
    // We always send an id; QEMU omits it only for requests it could not parse.
    nomadplugin::hclog::Warn("QMP reply without a usable id", {{"peer", peer}, {"message", Preview(line)}});
    return true;
  }
  absl::MutexLock lock(&mu);
  auto it = pending.find(id->get<int64_t>());
  if (it == pending.end()) {
    // The caller gave up (timeout) before QEMU answered.
    nomadplugin::hclog::Debug("dropping late QMP reply", {{"peer", peer}, {"message", Preview(line)}});
    return true;
  }
  Pending* call = it->second;
  pending.erase(it);
  if (is_return) {
    call->result = std::move(message["return"]);
  } else {
    call->result = ErrorReplyStatus("QEMU", call->command, message["error"]);
  }
  call->done = true;
  return true;
}

void QmpClient::Session::HandleEvent(const json& message) {
  QmpEvent event;
  const json& name = message["event"];
  event.name = name.is_string() ? name.get<std::string>() : Dump(name);
  auto data = message.find("data");
  if (data != message.end() && !data->is_null()) event.data = *data;
  auto ts = message.find("timestamp");
  if (ts != message.end() && ts->is_object()) {
    auto s = ts->find("seconds");
    auto us = ts->find("microseconds");
    if (s != ts->end() && s->is_number_integer() && us != ts->end() && us->is_number_integer()) {
      event.timestamp = absl::FromUnixSeconds(s->get<int64_t>()) + absl::Microseconds(us->get<int64_t>());
    }
  }
  absl::MutexLock handler_lock(&handler_mu);
  {
    absl::MutexLock lock(&mu);
    events.push_back(event);
    if (events.size() > kMaxBufferedEvents) events.pop_front();
  }
  if (handler) {
    handler(event);
  } else {
    undelivered.push_back(std::move(event));
    if (undelivered.size() > kMaxUndeliveredEvents) undelivered.pop_front();
  }
}

void QmpClient::Session::EndSession(const absl::Status& reason) {
  absl::MutexLock lock(&mu);
  if (ended) return;
  ended = true;
  end_reason = reason;
  for (auto& [id, call] : pending) {
    call->result = absl::Status(reason.code(), absl::StrCat("QMP command ", call->command,
                                                            " got no reply: ", reason.message()));
    call->done = true;
  }
  pending.clear();
}

absl::Status QmpClient::Session::SendLine(const std::string& line, absl::Time deadline, int pass_fd) {
  absl::MutexLock lock(&write_mu);
  if (write_broken) {
    return absl::UnavailableError(absl::StrCat(peer, ": an earlier command was only partly sent; session unusable"));
  }
  bool partial = false;
  absl::string_view rest = line;
  if (pass_fd >= 0) {
    absl::StatusOr<size_t> sent = SendWithFd(fd, line, pass_fd, peer);
    if (!sent.ok()) return sent.status();
    rest.remove_prefix(*sent);
  }
  absl::Status status = SendAll(fd, rest, deadline, peer, deadline - absl::Now(), &partial);
  partial = partial || rest.size() < line.size();
  if (!status.ok() && partial) {
    // Half a command on the wire would corrupt whatever we send next.
    write_broken = true;
    ::shutdown(fd, SHUT_RDWR);
  }
  return status;
}

absl::StatusOr<json> QmpClient::Execute(const std::string& command, const json& arguments, absl::Duration timeout) {
  // Held for the call, so a handler destroying the client cannot free the
  // session under a caller still waiting in it.
  const std::shared_ptr<Session> session = session_;
  return session->Execute(command, arguments, timeout);
}

absl::StatusOr<json> QmpClient::ExecuteWithFd(const std::string& command, const json& arguments, int fd,
                                              absl::Duration timeout) {
  if (fd < 0) return absl::InvalidArgumentError(absl::StrCat("QMP command ", command, ": no file descriptor to pass"));
  const std::shared_ptr<Session> session = session_;
  return session->Execute(command, arguments, timeout, fd);
}

absl::StatusOr<json> QmpClient::Session::Execute(const std::string& command, const json& arguments,
                                                 absl::Duration timeout, int pass_fd) {
  if (MustNotWait()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "QMP command ", command, " issued from the QMP event handler, which would deadlock; run it on another thread"));
  }
  if (!arguments.is_null() && !arguments.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("QMP command ", command, ": arguments must be a JSON object, got ", arguments.type_name()));
  }
  const absl::Time deadline = absl::Now() + timeout;
  Pending call;
  call.command = command;
  int64_t id;
  {
    absl::MutexLock lock(&mu);
    if (ended) {
      return absl::Status(end_reason.code(),
                          absl::StrCat("QMP command ", command, " not sent: ", end_reason.message()));
    }
    if (closing) {
      return absl::CancelledError(absl::StrCat("QMP command ", command, " not sent: ", peer, " is closed"));
    }
    id = next_id++;
    pending[id] = &call;
  }
  json request = {{"execute", command}};
  if (!arguments.is_null()) request["arguments"] = arguments;
  request["id"] = id;
  const absl::Status sent = SendLine(Dump(request) + "\n", deadline, pass_fd);

  absl::MutexLock lock(&mu);
  if (!sent.ok() && !call.done) {
    pending.erase(id);
    return absl::Status(sent.code(), absl::StrCat("QMP command ", command, ": ", sent.message()));
  }
  mu.AwaitWithDeadline(absl::Condition(&call.done), deadline);
  if (!call.done) {
    pending.erase(id);
    return absl::DeadlineExceededError(absl::StrCat(peer, ": QEMU did not answer ", command, " within ",
                                                    absl::FormatDuration(timeout),
                                                    " (QEMU hung, or busy with a long operation)"));
  }
  return std::move(call.result);
}

absl::StatusOr<std::string> QmpClient::QueryStatus(absl::Duration timeout) {
  absl::StatusOr<json> reply = Execute("query-status", nullptr, timeout);
  if (!reply.ok()) return reply.status();
  auto status = reply->find("status");
  if (!reply->is_object() || status == reply->end() || !status->is_string()) {
    return absl::InternalError(
        absl::StrCat(session_->peer, ": query-status reply has no status string: ", Dump(*reply)));
  }
  return status->get<std::string>();
}

absl::Status QmpClient::SystemPowerdown(absl::Duration timeout) {
  return Execute("system_powerdown", nullptr, timeout).status();
}

absl::Status QmpClient::Cont(absl::Duration timeout) { return Execute("cont", nullptr, timeout).status(); }

absl::Status QmpClient::Stop(absl::Duration timeout) { return Execute("stop", nullptr, timeout).status(); }

absl::Status QmpClient::Quit(absl::Duration timeout) {
  const std::shared_ptr<Session> session = session_;
  absl::Status status = session->Execute("quit", nullptr, timeout).status();
  if (status.ok()) return status;
  absl::MutexLock lock(&session->mu);
  // QEMU exiting before its reply got out is what we asked for.
  return session->eof ? absl::OkStatus() : status;
}

void QmpClient::SetEventHandler(std::function<void(const QmpEvent&)> handler) {
  const std::shared_ptr<Session> session = session_;  // a replayed handler may destroy the client
  Session& s = *session;
  absl::MutexLock lock(&s.handler_mu);
  s.handler = std::move(handler);
  if (!s.handler) return;
  // The reader is held off (handler_mu), so these come before any newer event.
  s.replaying_on = std::this_thread::get_id();
  for (const QmpEvent& event : s.undelivered) s.handler(event);
  s.replaying_on = std::thread::id();
  s.undelivered.clear();
}

absl::StatusOr<QmpEvent> QmpClient::WaitForEvent(const std::string& name, absl::Duration timeout) {
  const std::shared_ptr<Session> session = session_;
  Session& s = *session;
  // The handler runs on the only thread that could deliver the event.
  if (s.MustNotWait()) {
    return absl::FailedPreconditionError(absl::StrCat("waiting for QMP event ", name,
                                                      " inside the QMP event handler would deadlock"));
  }
  const absl::Time deadline = absl::Now() + timeout;
  absl::MutexLock lock(&s.mu);
  auto find = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    return std::find_if(s.events.begin(), s.events.end(), [&](const QmpEvent& e) { return e.name == name; });
  };
  auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) { return s.ended || find() != s.events.end(); };
  s.mu.AwaitWithDeadline(absl::Condition(&ready), deadline);
  auto it = find();
  if (it != s.events.end()) {
    QmpEvent event = std::move(*it);
    s.events.erase(it);
    return event;
  }
  if (s.ended) {
    return absl::Status(s.end_reason.code(),
                        absl::StrCat("no ", name, " event before the QMP session ended: ", s.end_reason.message()));
  }
  return absl::DeadlineExceededError(
      absl::StrCat(s.peer, ": no ", name, " event from QEMU within ", absl::FormatDuration(timeout)));
}

absl::Status QmpClient::WaitForDisconnect(absl::Duration timeout) {
  const std::shared_ptr<Session> session = session_;
  Session& s = *session;
  if (s.MustNotWait()) {
    return absl::FailedPreconditionError("waiting for the QMP session to end inside its event handler would deadlock");
  }
  absl::MutexLock lock(&s.mu);
  if (s.mu.AwaitWithTimeout(absl::Condition(&s.ended), timeout)) return absl::OkStatus();
  return absl::DeadlineExceededError(
      absl::StrCat(s.peer, ": QEMU still holds the connection open after ", absl::FormatDuration(timeout)));
}

}  // namespace ndq
