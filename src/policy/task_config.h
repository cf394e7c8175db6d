// The `config` block of a job's task with driver = "qemu", as Nomad's own qemu
// driver defines it, plus image_source/checksum from the original driver.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "nomadplugin/hclspec.h"

namespace ndq {

struct TaskConfig {
  std::optional<std::string> image_path;
  std::optional<std::string> image_source;
  // Mirrors of the same file, tried in order (image_source, if set, first).
  std::vector<std::string> image_sources;
  std::optional<std::string> checksum;
  // A sha256sum-style (GNU or BSD) file holding the checksum of image_source.
  std::optional<std::string> checksum_url;
  // Format of the image ("qcow2", "raw", ...); probed when unset.
  std::optional<std::string> image_format;
  // Size to grow the task's disk to, e.g. "20G".
  std::optional<std::string> disk_size;
  std::optional<std::string> emulator;
  std::optional<std::string> machine_type;
  std::optional<std::string> drive_interface;
  std::optional<std::string> accelerator;
  // vCPUs, overriding the count of the task's reserved cores.
  std::optional<int64_t> cpus;
  // pycloudlib-style size, "c<cpus>m<memory MB>", e.g. "c2m1024".
  std::optional<std::string> instance_type;
  bool graceful_shutdown = false;
  bool guest_agent = false;
  std::vector<std::string> args;
  // port label -> guest port
  std::map<std::string, int64_t> port_map;
};

nomadplugin::hclspec::Spec TaskConfigSpec();

// Decodes the task's msgpack config (types only; what the values mean is
// checked when a task starts). With `reject_unknown`, misspelt options in
// hand-written task files are errors rather than silently ignored.
absl::StatusOr<TaskConfig> DecodeTaskConfig(const std::string& msgpack, bool reject_unknown = false);

}  // namespace ndq
