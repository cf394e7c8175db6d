// A client for qemu-guest-agent inside the guest, the second control channel
// of a running VM (the first: qemu/qmp_client.h). JSON over the host end of a
// virtio-serial channel QEMU serves as a unix socket; every call has a
// deadline, and every reply is bounded, since it comes from the guest.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "base/timeouts.h"
#include "qemu/control_socket.h"

namespace ndq {

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
  // Syncs first unless in sync; a timeout says what it waited for.
  absl::Status EnsureSyncedLocked(absl::Time deadline, absl::Duration timeout) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
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
  bool trimmed_ ABSL_GUARDED_BY(mu_) = false;  // FillLocked dropped the head of input_
  size_t max_line_ ABSL_GUARDED_BY(mu_) = kMaxReplyBytes;  // the bound for the reply being read
};

}  // namespace ndq
