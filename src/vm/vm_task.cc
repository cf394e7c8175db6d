#include "vm/vm_task.h"

#include <signal.h>
#include <unistd.h>

#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nomadplugin/hclog.h"
#include "host/process_watch.h"
#include "host/signals.h"
#include "qemu/control_socket.h"
#include "qemu_driver/supervisor_protocol.h"

namespace ndq {

namespace log = nomadplugin::hclog;

std::string DriverStateRecord::Encode() const {
  nlohmann::json json = {
      {"version", kVersion},
      {"state_dir", state_dir},
      {"qmp_socket", qmp_socket},
      {"guest_agent_socket", guest_agent_socket},
      {"supervisor_pid", supervisor_pid},
      {"supervisor_start_ticks", supervisor_start_ticks},
      {"qemu_pid", qemu_pid},
      {"qemu_start_ticks", qemu_start_ticks},
      {"graceful_shutdown", graceful_shutdown},
      {"guest_agent", guest_agent},
      {"cached_images", cached_images},
      {"cgroup", {{"version", CgroupVersionName(cgroup.version)}, {"dirs", cgroup.dirs}, {"created", cgroup.created}}},
      {"memory_limit_bytes", memory_limit_bytes},
      {"started_at_unix_ms", absl::ToUnixMillis(started_at)},
      {"console_dir", console_dir},
      {"alloc_dir", alloc_dir},
  };
  if (!tap_name.empty()) json["tap_name"] = tap_name;
  if (!warm_start.empty()) json["warm_start"] = {{"mode", warm_start}, {"template", warm_template}};
  if (!network.ip.empty()) {
    json["network"] = {{"ip", network.ip}, {"port_map", network.port_map}, {"auto_advertise", network.auto_advertise}};
  }
  return json.dump();
}

absl::StatusOr<DriverStateRecord> DriverStateRecord::Decode(const std::string& bytes) {
  const nlohmann::json json = nlohmann::json::parse(bytes, nullptr, /*allow_exceptions=*/false);
  if (!json.is_object()) return absl::InvalidArgumentError("driver state is not a JSON object");
  if (json.value("version", 0) != kVersion) {
    return absl::InvalidArgumentError(
        absl::StrCat("driver state version ", json.value("version", 0), " is not understood (want ", kVersion, ")"));
  }
  DriverStateRecord r;
  try {
    r.state_dir = json.at("state_dir").get<std::string>();
    r.qmp_socket = json.at("qmp_socket").get<std::string>();
    r.guest_agent_socket = json.value("guest_agent_socket", "");
    r.supervisor_pid = json.at("supervisor_pid").get<pid_t>();
    r.supervisor_start_ticks = json.value("supervisor_start_ticks", uint64_t{0});
    r.qemu_pid = json.value("qemu_pid", pid_t{0});
    r.qemu_start_ticks = json.value("qemu_start_ticks", uint64_t{0});
    r.graceful_shutdown = json.value("graceful_shutdown", false);
    r.guest_agent = json.value("guest_agent", false);
    r.cached_images = json.value("cached_images", std::vector<std::string>{});
    // Records written before drives had images of their own name one.
    if (const std::string one = json.value("cached_image", ""); !one.empty()) r.cached_images.push_back(one);
    if (const auto cgroup = json.find("cgroup"); cgroup != json.end() && cgroup->is_object()) {
      const std::string version = cgroup->value("version", "none");
      r.cgroup.version = version == "v1" ? CgroupVersion::kV1 : version == "v2" ? CgroupVersion::kV2 : CgroupVersion::kNone;
      r.cgroup.dirs = cgroup->value("dirs", std::map<std::string, std::string>{});
      r.cgroup.created = cgroup->value("created", std::vector<std::string>{});
    }
    r.memory_limit_bytes = json.value("memory_limit_bytes", int64_t{0});
    r.started_at = absl::FromUnixMillis(json.value("started_at_unix_ms", int64_t{0}));
    r.tap_name = json.value("tap_name", "");
    if (json.contains("warm_start") && json["warm_start"].is_object()) {
      r.warm_start = json["warm_start"].value("mode", "");
      r.warm_template = json["warm_start"].value("template", "");
    }
    if (const auto network = json.find("network"); network != json.end() && network->is_object()) {
      r.network.ip = network->value("ip", "");
      r.network.port_map = network->value("port_map", std::map<std::string, int>{});
      r.network.auto_advertise = network->value("auto_advertise", true);
    }
    r.console_dir = json.value("console_dir", "");
    r.alloc_dir = json.value("alloc_dir", "");
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("driver state is incomplete: ", e.what()));
  }
  return r;
}

