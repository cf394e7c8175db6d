// One VM the driver runs: what identifies it (and survives a plugin restart in
// Nomad's TaskHandle), its exit once known, and the operations on it.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "base/timeouts.h"
#include "base/unique_fd.h"
#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "host/cgroups.h"
#include "policy/task_request.h"
#include "qemu/guest_agent_client.h"
#include "qemu/qmp_client.h"

namespace ndq {

// The guest's own address on a bridged NIC (advertise_address), as Nomad's
// DriverNetwork / NetworkOverride carries it.
struct AdvertisedNetwork {
  std::string ip;                          // empty: nothing advertised
  std::map<std::string, int> port_map;     // label -> guest port
  bool auto_advertise = true;
  bool operator==(const AdvertisedNetwork& o) const {
    return ip == o.ip && port_map == o.port_map && auto_advertise == o.auto_advertise;
  }
};

// Nomad's TaskHandle.driver_state: enough for a fresh plugin process to find
// the VM again, encoded as JSON.
struct DriverStateRecord {
  static constexpr int kVersion = 1;
  std::string state_dir;
  std::string qmp_socket;
  std::string guest_agent_socket;  // empty without guest_agent
  pid_t supervisor_pid = 0;
  uint64_t supervisor_start_ticks = 0;
  pid_t qemu_pid = 0;
  uint64_t qemu_start_ticks = 0;
  bool graceful_shutdown = false;
  bool guest_agent = false;
  // The shared cached images the task's drives use (leased to the task).
  std::vector<std::string> cached_images;
  TaskCgroup cgroup;         // version kNone: the VM runs without cgroup isolation
  int64_t memory_limit_bytes = 0;  // the cgroup's hard memory limit; 0: none
  absl::Time started_at = absl::UnixEpoch();
  // network_mode = "bridge": the TAP's name (removed on destroy if still
  // there) and the address advertised at start.
  std::string tap_name;
  // warm_start: "cold" (booted; a template is saved once ready) or
  // "restored" (from the template `warm_template`, a key); empty without.
  std::string warm_start;
  std::string warm_template;
  AdvertisedNetwork network;
  // The console (issue 11): the directory of its sockets in the task dir
  // (empty without console), and the alloc dir whose alloc/logs takes screenshots.
  std::string console_dir;
  std::string alloc_dir;

  std::string Encode() const;
  static absl::StatusOr<DriverStateRecord> Decode(const std::string& bytes);
};

struct ExitResult {
  int exit_code = 0;
  int signal = 0;
  bool oom_killed = false;
  std::string error;  // why the VM ended abnormally, for WaitTask's err
  std::string serial_tail;  // the last bytes of QEMU's stdout (the serial console, ttyS0), at most 4 KiB
  absl::Time completed_at = absl::UnixEpoch();
};

// Reads what the supervisor recorded in `state_dir` into Nomad's terms: a
// signal death is exit code 128+N as Nomad's executor reports it.
ExitResult LoadExitResult(const std::string& state_dir);

// Where a task's events go: (message, annotations).
using TaskEventSink = std::function<void(const std::string&, const std::map<std::string, std::string>&)>;

// A task event worth showing the operator.
struct TaskEventText {
  std::string message;
  std::map<std::string, std::string> annotations;
};

// The task event for one of QEMU's asynchronous QMP events, nullopt for those
// not relayed: RESET "Guest reset (guest-initiated, reason: guest-reset)",
// STOP "VM paused", RESUME "VM resumed", SHUTDOWN "Guest powered off (reason:
// guest-shutdown)" or, when the host asked, "QEMU is shutting the VM down
// at the host's request (reason: host-signal)", GUEST_PANICKED "Guest kernel panicked
// (action: poweroff)". POWERDOWN is not relayed: the driver reports its own
// power-button presses. Annotations: "qmp_event" and the event's data fields.
std::optional<TaskEventText> DescribeQmpEvent(const QmpEvent& event);

// Whether a guest-agent call failed in its session (not with an error the
// agent answered, nor a command's own timeout or cancellation): the session
// is then dropped (VmTask::DropGuestAgent) and the next caller connects anew.
bool GuestAgentSessionBroken(const absl::Status& status);

class VmTask {
 public:
  // Takes ownership of the pidfds (-1 when the process is already gone).
  VmTask(TaskIdentity identity, DriverStateRecord record, UniqueFd supervisor_pidfd, UniqueFd qemu_pidfd,
         std::unique_ptr<QmpClient> qmp);
  ~VmTask();
  VmTask(const VmTask&) = delete;
  VmTask& operator=(const VmTask&) = delete;

  const std::string& id() const { return identity_.id; }
  const TaskIdentity& identity() const { return identity_; }
  const DriverStateRecord& record() const { return record_; }
  int supervisor_pidfd() const { return supervisor_pidfd_.get(); }

  // Called once when the supervisor has gone; wakes every waiter.
  void MarkExited(ExitResult result);
  std::optional<ExitResult> result() const;
  // Waits up to `timeout` for the exit.
  std::optional<ExitResult> WaitFor(absl::Duration timeout) const;

