#include "nomadplugin/driver_client.h"

#include <grpcpp/client_context.h>

#include "absl/strings/str_cat.h"

namespace nomadplugin {

absl::StatusOr<std::string> EncodeConfigLikeNomad(
    const hashicorp::nomad::plugins::shared::hclspec::Spec& spec, const nlohmann::json& values) {
  if (!spec.has_object()) return absl::InvalidArgumentError("schema root is not an object");
  if (!values.is_null() && !values.is_object()) {
    return absl::InvalidArgumentError("config must be a JSON object");
  }
  nlohmann::json full = nlohmann::json::object();
  for (const auto& [name, unused] : spec.object().attributes()) full[name] = nullptr;
  if (values.is_object()) {
    for (const auto& [key, value] : values.items()) {
      if (!full.contains(key)) {
        return absl::InvalidArgumentError(absl::StrCat("\"", key, "\" is not an option of this schema"));
      }
      full[key] = value;
    }
  }
  std::vector<uint8_t> bytes = nlohmann::json::to_msgpack(full);
  return std::string(bytes.begin(), bytes.end());
}

absl::Status FromGrpc(const grpc::Status& status, const char* rpc) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      absl::StrCat(rpc, ": ", status.error_message()));
}

basepb::NomadConfig DefaultAgentConfig() {
  basepb::NomadConfig config;
  config.mutable_driver()->set_clientminport(10000);
  config.mutable_driver()->set_clientmaxport(25000);
  return config;
}

DriverClient::DriverClient(std::shared_ptr<grpc::Channel> channel, absl::Duration rpc_timeout)
    : channel_(std::move(channel)),
      rpc_timeout_(rpc_timeout),
      base_(basepb::BasePlugin::NewStub(channel_)),
      driver_(driverpb::Driver::NewStub(channel_)) {}

std::unique_ptr<grpc::ClientContext> DriverClient::NewContext() const { return NewContext(rpc_timeout_); }

std::unique_ptr<grpc::ClientContext> DriverClient::NewContext(absl::Duration timeout) const {
  auto context = std::make_unique<grpc::ClientContext>();
  if (timeout == absl::InfiniteDuration()) return context;
  context->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::milliseconds(absl::ToInt64Milliseconds(timeout)));
  return context;
}

absl::StatusOr<basepb::PluginInfoResponse> DriverClient::PluginInfo() {
  basepb::PluginInfoResponse response;
  auto context = NewContext();
  absl::Status status = FromGrpc(base_->PluginInfo(context.get(), {}, &response), "PluginInfo");
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<hashicorp::nomad::plugins::shared::hclspec::Spec> DriverClient::ConfigSchema() {
  basepb::ConfigSchemaResponse response;
  auto context = NewContext();
  absl::Status status = FromGrpc(base_->ConfigSchema(context.get(), {}, &response), "ConfigSchema");
  if (!status.ok()) return status;
  return response.spec();
}

absl::StatusOr<hashicorp::nomad::plugins::shared::hclspec::Spec> DriverClient::TaskConfigSchema() {
  driverpb::TaskConfigSchemaResponse response;
  auto context = NewContext();
  absl::Status status = FromGrpc(driver_->TaskConfigSchema(context.get(), {}, &response), "TaskConfigSchema");
  if (!status.ok()) return status;
  return response.spec();
}

absl::StatusOr<driverpb::DriverCapabilities> DriverClient::Capabilities() {
  driverpb::CapabilitiesResponse response;
  auto context = NewContext();
  absl::Status status = FromGrpc(driver_->Capabilities(context.get(), {}, &response), "Capabilities");
  if (!status.ok()) return status;
  return response.capabilities();
}

absl::Status DriverClient::SetConfigMsgpack(const std::string& msgpack, const basepb::NomadConfig* agent) {
  basepb::SetConfigRequest request;
  request.set_msgpack_config(msgpack);
  request.set_plugin_api_version("0.1.0");
  if (agent != nullptr) *request.mutable_nomad_config() = *agent;
  basepb::SetConfigResponse response;
  auto context = NewContext();
  return FromGrpc(base_->SetConfig(context.get(), request, &response), "SetConfig");
}

absl::Status DriverClient::SetConfig(const nlohmann::json& values, bool with_agent_config) {
  absl::StatusOr<hashicorp::nomad::plugins::shared::hclspec::Spec> spec = ConfigSchema();
  if (!spec.ok()) return spec.status();
  absl::StatusOr<std::string> msgpack = EncodeConfigLikeNomad(*spec, values);
  if (!msgpack.ok()) return msgpack.status();
  const basepb::NomadConfig agent = DefaultAgentConfig();
  return SetConfigMsgpack(*msgpack, with_agent_config ? &agent : nullptr);
}

absl::StatusOr<driverpb::FingerprintResponse> DriverClient::FirstFingerprint(absl::Duration timeout) {
  auto context = NewContext(timeout);
  std::unique_ptr<grpc::ClientReader<driverpb::FingerprintResponse>> reader =
      driver_->Fingerprint(context.get(), {});
  driverpb::FingerprintResponse first;
  if (!reader->Read(&first)) return FromGrpc(reader->Finish(), "Fingerprint");
  context->TryCancel();
  reader->Finish();
  return first;
}

}  // namespace nomadplugin
