// Launches the built plugin exactly as a Nomad client does and checks what
// Nomad relies on: handshake, refusals, health, schemas, config, fingerprint,
// the agent's start-up sequence and shutdown.
#include <signal.h>
#include <sys/stat.h>

#include <filesystem>
#include <regex>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../support/msgpack_writer.h"
#include "../support/temp_dir.h"
#include "google_rpc/status.pb.h"
#include "grpc_health/health.grpc.pb.h"
#include "nomad/structs.pb.h"
#include "nomadplugin/driver_client.h"
#include "nomadplugin/launcher.h"
#include "host/run_command.h"

namespace ndq {
namespace {

using nomadplugin::DriverClient;
using nomadplugin::LaunchOptions;
using nomadplugin::PluginProcess;
using ::ndq::testing::MsgpackWriter;
using ::ndq::testing::TempDir;
using ::testing::HasSubstr;
namespace driverpb = hashicorp::nomad::plugins::drivers::proto;
namespace basepb = hashicorp::nomad::plugins::base::proto;

LaunchOptions Options() {
  LaunchOptions options;
  options.binary = NDQ_PLUGIN_BINARY;
  return options;
}

std::unique_ptr<PluginProcess> Launch(LaunchOptions options = Options()) {
  auto plugin = PluginProcess::Launch(options);
  EXPECT_TRUE(plugin.ok()) << plugin.status();
  return plugin.ok() ? std::move(*plugin) : nullptr;
}

std::string StringAttr(const driverpb::FingerprintResponse& fp, const std::string& name) {
  return fp.attributes().at(name).string_val();
}

TEST(Handshake, LineHasNomadsFormatAndNothingElseGoesToStdout) {
  TempDir sockets;
  LaunchOptions options = Options();
  options.env["PLUGIN_UNIX_SOCKET_DIR"] = sockets.path();
  auto plugin = Launch(options);
  ASSERT_NE(plugin, nullptr);
  EXPECT_THAT(plugin->raw_handshake(),
              ::testing::MatchesRegex("1\\|2\\|unix\\|" + sockets.path() + "/plugin-[A-Za-z0-9]{6}/plugin\\.sock\\|grpc\\|\n"));
  ASSERT_TRUE(plugin->CheckHealth(absl::Seconds(5)).ok());
  EXPECT_EQ(plugin->ExtraStdout(), "");

  // The socket and its directory are private to the agent's user.
  struct stat st;
  ASSERT_EQ(::stat(plugin->handshake().address.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0077, 0u);
  const std::string dir = std::filesystem::path(plugin->handshake().address).parent_path();
  ASSERT_EQ(::stat(dir.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
}

TEST(Handshake, UsesTmpdirWhenNoSocketDirIsGiven) {
  TempDir tmp;
  LaunchOptions options = Options();
  options.unset_env = {"PLUGIN_UNIX_SOCKET_DIR"};
  options.env["TMPDIR"] = tmp.path();
  auto plugin = Launch(options);
  ASSERT_NE(plugin, nullptr);
  EXPECT_EQ(plugin->handshake().address.rfind(tmp.path() + "/plugin-", 0), 0u) << plugin->handshake().address;
}

TEST(Handshake, RefusesToRunWithoutTheCookie) {
  LaunchOptions options = Options();
  options.set_cookie = false;
  options.unset_env = {"NOMAD_PLUGIN_MAGIC_COOKIE"};
  const auto plugin = PluginProcess::Launch(options);
  ASSERT_FALSE(plugin.ok());
  const std::string message(plugin.status().message());
  EXPECT_THAT(message, HasSubstr("gave no handshake line (exit code 1)"));
  EXPECT_THAT(message, HasSubstr("is a Nomad plugin and is started by the Nomad client agent"));
}

TEST(Handshake, RefusesAnUnsupportedProtocolVersion) {
  LaunchOptions options = Options();
  options.protocol_versions = "1,3";
  const auto plugin = PluginProcess::Launch(options);
  ASSERT_FALSE(plugin.ok());
  const std::string message(plugin.status().message());
  EXPECT_THAT(message, HasSubstr("exit code 1"));
  EXPECT_THAT(message, HasSubstr("incompatible plugin protocol"));
}

TEST(Handshake, PicksVersion2FromAList) {
  LaunchOptions options = Options();
  options.protocol_versions = "1,2,3";
  auto plugin = Launch(options);
  ASSERT_NE(plugin, nullptr);
  EXPECT_EQ(plugin->handshake().app_version, 2);
}

TEST(Health, PluginServiceIsServingAndUnknownIsNotFound) {
  auto plugin = Launch();
  ASSERT_NE(plugin, nullptr);
  EXPECT_TRUE(plugin->CheckHealth(absl::Seconds(5)).ok());
  auto stub = grpc::health::v1::Health::NewStub(plugin->channel());
  grpc::ClientContext context;
  grpc::health::v1::HealthCheckRequest request;
  request.set_service("something-else");
  grpc::health::v1::HealthCheckResponse response;
  EXPECT_EQ(stub->Check(&context, request, &response).error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST(Logging, StderrIsHclogJson) {
  auto plugin = Launch();
  ASSERT_NE(plugin, nullptr);
  ASSERT_TRUE(plugin->WaitForStderrLine([](const std::string& l) { return l.find("plugin serving") != std::string::npos; },
                                        absl::Seconds(5)));
  const std::regex timestamp(R"(^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$)");
  for (const std::string& line : plugin->StderrLines()) {
    const nlohmann::json json = nlohmann::json::parse(line, nullptr, false);
    ASSERT_TRUE(json.is_object()) << line;
    EXPECT_TRUE(json.contains("@level")) << line;
    EXPECT_TRUE(json.contains("@message")) << line;
    EXPECT_TRUE(std::regex_match(json.value("@timestamp", ""), timestamp)) << line;
  }
}

TEST(BasePlugin, PluginInfoSupersedesTheBuiltInDriver) {
  auto plugin = Launch();
  ASSERT_NE(plugin, nullptr);
  DriverClient client(plugin->channel());
  const auto info = client.PluginInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->type(), basepb::DRIVER);
  EXPECT_EQ(info->name(), "qemu");
  EXPECT_THAT(info->plugin_api_versions(), ::testing::Contains("0.1.0"));
  int major = 0, minor = 0, patch = 0;
  ASSERT_EQ(std::sscanf(info->plugin_version().c_str(), "%d.%d.%d", &major, &minor, &patch), 3)
      << info->plugin_version();
  EXPECT_GE(major, 1) << "must be above Nomad's built-in qemu driver (0.1.0)";
}

TEST(BasePlugin, ConfigSchemaListsNomadsPluginOptions) {
  auto plugin = Launch();
  ASSERT_NE(plugin, nullptr);
  DriverClient client(plugin->channel());
  const auto spec = client.ConfigSchema();
  ASSERT_TRUE(spec.ok()) << spec.status();
  const auto& attrs = spec->object().attributes();
  for (const char* name : {"image_paths", "args_allowlist", "emulators_allowlist"}) {
    ASSERT_TRUE(attrs.count(name)) << name;
    EXPECT_EQ(attrs.at(name).attr().type(), "list(string)");
  }
  EXPECT_TRUE(attrs.count("image_cache_dir"));
}

TEST(Driver, TaskConfigSchemaListsNomadsTaskOptions) {
  auto plugin = Launch();
  ASSERT_NE(plugin, nullptr);
  DriverClient client(plugin->channel());
  const auto spec = client.TaskConfigSchema();
  ASSERT_TRUE(spec.ok()) << spec.status();
  const auto& attrs = spec->object().attributes();
  const std::map<std::string, std::string> nomad_options = {
      {"image_path", "string"},      {"emulator", "string"},    {"machine_type", "string"},
      {"drive_interface", "string"}, {"accelerator", "string"}, {"graceful_shutdown", "bool"},
      {"guest_agent", "bool"},       {"args", "list(string)"},  {"port_map", "list(map(number))"},
  };
  for (const auto& [name, type] : nomad_options) {
    ASSERT_TRUE(attrs.count(name)) << name;
    EXPECT_EQ(attrs.at(name).attr().type(), type) << name;
  }
  EXPECT_TRUE(attrs.count("image_source"));
  EXPECT_TRUE(attrs.count("checksum"));
}

TEST(Driver, CapabilitiesAreHonest) {
  auto plugin = Launch();
  ASSERT_NE(plugin, nullptr);
  DriverClient client(plugin->channel());
  const auto caps = client.Capabilities();
  ASSERT_TRUE(caps.ok()) << caps.status();
  EXPECT_TRUE(caps->exec());  // through the guest agent
  EXPECT_TRUE(caps->send_signals());
  EXPECT_EQ(caps->fs_isolation(), driverpb::DriverCapabilities::NONE);
  // Volume mounts become virtio-9p shares.
  EXPECT_EQ(caps->mount_configs(), driverpb::DriverCapabilities::ANY_MOUNTS);
  EXPECT_THAT(caps->network_isolation_modes(), ::testing::Contains(driverpb::NetworkIsolationSpec::HOST));
}

TEST(BasePlugin, SetConfigAcceptsNomadsEncodingAndRejectsBadTypes) {
  auto plugin = Launch();
  ASSERT_NE(plugin, nullptr);
  DriverClient client(plugin->channel());
  EXPECT_TRUE(client.SetConfig({{"image_paths", {"/srv/images"}}, {"emulators_allowlist", {"x86_64"}}}).ok());
  EXPECT_TRUE(client.SetConfig(nlohmann::json::object(), /*with_agent_config=*/false).ok());

  MsgpackWriter bad;
  bad.Map(4).Str("image_paths").FixInt(7).Str("args_allowlist").Nil().Str("emulators_allowlist").Nil()
      .Str("image_cache_dir").Nil();
  const absl::Status status = client.SetConfigMsgpack(bad.bytes(), nullptr);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("\"image_paths\" must be a list of strings"));

  const absl::Status garbage = client.SetConfigMsgpack(std::string("\xc1", 1), nullptr);
  EXPECT_EQ(garbage.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(garbage.message()), HasSubstr("not valid msgpack"));
}

TEST(Fingerprint, MatchesTheRealQemu) {
  auto plugin = Launch();
  ASSERT_NE(plugin, nullptr);
  DriverClient client(plugin->channel());
  ASSERT_TRUE(client.SetConfig(nlohmann::json::object()).ok());
  const auto fp = client.FirstFingerprint(absl::Seconds(20));
  ASSERT_TRUE(fp.ok()) << fp.status();
  EXPECT_EQ(fp->health(), driverpb::FingerprintResponse::HEALTHY) << fp->health_description();
  EXPECT_TRUE(fp->attributes().at("driver.qemu").bool_val());

  // The version the real binary reports, read independently of the plugin's parser.
  const auto out = RunCommand({"/usr/bin/qemu-system-x86_64", "--version"}, absl::Seconds(20));
  ASSERT_TRUE(out.ok());
  std::smatch m;
  ASSERT_TRUE(std::regex_search(out->output, m, std::regex(R"(QEMU emulator version ([0-9.]+))")));
  EXPECT_EQ(StringAttr(*fp, "driver.qemu.version"), m[1].str());
  EXPECT_THAT(StringAttr(*fp, "driver.qemu.emulators"), HasSubstr("x86_64"));
  EXPECT_THAT(StringAttr(*fp, "driver.qemu.accelerators"), HasSubstr("tcg"));
  EXPECT_TRUE(fp->attributes().count("driver.qemu.kvm"));
  // Least privilege in force by default: the sandbox, QEMU as the plugin's user.
  EXPECT_TRUE(fp->attributes().at("driver.qemu.sandbox").bool_val());
  EXPECT_EQ(StringAttr(*fp, "driver.qemu.user"), "plugin");
}

TEST(Fingerprint, PrivilegeSettingsAreAdvertised) {
  auto plugin = Launch();
  ASSERT_NE(plugin, nullptr);
  DriverClient client(plugin->channel());
  ASSERT_TRUE(client.SetConfig({{"sandbox", false}, {"qemu_user", "nobody"}}).ok());
  const auto fp = client.FirstFingerprint(absl::Seconds(20));
  ASSERT_TRUE(fp.ok());
  EXPECT_FALSE(fp->attributes().at("driver.qemu.sandbox").bool_val());
  EXPECT_EQ(StringAttr(*fp, "driver.qemu.user"), "nobody");
}

TEST(Fingerprint, AllowlistFromSetConfigApplies) {
  auto plugin = Launch();
  ASSERT_NE(plugin, nullptr);
  DriverClient client(plugin->channel());
  ASSERT_TRUE(client.SetConfig({{"emulators_allowlist", {"x86_64"}}}).ok());
  const auto fp = client.FirstFingerprint(absl::Seconds(20));
  ASSERT_TRUE(fp.ok());
  EXPECT_EQ(StringAttr(*fp, "driver.qemu.emulators"), "x86_64");
}

TEST(Fingerprint, EmptyPathIsUndetected) {
  LaunchOptions options = Options();
  options.env["PATH"] = "";
  auto plugin = Launch(options);
  ASSERT_NE(plugin, nullptr);
  DriverClient client(plugin->channel());
  const auto fp = client.FirstFingerprint(absl::Seconds(20));
  ASSERT_TRUE(fp.ok()) << fp.status();
  EXPECT_EQ(fp->health(), driverpb::FingerprintResponse::UNDETECTED);
  EXPECT_THAT(fp->health_description(), HasSubstr("no qemu-system-* binary found"));
  EXPECT_EQ(fp->attributes().count("driver.qemu"), 0u);
}

TEST(Fingerprint, ChangeIsSentPromptly) {
  TempDir bin;
  std::filesystem::create_symlink("/usr/bin/qemu-system-x86_64", bin / "qemu-system-x86_64");
  LaunchOptions options = Options();
  options.env["PATH"] = bin.path();
  auto plugin = Launch(options);
  ASSERT_NE(plugin, nullptr);
  DriverClient client(plugin->channel());
  auto context = client.NewContext(absl::Seconds(30));
  auto reader = client.driver().Fingerprint(context.get(), {});
  driverpb::FingerprintResponse fp;
  ASSERT_TRUE(reader->Read(&fp));
  EXPECT_EQ(fp.health(), driverpb::FingerprintResponse::HEALTHY);

  // QEMU is uninstalled: the node must stop advertising it well before the 30 s period.
  std::filesystem::remove(bin / "qemu-system-x86_64");
  const absl::Time removed = absl::Now();
  ASSERT_TRUE(reader->Read(&fp));
  EXPECT_EQ(fp.health(), driverpb::FingerprintResponse::UNDETECTED);
  EXPECT_LT(absl::Now() - removed, absl::Seconds(5));
  context->TryCancel();
  reader->Finish();
}

// Exec errors that need no VM (the rest are in vm_exec_test): an unknown
// task, no command, and a terminal, which the guest agent cannot give.
TEST(Driver, ExecRefusesWhatItCannotRun) {
  auto plugin = Launch();
  ASSERT_NE(plugin, nullptr);
  DriverClient client(plugin->channel());
  {
    auto context = client.NewContext();
    driverpb::ExecTaskRequest request;
    request.set_task_id("nope/nope/00000000");
    request.add_command("true");
    driverpb::ExecTaskResponse response;
    const grpc::Status status = client.driver().ExecTask(context.get(), request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND) << status.error_message();
  }
  {
    auto context = client.NewContext();
    driverpb::ExecTaskRequest request;
    request.set_task_id("nope/nope/00000000");
    driverpb::ExecTaskResponse response;
    const grpc::Status status = client.driver().ExecTask(context.get(), request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(), HasSubstr("no command"));
  }
  auto context = client.NewContext();
  auto stream = client.driver().ExecTaskStreaming(context.get());
  driverpb::ExecTaskStreamingRequest setup;
  setup.mutable_setup()->set_task_id("nope/nope/00000000");
  setup.mutable_setup()->add_command("/bin/sh");
  setup.mutable_setup()->set_tty(true);
  ASSERT_TRUE(stream->Write(setup));
  stream->WritesDone();
  driverpb::ExecTaskStreamingResponse frame;
  EXPECT_FALSE(stream->Read(&frame));
  const grpc::Status status = stream->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("terminal (tty) is not supported through the guest agent"));
}

TEST(Driver, UnknownTaskIsNotFound) {
  auto plugin = Launch();
  ASSERT_NE(plugin, nullptr);
  DriverClient client(plugin->channel());
  auto context = client.NewContext();
  driverpb::InspectTaskRequest request;
  request.set_task_id("nope/nope/00000000");
  driverpb::InspectTaskResponse response;
  const grpc::Status status = client.driver().InspectTask(context.get(), request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(status.error_message(), HasSubstr("is not known to this driver"));
}

TEST(Driver, StartFailureCarriesNomadsRecoverableError) {
  auto plugin = Launch();
  ASSERT_NE(plugin, nullptr);
  DriverClient client(plugin->channel());
  auto context = client.NewContext();
  driverpb::StartTaskRequest request;
  request.mutable_task()->set_id("a/b/00000000");
  request.mutable_task()->set_name("b");
  driverpb::StartTaskResponse response;
  const grpc::Status status = client.driver().StartTask(context.get(), request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  google::rpc::Status rich;
  ASSERT_TRUE(rich.ParseFromString(status.error_details()));
  ASSERT_EQ(rich.details_size(), 1);
  hashicorp::nomad::plugins::shared::structs::RecoverableError detail;
  ASSERT_TRUE(rich.details(0).UnpackTo(&detail));
  EXPECT_FALSE(detail.recoverable()) << "a config error does not heal on retry";
}

// Nomad's client launches a driver three times at agent start; the last one
// stays with Fingerprint and TaskEvents streams open until Shutdown.
TEST(NomadStartup, ThreeLaunchesAndPromptShutdownWithStreamsOpen) {
  {
    auto probe = Launch();
    ASSERT_NE(probe, nullptr);
    DriverClient client(probe->channel());
    ASSERT_TRUE(client.PluginInfo().ok());
    ASSERT_TRUE(client.ConfigSchema().ok());
    probe->Signal(SIGKILL);
  }
  {
    auto validate = Launch();
    ASSERT_NE(validate, nullptr);
    DriverClient client(validate->channel());
    ASSERT_TRUE(client.SetConfig(nlohmann::json::object(), /*with_agent_config=*/false).ok());
    validate->Signal(SIGKILL);
  }
  auto plugin = Launch();
  ASSERT_NE(plugin, nullptr);
  const std::string socket = plugin->handshake().address;
  DriverClient client(plugin->channel());
  ASSERT_TRUE(client.SetConfig(nlohmann::json::object()).ok());
  {
    auto context = client.NewContext();
    driverpb::InitResponse response;
    ASSERT_TRUE(client.driver().Init(context.get(), {}, &response).ok());
  }
  auto fp_context = client.NewContext(absl::InfiniteDuration());
  auto fingerprints = client.driver().Fingerprint(fp_context.get(), {});
  auto ev_context = client.NewContext(absl::InfiniteDuration());
  auto events = client.driver().TaskEvents(ev_context.get(), {});
  driverpb::FingerprintResponse fp;
  ASSERT_TRUE(fingerprints->Read(&fp));
  EXPECT_EQ(fp.health(), driverpb::FingerprintResponse::HEALTHY);

  // Nomad gives a plugin 2 s after Shutdown before it kills it.
  const absl::Time start = absl::Now();
  const auto exit = plugin->Shutdown(absl::Seconds(2));
  ASSERT_TRUE(exit.ok()) << exit.status();
  EXPECT_EQ(exit->code, 0) << exit->ToString();
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
  EXPECT_FALSE(std::filesystem::exists(socket));
  EXPECT_FALSE(std::filesystem::exists(std::filesystem::path(socket).parent_path()));
}

TEST(Signals, SigtermExitsCleanlyAndSigintIsIgnored) {
  auto plugin = Launch();
  ASSERT_NE(plugin, nullptr);
  const std::string socket = plugin->handshake().address;
  plugin->Signal(SIGINT);  // a Ctrl-C meant for the agent
  ASSERT_TRUE(plugin->CheckHealth(absl::Seconds(5)).ok());
  EXPECT_FALSE(plugin->WaitExit(absl::Milliseconds(200)).ok()) << "SIGINT must not stop the plugin";

  plugin->Signal(SIGTERM);
  const auto exit = plugin->WaitExit(absl::Seconds(5));
  ASSERT_TRUE(exit.ok()) << exit.status();
  EXPECT_EQ(exit->code, 0);
  EXPECT_FALSE(std::filesystem::exists(socket));
}

}  // namespace
}  // namespace ndq
