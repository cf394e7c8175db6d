#include "driver/driver_service.h"

#include <cstdlib>

#include "base/error_kind.h"
#include "base/timeouts.h"
#include "nomadplugin/hclog.h"
#include "driver/error_classification.h"
#include "driver/exec_service.h"
#include "driver/task_proto.h"
#include "absl/strings/str_join.h"
#include "driver/stats.h"
#include "policy/task_config.h"

namespace ndq {

const char kPluginVersion[] = NDQ_VERSION;

void DriverSettings::Set(PluginConfig config, std::optional<basepb::NomadConfig> agent) {
  absl::MutexLock lock(&mu_);
  config_ = std::move(config);
  // Nomad's first probe launch sends no agent config; keep the one we have.
  if (agent) agent_ = std::move(agent);
  configured_ = true;
}

PluginConfig DriverSettings::plugin_config() const {
  absl::MutexLock lock(&mu_);
  return config_;
}

bool DriverSettings::configured() const {
  absl::MutexLock lock(&mu_);
  return configured_;
}

grpc::Status BasePluginService::PluginInfo(grpc::ServerContext*, const basepb::PluginInfoRequest*,
                                           basepb::PluginInfoResponse* response) {
  response->set_type(basepb::DRIVER);
  response->add_plugin_api_versions(kPluginApiVersion);
  response->set_plugin_version(kPluginVersion);
  response->set_name(kPluginName);
  return grpc::Status::OK;
}

grpc::Status BasePluginService::ConfigSchema(grpc::ServerContext*, const basepb::ConfigSchemaRequest*,
                                             basepb::ConfigSchemaResponse* response) {
  *response->mutable_spec() = PluginConfigSpec();
  return grpc::Status::OK;
}

grpc::Status BasePluginService::SetConfig(grpc::ServerContext*, const basepb::SetConfigRequest* request,
                                          basepb::SetConfigResponse*) {
  absl::StatusOr<PluginConfig> config = DecodePluginConfig(request->msgpack_config());
  if (!config.ok()) {
    nomadplugin::hclog::Error("rejected plugin config", {{"error", config.status().message()}});
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, std::string(config.status().message()));
  }
  std::optional<basepb::NomadConfig> agent;
  if (request->has_nomad_config()) agent = request->nomad_config();
  nomadplugin::hclog::Debug("plugin configured",
                            {{"image_paths", config->image_paths},
                             {"args_allowlist", config->args_allowlist},
                             {"emulators_allowlist", config->emulators_allowlist},
                             {"agent_config", agent.has_value()}});
  settings_->Set(*std::move(config), std::move(agent));
  if (on_configured_) on_configured_();
  return grpc::Status::OK;
}

// driver.qemu.cgroups: "v1" or "v2" when VMs get limits, else "unavailable"
// with the reason, so operators can constrain jobs to isolated nodes.
void AddIsolationAttributes(const CgroupSupport& support, Fingerprint& fingerprint) {
  if (support.usable) {
    fingerprint.attributes["driver.qemu.cgroups"] = std::string(CgroupVersionName(support.version));
    fingerprint.attributes["driver.qemu.cgroups.controllers"] = absl::StrJoin(support.controllers, ",");
  } else {
    fingerprint.attributes["driver.qemu.cgroups"] = std::string("unavailable");
    fingerprint.attributes["driver.qemu.cgroups.reason"] = support.problem;
  }
}

// driver.qemu.sandbox and driver.qemu.user: the least privilege VMs run
// with here, so a job can require it with a constraint.
void AddPrivilegeAttributes(const PluginConfig& config, Fingerprint& fingerprint) {
  fingerprint.attributes["driver.qemu.sandbox"] = config.sandbox;
  fingerprint.attributes["driver.qemu.user"] = config.qemu_user.empty() ? std::string("plugin") : config.qemu_user;
}

driverpb::FingerprintResponse ToProto(const Fingerprint& fingerprint) {
  driverpb::FingerprintResponse out;
  switch (fingerprint.health) {
    case Fingerprint::Health::kHealthy: out.set_health(driverpb::FingerprintResponse::HEALTHY); break;
    case Fingerprint::Health::kUnhealthy: out.set_health(driverpb::FingerprintResponse::UNHEALTHY); break;
    case Fingerprint::Health::kUndetected: out.set_health(driverpb::FingerprintResponse::UNDETECTED); break;
  }
  out.set_health_description(fingerprint.description);
  auto& attrs = *out.mutable_attributes();
  for (const auto& [name, value] : fingerprint.attributes) {
    auto& attr = attrs[name];
    if (const bool* b = std::get_if<bool>(&value)) attr.set_bool_val(*b);
    else if (const int64_t* i = std::get_if<int64_t>(&value)) attr.set_int_val(*i);
    else attr.set_string_val(std::get<std::string>(value));
  }
  return out;
}

