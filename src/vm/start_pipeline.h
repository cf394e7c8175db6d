// StartTask as a list of stages:
//
//   decode → admit image → plan VM → prepare media → open disks → prepare
//   host → warm start → attach network → launch supervisor → await QMP →
//   restore state → await address
//
// (registering the VM is the caller's, TaskManager::Start). Each stage is a
// function from typed input to typed output; each pushes the undo of what it
// made onto the caller's Rollback, which runs in reverse unless committed.
// No stage changes another stage's output.
#pragma once

#include <sys/types.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "base/rollback.h"
#include "base/unique_fd.h"
#include "host/capabilities.h"
#include "host/cgroups.h"
#include "host/vm_host.h"
#include "image/image_cache.h"
#include "image/image_probe.h"
#include "policy/allowlist.h"
#include "policy/plugin_config.h"
#include "policy/task_config.h"
#include "policy/task_request.h"
#include "qemu/qmp_client.h"
#include "qemu/vm_spec.h"
#include "vm/vm_task.h"
#include "vm/warm_pool.h"
#include "vm/warm_start.h"

namespace ndq {

// In the order they run. Planning needs nothing downloaded, so a job that
// cannot work is refused before its image is fetched.
enum class StartStage {
  kDecode,
  kPlanVm,
  kAdmitImage,
  kPrepareMedia,
  kOpenDisks,
  kPrepareHost,
  kWarmStart,      // warm_start: restore a template that fits, or boot cold to save one
  kAttachNetwork,  // network_mode = "bridge": the TAP on the bridge
  kLaunch,        // a pooled QEMU (warm_pool): its directory becomes the task's
  kAwaitQmp,      // a pooled QEMU: its QMP session, already open
  kRestoreState,  // warm_start: the template's device state loaded (a pooled QEMU: the task's parts attached), the guest resumed
  kAwaitAddress   // advertise_address: the guest's IPv4 address from its agent
};
inline constexpr StartStage kAllStartStages[] = {
    StartStage::kDecode,      StartStage::kPlanVm,        StartStage::kAdmitImage, StartStage::kPrepareMedia,
    StartStage::kOpenDisks,   StartStage::kPrepareHost,   StartStage::kWarmStart,
    StartStage::kAttachNetwork, StartStage::kLaunch,      StartStage::kAwaitQmp,
    StartStage::kRestoreState, StartStage::kAwaitAddress};
const char* StartStageName(StartStage stage);

// What the start uses from outside: the host, the image store, what the
// fingerprint found (emulators, firmware, swtpm), where state goes, and where
// events go.
struct StartDeps {
  VmHost* host = nullptr;
  ImageCache* cache = nullptr;
  // What the host offers, with the facts of the named emulator ("x86_64")
  // probed if not known yet (host/fingerprint.h: CapabilitiesFor).
  std::function<HostCapabilities(const std::string& emulator)> capabilities;
  std::string supervisor_path;
  std::string state_root;
  absl::Duration qmp_timeout;
  TaskEventSink emit;
  // Asked between stages and while waiting; true once the caller gave up.
  std::function<bool()> cancelled;
  // warm_start's pool of QEMUs started ahead; null: none.
  WarmPool* pool = nullptr;
  // Runs before each stage: an error fails the start there (tests use it to
  // fail every stage in turn).
  std::function<absl::Status(StartStage)> before_stage;
};

// A VM whose QEMU answers on QMP: everything the registered task needs.
struct LaunchedVm {
  DriverStateRecord record;
  UniqueFd supervisor_pidfd;
  UniqueFd qemu_pidfd;
  std::unique_ptr<QmpClient> qmp;
  VmSpec spec;
  CgroupLimits limits;
  std::string netns;
  std::shared_ptr<WarmCapture> warm_capture;  // a cold warm_start VM: what saving it needs
};

// Runs every stage for `task`. On error the stages' undos are still on
// `rollback`; the caller lets it run (or commits once the VM is registered).
absl::StatusOr<LaunchedVm> RunStartPipeline(const TaskRequest& task, const PluginConfig& plugin,
                                            const StartDeps& deps, Rollback& rollback);

// A short, stable name for a task ID (its state directory and image lease),
// so socket paths stay far below the unix socket limit.
std::string TaskKey(const std::string& id);

// How a VM ended: the supervisor's exit record in `state_dir`, plus whether
// the cgroup's OOM killer ended it.
ExitResult FinalExit(const std::string& state_dir, const TaskCgroup& cgroup, int64_t memory_limit_bytes);
inline ExitResult FinalExit(const DriverStateRecord& record) {
  return FinalExit(record.state_dir, record.cgroup, record.memory_limit_bytes);
}

// The status of a start whose caller gave up.
absl::Status StartCancelled();

}  // namespace ndq
