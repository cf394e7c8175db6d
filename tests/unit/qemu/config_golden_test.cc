// Golden tests from the job's side, as libvirt's qemuxmlconftest does: a task
// config (the job's `config` block in JSON, as HCL gives it) in the TaskConfig
// Nomad sends, planned against a recorded host, ends in the argv QEMU gets
// (NAME.argv) or in the error the job gets (NAME.err).
//
// config_golden/cases/NAME.json:
//   {"comment": "...", "host": "qemu-7.2", "config": {...},
//    "task": {TaskConfig in protobuf's JSON, merged over a default task},
//    "plugin": {the operator's plugin config}}
// config_golden/hosts/VERSION/: what that QEMU printed for --version,
// -machine help and -device help, read by the fingerprinter's own parsers,
// and host.json (binary, firmware and swtpm paths).
//
// Planning reads no file: the files QEMU gets are numbered here from 3 in the
// start's order (boot chain, drives, kernel, initrd, firmware, shares, warm
// files, TAP), one layer per disk. NDQ_UPDATE_GOLDEN=1 rewrites the outputs.
#include <google/protobuf/util/json_util.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "../../support/golden.h"
#include "absl/strings/str_join.h"
#include "driver/task_proto.h"
#include "host/fingerprint.h"
#include "policy/plugin_config.h"
#include "policy/task_config.h"
#include "qemu/cmdline.h"
#include "qemu/vm_spec.h"

