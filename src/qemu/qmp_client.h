// A client for QEMU's own monitor protocol (QMP), one of the two control
// channels of a running VM (the other: qemu/guest_agent_client.h). JSON over a
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
#include "qemu/control_socket.h"
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

}  // namespace ndq
