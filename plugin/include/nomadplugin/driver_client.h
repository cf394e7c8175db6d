// The Nomad client's side of a driver plugin's RPCs, for tools and tests:
// typed calls with deadlines, and configs encoded the way Nomad encodes them.
#pragma once

#include <memory>
#include <string>

#include <grpcpp/channel.h>
#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "nomad/base.grpc.pb.h"
#include "nomad/driver.grpc.pb.h"

namespace nomadplugin {

namespace basepb = hashicorp::nomad::plugins::base::proto;
namespace driverpb = hashicorp::nomad::plugins::drivers::proto;

// Encodes `values` against an Object spec as Nomad does: every attribute of
// the schema present, the unset ones nil. Unknown keys are an error.
absl::StatusOr<std::string> EncodeConfigLikeNomad(const hashicorp::nomad::plugins::shared::hclspec::Spec& spec,
                                                  const nlohmann::json& values);

class DriverClient {
 public:
  explicit DriverClient(std::shared_ptr<grpc::Channel> channel, absl::Duration rpc_timeout = absl::Seconds(30));

  absl::StatusOr<basepb::PluginInfoResponse> PluginInfo();
  absl::StatusOr<hashicorp::nomad::plugins::shared::hclspec::Spec> ConfigSchema();
  absl::StatusOr<hashicorp::nomad::plugins::shared::hclspec::Spec> TaskConfigSchema();
  absl::StatusOr<driverpb::DriverCapabilities> Capabilities();
  // Sends raw msgpack, optionally with an agent config, as Nomad's loader does.
  absl::Status SetConfigMsgpack(const std::string& msgpack, const basepb::NomadConfig* agent);
  // Fetches the schema, encodes `values` like Nomad, then SetConfig.
  absl::Status SetConfig(const nlohmann::json& values, bool with_agent_config = true);

  // Opens a Fingerprint stream and returns its first message.
  absl::StatusOr<driverpb::FingerprintResponse> FirstFingerprint(absl::Duration timeout);

  driverpb::Driver::Stub& driver() { return *driver_; }
  basepb::BasePlugin::Stub& base() { return *base_; }

  // A context with this client's RPC deadline.
  std::unique_ptr<grpc::ClientContext> NewContext() const;
  std::unique_ptr<grpc::ClientContext> NewContext(absl::Duration timeout) const;

 private:
  std::shared_ptr<grpc::Channel> channel_;
  absl::Duration rpc_timeout_;
  std::unique_ptr<basepb::BasePlugin::Stub> base_;
  std::unique_ptr<driverpb::Driver::Stub> driver_;
};

// A gRPC failure as an absl::Status with the RPC's name.
absl::Status FromGrpc(const grpc::Status& status, const char* rpc);

// A default Nomad client agent config (port range 10000-25000).
basepb::NomadConfig DefaultAgentConfig();

}  // namespace nomadplugin
