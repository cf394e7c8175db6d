#include "qemu/control_socket.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"

namespace ndq::control_socket {
namespace {

using nlohmann::json;

// Status payload key under which an error reply's QMP class travels.
constexpr absl::string_view kErrorClassPayload = "ndq.qemu/qmp-error-class";

// Who serves the socket: the process that listened on it (SO_PEERCRED); 0 if unknown.
pid_t PeerPid(int fd) {
  ucred cred{};
  socklen_t len = sizeof cred;
  return ::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0 ? cred.pid : 0;
}

}  // namespace

int PollMs(absl::Time deadline) {
  const absl::Duration left = deadline - absl::Now();
  if (left <= absl::ZeroDuration()) return 0;
  constexpr int64_t kCapMs = 60 * 60 * 1000;  // also for an infinite deadline (no +1 overflow)
  return static_cast<int>(std::min<int64_t>(absl::ToInt64Milliseconds(left), kCapMs - 1) + 1);
}

std::string Errno(int err) { return std::strerror(err); }

std::string Preview(absl::string_view text) {
  constexpr size_t kMax = 200;
  std::string out;
  for (char c : text.substr(0, kMax)) {
    const auto u = static_cast<unsigned char>(c);
    if (u >= 0x20 && u < 0x7f) {
      out.push_back(c);
    } else {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out.push_back(kHex[u >> 4]);
      out.push_back(kHex[u & 15]);
    }
  }
  if (text.size() > kMax) absl::StrAppend(&out, "... (", text.size(), " bytes)");
  return out;
}

std::string StringMember(const json& object, const char* key, const std::string& fallback) {
  if (!object.is_object()) return fallback;
  auto it = object.find(key);
  return it != object.end() && it->is_string() ? it->get<std::string>() : fallback;
}

std::string Dump(const json& value) { return value.dump(-1, ' ', false, json::error_handler_t::replace); }

absl::Status ErrorReplyStatus(absl::string_view who, absl::string_view command, const json& error) {
  std::string cls = "GenericError";
  std::string desc = "(no description)";
  if (error.is_object()) {
    auto c = error.find("class");
    if (c != error.end() && c->is_string()) cls = c->get<std::string>();
    auto d = error.find("desc");
    if (d != error.end() && d->is_string()) desc = d->get<std::string>();
  }
  absl::StatusCode code = absl::StatusCode::kUnknown;
  if (cls == "CommandNotFound") {
    code = absl::StatusCode::kUnimplemented;
  } else if (cls == "DeviceNotFound") {
    code = absl::StatusCode::kNotFound;
  } else if (cls == "DeviceNotActive" || cls == "KVMMissingCap") {
    code = absl::StatusCode::kFailedPrecondition;
  }
  absl::Status status(code, absl::StrCat(who, " rejected ", command, ": ", desc, " [", cls, "]"));
  status.SetPayload(kErrorClassPayload, absl::Cord(cls));
  return status;
}

absl::Status CheckServedBy(int fd, absl::string_view peer, pid_t expected) {
  const pid_t server = PeerPid(fd);
  if (expected <= 0 || server == expected) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat(peer, " is served by process ", server,
                                                  ", not by the VM's QEMU (pid ", expected,
                                                  "); refusing to talk to it"));
}

