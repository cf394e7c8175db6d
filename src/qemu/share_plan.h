// Shares: host directories shown to the guest over virtio-9p. Only two kinds
// exist, and no job option can name a host path:
//  - share_alloc_dirs = true: the alloc's shared alloc/ (tag "alloc"), the
//    task's local/ ("local") and secrets/ ("secrets", always read-only);
//  - Nomad's volume mounts (MountConfig: host volumes, CSI), tagged by their
//    destination (task_path) and read-only when Nomad says so.
// PlanShares checks tags and paths (pure); vm/share_dirs opens them at start.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "policy/task_config.h"
#include "policy/task_request.h"
#include "qemu/vm_spec.h"

namespace ndq {

// QEMU 7.2 refuses a longer mount_tag ("mount tag '...' (32 bytes) is longer
// than maximum (31 bytes)", measured).
inline constexpr size_t kMaxShareTagBytes = 31;

// share_alloc_dirs and task.mounts → spec.shares, every problem named.
void PlanShares(const TaskConfig& config, const TaskRequest& task, VmSpec& spec, std::vector<std::string>& problems);

}  // namespace ndq
