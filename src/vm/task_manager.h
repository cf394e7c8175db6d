// The driver's task registry, independent of gRPC and Nomad's messages:
// start a VM (the start pipeline, then registration), wait for it, stop,
// destroy, inspect, signal, and recover VMs after a plugin restart from the
// driver state Nomad kept.
#pragma once

#include <functional>
#include <map>
#include <set>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "base/timeouts.h"
#include "host/cgroups.h"
#include "host/vm_host.h"
#include "vm/event_bus.h"
#include "host/fingerprint.h"
#include "image/image_cache.h"
#include "policy/plugin_config.h"
#include "host/process_watch.h"
#include "qemu/vm_spec.h"
#include "vm/cache_keeper.h"
#include "vm/start_pipeline.h"
#include "vm/task_exec.h"
#include "vm/vm_task.h"
#include "vm/vm_watches.h"

namespace ndq {

struct TaskManagerOptions {
  // The nomad-qemu-supervisor binary, unless the plugin config names one.
  std::string supervisor_path;
  // How long StartTask waits for QEMU's QMP socket to answer.
  absl::Duration start_timeout = timeouts::kQmpStart;
  // Where VMs' cgroups and supervisors are made; null: the real host.
  VmHost* host = nullptr;
  // Runs before each start stage (see StartDeps::before_stage); for tests.
  std::function<absl::Status(StartStage)> before_stage;
};

// What Inspect reports about a task.
struct TaskStatusInfo {
  TaskIdentity identity;
  absl::Time started_at;
  std::optional<ExitResult> exit;  // nullopt while running
  std::map<std::string, std::string> attributes;  // qemu_pid, supervisor_pid, qmp_socket, state_dir
  AdvertisedNetwork network;  // advertise_address: the guest's own address (also after a recovery)
};

// nomad-qemu-supervisor next to the running binary (the plugin_dir layout).
std::string DefaultSupervisorPath();

// Signal names that ask the guest rather than QEMU: SIGPWR (power failure)
// presses the ACPI power button.
inline constexpr char kPowerdownSignal[] = "SIGPWR";

class TaskManager {
 public:
  using ConfigSource = std::function<PluginConfig()>;
  TaskManager(TaskManagerOptions options, ConfigSource config, Fingerprinter* fingerprinter, EventBus* events);
  ~TaskManager();

  // Once the plugin is configured: in the background, probes the host
  // (keeping the facts in the state dir, so a relaunched plugin runs no
  // unchanged binary again) and removes warm templates no start may use any
  // more (another format's key). Returns at once.
  void Prepare();
  // Waits for Prepare's background work (tests).
  void AwaitPrepared();
  // The warm pool (tests and benchmarks watch it fill).
  WarmPool& pool() { return pool_; }

  // Runs the task's VM; returns its driver state (for Nomad's TaskHandle)
  // once QEMU answers on QMP. On failure nothing is left behind: no process,
  // socket or state directory. `cancelled` (may be empty) is asked while the
  // start waits; once it says true the start stops, undoes what it made and
  // returns Cancelled.
  absl::StatusOr<DriverStateRecord> Start(const TaskRequest& task, const std::function<bool()>& cancelled = {});
  // Re-attaches to a VM from the driver state Nomad kept (a task we still
  // track is fine too).
  absl::Status Recover(const TaskIdentity& task, const std::string& driver_state);
  // The exit once known; nullopt while still running after `timeout`.
  absl::StatusOr<std::optional<ExitResult>> Wait(const std::string& id, absl::Duration timeout);
  absl::Status Stop(const std::string& id, absl::Duration timeout, const std::string& signal);
  absl::Status Destroy(const std::string& id, bool force);
  absl::StatusOr<TaskStatusInfo> Inspect(const std::string& id);
  absl::Status Signal(const std::string& id, const std::string& signal);

  // A task's VM, for reading its stats.
  absl::StatusOr<std::shared_ptr<const VmTask>> Get(const std::string& id);
  // Runs a command in a task's guest (`nomad alloc exec`, see vm/task_exec.h).
  absl::StatusOr<GuestExecResult> Exec(const std::string& id, const GuestExecRequest& request,
                                       const TaskExecOptions& options);
  // Exec's errors that come before the command: no such task, an exited one,
  // no guest agent or none answering (it connects the agent).
  absl::Status CheckExec(const std::string& id);

  // Whether VMs get cgroup limits here; the first time it is not so, says
  // why in the log.
  CgroupSupport Isolation();

  // Where per-task state lives: the plugin's state_dir or a default.
  std::string StateRoot() const;
  // Where downloaded images are cached: image_cache_dir or a default.
  std::string CacheDir() const;

 private:
  absl::StatusOr<std::shared_ptr<VmTask>> Find(const std::string& id);
  StartDeps StartDepsFor(const TaskIdentity& task, const PluginConfig& plugin, const std::function<bool()>& cancelled);
  // Makes the launched VM a task: tracked, watched, announced.
  absl::Status Register(const TaskIdentity& task, LaunchedVm launched);
  // Registers the task and starts watching its supervisor.
  absl::Status Track(std::shared_ptr<VmTask> task);
  void OnSupervisorExit(const std::string& id);
  void Emit(const TaskIdentity& task, const std::string& message,
            const std::map<std::string, std::string>& annotations = {});
  // Tells the operator where the VM runs and under which limits.
  void EmitIsolation(const TaskIdentity& task, const VmSpec& spec, const PluginConfig& plugin,
                     const CgroupLimits& limits, const DriverStateRecord& record, const std::string& netns);
  ImageCache& CacheAt(const std::string& dir);
  // A screenshot asked for by kScreenshotSignal.
  absl::Status Screenshot(VmTask& vm);
  // Keeps the image cache under image_cache_max_size, sparing images in use.
  void EvictImages(const PluginConfig& plugin);

  const TaskManagerOptions options_;
  const ConfigSource config_;
  Fingerprinter* const fingerprinter_;
  EventBus* const events_;
  CgroupManager cgroups_{DetectCgroupMounts()};
  SystemVmHost system_host_{&cgroups_};
  VmHost* const host_;
  // warm_start's QEMUs started ahead; adopted from the last plugin by Prepare.
  WarmPool pool_{host_};

  absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<VmTask>> tasks_ ABSL_GUARDED_BY(mu_);
  // IDs whose StartTask is under way, so a duplicate is refused at once.
  std::map<std::string, bool> starting_ ABSL_GUARDED_BY(mu_);
  // cgroup parents whose missing isolation has been logged.
  std::set<std::string> reported_isolation_ ABSL_GUARDED_BY(mu_);
  // One cache object per directory, so single-flight spans every task.
  CacheKeeper caches_;

  absl::Mutex prepare_mu_;
  std::thread preparer_ ABSL_GUARDED_BY(prepare_mu_);

  // Declared last so it is destroyed first: its thread, which calls back into
  // the members above, is joined while they still exist.
  ExitWatcher watcher_;
  // Declared after the watcher, so destroyed before it: their threads stop
  // first (they use the members above, never the watcher).
  VmWatches watches_{[this](const TaskIdentity& task, const std::string& message,
                            const std::map<std::string, std::string>& annotations) { Emit(task, message, annotations); },
                     [this] { EvictImages(config_()); }};
};

}  // namespace ndq