  // StopTask: with graceful_shutdown the guest is asked to power off (guest
  // agent when enabled, else an ACPI power-button press) and given `timeout`;
  // then `signal` goes to QEMU, then SIGKILL after kKillGrace. Without
  // graceful_shutdown: `signal`, `timeout`, SIGKILL. Returns once QEMU is
  // gone, and always within `timeout` + kStopOverhead.
  absl::Status Stop(absl::Duration timeout, int signal);
  // A force destroy: SIGKILL to QEMU at once (then to its supervisor if the
  // exit is not recorded within kKillWait), no request to the guest, no lock
  // another call may hold. Returns within 2 * kKillWait.
  absl::Status Kill();
  // Delivers `signal` to QEMU itself.
  absl::Status Signal(int signal);
  // Asks the guest to power off (guest agent first when enabled, else ACPI).
  // A VM paused through QMP is resumed first, so the guest can act on it.
  // Every step together (the control lock, the agent, QMP) takes at most
  // `budget`.
  absl::Status RequestPowerdown(absl::Duration budget = kPowerdownBudget);
  // Runs one QMP command on the task's session (e.g. screendump), within
  // `timeout`; FailedPrecondition once the VM has exited.
  absl::StatusOr<nlohmann::json> ExecuteQmp(const std::string& command, const nlohmann::json& arguments,
                                            absl::Duration timeout, int pass_fd = -1);
  // Pauses the vCPUs (QMP stop); QEMU itself keeps running and answering.
  absl::Status Pause();
  // Continues QEMU's process (SIGCONT, in case it was SIGSTOPped) and the
  // vCPUs (QMP cont).
  absl::Status Resume();

  // Where the task's events go from now on, including QEMU's QMP events
  // (see DescribeQmpEvent). Without a QMP session (a task recovered after a
  // plugin restart) one is opened on a background thread, so the relay
  // resumes without delaying the caller.
  void SetEventSink(TaskEventSink sink);

  // The task's guest agent session, connected on first use (and again after
  // DropGuestAgent). Exec sessions and powerdown share it because QEMU's agent
  // socket serves one client at a time; the client serializes the calls.
  // FailedPrecondition when the task runs without guest_agent or has exited,
  // Unavailable when no agent answers within `connect_timeout`.
  absl::StatusOr<std::shared_ptr<GuestAgentClient>> GuestAgent(absl::Duration connect_timeout);
  // Forgets `agent` after it failed (a broken or desynchronized session), so
  // the next GuestAgent call connects anew. No-op if another took its place.
  void DropGuestAgent(const std::shared_ptr<GuestAgentClient>& agent);

  // Waits up to `timeout` for QEMU's QMP session to end, so that every event
  // QEMU sent before it exited has been relayed. Returns at once without a
  // session. For the exit event, which must come after them.
  void DrainQmpEvents(absl::Duration timeout);

  // Stop's waits (base/timeouts.h), kept here for the tests and the driver.
  static constexpr absl::Duration kKillGrace = timeouts::kKillGrace;
  static constexpr absl::Duration kPowerdownBudget = timeouts::kPowerdownBudget;
  static constexpr absl::Duration kKillWait = timeouts::kKillWait;
  static constexpr absl::Duration kStopOverhead = timeouts::kStopOverhead;

 private:
  // The QMP session, reconnected when needed (after a plugin restart); every
  // new session relays QEMU's events.
  absl::StatusOr<std::shared_ptr<QmpClient>> Qmp(absl::Duration connect_timeout = timeouts::kQmpQuick)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(control_mu_);
  absl::Status RequestPowerdownLocked(absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(control_mu_);
  void RelayQmpEvent(const QmpEvent& event);
  void Emit(const std::string& message, const std::map<std::string, std::string>& annotations = {});
  // Resumes a VM paused through QMP; true when it was paused.
  bool ResumeIfPaused(QmpClient& qmp) ABSL_EXCLUSIVE_LOCKS_REQUIRED(control_mu_);

  const TaskIdentity identity_;
  const DriverStateRecord record_;
  const UniqueFd supervisor_pidfd_;  // invalid when the process was already gone
  const UniqueFd qemu_pidfd_;

  // Held while an event is handed to the sink (a leaf: the sink never calls
  // back into the task). QMP reader threads take it inside their handler.
  absl::Mutex sink_mu_;
  TaskEventSink emit_ ABSL_GUARDED_BY(sink_mu_) = [](const std::string&, const std::map<std::string, std::string>&) {};

  // Serializes control operations (stop, signal, QMP use). Taken before
  // qmp_mu_ and sink_mu_.
  absl::Mutex control_mu_;
  // Guards only the pointer, so DrainQmpEvents never waits for a control operation.
  absl::Mutex qmp_mu_;
  std::shared_ptr<QmpClient> qmp_ ABSL_GUARDED_BY(qmp_mu_);
  // Opens the QMP session of a recovered task (see SetEventSink).
  std::thread connect_thread_ ABSL_GUARDED_BY(sink_mu_);

  // Held while connecting; taken after control_mu_ (powerdown), never before.
  absl::Mutex agent_mu_;
  std::shared_ptr<GuestAgentClient> agent_ ABSL_GUARDED_BY(agent_mu_);

  mutable absl::Mutex mu_;
  std::optional<ExitResult> result_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ndq
