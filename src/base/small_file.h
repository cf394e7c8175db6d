// Reading the small files the driver lives on: /proc entries, cgroup
// counters, the supervisor's records. One read loop for all of them.
#pragma once

#include <cstddef>
#include <optional>
#include <string>

namespace ndq {

// The whole file at `path`. nullopt when it cannot be read; then *error (if
// given) says why, and stays empty when the file does not exist. A file
// larger than `max_bytes` is an error too.
std::optional<std::string> ReadSmallFile(const std::string& path, std::string* error = nullptr,
                                         size_t max_bytes = 1 << 20);

}  // namespace ndq