driverpb::DriverCapabilities Capabilities() {
  driverpb::DriverCapabilities caps;
  caps.set_send_signals(true);
  caps.set_exec(true);  // through the guest agent (driver/exec_service.h)
  // NONE, as Nomad's qemu driver: with IMAGE, Nomad would hand the task
  // container-style paths (NOMAD_TASK_DIR=/local) that mean nothing on the host.
  caps.set_fs_isolation(driverpb::DriverCapabilities::NONE);
  caps.add_network_isolation_modes(driverpb::NetworkIsolationSpec::HOST);
  // Bridge networking: Nomad makes the namespace, QEMU joins it.
  caps.add_network_isolation_modes(driverpb::NetworkIsolationSpec::GROUP);
  caps.set_must_create_network(false);
  // Volume mounts (host volumes, CSI) become virtio-9p shares (qemu/share_plan.h).
  caps.set_mount_configs(driverpb::DriverCapabilities::ANY_MOUNTS);
  return caps;
}

grpc::Status DriverService::Init(grpc::ServerContext*, const driverpb::InitRequest*, driverpb::InitResponse*) {
  return grpc::Status::OK;
}

grpc::Status DriverService::TaskConfigSchema(grpc::ServerContext*, const driverpb::TaskConfigSchemaRequest*,
                                             driverpb::TaskConfigSchemaResponse* response) {
  *response->mutable_spec() = TaskConfigSpec();
  return grpc::Status::OK;
}

grpc::Status DriverService::Capabilities(grpc::ServerContext*, const driverpb::CapabilitiesRequest*,
                                         driverpb::CapabilitiesResponse* response) {
  *response->mutable_capabilities() = ndq::Capabilities();
  return grpc::Status::OK;
}

grpc::Status DriverService::Fingerprint(grpc::ServerContext* context, const driverpb::FingerprintRequest*,
                                        grpc::ServerWriter<driverpb::FingerprintResponse>* writer) {
  std::optional<ndq::Fingerprint> last;
  absl::Time last_sent;
  while (true) {
    ndq::Fingerprint current = fingerprinter_->Probe(settings_->plugin_config().emulators_allowlist);
    AddIsolationAttributes(tasks_->Isolation(), current);
    AddPrivilegeAttributes(settings_->plugin_config(), current);
    const absl::Time now = absl::Now();
    if (!last || current != *last || now - last_sent >= kFingerprintPeriod) {
      if (last && current != *last) {
        nomadplugin::hclog::Info("fingerprint changed", {{"health", current.description}});
      }
      if (!writer->Write(ToProto(current))) return grpc::Status::OK;
      last = std::move(current);
      last_sent = now;
    }
    if (lifecycle_->SleepInStream(context, kChangeCheckPeriod) != nomadplugin::Lifecycle::Wake::kTimeout) {
      return grpc::Status::OK;
    }
  }
}

grpc::Status DriverService::TaskEvents(grpc::ServerContext* context, const driverpb::TaskEventsRequest*,
                                       grpc::ServerWriter<driverpb::DriverTaskEvent>* writer) {
  // Nomad holds this stream open for the plugin's lifetime.
  std::shared_ptr<EventBus::Subscription> subscription = events_->Subscribe();
  // The headers tell the client that every event from now on reaches it.
  writer->SendInitialMetadata();
  while (!context->IsCancelled() && !lifecycle_->ShutdownRequested()) {
    std::optional<TaskEvent> event = subscription->Next(nomadplugin::Lifecycle::kCancelCheckInterval);
    if (!event) continue;
    driverpb::DriverTaskEvent out;
    out.set_task_id(event->task_id);
    out.set_alloc_id(event->alloc_id);
    out.set_task_name(event->task_name);
    out.set_message(event->message);
    out.mutable_timestamp()->set_seconds(absl::ToUnixSeconds(event->time));
    out.mutable_timestamp()->set_nanos(static_cast<int32_t>(absl::ToUnixNanos(event->time) % 1000000000));
    for (const auto& [key, value] : event->annotations) (*out.mutable_annotations())[key] = value;
    if (!writer->Write(out)) break;
  }
  events_->Unsubscribe(subscription);
  return grpc::Status::OK;
}

grpc::Status DriverService::Shutdown(grpc::ServerContext*, const driverpb::ShutdownRequest*,
                                     driverpb::ShutdownResponse*) {
  lifecycle_->RequestShutdown("driver Shutdown RPC");
  return grpc::Status::OK;
}

grpc::Status DriverService::RecoverTask(grpc::ServerContext*, const driverpb::RecoverTaskRequest* request,
                                        driverpb::RecoverTaskResponse*) {
  driverpb::TaskHandle handle = request->handle();
  // After an agent restart Nomad may send the handle alone, without task_id.
  if (handle.config().id().empty()) handle.mutable_config()->set_id(request->task_id());
  absl::Status status = tasks_->Recover(TaskIdentityFromProto(handle.config()), handle.driver_state());
  if (!status.ok()) nomadplugin::hclog::Error("task recovery failed", {{"task_id", handle.config().id()}, {"error", std::string(status.message())}});
  return ToGrpc(status);
}

