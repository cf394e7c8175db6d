// Runs a short-lived helper program (qemu-system --version, qemu-img ...) and
// collects its output, with a deadline so a hung binary cannot hang the plugin.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace ndq {

struct CommandResult {
  int exit_code = -1;  // -1 when killed by a signal
  int signal = 0;
  std::string output;  // stdout and stderr together, in order
};

// argv[0] must be a path. Not found / not runnable is NotFound; over `timeout`
// the process is killed and DeadlineExceeded returned. Output beyond 1 MiB is dropped.
absl::StatusOr<CommandResult> RunCommand(const std::vector<std::string>& argv, absl::Duration timeout);


// The first executable `name` in the directories of $PATH; empty when none.
std::string FindOnPath(const std::string& name);

}  // namespace ndq
