// Sizes an operator or job writes ("20G", "512MiB", "1.5T"): ParseSize.
#include <cstddef>
#include <cstdint>
#include <string>

#include "policy/plugin_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<int64_t> bytes = ndq::ParseSize(text);
  if (bytes.ok() && *bytes < 0) __builtin_trap();
  return 0;
}
