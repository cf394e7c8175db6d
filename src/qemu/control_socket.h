// The plumbing both control channels of a VM share, QMP (qemu/qmp_client.h)
// and the guest agent (qemu/guest_agent_client.h): connecting to a unix socket
// QEMU serves, checking who serves it, sending before a deadline, error
// replies as a Status, and printable excerpts of what a peer sent.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <string>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "nomadplugin/bounded_json.h"

namespace ndq::control_socket {

// Copying or dumping a parsed message recurses once per level, so what QEMU or
// the guest sends is parsed with a bound (no real message comes near it).
inline constexpr size_t kMaxJsonDepth = nomadplugin::kDefaultMaxJsonDepth;

// Milliseconds left until `deadline`, for poll(); 0 once it passed.
int PollMs(absl::Time deadline);
std::string Errno(int err);
// A short, printable excerpt of untrusted text for error messages.
std::string Preview(absl::string_view text);
// Compact JSON; invalid UTF-8 replaced.
std::string Dump(const nlohmann::json& value);

// The string member `key` of a reply or event object; `fallback` when it is
// absent or of another type (a reply's shape is QEMU's or the guest's to get wrong).
std::string StringMember(const nlohmann::json& object, const char* key, const std::string& fallback = "");

// A QMP-style error reply ({"class", "desc"}) from `who` to `command` as a
// Status; the class rides along (ndq::QmpErrorClass).
absl::Status ErrorReplyStatus(absl::string_view who, absl::string_view command, const nlohmann::json& error);

// PermissionDenied unless `expected` (when > 0) serves the socket `fd`; `peer`
// names it in the message.
absl::Status CheckServedBy(int fd, absl::string_view peer, pid_t expected);

// Connects to a unix socket that may not exist yet (QEMU creates its sockets
// shortly after it starts), retrying with a short backoff for `timeout`.
// With `served_by` > 0, a socket some other process serves is refused before
// a byte is sent: the socket's directory is QEMU's user's to write, and a link
// planted there must not make the (root) plugin talk to another daemon.
absl::StatusOr<int> ConnectUnix(const std::string& path, absl::string_view what, absl::Duration timeout,
                                pid_t served_by);

// Writes all of `data` before `deadline`. A closed peer is Unavailable;
// `*partial` says whether some bytes went before a failure.
absl::Status SendAll(int fd, absl::string_view data, absl::Time deadline, absl::string_view peer,
                     absl::Duration timeout, bool* partial);

}  // namespace ndq::control_socket

namespace ndq {

// The QMP error class ("CommandNotFound", "GenericError", ...) carried by a
// Status that QEMU or the guest agent returned as an error reply; empty for
// every other Status.
std::string QmpErrorClass(const absl::Status& status);

}  // namespace ndq