// With `served_by` > 0, a socket some other process serves is refused before a
// byte is sent: the socket's directory is QEMU's user's to write, and a link
// planted there must not make the (root) plugin talk to another daemon.
absl::StatusOr<int> ConnectUnix(const std::string& path, absl::string_view what, absl::Duration timeout,
                                pid_t served_by) {
  const absl::Time deadline = absl::Now() + timeout;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat(what, " socket path \"", path, "\" is ", path.size(),
                                                   " bytes; a unix socket path must be 1 to ",
                                                   sizeof(addr.sun_path) - 1, " bytes, so use a shorter directory"));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  absl::Duration backoff = absl::Milliseconds(5);
  while (true) {
    // A link in the socket's place is refused without connecting through it.
    if (struct stat st {}; served_by > 0 && ::lstat(path.c_str(), &st) == 0 && !S_ISSOCK(st.st_mode)) {
      return absl::PermissionDeniedError(absl::StrCat(what, " socket ", path,
                                                      " is not a socket (something was put in its place); "
                                                      "refusing to connect through it"));
    }
    // Non-blocking so a full backlog (QEMU busy with another client) is EAGAIN, not a hang.
    const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return absl::InternalError(absl::StrCat("socket(AF_UNIX): ", Errno(errno)));
    if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0) {
      if (absl::Status served = CheckServedBy(fd, absl::StrCat(what, " socket ", path), served_by); !served.ok()) {
        ::close(fd);
        return served;
      }
      // Reads block in their own thread or behind poll(); writes use MSG_DONTWAIT.
      ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
      return fd;
    }
    const int err = errno;
    ::close(fd);
    // Linux refuses connections to a file that is no socket; do not wait on that.
    struct stat st;
    if (err == ECONNREFUSED && ::stat(path.c_str(), &st) == 0 && !S_ISSOCK(st.st_mode)) {
      return absl::FailedPreconditionError(
          absl::StrCat(what, " socket path ", path, " exists but is not a socket: point it at the socket QEMU serves"));
    }
    const bool transient = err == ENOENT || err == ECONNREFUSED || err == EAGAIN || err == EINTR;
    if (!transient) {
      if (err == EACCES || err == EPERM) {
        return absl::PermissionDeniedError(
            absl::StrCat("no permission to connect to ", what, " socket ", path, ": ", Errno(err)));
      }
      return absl::FailedPreconditionError(
          absl::StrCat("cannot connect to ", what, " socket ", path, ": ", Errno(err)));
    }
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      const std::string waited = absl::FormatDuration(timeout);
      if (err == ENOENT) {
        return absl::UnavailableError(absl::StrCat(what, " socket ", path, " still does not exist after ", waited,
                                                   ": QEMU is not running, or not with this socket configured"));
      }
      if (err == ECONNREFUSED) {
        return absl::UnavailableError(absl::StrCat(what, " socket ", path, " refused connections for ", waited,
                                                   ": the QEMU that created it has probably exited"));
      }
      return absl::UnavailableError(absl::StrCat(what, " socket ", path, " stayed busy for ", waited,
                                                 " (connection backlog full)"));
    }
    absl::SleepFor(std::min(backoff, left));
    backoff = std::min(backoff * 2, absl::Milliseconds(100));
  }
}

absl::Status SendAll(int fd, absl::string_view data, absl::Time deadline, absl::string_view peer,
                     absl::Duration timeout, bool* partial) {
  size_t off = 0;
  while (off < data.size()) {
    const ssize_t n = ::send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      off += static_cast<size_t>(n);
      continue;
    }
    const int err = errno;
    if (n < 0 && err == EINTR) continue;
    if (n < 0 && (err == EAGAIN || err == EWOULDBLOCK)) {
      pollfd pfd{fd, POLLOUT, 0};
      const int ready = ::poll(&pfd, 1, PollMs(deadline));
      if (ready == 0 && absl::Now() >= deadline) {
        *partial = off > 0;
        return absl::DeadlineExceededError(
            absl::StrCat(peer, ": could not send within ", absl::FormatDuration(timeout), ": the peer is not reading"));
      }
      continue;
    }
    *partial = off > 0;
    if (err == EPIPE || err == ECONNRESET || err == ENOTCONN) {
      return absl::UnavailableError(absl::StrCat(peer, ": connection closed (QEMU exited?)"));
    }
    return absl::UnavailableError(absl::StrCat(peer, ": write failed: ", Errno(err)));
  }
  return absl::OkStatus();
}

}  // namespace ndq::control_socket

namespace ndq {

std::string QmpErrorClass(const absl::Status& status) {
  auto payload = status.GetPayload(control_socket::kErrorClassPayload);
  return payload.has_value() ? std::string(*payload) : std::string();
}

}  // namespace ndq