ExitResult LoadExitResult(const std::string& state_dir) {
  ExitResult result;
  result.completed_at = absl::Now();
  std::string problem;
  std::optional<supervisor::ExitRecord> record = supervisor::ReadExitRecord(state_dir, &problem);
  if (!record) {
    result.exit_code = -1;
    result.error = "the VM's supervisor ended without recording QEMU's exit (" + problem + ")";
    return result;
  }
  result.exit_code = record->exit_code;
  result.signal = record->signal;
  result.serial_tail = record->stdout_tail;
  if (record->signal != 0) result.exit_code = 128 + record->signal;
  if (record->exited_at_ms > 0) result.completed_at = absl::FromUnixMillis(record->exited_at_ms);
  if (!record->error.empty()) {
    result.error = record->error;
  } else if (record->exit_code != 0 || record->signal != 0) {
    result.error = record->signal != 0 ? absl::StrCat("QEMU was killed by ", SignalName(record->signal))
                                       : absl::StrCat("QEMU exited with code ", record->exit_code);
    if (!record->stderr_tail.empty()) absl::StrAppend(&result.error, ": ", record->stderr_tail);
  }
  return result;
}

namespace {

std::optional<bool> BoolField(const nlohmann::json& data, const char* key) {
  if (!data.is_object()) return std::nullopt;
  auto it = data.find(key);
  if (it == data.end() || !it->is_boolean()) return std::nullopt;
  return it->get<bool>();
}

// " (a, b)", or nothing without parts.
std::string Parenthesized(const std::vector<std::string>& parts) {
  return parts.empty() ? "" : absl::StrCat(" (", absl::StrJoin(parts, ", "), ")");
}

}  // namespace

std::optional<TaskEventText> DescribeQmpEvent(const QmpEvent& event) {
  TaskEventText out;
  out.annotations["qmp_event"] = event.name;
  const std::optional<bool> guest = BoolField(event.data, "guest");
  const std::string reason = control_socket::StringMember(event.data, "reason");
  if (guest) out.annotations["guest"] = *guest ? "true" : "false";
  if (!reason.empty()) out.annotations["reason"] = reason;
  std::vector<std::string> why;
  if (!reason.empty()) why.push_back("reason: " + reason);

  if (event.name == "RESET") {
    if (guest) why.insert(why.begin(), *guest ? "guest-initiated" : "host-initiated");
    out.message = "Guest reset" + Parenthesized(why);
  } else if (event.name == "STOP") {
    out.message = "VM paused";
  } else if (event.name == "RESUME") {
    out.message = "VM resumed";
  } else if (event.name == "SHUTDOWN") {
    if (!guest) {
      out.message = "VM shut down" + Parenthesized(why);
    } else if (*guest) {
      out.message = "Guest powered off" + Parenthesized(why);
    } else {
      out.message = "QEMU is shutting the VM down at the host's request" + Parenthesized(why);
    }
  } else if (event.name == "GUEST_PANICKED") {
    const std::string action = control_socket::StringMember(event.data, "action");
    if (!action.empty()) out.annotations["action"] = action;
    out.message = "Guest kernel panicked" + Parenthesized(action.empty() ? std::vector<std::string>{}
                                                                         : std::vector<std::string>{"action: " + action});
  } else {
    return std::nullopt;
  }
  return out;
}

VmTask::VmTask(TaskIdentity identity, DriverStateRecord record, UniqueFd supervisor_pidfd, UniqueFd qemu_pidfd,
               std::unique_ptr<QmpClient> qmp)
    : identity_(std::move(identity)),
      record_(std::move(record)),
      supervisor_pidfd_(std::move(supervisor_pidfd)),
      qemu_pidfd_(std::move(qemu_pidfd)) {
  if (qmp != nullptr) {
    qmp->SetEventHandler([this](const QmpEvent& event) { RelayQmpEvent(event); });
    absl::MutexLock lock(&qmp_mu_);
    qmp_ = std::move(qmp);
  }
}

