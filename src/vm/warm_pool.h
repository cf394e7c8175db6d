// The warm pool (warm_start { warm_pool = N }): for each template restored
// recently, up to N QEMUs kept started ahead under their own supervisors,
// the template's state already loaded, the guest paused. A restore then takes
// one and attaches the task's parts (vm/pool_handover.h) instead of starting
// QEMU: no QEMU start, no state load, and the guest's code already
// translated once by a warm-up (TCG), which is most of a restore's time.
//
// Each pooled QEMU lives in <state_root>/pool/<slot>/ like a VM in its state
// dir; its slot.json (written once it is ready) lets a relaunched plugin
// adopt it. It belongs to one template (and so to one job: the template's
// key holds the namespace, job, group and task). A slot whose QEMU dies, or
// whose template is evicted or removed, is removed with everything in its
// directory; one unused for kPoolIdle goes too. Slots are refilled in the
// background, never inside a start.
#pragma once

#include <sys/types.h>

#include <deque>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "base/timeouts.h"
#include "base/unique_fd.h"
#include "host/vm_host.h"
#include "image/vm_template.h"
#include "qemu/cmdline.h"
#include "qemu/qmp_client.h"
#include "qemu/vm_spec.h"

namespace ndq {

// What a template's pooled QEMUs are started from: the planned VM with its
// per-task values blanked, the image's layers under the template's frozen
// disk (open, read-only), QEMU's user, and how to warm the guest up.
struct PoolRecipe {
  TemplateIdentity identity;
  std::string key;
  std::string cache_dir;
  VmSpec spec;  // name, port forwards, console and watches blanked (PoolSpec)
  std::vector<std::shared_ptr<UniqueFd>> base;  // the image's layers, top first
  std::vector<std::string> base_formats;
  std::string qemu_user;
  std::string supervisor_path;
  int size = 0;
};

// A pooled QEMU: its slot dir, its supervisor and QEMU, and the QMP session
// the pool opened (QMP takes one client at a time).
struct PooledVm {
  std::string key;
  std::string dir;
  pid_t supervisor_pid = -1;
  uint64_t supervisor_start_ticks = 0;
  UniqueFd supervisor_pidfd;
  pid_t qemu_pid = -1;
  uint64_t qemu_start_ticks = 0;
  UniqueFd qemu_pidfd;
  std::unique_ptr<QmpClient> qmp;
  bool our_child = false;  // started by this plugin (reaped here), not adopted
};

// The files and directories of a slot.
inline constexpr char kPoolDirName[] = "pool";
inline constexpr char kSlotManifest[] = "slot.json";
inline constexpr char kSlotOverlay[] = "overlay.qcow2";
// The node name of a pooled boot disk's top (qemu/cmdline.cc's boot chain).
inline constexpr char kPoolBootNode[] = "image0";
// Its waits (base/timeouts.h).
inline constexpr absl::Duration kPoolIdle = timeouts::kPoolIdle;
inline constexpr absl::Duration kAdoptWait = timeouts::kPoolAdoptWait;
inline constexpr absl::Duration kPoolRefillDelay = timeouts::kPoolRefillDelay;

// The planned VM as its pooled QEMUs run it: no task's name, forwards,
// console or watches; its user network kept, so forwards can be added.
VmSpec PoolSpec(const VmSpec& task_spec);

// A pooled QEMU's argv: `pool_spec` (PoolSpec) restoring from `files`, its
// sockets in `run_dir`, paused once the state is loaded (-S).
std::vector<std::string> PooledQemuArgv(const VmSpec& pool_spec, const QemuFiles& files, const std::string& run_dir);

class WarmPool {
 public:
  explicit WarmPool(VmHost* host);
  // Stops refilling; the pooled QEMUs keep running for the next plugin.
  ~WarmPool();
  WarmPool(const WarmPool&) = delete;
  WarmPool& operator=(const WarmPool&) = delete;

  // Where slots live (<state_root>/pool); set once the plugin knows its
  // state dir. Adopts the slots a previous plugin left that are ready, their
  // QEMU alive and their template still there; removes every other.
  void Adopt(const std::string& state_root);
  // Called before Adopt runs in the background: until it is done (or
  // kAdoptWait passed), Take waits, so the first restores after a plugin
  // launch find the slots the last plugin left.
  void ExpectAdoption();

  // A ready QEMU for template `key`, or null. Dead ones met on the way are removed.
  std::shared_ptr<PooledVm> Take(const std::string& key);

  // Keeps recipe.size QEMUs ready for its template from now on (replacing an
  // earlier recipe), refilled in the background after kPoolRefillDelay.
  void Want(std::shared_ptr<PoolRecipe> recipe);

  // Removes the slots whose template is gone (evicted or removed).
  void Prune();

  // Removes a slot and everything in it (a failed handover's rollback does
  // the same through the task's resources).
  void Discard(PooledVm& vm);

  // For tests and benchmarks: ready QEMUs for `key` (all keys when empty).
  int Ready(const std::string& key = "");
  // Waits until `key` has `count` ready QEMUs; false at the deadline.
  bool AwaitReady(const std::string& key, int count, absl::Duration timeout);

 private:
  struct Entry {
    std::shared_ptr<PoolRecipe> recipe;  // null for adopted slots until a restore brings one
    std::deque<std::shared_ptr<PooledVm>> ready;
    int launching = 0;
    absl::Time used;                      // the last Want or Take
    absl::Time refill_after;
    std::string template_dir;
  };

  void Run();
  // One pass: drop dead slots and gone templates, then start what is missing.
  // Returns whether it started a slot (another pass follows at once).
  bool Tend();
  absl::StatusOr<std::shared_ptr<PooledVm>> Launch(const PoolRecipe& recipe);

  VmHost* const host_;
  absl::Mutex mu_;
  absl::CondVar wake_;
  std::string dir_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, Entry> entries_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool adopting_ ABSL_GUARDED_BY(mu_) = false;
  std::thread worker_;
};

}  // namespace ndq
