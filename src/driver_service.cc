#include "qemu_driver/driver_service.h"

#include <cstdlib>

#include "nomadplugin/hclog.h"
#include "qemu_driver/task_config.h"

namespace ndq {

const char kPluginVersion[] = NDQ_VERSION;

namespace {

grpc::Status NotYet(const char* rpc) {
  return grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                      std::string(rpc) + " is not implemented yet in nomad-driver-qemu " + kPluginVersion);
}

}  // namespace

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
  return grpc::Status::OK;
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
  caps.set_send_signals(false);
  caps.set_exec(false);
  // NONE, as Nomad's qemu driver: with IMAGE, Nomad would hand the task
  // container-style paths (NOMAD_TASK_DIR=/local) that mean nothing on the host.
  caps.set_fs_isolation(driverpb::DriverCapabilities::NONE);
  caps.add_network_isolation_modes(driverpb::NetworkIsolationSpec::HOST);
  caps.set_must_create_network(false);
  caps.set_mount_configs(driverpb::DriverCapabilities::NO_MOUNTS);
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
                                       grpc::ServerWriter<driverpb::DriverTaskEvent>*) {
  // Nomad holds this stream open for the plugin's lifetime; no task produces events yet.
  while (lifecycle_->SleepInStream(context, absl::Hours(1)) == nomadplugin::Lifecycle::Wake::kTimeout) {
  }
  return grpc::Status::OK;
}

grpc::Status DriverService::Shutdown(grpc::ServerContext*, const driverpb::ShutdownRequest*,
                                     driverpb::ShutdownResponse*) {
  lifecycle_->RequestShutdown("driver Shutdown RPC");
  return grpc::Status::OK;
}

grpc::Status DriverService::RecoverTask(grpc::ServerContext*, const driverpb::RecoverTaskRequest*,
                                        driverpb::RecoverTaskResponse*) {
  return NotYet("RecoverTask");
}
grpc::Status DriverService::StartTask(grpc::ServerContext*, const driverpb::StartTaskRequest*,
                                      driverpb::StartTaskResponse*) {
  return NotYet("StartTask");
}
grpc::Status DriverService::WaitTask(grpc::ServerContext*, const driverpb::WaitTaskRequest*,
                                     driverpb::WaitTaskResponse*) {
  return NotYet("WaitTask");
}
grpc::Status DriverService::StopTask(grpc::ServerContext*, const driverpb::StopTaskRequest*,
                                     driverpb::StopTaskResponse*) {
  return NotYet("StopTask");
}
grpc::Status DriverService::DestroyTask(grpc::ServerContext*, const driverpb::DestroyTaskRequest*,
                                        driverpb::DestroyTaskResponse*) {
  return NotYet("DestroyTask");
}
grpc::Status DriverService::InspectTask(grpc::ServerContext*, const driverpb::InspectTaskRequest*,
                                        driverpb::InspectTaskResponse*) {
  return NotYet("InspectTask");
}
grpc::Status DriverService::TaskStats(grpc::ServerContext*, const driverpb::TaskStatsRequest*,
                                      grpc::ServerWriter<driverpb::TaskStatsResponse>*) {
  return NotYet("TaskStats");
}
grpc::Status DriverService::SignalTask(grpc::ServerContext*, const driverpb::SignalTaskRequest*,
                                       driverpb::SignalTaskResponse*) {
  return NotYet("SignalTask");
}
grpc::Status DriverService::ExecTask(grpc::ServerContext*, const driverpb::ExecTaskRequest*,
                                     driverpb::ExecTaskResponse*) {
  return NotYet("ExecTask");
}
grpc::Status DriverService::ExecTaskStreaming(
    grpc::ServerContext*,
    grpc::ServerReaderWriter<driverpb::ExecTaskStreamingResponse, driverpb::ExecTaskStreamingRequest>*) {
  return NotYet("ExecTaskStreaming");
}

}  // namespace ndq
