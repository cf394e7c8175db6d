// Covers plugin/src/go_plugin_services.cc: the health, controller and stdio
// services go-plugin's host calls, served by a real gRPC server on a unix
// socket and called through real stubs; streams end on shutdown or when the client leaves.
#include "nomadplugin/go_plugin_services.h"

#include <thread>

#include <gtest/gtest.h>

#include "../../support/unix_grpc_server.h"
#include "absl/synchronization/notification.h"

namespace nomadplugin {
namespace {

using ::ndq::testing::UnixGrpcServer;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

void SetDeadline(grpc::ClientContext* context, absl::Duration timeout) {
  context->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::milliseconds(absl::ToInt64Milliseconds(timeout)));
}

HealthCheckRequest ForService(const std::string& name) {
  HealthCheckRequest request;
  request.set_service(name);
  return request;
}

class GoPluginServicesTest : public ::testing::Test {
 protected:
  GoPluginServicesTest()
      : health_(&lifecycle_), controller_(&lifecycle_), stdio_(&lifecycle_),
        server_({&health_, &controller_, &stdio_}),
        health_stub_(grpc::health::v1::Health::NewStub(server_.NewChannel())) {}

  grpc::Status Check(const std::string& service, HealthCheckResponse* response) {
    grpc::ClientContext context;
    SetDeadline(&context, absl::Seconds(10));
    return health_stub_->Check(&context, ForService(service), response);
  }

  Lifecycle lifecycle_;
  HealthService health_;
  ControllerService controller_;
  StdioService stdio_;
  UnixGrpcServer server_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_stub_;
};

TEST_F(GoPluginServicesTest, PluginAndWholeServerAreServingUntilShutdown) {
  ASSERT_TRUE(server_.started());
  for (const char* name : {"plugin", ""}) {
    HealthCheckResponse response;
    ASSERT_TRUE(Check(name, &response).ok()) << name;
    EXPECT_EQ(response.status(), HealthCheckResponse::SERVING) << name;
  }
  lifecycle_.RequestShutdown("test");
  HealthCheckResponse response;
  ASSERT_TRUE(Check("plugin", &response).ok());
  EXPECT_EQ(response.status(), HealthCheckResponse::NOT_SERVING);
}

TEST_F(GoPluginServicesTest, CheckOfAnUnknownServiceIsNotFoundNamingIt) {
  HealthCheckResponse response;
  const grpc::Status status = Check("kv", &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(status.error_message(), "unknown health service kv");
}

TEST_F(GoPluginServicesTest, WatchSendsServingThenNotServingAtShutdown) {
  grpc::ClientContext context;
  SetDeadline(&context, absl::Seconds(10));
  auto reader = health_stub_->Watch(&context, ForService("plugin"));
  HealthCheckResponse response;
  ASSERT_TRUE(reader->Read(&response));
  EXPECT_EQ(response.status(), HealthCheckResponse::SERVING);

  lifecycle_.RequestShutdown("test");
  ASSERT_TRUE(reader->Read(&response));
  EXPECT_EQ(response.status(), HealthCheckResponse::NOT_SERVING);
  EXPECT_FALSE(reader->Read(&response));
  EXPECT_TRUE(reader->Finish().ok());
}

TEST_F(GoPluginServicesTest, WatchOfAnUnknownServiceSaysServiceUnknown) {
  grpc::ClientContext context;
  SetDeadline(&context, absl::Seconds(10));
  auto reader = health_stub_->Watch(&context, ForService("kv"));
  HealthCheckResponse response;
  ASSERT_TRUE(reader->Read(&response));
  EXPECT_EQ(response.status(), HealthCheckResponse::SERVICE_UNKNOWN);
  context.TryCancel();
  reader->Finish();
}

TEST_F(GoPluginServicesTest, ControllerShutdownRequestsShutdown) {
  auto stub = ::plugin::GRPCController::NewStub(server_.NewChannel());
  grpc::ClientContext context;
  SetDeadline(&context, absl::Seconds(10));
  ::plugin::Empty request, response;
  ASSERT_TRUE(stub->Shutdown(&context, request, &response).ok());
  EXPECT_TRUE(lifecycle_.ShutdownRequested());
  EXPECT_EQ(lifecycle_.ShutdownReason(), "controller");
}

TEST_F(GoPluginServicesTest, StdioStaysOpenWithoutDataUntilTheClientsDeadline) {
  auto stub = ::plugin::GRPCStdio::NewStub(server_.NewChannel());
  grpc::ClientContext context;
  SetDeadline(&context, absl::Milliseconds(300));
  auto reader = stub->StreamStdio(&context, google::protobuf::Empty());
  ::plugin::StdioData data;
  EXPECT_FALSE(reader->Read(&data));
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_FALSE(lifecycle_.ShutdownRequested());
}

TEST_F(GoPluginServicesTest, StdioEndsCleanlyAtShutdown) {
  auto stub = ::plugin::GRPCStdio::NewStub(server_.NewChannel());
  grpc::ClientContext context;
  SetDeadline(&context, absl::Seconds(30));
  auto reader = stub->StreamStdio(&context, google::protobuf::Empty());
  lifecycle_.RequestShutdown("test");
  ::plugin::StdioData data;
  EXPECT_FALSE(reader->Read(&data));
  EXPECT_TRUE(reader->Finish().ok());
}

// The handlers return once their client has gone: a server shutdown that waits
// for every call (no deadline) then completes without the lifecycle's help.
TEST_F(GoPluginServicesTest, StreamsEndWhenTheirClientLeaves) {
  grpc::ClientContext watch_context, stdio_context;
  auto watch = health_stub_->Watch(&watch_context, ForService("plugin"));
  HealthCheckResponse response;
  ASSERT_TRUE(watch->Read(&response));
  auto stdio_stub = ::plugin::GRPCStdio::NewStub(server_.NewChannel());
  auto stdio = stdio_stub->StreamStdio(&stdio_context, google::protobuf::Empty());
  watch_context.TryCancel();
  stdio_context.TryCancel();
  watch->Finish();
  stdio->Finish();

  absl::Notification stopped;
  std::thread stopper([&] {
    server_.StopWhenIdle();
    stopped.Notify();
  });
  const bool prompt = stopped.WaitForNotificationWithTimeout(absl::Seconds(5));
  if (!prompt) lifecycle_.RequestShutdown("unblock the test");
  stopper.join();
  EXPECT_TRUE(prompt) << "a stream handler did not notice its client had gone";
}

}  // namespace
}  // namespace nomadplugin
