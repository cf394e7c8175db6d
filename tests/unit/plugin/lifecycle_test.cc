// Covers plugin/src/lifecycle.cc: the shutdown flag and its reason, waits that
// end on a request from another thread, and SleepInStream inside a real gRPC
// handler whose client cancels the call.
#include "nomadplugin/lifecycle.h"

#include <thread>

#include <gtest/gtest.h>

#include "../../support/unix_grpc_server.h"
#include "absl/synchronization/notification.h"
#include "grpc_health/health.grpc.pb.h"

namespace nomadplugin {
namespace {

using ::ndq::testing::UnixGrpcServer;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

TEST(Lifecycle, StartsServingWithNoReason) {
  const Lifecycle lifecycle;
  EXPECT_FALSE(lifecycle.ShutdownRequested());
  EXPECT_EQ(lifecycle.ShutdownReason(), "");
}

TEST(Lifecycle, FirstReasonWins) {
  Lifecycle lifecycle;
  lifecycle.RequestShutdown("controller");
  lifecycle.RequestShutdown("SIGTERM");
  EXPECT_TRUE(lifecycle.ShutdownRequested());
  EXPECT_EQ(lifecycle.ShutdownReason(), "controller");
}

TEST(Lifecycle, WaitForShutdownTimesOutWhileServing) {
  const Lifecycle lifecycle;
  const absl::Time start = absl::Now();
  EXPECT_FALSE(lifecycle.WaitForShutdown(absl::Milliseconds(30)));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(30));
}

TEST(Lifecycle, WaitForShutdownEndsWhenAnotherThreadRequestsIt) {
  Lifecycle lifecycle;
  bool woke = false;
  std::thread waiter([&] { woke = lifecycle.WaitForShutdown(absl::InfiniteDuration()); });
  lifecycle.RequestShutdown("test");
  waiter.join();
  EXPECT_TRUE(woke);
}

TEST(Lifecycle, SleepInStreamWithoutContextTimesOut) {
  const Lifecycle lifecycle;
  const absl::Time start = absl::Now();
  EXPECT_EQ(lifecycle.SleepInStream(nullptr, absl::Milliseconds(40), absl::Milliseconds(5)),
            Lifecycle::Wake::kTimeout);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(40));
}

TEST(Lifecycle, SleepInStreamWakesAtOnceOnShutdown) {
  Lifecycle lifecycle;
  Lifecycle::Wake wake = Lifecycle::Wake::kTimeout;
  const absl::Time start = absl::Now();
  // The cancel check is an hour too: only the shutdown itself can end the sleep early.
  std::thread sleeper([&] { wake = lifecycle.SleepInStream(nullptr, absl::Hours(1), absl::Hours(1)); });
  lifecycle.RequestShutdown("test");
  sleeper.join();
  EXPECT_EQ(wake, Lifecycle::Wake::kShutdown);
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

TEST(Lifecycle, SleepInStreamAfterShutdownReturnsShutdown) {
  Lifecycle lifecycle;
  lifecycle.RequestShutdown("test");
  EXPECT_EQ(lifecycle.SleepInStream(nullptr, absl::Hours(1)), Lifecycle::Wake::kShutdown);
}

// A health Watch whose handler only sleeps in the stream and records why it woke.
class SleepingWatch final : public grpc::health::v1::Health::Service {
 public:
  explicit SleepingWatch(const Lifecycle* lifecycle) : lifecycle_(lifecycle) {}
  grpc::Status Watch(grpc::ServerContext* context, const HealthCheckRequest*,
                     grpc::ServerWriter<HealthCheckResponse>* writer) override {
    HealthCheckResponse response;
    response.set_status(HealthCheckResponse::SERVING);
    writer->Write(response);
    wake_ = lifecycle_->SleepInStream(context, absl::Hours(1), absl::Milliseconds(10));
    woke_.Notify();
    return grpc::Status::OK;
  }
  const Lifecycle* lifecycle_;
  Lifecycle::Wake wake_ = Lifecycle::Wake::kTimeout;
  absl::Notification woke_;
};

TEST(Lifecycle, SleepInStreamNoticesTheClientCancelling) {
  const Lifecycle lifecycle;
  SleepingWatch service(&lifecycle);
  UnixGrpcServer server({&service});
  ASSERT_TRUE(server.started());
  auto stub = grpc::health::v1::Health::NewStub(server.NewChannel());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto reader = stub->Watch(&context, HealthCheckRequest());
  HealthCheckResponse response;
  ASSERT_TRUE(reader->Read(&response));  // the handler is in its sleep now, or about to be

  context.TryCancel();
  ASSERT_TRUE(service.woke_.WaitForNotificationWithTimeout(absl::Seconds(5)));
  EXPECT_EQ(service.wake_, Lifecycle::Wake::kCancelled);
  EXPECT_FALSE(lifecycle.ShutdownRequested());
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
}

}  // namespace
}  // namespace nomadplugin