grpc::Status DriverService::StartTask(grpc::ServerContext* context, const driverpb::StartTaskRequest* request,
                                      driverpb::StartTaskResponse* response) {
  // A start Nomad gave up on (or one the plugin's shutdown interrupts) must
  // not leave a VM that nobody holds.
  absl::StatusOr<DriverStateRecord> started =
      tasks_->Start(TaskRequestFromProto(request->task()),
                    [this, context] { return context->IsCancelled() || lifecycle_->ShutdownRequested(); });
  if (!started.ok()) {
    nomadplugin::hclog::Error("task start failed", {{"task_id", request->task().id()},
                                                    {"stage", StageOf(started.status())},
                                                    {"kind", ErrorKindName(KindOf(started.status()))},
                                                    {"error", std::string(started.status().message())}});
    return StartFailure(started.status());
  }
  *response->mutable_handle() = HandleToProto(request->task(), *started);
  if (!started->network.ip.empty()) NetworkToProto(started->network, response->mutable_network_override());
  return grpc::Status::OK;
}

grpc::Status DriverService::WaitTask(grpc::ServerContext* context, const driverpb::WaitTaskRequest* request,
                                     driverpb::WaitTaskResponse* response) {
  // Woken at once by the exit; the slices only look for a client that left.
  while (true) {
    absl::StatusOr<std::optional<ExitResult>> result =
        tasks_->Wait(request->task_id(), nomadplugin::Lifecycle::kCancelCheckInterval);
    if (!result.ok()) return ToGrpc(result.status());
    if (*result) {
      ExitToProto(**result, response->mutable_result());
      response->set_err((*result)->error);
      return grpc::Status::OK;
    }
    if (context->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "WaitTask cancelled");
    if (lifecycle_->ShutdownRequested()) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "plugin is shutting down");
  }
}

grpc::Status DriverService::StopTask(grpc::ServerContext*, const driverpb::StopTaskRequest* request,
                                     driverpb::StopTaskResponse*) {
  const absl::Duration timeout =
      absl::Seconds(request->timeout().seconds()) + absl::Nanoseconds(request->timeout().nanos());
  return ToGrpc(tasks_->Stop(request->task_id(), timeout, request->signal()));
}

grpc::Status DriverService::DestroyTask(grpc::ServerContext*, const driverpb::DestroyTaskRequest* request,
                                        driverpb::DestroyTaskResponse*) {
  return ToGrpc(tasks_->Destroy(request->task_id(), request->force()));
}

grpc::Status DriverService::InspectTask(grpc::ServerContext*, const driverpb::InspectTaskRequest* request,
                                        driverpb::InspectTaskResponse* response) {
  absl::StatusOr<TaskStatusInfo> inspected = tasks_->Inspect(request->task_id());
  if (!inspected.ok()) return ToGrpc(inspected.status());
  *response = InspectToProto(*inspected);
  return grpc::Status::OK;
}

constexpr absl::Duration kStatsCancelCheck = timeouts::kStatsCancelCheck;

grpc::Status DriverService::TaskStats(grpc::ServerContext* context, const driverpb::TaskStatsRequest* request,
                                      grpc::ServerWriter<driverpb::TaskStatsResponse>* writer) {
  absl::Duration interval = absl::Seconds(request->collection_interval().seconds()) +
                            absl::Nanoseconds(request->collection_interval().nanos());
  if (interval <= absl::ZeroDuration()) interval = absl::Seconds(1);
  StatsSampler sampler;
  while (true) {
    absl::StatusOr<std::shared_ptr<const VmTask>> task = tasks_->Get(request->task_id());
    if (!task.ok()) return ToGrpc(task.status());
    if ((*task)->result()) return grpc::Status::OK;
    const DriverStateRecord& record = (*task)->record();
    driverpb::TaskStatsResponse response;
    *response.mutable_stats() =
        sampler.Sample(request->task_id(), {record.qemu_pid, record.supervisor_pid}, &record.cgroup);
    if (!writer->Write(response)) return grpc::Status::OK;
    // A cancelled stream is also caught by the next Write; checking once a
    // second instead of five times keeps 20 VMs' streams cheap (stats_bench).
    if (lifecycle_->SleepInStream(context, interval, kStatsCancelCheck) != nomadplugin::Lifecycle::Wake::kTimeout) {
      return grpc::Status::OK;
    }
  }
}

grpc::Status DriverService::SignalTask(grpc::ServerContext*, const driverpb::SignalTaskRequest* request,
                                       driverpb::SignalTaskResponse*) {
  return ToGrpc(tasks_->Signal(request->task_id(), request->signal()));
}

grpc::Status DriverService::ExecTask(grpc::ServerContext* context, const driverpb::ExecTaskRequest* request,
                                     driverpb::ExecTaskResponse* response) {
  return ExecTaskOnce(*tasks_, context, *request, response, [this] { return lifecycle_->ShutdownRequested(); });
}

grpc::Status DriverService::ExecTaskStreaming(grpc::ServerContext* context, ExecStream* stream) {
  return ExecTaskStreamed(*tasks_, context, stream, [this] { return lifecycle_->ShutdownRequested(); });
}

}  // namespace ndq
