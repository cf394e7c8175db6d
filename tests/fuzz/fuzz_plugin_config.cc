// The operator's plugin config as Nomad sends it in SetConfig: cty-style
// msgpack, decoded by DecodePluginConfig (ConfigReader, ParseSize, the path checks).
#include <cstddef>
#include <cstdint>
#include <string>

#include <spdlog/spdlog.h>

#include "policy/plugin_config.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string msgpack(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<ndq::PluginConfig> config = ndq::DecodePluginConfig(msgpack);
  if (config.ok()) {
    // What a successful decode promises.
    if (config->pids_limit < 0 || config->max_image_size < 0 || config->image_cache_max_size < 0 ||
        config->memory_overhead < 0 || config->state_dir.size() > 80) {
      __builtin_trap();
    }
  }
  return 0;
}