VmTask::~VmTask() {
  std::thread connect_thread;
  {
    // No event reaches the sink's owner any more, even from a late QMP event.
    absl::MutexLock lock(&sink_mu_);
    emit_ = [](const std::string&, const std::map<std::string, std::string>&) {};
    connect_thread = std::move(connect_thread_);
  }
  if (connect_thread.joinable()) connect_thread.join();
  std::shared_ptr<QmpClient> qmp;
  {
    absl::MutexLock lock(&qmp_mu_);
    qmp = std::move(qmp_);
  }
  qmp.reset();  // joins its reader thread, which may be relaying an event
}

void VmTask::Emit(const std::string& message, const std::map<std::string, std::string>& annotations) {
  absl::MutexLock lock(&sink_mu_);
  emit_(message, annotations);
}

void VmTask::RelayQmpEvent(const QmpEvent& event) {
  // On the QMP reader thread: no QMP calls, no control_mu_, just hand it on.
  std::optional<TaskEventText> text = DescribeQmpEvent(event);
  if (!text) {
    log::Debug("QMP event not relayed", {{"task_id", id()}, {"event", event.name}});
    return;
  }
  log::Info("QMP event", {{"task_id", id()},
                          {"event", event.name},
                          {"data", event.data.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)}});
  Emit(text->message, text->annotations);
}

void VmTask::SetEventSink(TaskEventSink sink) {
  bool have_qmp;
  {
    absl::MutexLock lock(&qmp_mu_);
    have_qmp = qmp_ != nullptr;
  }
  absl::MutexLock lock(&sink_mu_);
  emit_ = std::move(sink);
  // A recovered task: reconnect in the background so QEMU's events are
  // relayed again. A QEMU that is gone (or going) only costs that thread a
  // short connect timeout.
  if (!have_qmp && qemu_pidfd_.valid() && !PidfdExited(qemu_pidfd_.get()) && !connect_thread_.joinable()) {
    connect_thread_ = std::thread([this] {
      absl::MutexLock control(&control_mu_);
      if (result()) return;
      absl::StatusOr<std::shared_ptr<QmpClient>> qmp = Qmp(timeouts::kQmpReconnect);
      if (qmp.ok()) {
        log::Info("QMP session reopened after recovery; relaying QEMU events", {{"task_id", id()}});
      } else {
        log::Info("no QMP session after recovery; QEMU events are not relayed until the next QMP command",
                  {{"task_id", id()}, {"error", std::string(qmp.status().message())}});
      }
    });
  }
}

void VmTask::DrainQmpEvents(absl::Duration timeout) {
  std::shared_ptr<QmpClient> qmp;
  {
    absl::MutexLock lock(&qmp_mu_);
    qmp = qmp_;
  }
  if (qmp != nullptr) qmp->WaitForDisconnect(timeout).IgnoreError();
}

void VmTask::MarkExited(ExitResult result) {
  absl::MutexLock lock(&mu_);
  if (!result_) result_ = std::move(result);
}

std::optional<ExitResult> VmTask::result() const {
  absl::MutexLock lock(&mu_);
  return result_;
}

std::optional<ExitResult> VmTask::WaitFor(absl::Duration timeout) const {
  absl::MutexLock lock(&mu_);
  auto exited = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return result_.has_value(); };
  mu_.AwaitWithTimeout(absl::Condition(&exited), timeout);
  return result_;
}

absl::StatusOr<std::shared_ptr<QmpClient>> VmTask::Qmp(absl::Duration connect_timeout) {
  std::shared_ptr<QmpClient> current;
  {
    absl::MutexLock lock(&qmp_mu_);
    current = qmp_;
  }
  if (current != nullptr && current->connected()) return current;
  absl::StatusOr<std::unique_ptr<QmpClient>> client = QmpClient::Connect(record_.qmp_socket, connect_timeout, record_.qemu_pid);
  if (!client.ok()) return client.status();
  std::shared_ptr<QmpClient> fresh = std::move(*client);
  fresh->SetEventHandler([this](const QmpEvent& event) { RelayQmpEvent(event); });
  {
    absl::MutexLock lock(&qmp_mu_);
    qmp_ = fresh;
  }
  return fresh;  // the old session, if any, ends with `current`
}

bool VmTask::ResumeIfPaused(QmpClient& qmp) {
  absl::StatusOr<std::string> state = qmp.QueryStatus(timeouts::kQmpQuick);
  if (!state.ok() || *state != "paused") return false;
  absl::Status status = qmp.Cont(timeouts::kQmpQuick);
  if (!status.ok()) {
    log::Warn("could not resume the paused VM", {{"task_id", id()}, {"error", std::string(status.message())}});
    return false;
  }
  log::Info("resumed the paused VM so it can power off", {{"task_id", id()}});
  return true;
}

