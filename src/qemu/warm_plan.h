// warm_start: what the job asked (when its guest counts as ready to be saved)
// and what the start decided (boot cold and save a template, or restore one).
// Checked like every other option: everything at once, naming "warm_start".
#pragma once

#include <string>
#include <vector>

#include "base/timeouts.h"
#include "absl/time/time.h"
#include "qemu/console_plan.h"
#include "policy/task_config.h"

namespace ndq {

struct VmSpec;

inline constexpr int kDefaultWarmPool = 1;
inline constexpr int kMaxWarmPool = 8;

enum class WarmMode {
  kOff,
  kCold,     // boots normally; the RAM is a file the driver holds, saved once ready
  kRestore,  // starts with -incoming defer and loads a template
};

struct WarmPlan {
  bool enabled = false;
  // When the guest is ready to be saved: the same probes as boot_timeout's
  // watch (guest agent, or the guest accepting on a port_map label).
  BootWatchPlan ready;
  // warm_pool: how many QEMUs are kept started ahead for the template, its
  // state loaded and paused, so a restore only attaches the task's parts
  // (vm/warm_pool.h). 0: none.
  int pool_size = kDefaultWarmPool;
};

// How long a cold warm_start VM has to become ready before no template is
// taken (the VM keeps running either way).
inline constexpr absl::Duration kWarmReadyTimeout = timeouts::kWarmReady;

// Checks warm_start against the rest of the planned VM: exactly one of
// ready_port (a port_map TCP label) and ready_agent (needs guest_agent), a
// boot disk, user networking, and nothing whose state lives outside the
// template (extra drives, UEFI variables, TPM, shares).
void PlanWarmStart(const TaskConfig& config, VmSpec& spec, std::vector<std::string>& problems);

}  // namespace ndq
