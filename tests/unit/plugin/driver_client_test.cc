// Covers plugin/src/driver_client.cc: Nomad's config encoding (checked byte by
// byte), and the typed client calls against a real in-process gRPC server whose
// BasePlugin and Driver services record what the client sent and answer errors on demand.
#include "nomadplugin/driver_client.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/msgpack_writer.h"
#include "../../support/unix_grpc_server.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "nomadplugin/hclspec.h"

namespace nomadplugin {
namespace {

using ::ndq::testing::MsgpackWriter;
using ::ndq::testing::UnixGrpcServer;
using ::testing::HasSubstr;
using Spec = hashicorp::nomad::plugins::shared::hclspec::Spec;

Spec TwoOptionSchema() {
  return hclspec::Object({{"name", hclspec::Attr("name", "string")},
                          {"paths", hclspec::Attr("paths", "list(string)")}});
}

// Blocks a handler until its client gives up.
void HoldUntilCancelled(grpc::ServerContext* context) {
  while (!context->IsCancelled()) absl::SleepFor(absl::Milliseconds(2));
}

class FakeBase final : public basepb::BasePlugin::Service {
 public:
  grpc::Status PluginInfo(grpc::ServerContext* context, const basepb::PluginInfoRequest*,
                          basepb::PluginInfoResponse* response) override {
    if (hold_) HoldUntilCancelled(context);
    response->set_name("fake");
    response->set_type(basepb::DRIVER);
    response->set_plugin_version("9.8.7");
    return grpc::Status::OK;
  }
  grpc::Status ConfigSchema(grpc::ServerContext*, const basepb::ConfigSchemaRequest*,
                            basepb::ConfigSchemaResponse* response) override {
    *response->mutable_spec() = TwoOptionSchema();
    return grpc::Status::OK;
  }
  grpc::Status SetConfig(grpc::ServerContext*, const basepb::SetConfigRequest* request,
                         basepb::SetConfigResponse*) override {
    absl::MutexLock lock(&mu_);
    set_config_requests_.push_back(*request);
    return set_config_answer_;
  }
  std::vector<basepb::SetConfigRequest> SetConfigRequests() {
    absl::MutexLock lock(&mu_);
    return set_config_requests_;
  }

  bool hold_ = false;  // set before any call
  grpc::Status set_config_answer_ = grpc::Status::OK;

 private:
  absl::Mutex mu_;
  std::vector<basepb::SetConfigRequest> set_config_requests_ ABSL_GUARDED_BY(mu_);
};

class FakeDriver final : public driverpb::Driver::Service {
 public:
  grpc::Status TaskConfigSchema(grpc::ServerContext*, const driverpb::TaskConfigSchemaRequest*,
                                driverpb::TaskConfigSchemaResponse* response) override {
    *response->mutable_spec() = hclspec::Object({{"image_path", hclspec::Attr("image_path", "string", true)}});
    return grpc::Status::OK;
  }
  grpc::Status Capabilities(grpc::ServerContext*, const driverpb::CapabilitiesRequest*,
                            driverpb::CapabilitiesResponse* response) override {
    if (!capabilities_answer_.ok()) return capabilities_answer_;
    response->mutable_capabilities()->set_send_signals(true);
    response->mutable_capabilities()->set_exec(false);
    return grpc::Status::OK;
  }
  grpc::Status Fingerprint(grpc::ServerContext* context, const driverpb::FingerprintRequest*,
                           grpc::ServerWriter<driverpb::FingerprintResponse>* writer) override {
    if (!fingerprint_answer_.ok()) return fingerprint_answer_;
    for (int i = 0; i < fingerprints_to_send_; ++i) {
      driverpb::FingerprintResponse fp;
      fp.set_health(driverpb::FingerprintResponse::HEALTHY);
      fp.set_health_description("fingerprint " + std::to_string(i + 1));
      writer->Write(fp);
    }
    HoldUntilCancelled(context);
    fingerprint_cancelled_.Notify();
    return grpc::Status::OK;
  }

  // Set before any call.
  grpc::Status capabilities_answer_ = grpc::Status::OK;
  grpc::Status fingerprint_answer_ = grpc::Status::OK;
  int fingerprints_to_send_ = 2;
  absl::Notification fingerprint_cancelled_;
};

class DriverClientTest : public ::testing::Test {
 protected:
  void Serve() {
    server_ = std::make_unique<UnixGrpcServer>(std::vector<grpc::Service*>{&base_, &driver_});
    ASSERT_TRUE(server_->started());
  }
  DriverClient Client(absl::Duration timeout = absl::Seconds(10)) {
    return DriverClient(server_->NewChannel(), timeout);
  }