namespace ndq {
namespace {

namespace driverpb = hashicorp::nomad::plugins::drivers::proto;
using json = nlohmann::json;
using ::ndq::testing::Diff;
using ::ndq::testing::Lines;
using ::ndq::testing::ReadFile;
using ::ndq::testing::UpdatingGoldens;

const std::string& ConfigGoldenDir() {
  static const std::string dir = std::string(NDQ_SOURCE_DIR) + "/tests/unit/qemu/config_golden";
  return dir;
}

// A recorded host: the emulator's own output through the fingerprinter's parsers.
HostCapabilities RecordedHost(const std::string& version) {
  const std::string dir = ConfigGoldenDir() + "/hosts/" + version;
  const json host = json::parse(ReadFile(dir + "/host.json"));
  const std::string binary = host.at("binary");
  HostCapabilities caps;
  caps.emulators["x86_64"] = binary;
  caps.versions["x86_64"] = ParseQemuVersion(ReadFile(dir + "/version.txt"));
  caps.machines["x86_64"] = ParseMachineList(ReadFile(dir + "/machine-help.txt"));
  caps.net_devices["x86_64"] = ParseNetDeviceList(ReadFile(dir + "/device-help.txt"));
  if (host.contains("uefi")) caps.uefi = FirmwareFiles{host["uefi"].at("code"), host["uefi"].at("vars")};
  if (host.contains("secure_boot")) {
    caps.secure_boot = FirmwareFiles{host["secure_boot"].at("code"), host["secure_boot"].at("vars")};
  }
  caps.swtpm = host.value("swtpm", "");
  return caps;
}

// The TaskConfig Nomad sends for task "web", the case's "task" merged over it,
// carrying the job's config as msgpack.
driverpb::TaskConfig NomadTask(const json& overrides, const json& config) {
  json task = {{"id", "5e1f0a2b-7c3d-4e5f-8a9b-0c1d2e3f4a5b/web/0123abcd"},
               {"name", "web"},
               {"allocId", "5e1f0a2b-7c3d-4e5f-8a9b-0c1d2e3f4a5b"},
               {"jobName", "example"},
               {"taskGroupName", "group"},
               {"namespace", "default"},
               {"allocDir", "/var/nomad/alloc/5e1f0a2b-7c3d-4e5f-8a9b-0c1d2e3f4a5b"},
               {"resources", {{"allocatedResources", {{"memory", {{"memoryMb", "256"}}}}}}}};
  task.merge_patch(overrides);
  driverpb::TaskConfig proto;
  const auto parsed = google::protobuf::util::JsonStringToMessage(task.dump(), &proto);
  EXPECT_TRUE(parsed.ok()) << parsed.ToString() << " in " << task.dump();
  const std::vector<uint8_t> msgpack = json::to_msgpack(config);
  proto.set_msgpack_driver_config(std::string(msgpack.begin(), msgpack.end()));
  return proto;
}

// A drive's format as the start would know it: the job's, else what a probe finds.
std::string DiskFormat(const DriveSource& source) {
  if (!source.format.empty()) return source.format;
  return source.origin == DriveOrigin::kDownload ? "qcow2" : "raw";
}

// Stand-ins for the descriptors the start stages open, in their order.
QemuFiles PlaceholderFiles(const VmSpec& spec) {
  QemuFiles files;
  int next = 3;
  if (!spec.image_path.empty()) {
    files.boot = {DiskNode{spec.image_format.empty() ? "qcow2" : spec.image_format, false, next++}};
  }
  for (const Drive& drive : spec.drives) {
    files.drives.push_back({DiskNode{DiskFormat(drive.source), drive.read_only, next++}});
  }
  if (!spec.kernel.kernel.empty()) files.kernel = next++;
  if (!spec.kernel.initrd.empty()) files.initrd = next++;
  if (spec.firmware.uefi) {
    files.firmware_code = next++;
    files.firmware_vars = next++;
  }
  for (size_t i = 0; i < spec.shares.size(); ++i) files.shares.push_back(next++);
  files.warm_mode = spec.warm.enabled ? WarmMode::kCold : WarmMode::kOff;
  if (spec.warm.enabled) {
    files.warm_memory = next++;
    files.warm_state = next++;
  }
  if (spec.network.enabled) files.tap = next++;
  return files;
}

// What the job gets: the argv's lines, or "error: <code>: <message>".
std::vector<std::string> Outcome(const json& input) {
  for (const auto& [key, unused] : input.items()) {
    EXPECT_TRUE(key == "comment" || key == "host" || key == "config" || key == "task" || key == "plugin")
        << "unknown key " << key;
  }
  const TaskRequest task = TaskRequestFromProto(NomadTask(input.value("task", json::object()), input.at("config")));
  const std::vector<uint8_t> plugin_msgpack = json::to_msgpack(input.value("plugin", json::object()));
  absl::StatusOr<PluginConfig> plugin = DecodePluginConfig(std::string(plugin_msgpack.begin(), plugin_msgpack.end()));
  if (!plugin.ok()) return {absl::StrCat("plugin config error: ", plugin.status().ToString())};
  absl::StatusOr<TaskConfig> config = DecodeTaskConfig(task.driver_config, /*reject_unknown=*/true);
  absl::StatusOr<VmSpec> spec =
      config.ok() ? PlanVm(*config, task, *plugin, RecordedHost(input.at("host"))) : config.status();
  if (!spec.ok()) return Lines(absl::StrCat("error: ", spec.status().ToString()));
  const RuntimePaths paths{"/var/lib/ndq/5e1f-web/run/qmp.sock", "/var/lib/ndq/5e1f-web/run/qga.sock",
                           "/var/lib/ndq/5e1f-web/tpm/swtpm.sock"};
  return BuildQemuArgv(*spec, PlaceholderFiles(*spec), paths);
}

class ConfigGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(ConfigGolden, GivesTheRecordedArgvOrError) {
  const std::string base = ConfigGoldenDir() + "/cases/" + GetParam();
  const std::vector<std::string> actual = Outcome(json::parse(ReadFile(base + ".json")));
  const bool refused = !actual.empty() && actual[0].rfind("error: ", 0) == 0;
  const std::string out = base + (refused ? ".err" : ".argv");
  const std::string other = base + (refused ? ".argv" : ".err");
  if (UpdatingGoldens()) {
    std::remove(other.c_str());
    std::ofstream(out) << absl::StrJoin(actual, "\n") << "\n";
    GTEST_SKIP() << "rewrote " << out;
  }
  EXPECT_TRUE(ReadFile(other).empty()) << other << " exists, but the case " << (refused ? "is refused" : "runs");
  const std::vector<std::string> expected = Lines(ReadFile(out));
  ASSERT_FALSE(expected.empty()) << out << " is missing or empty; got:\n" << absl::StrJoin(actual, "\n");
  EXPECT_EQ(expected, actual) << out << " differs (- expected, + actual):\n" << Diff(expected, actual);
}

INSTANTIATE_TEST_SUITE_P(Cases, ConfigGolden,
                         ::testing::ValuesIn(::ndq::testing::GoldenCases(ConfigGoldenDir() + "/cases", ".json")),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

TEST(ConfigGoldenHost, TheRecordedQemuIsParsed) {
  const HostCapabilities host = RecordedHost("qemu-7.2");
  EXPECT_EQ(host.versions.at("x86_64"), "7.2.22");
  EXPECT_GT(host.machines.at("x86_64").size(), 20u);
  EXPECT_NE(std::find(host.net_devices.at("x86_64").begin(), host.net_devices.at("x86_64").end(), "virtio-net-pci"),
            host.net_devices.at("x86_64").end());
}

}  // namespace
}  // namespace ndq
