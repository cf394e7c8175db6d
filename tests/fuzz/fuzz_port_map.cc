// Ports and the rest of task planning: a job's port_map (cty msgpack, as an
// array of maps) against the ports Nomad allocated (task networks[0] and group
// ports, host or bridge mode), cpuset and memory, cpus/instance_type, DNS
// searches, args, and then the QEMU argv built from the plan (DecodeTaskConfig
// -> PlanVm -> BuildQemuArgv, as StartTask runs them).
// Input: Nomad's TaskConfig in protobuf's JSON form, a NUL byte, then the
// task's msgpack config (set as msgpack_driver_config).
// The disk is planned as StartTask fills it in after admitting and opening
// the image: a top layer in the job's image_format (qcow2 when unset) over a
// raw backing file, each an fd passed to QEMU.
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>

#include <google/protobuf/util/json_util.h>
#include <spdlog/spdlog.h>

#include "driver/task_proto.h"
#include "nomad/driver.pb.h"
#include "qemu/cmdline.h"
#include "policy/task_config.h"
#include "qemu/vm_spec.h"

namespace driverpb = hashicorp::nomad::plugins::drivers::proto;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  const std::string json(input.substr(0, nul));
  const std::string msgpack(nul == std::string_view::npos ? std::string_view() : input.substr(nul + 1));

  driverpb::TaskConfig task;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = true;
  if (!google::protobuf::util::JsonStringToMessage(json, &task, options).ok()) task.Clear();
  task.set_msgpack_driver_config(msgpack);

  absl::StatusOr<ndq::TaskConfig> config = ndq::DecodeTaskConfig(task.msgpack_driver_config());
  if (!config.ok()) return 0;
  (void)ndq::CountCpuset(task.resources().linux_resources().cpuset_cpus());

  ndq::PluginConfig plugin;
  ndq::HostCapabilities host;
  host.emulators = {{"x86_64", "/usr/bin/qemu-system-x86_64"}, {"aarch64", "/usr/bin/qemu-system-aarch64"}};
  absl::StatusOr<ndq::VmSpec> spec = ndq::PlanVm(*config, ndq::TaskRequestFromProto(task), plugin, host);
  if (!spec.ok()) return 0;
  // What a plan promises.
  for (const ndq::PortForward& forward : spec->port_forwards) {
    if (forward.host_port < 1 || forward.host_port > 65535 || forward.guest_port < 1 || forward.guest_port > 65535 ||
        config->port_map.count(forward.label) == 0 || (forward.protocol != "tcp" && forward.protocol != "udp")) {
      __builtin_trap();
    }
  }
  if (spec->cpus < 0 || spec->memory_mb < 128) __builtin_trap();
  ndq::QemuFiles files;
  files.boot = {ndq::DiskNode{spec->image_format.empty() ? "qcow2" : spec->image_format, false, 3},
                ndq::DiskNode{"raw", true, 4}};
  const std::vector<std::string> argv =
      ndq::BuildQemuArgv(*spec, files,
                         ndq::RuntimePaths{"/run/ndq/0123456789abcdef/qmp.sock", "/run/ndq/0123456789abcdef/qga.sock"});
  if (argv.empty() || argv[0] != spec->emulator_path) __builtin_trap();
  return 0;
}