  FakeBase base_;
  FakeDriver driver_;
  std::unique_ptr<UnixGrpcServer> server_;
};

TEST(EncodeConfigLikeNomad, EveryAttributeIsPresentAndUnsetOnesAreNil) {
  const absl::StatusOr<std::string> encoded = EncodeConfigLikeNomad(TwoOptionSchema(), {{"name", "vm"}});
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  MsgpackWriter want;
  want.Map(2).Str("name").Str("vm").Str("paths").Nil();
  EXPECT_EQ(*encoded, want.bytes());
}

TEST(EncodeConfigLikeNomad, NullConfigIsAllNil) {
  const absl::StatusOr<std::string> encoded = EncodeConfigLikeNomad(TwoOptionSchema(), nullptr);
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  MsgpackWriter want;
  want.Map(2).Str("name").Nil().Str("paths").Nil();
  EXPECT_EQ(*encoded, want.bytes());
}

TEST(EncodeConfigLikeNomad, ListValuesAreEncodedAsGiven) {
  const absl::StatusOr<std::string> encoded =
      EncodeConfigLikeNomad(TwoOptionSchema(), {{"paths", {"/a", "/b"}}});
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  MsgpackWriter want;
  want.Map(2).Str("name").Nil().Str("paths").Array(2).Str("/a").Str("/b");
  EXPECT_EQ(*encoded, want.bytes());
}

TEST(EncodeConfigLikeNomad, UnknownOptionIsAnErrorNamingIt) {
  const absl::StatusOr<std::string> encoded =
      EncodeConfigLikeNomad(TwoOptionSchema(), {{"name", "vm"}, {"colour", "red"}});
  EXPECT_EQ(encoded.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(encoded.status().message(), "\"colour\" is not an option of this schema");
}

TEST(EncodeConfigLikeNomad, ConfigThatIsNotAnObjectIsAnError) {
  const absl::StatusOr<std::string> encoded = EncodeConfigLikeNomad(TwoOptionSchema(), {1, 2});
  EXPECT_EQ(encoded.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(encoded.status().message(), "config must be a JSON object");
}

TEST(EncodeConfigLikeNomad, SchemaWhoseRootIsNotAnObjectIsAnError) {
  const absl::StatusOr<std::string> encoded = EncodeConfigLikeNomad(hclspec::Attr("x", "string"), {});
  EXPECT_EQ(encoded.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(encoded.status().message(), "schema root is not an object");
}

TEST(FromGrpc, OkStaysOkAndErrorsKeepTheirCodeAndNameTheRpc) {
  EXPECT_TRUE(FromGrpc(grpc::Status::OK, "PluginInfo").ok());
  const absl::Status status = FromGrpc(grpc::Status(grpc::StatusCode::NOT_FOUND, "no such task"), "InspectTask");
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(status.message(), "InspectTask: no such task");
}

TEST(DefaultAgentConfig, HasNomadsDefaultPortRange) {
  const basepb::NomadConfig config = DefaultAgentConfig();
  EXPECT_EQ(config.driver().clientminport(), 10000u);
  EXPECT_EQ(config.driver().clientmaxport(), 25000u);
}

TEST_F(DriverClientTest, ContextsCarryTheClientsDeadlineOrNone) {
  Serve();
  const DriverClient client = Client(absl::Seconds(30));
  const auto before = std::chrono::system_clock::now();
  const auto bounded = client.NewContext();
  EXPECT_GE(bounded->deadline(), before + std::chrono::seconds(29));
  EXPECT_LE(bounded->deadline(), std::chrono::system_clock::now() + std::chrono::seconds(30));
  const auto shorter = client.NewContext(absl::Seconds(1));
  EXPECT_LE(shorter->deadline(), std::chrono::system_clock::now() + std::chrono::seconds(1));
  const auto unbounded = client.NewContext(absl::InfiniteDuration());
  EXPECT_GT(unbounded->deadline(), before + std::chrono::hours(24 * 365));
}

TEST_F(DriverClientTest, TypedCallsReturnWhatThePluginAnswered) {
  Serve();
  DriverClient client = Client();
  const auto info = client.PluginInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->name(), "fake");
  EXPECT_EQ(info->plugin_version(), "9.8.7");
  const auto schema = client.ConfigSchema();
  ASSERT_TRUE(schema.ok()) << schema.status();
  EXPECT_THAT(schema->object().attributes(), ::testing::SizeIs(2));
  const auto task_schema = client.TaskConfigSchema();
  ASSERT_TRUE(task_schema.ok()) << task_schema.status();
  EXPECT_TRUE(task_schema->object().attributes().at("image_path").attr().required());
  const auto caps = client.Capabilities();
  ASSERT_TRUE(caps.ok()) << caps.status();
  EXPECT_TRUE(caps->send_signals());
  EXPECT_FALSE(caps->exec());
}

TEST_F(DriverClientTest, PluginErrorKeepsItsCodeAndNamesTheRpc) {
  driver_.capabilities_answer_ = grpc::Status(grpc::StatusCode::UNAVAILABLE, "not ready");
  Serve();
  const auto caps = Client().Capabilities();
  EXPECT_EQ(caps.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(caps.status().message(), "Capabilities: not ready");
}

TEST_F(DriverClientTest, CallOutlivingTheClientTimeoutIsDeadlineExceeded) {
  base_.hold_ = true;
  Serve();
  const absl::Time start = absl::Now();
  const auto info = Client(absl::Milliseconds(100)).PluginInfo();
  EXPECT_EQ(info.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(std::string(info.status().message()), ::testing::StartsWith("PluginInfo: "));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(100));
}

TEST_F(DriverClientTest, NoPluginListeningIsUnavailable) {
  Serve();
  DriverClient client = Client();
  server_->Stop();
  const auto info = client.PluginInfo();
  EXPECT_EQ(info.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(info.status().message()), ::testing::StartsWith("PluginInfo: "));
}

TEST_F(DriverClientTest, SetConfigSendsTheSchemasEncodingAndTheAgentConfig) {
  Serve();
  DriverClient client = Client();
  ASSERT_TRUE(client.SetConfig({{"paths", {"/x"}}}).ok());
  ASSERT_TRUE(client.SetConfig(nlohmann::json::object(), /*with_agent_config=*/false).ok());
  const std::vector<basepb::SetConfigRequest> sent = base_.SetConfigRequests();
  ASSERT_EQ(sent.size(), 2u);
  MsgpackWriter first;
  first.Map(2).Str("name").Nil().Str("paths").Array(1).Str("/x");
  EXPECT_EQ(sent[0].msgpack_config(), first.bytes());
  EXPECT_EQ(sent[0].plugin_api_version(), "0.1.0");
  ASSERT_TRUE(sent[0].has_nomad_config());
  EXPECT_EQ(sent[0].nomad_config().driver().clientminport(), 10000u);
  EXPECT_EQ(sent[0].nomad_config().driver().clientmaxport(), 25000u);
  EXPECT_FALSE(sent[1].has_nomad_config());
}

TEST_F(DriverClientTest, SetConfigWithAnUnknownOptionSendsNothing) {
  Serve();
  const absl::Status status = Client().SetConfig({{"colour", "red"}});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("\"colour\""));
  EXPECT_THAT(base_.SetConfigRequests(), ::testing::IsEmpty());
}

TEST_F(DriverClientTest, SetConfigMsgpackSendsTheBytesAsGivenAndReportsRefusal) {
  base_.set_config_answer_ = grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "bad image_paths");
  Serve();
  const std::string raw("\x81\xa1k\xc0", 4);
  const absl::Status status = Client().SetConfigMsgpack(raw, nullptr);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(), "SetConfig: bad image_paths");
  const std::vector<basepb::SetConfigRequest> sent = base_.SetConfigRequests();
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_EQ(sent[0].msgpack_config(), raw);
  EXPECT_FALSE(sent[0].has_nomad_config());
}

TEST_F(DriverClientTest, FirstFingerprintReturnsTheFirstAndClosesTheStream) {
  Serve();
  const auto fp = Client().FirstFingerprint(absl::Seconds(10));
  ASSERT_TRUE(fp.ok()) << fp.status();
  EXPECT_EQ(fp->health_description(), "fingerprint 1");
  EXPECT_TRUE(driver_.fingerprint_cancelled_.WaitForNotificationWithTimeout(absl::Seconds(5)))
      << "the plugin's stream was left open";
}

TEST_F(DriverClientTest, FirstFingerprintReportsThePluginsError) {
  driver_.fingerprint_answer_ = grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "not configured");
  Serve();
  const auto fp = Client().FirstFingerprint(absl::Seconds(10));
  EXPECT_EQ(fp.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(fp.status().message(), "Fingerprint: not configured");
}

TEST_F(DriverClientTest, FirstFingerprintTimesOutWhenNoneComes) {
  driver_.fingerprints_to_send_ = 0;
  Serve();
  const auto fp = Client().FirstFingerprint(absl::Milliseconds(100));
  EXPECT_EQ(fp.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(std::string(fp.status().message()), ::testing::StartsWith("Fingerprint: "));
}

}  // namespace
}  // namespace nomadplugin
