#include "qemu_driver/vm_task.h"

#include <signal.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "nomadplugin/hclog.h"
#include "qemu_driver/process_watch.h"
#include "qemu_driver/signals.h"
#include "qemu_driver/supervisor_protocol.h"

namespace ndq {

namespace log = nomadplugin::hclog;

std::string DriverStateRecord::Encode() const {
  const nlohmann::json json = {
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
      {"cached_image", cached_image},
      {"started_at_unix_ms", absl::ToUnixMillis(started_at)},
  };
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
    r.cached_image = json.value("cached_image", "");
    r.started_at = absl::FromUnixMillis(json.value("started_at_unix_ms", int64_t{0}));
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

VmTask::VmTask(driverpb::TaskConfig config, DriverStateRecord record, int supervisor_pidfd, int qemu_pidfd,
               std::unique_ptr<QmpClient> qmp)
    : config_(std::move(config)),
      record_(std::move(record)),
      supervisor_pidfd_(supervisor_pidfd),
      qemu_pidfd_(qemu_pidfd),
      qmp_(std::move(qmp)) {}

VmTask::~VmTask() {
  {
    absl::MutexLock lock(&control_mu_);
    qmp_.reset();
  }
  if (supervisor_pidfd_ >= 0) ::close(supervisor_pidfd_);
  if (qemu_pidfd_ >= 0) ::close(qemu_pidfd_);
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

absl::StatusOr<QmpClient*> VmTask::Qmp() {
  if (qmp_ != nullptr && qmp_->connected()) return qmp_.get();
  qmp_.reset();
  absl::StatusOr<std::unique_ptr<QmpClient>> client = QmpClient::Connect(record_.qmp_socket, absl::Seconds(2));
  if (!client.ok()) return client.status();
  qmp_ = std::move(*client);
  return qmp_.get();
}

absl::Status VmTask::RequestPowerdown() {
  absl::MutexLock lock(&control_mu_);
  if (record_.guest_agent) {
    absl::StatusOr<std::unique_ptr<GuestAgentClient>> agent =
        GuestAgentClient::Connect(record_.guest_agent_socket, absl::Seconds(2));
    absl::Status status = agent.ok() ? (*agent)->Shutdown("powerdown") : agent.status();
    if (status.ok()) {
      log::Info("guest agent asked to power off", {{"task_id", id()}});
      emit_("Asked the guest agent to shut down", {});
      return status;
    }
    log::Warn("guest agent shutdown failed, pressing the ACPI power button instead",
              {{"task_id", id()}, {"error", std::string(status.message())}});
  }
  absl::StatusOr<QmpClient*> qmp = Qmp();
  if (!qmp.ok()) return qmp.status();
  absl::Status status = (*qmp)->SystemPowerdown();
  if (status.ok()) {
    log::Info("ACPI power button pressed", {{"task_id", id()}});
    emit_("Sent ACPI powerdown (power button)", {});
  }
  return status;
}

absl::Status VmTask::Signal(int signal) {
  if (result()) return absl::FailedPreconditionError(absl::StrCat("task ", id(), " has already exited"));
  if (qemu_pidfd_ < 0) return absl::FailedPreconditionError("QEMU's process is not known");
  return SignalPidfd(qemu_pidfd_, signal);
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
    emit_(absl::StrCat("Guest did not power off within ", absl::FormatDuration(timeout), "; sending ",
                       SignalName(signal)),
          {{"signal", SignalName(signal)}});
    Signal(signal).IgnoreError();
    if (WaitFor(kKillGrace)) return absl::OkStatus();
  } else {
    emit_(absl::StrCat("Sent ", SignalName(signal), " to QEMU"), {{"signal", SignalName(signal)}});
    Signal(signal).IgnoreError();
    if (WaitFor(timeout)) return absl::OkStatus();
  }
  log::Warn("VM did not stop, killing QEMU", {{"task_id", id()}});
  emit_("VM did not stop; killing QEMU with SIGKILL", {{"signal", "SIGKILL"}});
  Signal(SIGKILL).IgnoreError();
  // The supervisor records the exit right after QEMU dies.
  if (WaitFor(absl::Seconds(10))) return absl::OkStatus();
  if (supervisor_pidfd_ >= 0) SignalPidfd(supervisor_pidfd_, SIGKILL).IgnoreError();
  if (WaitFor(absl::Seconds(5))) return absl::OkStatus();
  return absl::DeadlineExceededError(absl::StrCat("task ", id(), " did not exit after SIGKILL"));
}

}  // namespace ndq