absl::StatusOr<nlohmann::json> VmTask::ExecuteQmp(const std::string& command, const nlohmann::json& arguments,
                                                  absl::Duration timeout, int pass_fd) {
  if (result()) return absl::FailedPreconditionError(absl::StrCat("task ", id(), " has already exited"));
  const absl::Time deadline = absl::Now() + timeout;
  absl::MutexLock lock(&control_mu_);
  absl::StatusOr<std::shared_ptr<QmpClient>> qmp = Qmp(std::min(timeout, timeouts::kQmpQuick));
  if (!qmp.ok()) return qmp.status();
  const absl::Duration left = std::max(deadline - absl::Now(), absl::Milliseconds(1));
  if (pass_fd >= 0) return (*qmp)->ExecuteWithFd(command, arguments, pass_fd, left);
  return (*qmp)->Execute(command, arguments, left);
}

absl::Status VmTask::Pause() {
  if (result()) return absl::FailedPreconditionError(absl::StrCat("task ", id(), " has already exited"));
  absl::MutexLock lock(&control_mu_);
  absl::StatusOr<std::shared_ptr<QmpClient>> qmp = Qmp();
  if (!qmp.ok()) return qmp.status();
  // QEMU reports the pause as a STOP event, relayed as "VM paused".
  absl::Status status = (*qmp)->Stop();
  if (status.ok()) log::Info("VM paused", {{"task_id", id()}});
  return status;
}

absl::Status VmTask::Resume() {
  if (result()) return absl::FailedPreconditionError(absl::StrCat("task ", id(), " has already exited"));
  // A SIGSTOPped QEMU cannot answer QMP; SIGCONT is harmless otherwise.
  if (qemu_pidfd_.valid()) SignalPidfd(qemu_pidfd_.get(), SIGCONT).IgnoreError();
  absl::MutexLock lock(&control_mu_);
  absl::StatusOr<std::shared_ptr<QmpClient>> qmp = Qmp();
  if (!qmp.ok()) return qmp.status();
  // A RESUME event ("VM resumed") follows when the vCPUs were paused.
  absl::Status status = (*qmp)->Cont();
  if (status.ok()) log::Info("VM resumed", {{"task_id", id()}});
  return status;
}

absl::Status VmTask::RequestPowerdown(absl::Duration budget) {
  const absl::Time deadline = absl::Now() + budget;
  // Another control call (a pause, an earlier request) may hold the lock; it
  // is waited for within the budget only.
  if (!control_mu_.LockWhenWithTimeout(absl::Condition::kTrue, budget)) {
    control_mu_.Unlock();
    return absl::DeadlineExceededError("another control request to the VM is still under way");
  }
  absl::Status status = RequestPowerdownLocked(deadline);
  control_mu_.Unlock();
  return status;
}

absl::Status VmTask::RequestPowerdownLocked(absl::Time deadline) {
  auto left = [deadline] { return std::max(deadline - absl::Now(), absl::Milliseconds(1)); };
  // A paused guest could not act on the request.
  if (absl::StatusOr<std::shared_ptr<QmpClient>> qmp = Qmp(std::min(left(), timeouts::kQmpQuick)); qmp.ok()) {
    ResumeIfPaused(**qmp);
  }
  // Each request's event is emitted before the request goes out, so that it
  // precedes whatever the guest does about it (QEMU's SHUTDOWN event).
  if (record_.guest_agent) {
    absl::StatusOr<std::shared_ptr<GuestAgentClient>> agent = GuestAgent(std::min(left(), timeouts::kQmpQuick));
    absl::Status status = agent.status();
    if (agent.ok()) {
      Emit("Asked the guest agent to shut down");
      status = (*agent)->Shutdown("powerdown", left());
      if (!status.ok()) DropGuestAgent(*agent);
    }
    if (status.ok()) {
      log::Info("guest agent asked to power off", {{"task_id", id()}});
      return status;
    }
    log::Warn("guest agent shutdown failed, pressing the ACPI power button instead",
              {{"task_id", id()}, {"error", std::string(status.message())}});
    if (agent.ok()) {
      Emit(absl::StrCat("Guest agent shutdown failed (", status.message(), "); pressing the ACPI power button"));
    }
  }
  absl::StatusOr<std::shared_ptr<QmpClient>> qmp = Qmp(left());
  if (!qmp.ok()) return qmp.status();
  Emit("Sent ACPI powerdown (power button)");
  absl::Status status = (*qmp)->SystemPowerdown(left());
  if (status.ok()) {
    log::Info("ACPI power button pressed", {{"task_id", id()}});
  } else {
    Emit(absl::StrCat("ACPI powerdown failed: ", status.message()));
  }
  return status;
}

