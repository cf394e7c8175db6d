// Clients for the two control channels of a running VM: QEMU's own monitor
// protocol (QMP) and qemu-guest-agent inside the guest. Both speak JSON over a
// unix socket that QEMU serves; every call has a deadline so a hung or dead VM
// can never hang the plugin.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/timeouts.h"
#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace ndq {

// The QEMU version announced in the QMP greeting.
struct QmpVersion {
  int major = 0;
  int minor = 0;
  int micro = 0;
  std::string package;  // distribution build, e.g. "Debian 1:7.2+dfsg-7+deb12u18"
  std::string ToString() const;  // "7.2.22"
};

// An asynchronous QMP event such as SHUTDOWN, POWERDOWN, RESET, STOP, RESUME.
struct QmpEvent {
  std::string name;
  nlohmann::json data = nlohmann::json::object();  // the event's "data", {} when absent
  absl::Time timestamp = absl::InfinitePast();     // QEMU's wall clock when it was emitted
};

// The QMP error class ("CommandNotFound", "GenericError", ...) carried by a
// Status that QEMU or the guest agent returned as an error reply; empty for
// every other Status.
std::string QmpErrorClass(const absl::Status& status);

// One QMP session. Thread-safe: any number of threads may run commands at once;
// replies are matched to requests by id. A reader thread owns the socket's
// input and hands replies to their callers and events to the handler and to
// WaitForEvent. When QEMU goes away (EOF) every pending and later call fails
// at once with the reason.
class QmpClient {
 public:
  static constexpr absl::Duration kDefaultTimeout = timeouts::kQmpCommand;

  // Connects to the QMP socket QEMU serves (`-qmp unix:PATH,server=on,wait=off`,
  // or a socket chardev with `-mon chardev=...,mode=control`), reads the
  // greeting and negotiates capabilities. While the socket does not exist yet
  // or refuses connections (QEMU still starting) it retries until `timeout`.
  // With `served_by` > 0, a socket served by any other process is refused
  // (PermissionDenied) before anything is sent.
  static absl::StatusOr<std::unique_ptr<QmpClient>> Connect(const std::string& socket_path, absl::Duration timeout,
                                                            pid_t served_by = 0);

  // The same handshake on an already connected stream socket, which the client
  // then owns. `peer` names it in messages.
  static absl::StatusOr<std::unique_ptr<QmpClient>> Adopt(int fd, const std::string& peer, absl::Duration timeout);

  // Closes the connection; never blocks on QEMU.
  ~QmpClient();
  QmpClient(const QmpClient&) = delete;
  QmpClient& operator=(const QmpClient&) = delete;

  const QmpVersion& version() const { return version_; }
  // Capabilities QEMU offered in its greeting (e.g. "oob"); none are enabled.
  const std::vector<std::string>& offered_capabilities() const { return offered_capabilities_; }

  // Runs a command and returns its "return" value. `arguments` is an object, or
  // null for none. A QMP error reply becomes a Status with QEMU's class and
  // description (see QmpErrorClass); no reply within `timeout` is DeadlineExceeded.
  // Must not be called from the event handler (FailedPrecondition).
  absl::StatusOr<nlohmann::json> Execute(const std::string& command, const nlohmann::json& arguments = nullptr,
                                         absl::Duration timeout = kDefaultTimeout);
  // Execute with `fd` passed alongside the command (SCM_RIGHTS), as QEMU's
  // getfd and add-fd expect.
  absl::StatusOr<nlohmann::json> ExecuteWithFd(const std::string& command, const nlohmann::json& arguments, int fd,
                                               absl::Duration timeout = kDefaultTimeout);

  // The run state from query-status: "running", "paused", "prelaunch", "shutdown", ...
  absl::StatusOr<std::string> QueryStatus(absl::Duration timeout = kDefaultTimeout);
  // Presses the ACPI power button; the guest decides whether to power off.
  absl::Status SystemPowerdown(absl::Duration timeout = kDefaultTimeout);
  absl::Status Cont(absl::Duration timeout = kDefaultTimeout);
  absl::Status Stop(absl::Duration timeout = kDefaultTimeout);
  // Asks QEMU to exit. QEMU may close the socket before its reply arrives;
  // that counts as success.
  absl::Status Quit(absl::Duration timeout = kDefaultTimeout);

  // Called for every event, in arrival order, on the reader thread. It should
  // return quickly; Execute, WaitForEvent and WaitForDisconnect called from it
  // fail with FailedPrecondition instead of deadlocking. Events that arrived
  // while no handler was installed (e.g. between Connect and this call) are
  // handed to the new handler first, on the caller's thread, before this
  // returns, so no event is missed. After SetEventHandler returns, the previous
  // handler is not running and will not run again. Must not be called from
  // inside a handler.
  void SetEventHandler(std::function<void(const QmpEvent&)> handler);
  static constexpr size_t kMaxUndeliveredEvents = 1024;

  // Returns (and consumes) the oldest event named `name` received since
  // Connect, waiting up to `timeout` for one. Fails at once when the connection
  // ends without one. Up to kMaxBufferedEvents events are kept.
  absl::StatusOr<QmpEvent> WaitForEvent(const std::string& name, absl::Duration timeout);
  static constexpr size_t kMaxBufferedEvents = 1024;

