// The services go-plugin's host expects beside the plugin's own: health
// (service "plugin" must be SERVING), the controller (graceful shutdown) and stdio.
#pragma once

#include "go_plugin/controller.grpc.pb.h"
#include "go_plugin/stdio.grpc.pb.h"
#include "grpc_health/health.grpc.pb.h"
#include "nomadplugin/lifecycle.h"

namespace nomadplugin {

class HealthService final : public grpc::health::v1::Health::Service {
 public:
  explicit HealthService(const Lifecycle* lifecycle) : lifecycle_(lifecycle) {}
  grpc::Status Check(grpc::ServerContext* context, const grpc::health::v1::HealthCheckRequest* request,
                     grpc::health::v1::HealthCheckResponse* response) override;
  grpc::Status Watch(grpc::ServerContext* context, const grpc::health::v1::HealthCheckRequest* request,
                     grpc::ServerWriter<grpc::health::v1::HealthCheckResponse>* writer) override;

 private:
  const Lifecycle* lifecycle_;
};

class ControllerService final : public ::plugin::GRPCController::Service {
 public:
  explicit ControllerService(Lifecycle* lifecycle) : lifecycle_(lifecycle) {}
  grpc::Status Shutdown(grpc::ServerContext* context, const ::plugin::Empty* request,
                        ::plugin::Empty* response) override;

 private:
  Lifecycle* lifecycle_;
};

// Our logs already reach the host through stderr, so the stream carries no data;
// it stays open so the host does not warn that stdio syncing is unavailable.
class StdioService final : public ::plugin::GRPCStdio::Service {
 public:
  explicit StdioService(const Lifecycle* lifecycle) : lifecycle_(lifecycle) {}
  grpc::Status StreamStdio(grpc::ServerContext* context, const google::protobuf::Empty* request,
                           grpc::ServerWriter<::plugin::StdioData>* writer) override;

 private:
  const Lifecycle* lifecycle_;
};

}  // namespace nomadplugin
