// Reading the small files the driver lives on: /proc entries, cgroup
// counters, the supervisor's records. One read loop for all of them.
#pragma once

#include <cstddef>
#include <optional>
#include <string>

#include "absl/status/status.h"

namespace ndq {

// The whole file at `path`. nullopt when it cannot be read; then *error (if
// given) says why, and stays empty when the file does not exist. A file
// larger than `max_bytes` is an error too.
std::optional<std::string> ReadSmallFile(const std::string& path, std::string* error = nullptr,
                                         size_t max_bytes = 1 << 20);

// Replaces the file at `path` with `content` (mode 0600) so that a reader
// sees the old file or the new one, never a part: written to a unique name
// beside it, then renamed over it. Links in `path`'s place are replaced, not
// followed.
absl::Status WriteSmallFileAtomically(const std::string& path, const std::string& content);

}  // namespace ndq
