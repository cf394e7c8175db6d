// Shares: host directories shown to the guest over virtio-9p. Only two kinds
// exist, and no job option can name a host path:
//  - share_alloc_dirs = true: the alloc's shared alloc/ (tag "alloc"), the
//    task's local/ ("local") and secrets/ ("secrets", always read-only);
//  - Nomad's volume mounts (MountConfig: host volumes, CSI), tagged by their
//    destination (task_path) and read-only when Nomad says so.
// PlanShares checks tags and paths (pure); OpenShareDirs opens each directory
// for QEMU, which gets it as /proc/self/fd/N (the 9p "local" backend opens its
// root once by name and resolves everything below it relative to that fd, so
// what was checked is what the guest sees).
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/unique_fd.h"
#include "policy/task_config.h"
#include "policy/task_request.h"
#include "qemu/vm_spec.h"

namespace ndq {

// QEMU 7.2 refuses a longer mount_tag ("mount tag '...' (32 bytes) is longer
// than maximum (31 bytes)", measured).
inline constexpr size_t kMaxShareTagBytes = 31;

// share_alloc_dirs and task.mounts → spec.shares, every problem named.
void PlanShares(const TaskConfig& config, const TaskRequest& task, VmSpec& spec, std::vector<std::string>& problems);

// One open directory per share, in order. An alloc dir must be the directory
// Nomad made: each component below `alloc_dir` is opened without following
// symbolic links, so a local/ that an artifact or template replaced with a
// link elsewhere is refused. A volume's host_path (Nomad's) is resolved and
// must be a directory. Errors name the option or mount, never a link's target.
absl::StatusOr<std::vector<UniqueFd>> OpenShareDirs(const std::vector<Share>& shares, const std::string& alloc_dir);

}  // namespace ndq
