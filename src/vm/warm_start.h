// warm_start in the start pipeline and after it:
//  - PrepareWarmStart (a stage after prepare host): the template key from
//    what shapes the VM; a template that fits and passes its check is
//    restored (the task's overlay on its frozen disk, its RAM mapped
//    copy-on-write, its device state loaded), else the VM boots cold with
//    its RAM in a memfd the driver keeps, on an overlay of its own;
//  - RestoreState (after QMP answers): loads the state, then resumes;
//  - SaveTemplate (once a cold guest is ready): pauses the VM, migrates its
//    device state, copies RAM and disk into a template, resumes it.
#pragma once

#include <sys/types.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "base/rollback.h"
#include "base/unique_fd.h"
#include "image/image_cache.h"
#include "image/vm_template.h"
#include "policy/task_request.h"
#include "qemu/cmdline.h"
#include "qemu/qmp_client.h"
#include "qemu/vm_spec.h"
#include "vm/vm_resources.h"
#include "vm/vm_task.h"

namespace ndq {

class WarmPool;
struct PooledVm;
struct PoolRecipe;

// The parts of a cold VM the driver keeps until it saves the template.
struct WarmCapture {
  TemplateIdentity identity;
  std::string cache_dir;
  UniqueFd ram;    // the memfd QEMU maps shared
  UniqueFd state;  // the memfd QEMU migrates its device state into (given by getfd)
  UniqueFd disk;  // the VM's overlay, read-only
  int64_t ram_bytes = 0;
  int64_t disk_size = 0;  // the boot disk's virtual size
  std::optional<std::pair<uid_t, gid_t>> qemu_owner;  // QEMU's user when not root
};

struct WarmStart {
  WarmMode mode = WarmMode::kOff;
  std::vector<DiskNode> boot;  // the boot disk's chain, in place of the one opened
  int memory_fd = -1;
  int state_fd = -1;
  std::string key;
  std::string template_dir;  // kRestore: leased until the task is destroyed
  std::shared_ptr<WarmCapture> capture;  // kCold
  // kRestore from the warm pool: a QEMU already running the template,
  // paused; the task's overlay (our fd, not among QEMU's files) is attached
  // to it at handover (vm/pool_handover.h).
  std::shared_ptr<PooledVm> pooled;
  UniqueFd task_overlay;
  // kRestore with warm_pool > 0: what the pool keeps started for this template.
  std::shared_ptr<PoolRecipe> recipe;
};

struct WarmContext {
  const TaskRequest& task;
  const VmSpec& spec;
  const std::vector<DiskNode>& boot;  // the boot image's chain as the open-disks stage opened it
  std::string qemu_version;
  std::string qemu_user;  // empty: root
  ImageCache* cache;
  std::string lease;  // the task's lease name on a template it restores
  TaskEventSink emit;
  std::function<int(UniqueFd)> pass;  // hands an fd to QEMU; its number there
  std::function<int(int)> local_fd;   // our fd behind a number in QEMU
  VmResources& owned;                 // where a template's lease is recorded
  WarmPool* pool = nullptr;           // null: no warm pool
  std::string supervisor_path;        // what a pooled QEMU runs under
  bool poolable = false;              // the task has nothing a pooled QEMU cannot take on (PoolableTask)
};

// The overlay a warm VM writes, in its task dir.
inline constexpr char kWarmDiskName[] = "warm-disk.qcow2";

absl::StatusOr<WarmStart> PrepareWarmStart(const WarmContext& context, Rollback& rollback);

// Copies `from` (a template's empty overlay) to `dir/name`, replacing
// whatever is there without following it; the copy, open read-write.
absl::StatusOr<UniqueFd> CopyOverlayInto(const std::string& from, const std::string& dir, const std::string& name);

// Loads a template's device state (QEMU's fd `state_fd`) into a QEMU started
// with -incoming defer; the guest stays paused.
absl::Status LoadTemplateState(QmpClient& qmp, int state_fd);

// Loads the template's state into a QEMU started with -incoming defer and
// resumes the guest. On failure the template is removed (the next start
// boots cold).
absl::Status RestoreState(QmpClient& qmp, const WarmStart& warm, const std::string& cache_dir,
                          const TaskEventSink& emit);

// Sets a restored guest's clock to the host's time through its agent
// (guest-set-time), which also sets the guest's RTC.
absl::Status SetGuestClock(VmTask& vm);

// What saving took, for the event and the benchmark.
struct SavedTemplate {
  std::string key;
  absl::Duration paused;  // the guest's pause: device state, RAM and disk copied
  absl::Duration total;
  int64_t ram_bytes = 0, state_bytes = 0, disk_bytes = 0;
};

// Saves the cold VM `vm` as a template (the guest pauses meanwhile and
// always resumes). AlreadyExists: another start saved the same key first.
absl::StatusOr<SavedTemplate> SaveTemplate(VmTask& vm, WarmCapture& capture);

// The config part of the key: QEMU's argv for `spec` booting `boot` (its
// layers read-only) with every per-task value (name, paths, host ports, MAC,
// console sockets) blanked, and QEMU's user.
std::string WarmConfigDigest(const VmSpec& spec, const std::vector<DiskNode>& boot, const std::string& qemu_user);

}  // namespace ndq
