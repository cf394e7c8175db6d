#include "nomadplugin/go_plugin_services.h"

#include "nomadplugin/hclog.h"

namespace nomadplugin {
namespace {

using grpc::health::v1::HealthCheckResponse;

// go-plugin asks for "plugin"; "" is the gRPC convention for the whole server.
bool KnownHealthService(const std::string& name) { return name.empty() || name == "plugin"; }

// Holds a server stream open until the client leaves or the plugin shuts down.
void HoldOpen(const Lifecycle* lifecycle, grpc::ServerContext* context) {
  while (lifecycle->SleepInStream(context, absl::Hours(1)) == Lifecycle::Wake::kTimeout) {
  }
}

}  // namespace

grpc::Status HealthService::Check(grpc::ServerContext*,
                                  const grpc::health::v1::HealthCheckRequest* request,
                                  HealthCheckResponse* response) {
  if (!KnownHealthService(request->service())) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown health service " + request->service());
  }
  response->set_status(lifecycle_->ShutdownRequested() ? HealthCheckResponse::NOT_SERVING
                                                       : HealthCheckResponse::SERVING);
  return grpc::Status::OK;
}

grpc::Status HealthService::Watch(grpc::ServerContext* context,
                                  const grpc::health::v1::HealthCheckRequest* request,
                                  grpc::ServerWriter<HealthCheckResponse>* writer) {
  HealthCheckResponse response;
  response.set_status(KnownHealthService(request->service()) ? HealthCheckResponse::SERVING
                                                             : HealthCheckResponse::SERVICE_UNKNOWN);
  if (!writer->Write(response)) return grpc::Status::OK;
  HoldOpen(lifecycle_, context);
  response.set_status(HealthCheckResponse::NOT_SERVING);
  writer->Write(response);
  return grpc::Status::OK;
}

grpc::Status ControllerService::Shutdown(grpc::ServerContext*, const ::plugin::Empty*, ::plugin::Empty*) {
  hclog::Debug("shutdown requested by the plugin host");
  lifecycle_->RequestShutdown("controller");
  return grpc::Status::OK;
}

grpc::Status StdioService::StreamStdio(grpc::ServerContext* context, const google::protobuf::Empty*,
                                       grpc::ServerWriter<::plugin::StdioData>*) {
  HoldOpen(lifecycle_, context);
  return grpc::Status::OK;
}

}  // namespace nomadplugin
