// The gRPC face of the driver: Nomad's BasePlugin and Driver services.
#pragma once

#include <memory>
#include <functional>
#include <optional>

#include "base/timeouts.h"
#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "nomad/base.grpc.pb.h"
#include "nomad/driver.grpc.pb.h"
#include "nomadplugin/lifecycle.h"
#include "host/fingerprint.h"
#include "policy/plugin_config.h"
#include "vm/task_manager.h"

namespace ndq {

inline constexpr char kPluginName[] = "qemu";
inline constexpr char kPluginApiVersion[] = "0.1.0";
extern const char kPluginVersion[];

namespace basepb = hashicorp::nomad::plugins::base::proto;
namespace driverpb = hashicorp::nomad::plugins::drivers::proto;

// Configuration set through SetConfig, read by every other RPC.
class DriverSettings {
 public:
  void Set(PluginConfig config, std::optional<basepb::NomadConfig> agent);
  PluginConfig plugin_config() const;
  bool configured() const;

 private:
  mutable absl::Mutex mu_;
  PluginConfig config_ ABSL_GUARDED_BY(mu_);
  std::optional<basepb::NomadConfig> agent_ ABSL_GUARDED_BY(mu_);
  bool configured_ ABSL_GUARDED_BY(mu_) = false;
};

class BasePluginService final : public basepb::BasePlugin::Service {
 public:
  // `on_configured` runs after each accepted SetConfig.
  explicit BasePluginService(DriverSettings* settings, std::function<void()> on_configured = {})
      : settings_(settings), on_configured_(std::move(on_configured)) {}
  grpc::Status PluginInfo(grpc::ServerContext*, const basepb::PluginInfoRequest*,
                          basepb::PluginInfoResponse* response) override;
  grpc::Status ConfigSchema(grpc::ServerContext*, const basepb::ConfigSchemaRequest*,
                            basepb::ConfigSchemaResponse* response) override;
  grpc::Status SetConfig(grpc::ServerContext*, const basepb::SetConfigRequest* request,
                         basepb::SetConfigResponse*) override;

 private:
  DriverSettings* settings_;
  std::function<void()> on_configured_;
};

// Converts a probe result to Nomad's wire form.
driverpb::FingerprintResponse ToProto(const Fingerprint& fingerprint);

// What the driver really supports today.
driverpb::DriverCapabilities Capabilities();

class DriverService final : public driverpb::Driver::Service {
 public:
  // How often the fingerprint is re-sent when nothing changed, as Nomad's drivers do.
  static constexpr absl::Duration kFingerprintPeriod = timeouts::kFingerprintResend;
  // How often the host is looked at for changes (cheap: directory listing and stat).
  static constexpr absl::Duration kChangeCheckPeriod = timeouts::kFingerprintCheck;

  DriverService(DriverSettings* settings, Fingerprinter* fingerprinter, TaskManager* tasks, EventBus* events,
                nomadplugin::Lifecycle* lifecycle)
      : settings_(settings), fingerprinter_(fingerprinter), tasks_(tasks), events_(events), lifecycle_(lifecycle) {}

  grpc::Status Init(grpc::ServerContext*, const driverpb::InitRequest*, driverpb::InitResponse*) override;
  grpc::Status TaskConfigSchema(grpc::ServerContext*, const driverpb::TaskConfigSchemaRequest*,
                                driverpb::TaskConfigSchemaResponse* response) override;
  grpc::Status Capabilities(grpc::ServerContext*, const driverpb::CapabilitiesRequest*,
                            driverpb::CapabilitiesResponse* response) override;
  grpc::Status Fingerprint(grpc::ServerContext* context, const driverpb::FingerprintRequest*,
                           grpc::ServerWriter<driverpb::FingerprintResponse>* writer) override;
  grpc::Status TaskEvents(grpc::ServerContext* context, const driverpb::TaskEventsRequest*,
                          grpc::ServerWriter<driverpb::DriverTaskEvent>* writer) override;
  grpc::Status Shutdown(grpc::ServerContext*, const driverpb::ShutdownRequest*,
                        driverpb::ShutdownResponse*) override;

  grpc::Status RecoverTask(grpc::ServerContext*, const driverpb::RecoverTaskRequest*,
                           driverpb::RecoverTaskResponse*) override;
  grpc::Status StartTask(grpc::ServerContext*, const driverpb::StartTaskRequest*,
                         driverpb::StartTaskResponse*) override;
  grpc::Status WaitTask(grpc::ServerContext*, const driverpb::WaitTaskRequest*,
                        driverpb::WaitTaskResponse*) override;
  grpc::Status StopTask(grpc::ServerContext*, const driverpb::StopTaskRequest*,
                        driverpb::StopTaskResponse*) override;
  grpc::Status DestroyTask(grpc::ServerContext*, const driverpb::DestroyTaskRequest*,
                           driverpb::DestroyTaskResponse*) override;
  grpc::Status InspectTask(grpc::ServerContext*, const driverpb::InspectTaskRequest*,
                           driverpb::InspectTaskResponse*) override;
  grpc::Status TaskStats(grpc::ServerContext*, const driverpb::TaskStatsRequest*,
                         grpc::ServerWriter<driverpb::TaskStatsResponse>*) override;
  grpc::Status SignalTask(grpc::ServerContext*, const driverpb::SignalTaskRequest*,
                          driverpb::SignalTaskResponse*) override;
  grpc::Status ExecTask(grpc::ServerContext*, const driverpb::ExecTaskRequest*,
                        driverpb::ExecTaskResponse*) override;
  grpc::Status ExecTaskStreaming(
      grpc::ServerContext*,
      grpc::ServerReaderWriter<driverpb::ExecTaskStreamingResponse, driverpb::ExecTaskStreamingRequest>*) override;

 private:
  DriverSettings* settings_;
  Fingerprinter* fingerprinter_;
  TaskManager* tasks_;
  EventBus* events_;
  nomadplugin::Lifecycle* lifecycle_;
};

}  // namespace ndq
