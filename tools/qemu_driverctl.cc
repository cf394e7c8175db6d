// qemu-driverctl: launches nomad-driver-qemu exactly as a Nomad client does and
// drives its RPCs, so the driver can be tried (and tested) without a cluster.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <google/protobuf/util/json_util.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "nomadplugin/driver_client.h"
#include "nomadplugin/launcher.h"
#include "run_task.h"

namespace {

struct Options {
  ndq::ctl::RunOptions run;
  std::string plugin;
  std::string config_file;
  bool verbose = false;
  bool watch = false;
  std::string command;
};

int Usage() {
  std::fprintf(stderr,
               "usage: qemu-driverctl [options] COMMAND\n"
               "commands:\n"
               "  info          plugin info, config and task schemas, capabilities (JSON)\n"
               "  fingerprint   configure the plugin, print its first fingerprint (JSON)\n"
               "  run TASK.json start a VM, then stop it on Ctrl-C (or after --check-http)\n"
               "options:\n"
               "  --plugin PATH   plugin binary (default: nomad-driver-qemu next to this tool)\n"
               "  --config FILE   plugin config as JSON, e.g. {\"emulators_allowlist\": [\"x86_64\"]}\n"
               "  --watch         with fingerprint: keep printing every fingerprint sent\n"
               "  --verbose       copy the plugin's log lines to stderr\n"
               "  --alloc-dir DIR with run: the allocation directory (default: a new temp dir)\n"
               "  --check-http L  with run: GET the guest's page through port label L, then stop\n"
               "  --kill-timeout S  with run: StopTask timeout in seconds (default 5)\n");
  return 2;
}

std::string SiblingPlugin() {
  char self[4096];
  const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
  if (n <= 0) return "nomad-driver-qemu";
  std::string path(self, static_cast<size_t>(n));
  return path.substr(0, path.rfind('/') + 1) + "nomad-driver-qemu";
}

nlohmann::json ToJson(const google::protobuf::Message& message) {
  std::string text;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(message, &text, options);
  return nlohmann::json::parse(text);
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "qemu-driverctl: %s\n", std::string(status.message()).c_str());
  return 1;
}

absl::StatusOr<nlohmann::json> ReadJsonFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  nlohmann::json value = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (value.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, " is not valid JSON"));
  return value;
}

int RunInfo(nomadplugin::DriverClient& client) {
  nlohmann::json out;
  auto info = client.PluginInfo();
  if (!info.ok()) return Fail(info.status());
  auto schema = client.ConfigSchema();
  if (!schema.ok()) return Fail(schema.status());
  auto task_schema = client.TaskConfigSchema();
  if (!task_schema.ok()) return Fail(task_schema.status());
  auto caps = client.Capabilities();
  if (!caps.ok()) return Fail(caps.status());
  out["plugin_info"] = ToJson(*info);
  out["config_schema"] = ToJson(*schema);
  out["task_config_schema"] = ToJson(*task_schema);
  out["capabilities"] = ToJson(*caps);
  std::cout << out.dump(2) << std::endl;
  return 0;
}

int RunFingerprint(nomadplugin::DriverClient& client, bool watch) {
  auto context = client.NewContext(absl::InfiniteDuration());
  auto reader = client.driver().Fingerprint(context.get(), {});
  nomadplugin::driverpb::FingerprintResponse response;
  while (reader->Read(&response)) {
    std::cout << ToJson(response).dump(2) << std::endl;
    if (!watch) {
      context->TryCancel();
      reader->Finish();
      return 0;
    }
  }
  return Fail(nomadplugin::FromGrpc(reader->Finish(), "Fingerprint"));
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--plugin" && i + 1 < argc) options.plugin = argv[++i];
    else if (arg == "--config" && i + 1 < argc) options.config_file = argv[++i];
    else if (arg == "--verbose") options.verbose = true;
    else if (arg == "--watch") options.watch = true;
    else if (arg == "--alloc-dir" && i + 1 < argc) options.run.alloc_dir = argv[++i];
    else if (arg == "--check-http" && i + 1 < argc) options.run.check_http = argv[++i];
    else if (arg == "--kill-timeout" && i + 1 < argc) options.run.kill_timeout_s = std::atof(argv[++i]);
    else if (arg.rfind("--", 0) == 0) return Usage();
    else if (options.command.empty()) options.command = arg;
    else if (options.command == "run" && options.run.task_file.empty()) options.run.task_file = arg;
    else return Usage();
  }
  if (options.command != "info" && options.command != "fingerprint" && options.command != "run") return Usage();
  if (options.command == "run" && options.run.task_file.empty()) return Usage();
  if (options.plugin.empty()) options.plugin = SiblingPlugin();

  nlohmann::json config = nlohmann::json::object();
  if (!options.config_file.empty()) {
    auto parsed = ReadJsonFile(options.config_file);
    if (!parsed.ok()) return Fail(parsed.status());
    config = *parsed;
  }

  nomadplugin::LaunchOptions launch;
  launch.binary = options.plugin;
  launch.echo_stderr = options.verbose;
  auto plugin = nomadplugin::PluginProcess::Launch(launch);
  if (!plugin.ok()) return Fail(plugin.status());
  if (absl::Status health = (*plugin)->CheckHealth(absl::Seconds(5)); !health.ok()) return Fail(health);

  nomadplugin::DriverClient client((*plugin)->channel());
  int rc = 0;
  if (options.command == "info") {
    rc = RunInfo(client);
  } else {
    if (absl::Status status = client.SetConfig(config); !status.ok()) return Fail(status);
    rc = options.command == "run" ? ndq::ctl::RunTask(client, options.run) : RunFingerprint(client, options.watch);
  }
  auto exit = (*plugin)->Shutdown(absl::Seconds(2));
  if (exit.ok() && (exit->code != 0 || exit->signal != 0)) {
    std::fprintf(stderr, "qemu-driverctl: plugin ended with %s\n", exit->ToString().c_str());
    if (rc == 0) rc = 1;
  }
  return rc;
}
