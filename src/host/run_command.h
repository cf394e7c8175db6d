// Runs a short-lived helper program (qemu-system --version, qemu-img ...) and
// collects its output, with a deadline so a hung binary cannot hang the plugin.
#pragma once

#include <spawn.h>

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


// posix_spawn of argv (argv[0] a path) with an empty signal mask and every
// signal at its default disposition: the plugin blocks SIGTERM and ignores
// SIGINT/SIGPIPE for itself, and children must not inherit that.
// `extra_flags` adds posix_spawn flags such as POSIX_SPAWN_SETSID.
absl::StatusOr<pid_t> SpawnWithDefaultSignals(const std::vector<std::string>& argv,
                                              const posix_spawn_file_actions_t* actions, short extra_flags = 0);

// The first executable `name` in the directories of $PATH; empty when none.
std::string FindOnPath(const std::string& name);

}  // namespace ndq