absl::StatusOr<std::shared_ptr<GuestAgentClient>> VmTask::GuestAgent(absl::Duration connect_timeout) {
  if (!record_.guest_agent) {
    return absl::FailedPreconditionError(
        absl::StrCat("task ", id(), " runs without the guest agent (its config does not set guest_agent = true)"));
  }
  if (result()) return absl::FailedPreconditionError(absl::StrCat("task ", id(), " has exited"));
  absl::MutexLock lock(&agent_mu_);
  if (agent_ != nullptr) return agent_;
  absl::StatusOr<std::unique_ptr<GuestAgentClient>> agent =
      GuestAgentClient::Connect(record_.guest_agent_socket, connect_timeout, record_.qemu_pid);
  if (!agent.ok()) {
    return absl::UnavailableError(absl::StrCat("the guest agent of task ", id(), " does not answer within ",
                                               absl::FormatDuration(connect_timeout),
                                               " (is qemu-guest-agent running in the guest?): ",
                                               agent.status().message()));
  }
  agent_ = std::move(*agent);
  return agent_;
}

bool GuestAgentSessionBroken(const absl::Status& status) {
  return !status.ok() && QmpErrorClass(status).empty() && !absl::IsNotFound(status) &&
         !absl::IsInvalidArgument(status) && !absl::IsCancelled(status) && !absl::IsDeadlineExceeded(status);
}

void VmTask::DropGuestAgent(const std::shared_ptr<GuestAgentClient>& agent) {
  std::shared_ptr<GuestAgentClient> dropped;
  {
    absl::MutexLock lock(&agent_mu_);
    if (agent_ != agent) return;
    dropped = std::move(agent_);
  }
  dropped->Close();
}

absl::Status VmTask::Signal(int signal) {
  if (result()) return absl::FailedPreconditionError(absl::StrCat("task ", id(), " has already exited"));
  if (!qemu_pidfd_.valid()) return absl::FailedPreconditionError("QEMU's process is not known");
  return SignalPidfd(qemu_pidfd_.get(), signal);
}

absl::Status VmTask::Stop(absl::Duration timeout, int signal) {
  if (result()) return absl::OkStatus();
  if (record_.graceful_shutdown) {
    if (absl::Status status = RequestPowerdown(); !status.ok()) {
      log::Warn("graceful shutdown request failed", {{"task_id", id()}, {"error", std::string(status.message())}});
    } else if (WaitFor(timeout)) {
      return absl::OkStatus();
    }
    log::Info("VM still running after graceful shutdown timeout, sending signal",
              {{"task_id", id()}, {"signal", SignalName(signal)}});
    Emit(absl::StrCat("Guest did not power off within ", absl::FormatDuration(timeout), "; sending ",
                       SignalName(signal)),
          {{"signal", SignalName(signal)}});
    Signal(signal).IgnoreError();
    if (WaitFor(kKillGrace)) return absl::OkStatus();
  } else {
    Emit(absl::StrCat("Sent ", SignalName(signal), " to QEMU"), {{"signal", SignalName(signal)}});
    Signal(signal).IgnoreError();
    if (WaitFor(timeout)) return absl::OkStatus();
  }
  log::Warn("VM did not stop, killing QEMU", {{"task_id", id()}});
  Emit("VM did not stop; killing QEMU with SIGKILL", {{"signal", "SIGKILL"}});
  return Kill();
}

absl::Status VmTask::Kill() {
  if (result()) return absl::OkStatus();
  Signal(SIGKILL).IgnoreError();
  // The supervisor records the exit right after QEMU dies.
  if (WaitFor(kKillWait)) return absl::OkStatus();
  if (supervisor_pidfd_.valid()) SignalPidfd(supervisor_pidfd_.get(), SIGKILL).IgnoreError();
  if (WaitFor(kKillWait)) return absl::OkStatus();
  return absl::DeadlineExceededError(absl::StrCat("task ", id(), " did not exit after SIGKILL"));
}

}  // namespace ndq
