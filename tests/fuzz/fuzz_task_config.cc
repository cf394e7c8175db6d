// A job's task config as Nomad sends it in StartTask (job authors control it):
// cty-style msgpack decoded by DecodeTaskConfig, also with reject_unknown as
// qemu-driverctl uses it for hand-written task files.
#include <cstddef>
#include <cstdint>
#include <string>

#include <spdlog/spdlog.h>

#include "policy/task_config.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string msgpack(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<ndq::TaskConfig> lenient = ndq::DecodeTaskConfig(msgpack, /*reject_unknown=*/false);
  absl::StatusOr<ndq::TaskConfig> strict = ndq::DecodeTaskConfig(msgpack, /*reject_unknown=*/true);
  // Strict accepts a subset of what lenient accepts.
  if (strict.ok() && !lenient.ok()) __builtin_trap();
  return 0;
}
