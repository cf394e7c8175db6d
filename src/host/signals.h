// Signal names as Nomad sends them ("SIGTERM", "SIGINT", ...).
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace ndq {

// "SIGTERM", "TERM" or "15" -> 15; a clear error for anything else.
absl::StatusOr<int> ParseSignal(const std::string& name);

// 15 -> "SIGTERM".
std::string SignalName(int signal);

}  // namespace ndq