  // Waits until the connection has ended (normally: QEMU exited). OK once it
  // has, DeadlineExceeded if it is still open after `timeout`.
  absl::Status WaitForDisconnect(absl::Duration timeout);

  bool connected() const;
  // PermissionDenied unless process `qemu_pid` serves the socket (SO_PEERCRED),
  // as Connect's `served_by` checks before the handshake.
  absl::Status CheckServedBy(pid_t qemu_pid) const;
  // Why the connection ended; OK while it is open.
  absl::Status disconnect_reason() const;

  // Ends the session; pending calls fail. Safe to call more than once.
  void Close();

 private:
  // Everything the reader thread touches. The thread holds a reference of its
  // own, so a client destroyed from inside its event handler (on the reader
  // thread, which cannot join itself) leaves the thread a live session to
  // finish with; the socket is closed when the last holder lets go.
  struct Session;

  explicit QmpClient(std::shared_ptr<Session> session);
  absl::Status Handshake(absl::Time deadline);

  const std::shared_ptr<Session> session_;
  std::thread reader_;
  QmpVersion version_;  // set before Connect returns, then read-only
  std::vector<std::string> offered_capabilities_;
};

// A client for qemu-guest-agent through the host end of its virtio-serial
// channel: `-chardev socket,path=PATH,server=on,wait=off,id=qga0 -device
// virtio-serial -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0`.
// The agent answers one command at a time, so calls are serialized. The
// channel carries no framing of its own: after a timeout a late reply may still
// arrive, so the next call first resynchronizes with guest-sync-delimited.
class GuestAgentClient {
 public:
  static constexpr absl::Duration kDefaultTimeout = timeouts::kQmpCommand;

  // Connects (retrying while QEMU has not created the socket yet) and
  // synchronizes with the agent, all within `timeout`. Fails when no agent
  // answers in the guest within `timeout`, e.g. while the guest still boots.
  // `served_by` as for QmpClient::Connect (QEMU serves the agent's socket).
  static absl::StatusOr<std::unique_ptr<GuestAgentClient>> Connect(const std::string& socket_path,
                                                                   absl::Duration timeout, pid_t served_by = 0);
  // The same on an already connected stream socket, which the client then owns.
  static absl::StatusOr<std::unique_ptr<GuestAgentClient>> Adopt(int fd, const std::string& peer,
                                                                 absl::Duration timeout);

  ~GuestAgentClient();
  GuestAgentClient(const GuestAgentClient&) = delete;
  GuestAgentClient& operator=(const GuestAgentClient&) = delete;

  // guest-sync-delimited: sends 0xFF (the agent drops any partial input) and a
  // random id, then discards everything up to the agent's 0xFF sentinel and
  // the reply carrying that id, so stale replies can never be mistaken for new
  // ones. Repeated every second until the agent answers, since bytes sent
  // while the guest end of the channel (re)opens can be lost.
  absl::Status Sync(absl::Duration timeout = kDefaultTimeout);

  // Replies come from inside the guest, which we do not trust, so a reply
  // longer than this is refused (DataLoss) and the client resynchronizes.
  static constexpr size_t kMaxReplyBytes = 1 << 20;

  // Runs a command that replies, returning its "return" value; error replies
  // become a Status as for QmpClient::Execute. `max_reply_bytes` raises the
  // bound for this one reply (guest-exec-status carries a command's output).
  absl::StatusOr<nlohmann::json> Execute(const std::string& command, const nlohmann::json& arguments = nullptr,
                                         absl::Duration timeout = kDefaultTimeout,
                                         size_t max_reply_bytes = kMaxReplyBytes);
  absl::Status Ping(absl::Duration timeout = kDefaultTimeout);
  // guest-info: the agent's version and supported commands.
  absl::StatusOr<nlohmann::json> Info(absl::Duration timeout = kDefaultTimeout);

  // guest-shutdown with `mode` "powerdown", "halt" or "reboot". The agent sends
  // no reply when it accepts, so a guest-sync-delimited follows it: its reply
  // (or the socket closing because the VM is already gone) means accepted, an
  // error reply means refused. Whether the VM then really stops is for the
  // caller to watch (QMP SHUTDOWN event or QEMU's exit).
  absl::Status Shutdown(const std::string& mode = "powerdown", absl::Duration timeout = kDefaultTimeout);

  // Ends the session; a call blocked in another thread returns promptly.
  void Close();

 private:
  GuestAgentClient(int fd, std::string peer);
  absl::Status SyncLocked(absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status SendLocked(const std::string& data, absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The next newline-terminated line, without the newline.
  absl::StatusOr<std::string> ReadLineLocked(absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Discards input up to and including the next 0xFF byte.
  absl::Status SkipToSentinelLocked(absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status FillLocked(absl::Time deadline, absl::string_view waiting_for) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Timeout(absl::string_view what, absl::Duration timeout) const;

  const int fd_;
  const std::string peer_;

  absl::Mutex mu_;
  std::string input_ ABSL_GUARDED_BY(mu_);
  bool in_sync_ ABSL_GUARDED_BY(mu_) = false;
  bool eof_ ABSL_GUARDED_BY(mu_) = false;
  size_t max_line_ ABSL_GUARDED_BY(mu_) = kMaxReplyBytes;  // the bound for the reply being read
};

}  // namespace ndq
