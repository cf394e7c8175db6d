#include "vm/task_manager.h"

#include "host/tap_device.h"

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <set>

#include "absl/strings/str_cat.h"
#include "base/rollback.h"
#include "base/timeouts.h"
#include "base/unique_fd.h"
#include "host/signals.h"
#include "nomadplugin/hclog.h"
#include "vm/console.h"
#include "vm/vm_resources.h"

namespace ndq {
namespace {

namespace log = nomadplugin::hclog;

// What the fingerprinter found, kept in the state dir for the next launch.
constexpr char kHostFactsFile[] = "host-facts.json";
// The digests of images and template files, kept in the cache for the next launch.
constexpr char kKeptDigestsFile[] = "digests.json";

absl::Status WithTaskPrefix(const absl::Status& status, const std::string& id) {
  return absl::Status(status.code(), absl::StrCat("task ", id, ": ", status.message()));
}

}  // namespace

std::string DefaultSupervisorPath() {
  std::error_code error;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", error);
  if (error) return "nomad-qemu-supervisor";
  return (self.parent_path() / "nomad-qemu-supervisor").string();
}

TaskManager::TaskManager(TaskManagerOptions options, ConfigSource config, Fingerprinter* fingerprinter,
                         EventBus* events)
    : options_(std::move(options)),
      config_(std::move(config)),
      fingerprinter_(fingerprinter),
      events_(events),
      host_(options_.host != nullptr ? options_.host : &system_host_) {}

TaskManager::~TaskManager() { AwaitPrepared(); }

void TaskManager::Prepare() {
  AwaitPrepared();  // a second SetConfig: one preparation at a time
  pool_.ExpectAdoption();
  absl::MutexLock lock(&prepare_mu_);
  preparer_ = std::thread([this] {
    const PluginConfig plugin = config_();
    const std::string root = StateRoot();
    const absl::Time started = absl::Now();
    if (::mkdir(root.c_str(), 0711) == 0 || errno == EEXIST) fingerprinter_->KeepFactsIn(root + "/" + kHostFactsFile);
    pool_.Adopt(root);
    // The kept digests before the probing, which may take a while on a first
    // launch: a restore meanwhile should not hash its template again.
    const std::string cache = CacheDir();
    std::error_code no_cache;
    std::filesystem::create_directories(cache, no_cache);  // as the image cache makes it
    if (!no_cache) KeepDigestsIn(cache + "/" + kKeptDigestsFile);
    const int removed = TemplateStore(cache).RemoveOtherFormats();
    fingerprinter_->WarmUp(plugin.emulators_allowlist);
    log::Debug("host probed and cache tidied", {{"ms", absl::ToDoubleMilliseconds(absl::Now() - started)},
                                                {"binary_probes", fingerprinter_->binary_probes()},
                                                {"stale_templates_removed", removed}});
  });
}

void TaskManager::AwaitPrepared() {
  std::thread running;
  {
    absl::MutexLock lock(&prepare_mu_);
    running = std::move(preparer_);
  }
  if (running.joinable()) running.join();
}

void TaskManager::Emit(const TaskIdentity& task, const std::string& message,
                       const std::map<std::string, std::string>& annotations) {
  events_->Publish(TaskEvent{task.id, task.alloc_id, task.name, message, annotations, absl::Now()});
}

std::string TaskManager::CacheDir() const {
  const PluginConfig config = config_();
  if (!config.image_cache_dir.empty()) return config.image_cache_dir;
  if (::geteuid() == 0) return "/var/cache/nomad-driver-qemu/images";
  const char* tmp = std::getenv("TMPDIR");
  return absl::StrCat(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp", "/nomad-driver-qemu-", ::geteuid(), "-images");
}

ImageCache& TaskManager::CacheAt(const std::string& dir) { return caches_.At(dir); }

void TaskManager::EvictImages(const PluginConfig& plugin) {
  if (plugin.image_cache_max_size <= 0) return;
  std::set<std::string> in_use;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [id, task] : tasks_) {
      if (!task->result()) in_use.insert(task->record().cached_images.begin(), task->record().cached_images.end());
    }
  }
  caches_.Evict(CacheDir(), plugin.image_cache_max_size, in_use);
  pool_.Prune();  // slots of an evicted template go with it
}

std::string TaskManager::StateRoot() const {
  const PluginConfig config = config_();
  if (!config.state_dir.empty()) return config.state_dir;
  if (::geteuid() == 0) return "/run/nomad-driver-qemu";
  const char* tmp = std::getenv("TMPDIR");
  return absl::StrCat(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp", "/nomad-driver-qemu-", ::geteuid());
}

absl::StatusOr<std::shared_ptr<VmTask>> TaskManager::Find(const std::string& id) {
  absl::MutexLock lock(&mu_);
  auto it = tasks_.find(id);
  if (it == tasks_.end()) return absl::NotFoundError(absl::StrCat("task ", id, " is not known to this driver"));
  return it->second;
}

absl::Status TaskManager::Track(std::shared_ptr<VmTask> task) {
  const std::string id = task->id();
  const int pidfd = task->supervisor_pidfd();
  {
    absl::MutexLock lock(&mu_);
    tasks_[id] = task;
  }
  if (pidfd < 0) return absl::OkStatus();
  return watcher_.Watch(pidfd, [this, id] { OnSupervisorExit(id); });
}

void TaskManager::OnSupervisorExit(const std::string& id) {
  std::shared_ptr<VmTask> task;
  {
    absl::MutexLock lock(&mu_);
    auto it = tasks_.find(id);
    if (it == tasks_.end()) return;
    task = it->second;
  }
  // Reap it when we are its parent; after a plugin restart init does that.
  ::waitpid(task->record().supervisor_pid, nullptr, WNOHANG);
  task->DrainQmpEvents(timeouts::kExitEventDrain);  // QEMU's last events (SHUTDOWN) are relayed before the exit
  ExitResult result = FinalExit(task->record());
  RemoveConsoleDir(task->record().console_dir);  // QEMU leaves vnc.sock behind
  if (const std::string boot_failure = watches_.TakeBootFailure(id); !boot_failure.empty()) {
    const std::string tail = LastLines(result.serial_tail, kBootFailureTailLines);
    result.error = absl::StrCat(boot_failure, "; last serial console lines (ttyS0):\n",
                                tail.empty() ? "(none)" : tail);
  }
  log::Info("VM exited", {{"task_id", id},
                          {"exit_code", result.exit_code},
                          {"signal", result.signal},
                          {"error", result.error}});
  std::map<std::string, std::string> annotations = {{"exit_code", std::to_string(result.exit_code)},
                                                     {"signal", std::to_string(result.signal)}};
  Emit(task->identity(), result.error.empty() ? "VM powered off" : "VM exited: " + result.error, annotations);
  task->MarkExited(std::move(result));
}

void TaskManager::EmitIsolation(const TaskIdentity& task, const VmSpec& spec, const PluginConfig& plugin,
                                const CgroupLimits& limits, const DriverStateRecord& record, const std::string& netns) {
  if (!netns.empty()) Emit(task, "QEMU runs in the allocation's network namespace " + netns, {{"netns", netns}});
  if (record.cgroup.version == CgroupVersion::kNone) return;
  std::map<std::string, std::string> annotations = {
      {"cgroup", record.cgroup.Dir("memory")},
      {"memory_limit_bytes", std::to_string(limits.memory_bytes)},
      {"cpu_shares", std::to_string(limits.cpu_shares)}};
  if (!limits.cpuset.empty()) annotations["cpuset"] = limits.cpuset;
  Emit(task,
       absl::StrCat("VM isolated in cgroup (", CgroupVersionName(record.cgroup.version), "): memory limit ",
                    limits.memory_bytes >> 20, " MiB, cpu shares ", limits.cpu_shares,
                    limits.cpuset.empty() ? "" : ", cpuset " + limits.cpuset),
       annotations);
  const int64_t needed = spec.memory_mb * (1 << 20) + plugin.memory_overhead;
  if (limits.memory_bytes > 0 && limits.memory_bytes < needed) {
    Emit(task, absl::StrCat("memory_max of ", limits.memory_bytes >> 20, " MiB leaves QEMU less than its ",
                            plugin.memory_overhead >> 20, " MiB overhead above the guest's ", spec.memory_mb,
                            " MiB of RAM; the VM is OOM-killed if the guest uses all of it"),
         {{"memory_limit_bytes", std::to_string(limits.memory_bytes)}});
  }
}

CgroupSupport TaskManager::Isolation() {
  const std::string parent = config_().cgroup_parent;
  const CgroupSupport support = cgroups_.Support(parent);
  absl::MutexLock lock(&mu_);
  if (!support.usable && reported_isolation_.insert(parent).second) {
    log::Warn("VMs run without cgroup resource limits", {{"reason", support.problem}});
  }
  return support;
}

absl::StatusOr<std::shared_ptr<const VmTask>> TaskManager::Get(const std::string& id) {
  absl::StatusOr<std::shared_ptr<VmTask>> task = Find(id);
  if (!task.ok()) return task.status();
  return std::shared_ptr<const VmTask>(*task);
}

absl::StatusOr<GuestExecResult> TaskManager::Exec(const std::string& id, const GuestExecRequest& request,
                                                  const TaskExecOptions& options) {
  absl::StatusOr<std::shared_ptr<VmTask>> task = Find(id);
  if (!task.ok()) return task.status();
  return ExecInTask(**task, request, options);
}

absl::Status TaskManager::CheckExec(const std::string& id) {
  absl::StatusOr<std::shared_ptr<VmTask>> task = Find(id);
  if (!task.ok()) return task.status();
  return CheckExecTarget(**task);
}

absl::StatusOr<DriverStateRecord> TaskManager::Start(const TaskRequest& task, const std::function<bool()>& cancelled) {
  const std::string& id = task.identity.id;
  if (id.empty()) return absl::InvalidArgumentError("task config has no id");
  {
    absl::MutexLock lock(&mu_);
    if (tasks_.count(id) || starting_.count(id)) {
      return absl::AlreadyExistsError(absl::StrCat("task ", id, " is already started"));
    }
    starting_[id] = true;
  }
  Rollback starting_mark;  // released last, whatever happens
  starting_mark.Push([this, id] {
    absl::MutexLock lock(&mu_);
    starting_.erase(id);
  });
  const PluginConfig plugin = config_();
  // Everything made for the task, undone in reverse if the start fails.
  Rollback rollback;
  absl::StatusOr<LaunchedVm> launched =
      RunStartPipeline(task, plugin, StartDepsFor(task.identity, plugin, cancelled), rollback);
  if (!launched.ok()) return launched.status();
  // The last point to give up: after this the VM is registered and Nomad holds it.
  if (cancelled && cancelled()) return StartCancelled();
  const DriverStateRecord record = launched->record;
  if (absl::Status status = Register(task.identity, *std::move(launched)); !status.ok()) return status;
  rollback.Commit();  // the VM owns what was made now
  EvictImages(plugin);
  return record;
}

StartDeps TaskManager::StartDepsFor(const TaskIdentity& task, const PluginConfig& plugin,
                                    const std::function<bool()>& cancelled) {
  StartDeps deps;
  deps.host = host_;
  deps.cache = &CacheAt(CacheDir());
  // Unfiltered: planning applies the allowlist and names it in its error.
  // Only the task's own emulator is probed, and only when the launch's
  // background probing (Prepare) has not done it yet.
  deps.capabilities = [fingerprinter = fingerprinter_](const std::string& emulator) {
    return fingerprinter->CapabilitiesFor(emulator);
  };
  deps.supervisor_path = plugin.supervisor_path.empty() ? options_.supervisor_path : plugin.supervisor_path;
  deps.state_root = StateRoot();
  deps.qmp_timeout = options_.start_timeout;
  deps.emit = [this, task](const std::string& message, const std::map<std::string, std::string>& annotations) {
    Emit(task, message, annotations);
  };
  deps.cancelled = cancelled;
  deps.before_stage = options_.before_stage;
  deps.pool = &pool_;
  return deps;
}

absl::Status TaskManager::Register(const TaskIdentity& task, LaunchedVm launched) {
  const DriverStateRecord record = launched.record;
  auto vm = std::make_shared<VmTask>(task, record, std::move(launched.supervisor_pidfd),
                                     std::move(launched.qemu_pidfd), std::move(launched.qmp));
  vm->SetEventSink([this, task](const std::string& message, const std::map<std::string, std::string>& annotations) {
    Emit(task, message, annotations);
  });
  if (absl::Status status = Track(vm); !status.ok()) {
    absl::MutexLock lock(&mu_);
    tasks_.erase(task.id);
    return status;
  }
  log::Info("VM started", {{"task_id", task.id},
                           {"qemu_pid", record.qemu_pid},
                           {"supervisor_pid", record.supervisor_pid}});
  Emit(task, absl::StrCat("Started QEMU (pid ", record.qemu_pid, ")"),
       {{"qemu_pid", std::to_string(record.qemu_pid)}, {"supervisor_pid", std::to_string(record.supervisor_pid)}});
  EmitIsolation(task, launched.spec, config_(), launched.limits, record, launched.netns);
  if (launched.spec.console.enabled) {
    Emit(task, "Console: serial (ttyS1) on " + launched.spec.console.serial_socket + ", VNC on " +
                   launched.spec.console.vnc_socket,
         {{"console_serial", launched.spec.console.serial_socket}, {"console_vnc", launched.spec.console.vnc_socket}});
  }
  watches_.Begin(task, vm, launched);
  return absl::OkStatus();
}

absl::Status TaskManager::Screenshot(VmTask& vm) {
  absl::StatusOr<std::string> shot = TakeScreenshot(vm);
  if (!shot.ok()) {
    return absl::Status(shot.status().code(), absl::StrCat("screenshot (SIGUSR2): ", shot.status().message()));
  }
  Emit(vm.identity(), "Screenshot of the VM's display: " + *shot, {{"screenshot", *shot}, {"reason", "SIGUSR2"}});
  return absl::OkStatus();
}

absl::Status TaskManager::Recover(const TaskIdentity& task, const std::string& driver_state) {
  const std::string& id = task.id;
  if (id.empty()) return absl::InvalidArgumentError("task handle has no task id");
  {
    // A concurrent start or recovery of the same task is waited for, so one
    // VM is never watched twice; this one then only confirms it.
    absl::MutexLock lock(&mu_);
    auto settled = [this, &id]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return starting_.count(id) == 0; };
    if (!mu_.AwaitWithTimeout(absl::Condition(&settled), timeouts::kRecoverWait)) {
      return absl::UnavailableError(absl::StrCat("task ", id, " is still being started or recovered"));
    }
    if (tasks_.count(id)) return absl::OkStatus();
    starting_[id] = true;
  }
  Rollback recovering_mark;
  recovering_mark.Push([this, id] {
    absl::MutexLock lock(&mu_);
    starting_.erase(id);
  });
  absl::StatusOr<DriverStateRecord> record = DriverStateRecord::Decode(driver_state);
  if (!record.ok()) return WithTaskPrefix(record.status(), id);
  struct stat st;
  if (::stat(record->state_dir.c_str(), &st) != 0) {
    return absl::NotFoundError(absl::StrCat("task ", id, ": state directory ", record->state_dir, " is gone"));
  }

  UniqueFd supervisor_pidfd, qemu_pidfd;
  if (absl::StatusOr<int> fd = OpenVerifiedPidfd(record->supervisor_pid, record->supervisor_start_ticks); fd.ok()) {
    supervisor_pidfd.reset(*fd);
  }
  if (absl::StatusOr<int> fd = OpenVerifiedPidfd(record->qemu_pid, record->qemu_start_ticks); fd.ok()) {
    qemu_pidfd.reset(*fd);
  }
  const bool running = supervisor_pidfd.valid();
  auto vm = std::make_shared<VmTask>(task, *record, std::move(supervisor_pidfd), std::move(qemu_pidfd), nullptr);
  vm->SetEventSink([this, task](const std::string& message, const std::map<std::string, std::string>& annotations) {
    Emit(task, message, annotations);
  });
  if (!running) {
    // The VM ended while the plugin was away; its supervisor left the record.
    vm->MarkExited(FinalExit(*record));
    // Its TAP at once (another VM may want the name); the rest when Nomad destroys it.
    VmResources tap_only;
    tap_only.tap = record->tap_name;
    Release(tap_only, *host_, CacheAt(CacheDir()), TaskKey(id));
  }
  Emit(task, running ? "Reattached to the running VM after a plugin restart"
                                    : "The VM exited while the plugin was not running");
  log::Info("task recovered", {{"task_id", id},
                               {"running", running},
                               {"qemu_pid", record->qemu_pid}});
  return Track(std::move(vm));
}

absl::StatusOr<std::optional<ExitResult>> TaskManager::Wait(const std::string& id, absl::Duration timeout) {
  absl::StatusOr<std::shared_ptr<VmTask>> task = Find(id);
  if (!task.ok()) return task.status();
  return (*task)->WaitFor(timeout);
}

absl::Status TaskManager::Stop(const std::string& id, absl::Duration timeout, const std::string& signal) {
  absl::StatusOr<std::shared_ptr<VmTask>> task = Find(id);
  if (!task.ok()) return task.status();
  absl::StatusOr<int> sig = ParseSignal(signal.empty() ? "SIGTERM" : signal);
  if (!sig.ok()) return sig.status();
  return (*task)->Stop(timeout, *sig);
}

absl::Status TaskManager::Destroy(const std::string& id, bool force) {
  absl::StatusOr<std::shared_ptr<VmTask>> task = Find(id);
  if (!task.ok()) {
    // Destroying what is already gone is not an error for Nomad.
    return task.status().code() == absl::StatusCode::kNotFound ? absl::OkStatus() : task.status();
  }
  if (!(*task)->result()) {
    if (!force) {
      return absl::FailedPreconditionError(
          absl::StrCat("task ", id, " is still running; stop it first or destroy with force"));
    }
    // At once: no request to the guest, no waiting on a hung agent or QMP.
    if (absl::Status status = (*task)->Kill(); !status.ok()) return status;
  }
  watches_.End(id);
  (void)watches_.TakeBootFailure(id);
  {
    absl::MutexLock lock(&mu_);
    tasks_.erase(id);
  }
  Release(ResourcesOf((*task)->record()), *host_, CacheAt(CacheDir()), TaskKey(id));
  log::Debug("task destroyed", {{"task_id", id}});
  return absl::OkStatus();
}

absl::StatusOr<TaskStatusInfo> TaskManager::Inspect(const std::string& id) {
  absl::StatusOr<std::shared_ptr<VmTask>> task = Find(id);
  if (!task.ok()) return task.status();
  const VmTask& vm = **task;
  TaskStatusInfo info;
  info.identity = vm.identity();
  info.started_at = vm.record().started_at;
  info.exit = vm.result();
  info.attributes = {{"qemu_pid", std::to_string(vm.record().qemu_pid)},
                     {"supervisor_pid", std::to_string(vm.record().supervisor_pid)},
                     {"qmp_socket", vm.record().qmp_socket},
                     {"state_dir", vm.record().state_dir}};
  if (!vm.record().tap_name.empty()) info.attributes["tap"] = vm.record().tap_name;
  if (!vm.record().warm_start.empty()) info.attributes["warm_start"] = vm.record().warm_start;
  if (!vm.record().warm_template.empty()) info.attributes["warm_template"] = vm.record().warm_template;
  if (!vm.record().network.ip.empty()) info.attributes["guest_address"] = vm.record().network.ip;
  info.network = vm.record().network;
  return info;
}

absl::Status TaskManager::Signal(const std::string& id, const std::string& signal) {
  absl::StatusOr<std::shared_ptr<VmTask>> task = Find(id);
  if (!task.ok()) return task.status();
  absl::StatusOr<int> sig = ParseSignal(signal);
  if (!sig.ok()) return sig.status();
  // These ask the VM rather than QEMU's process (see README, signals).
  switch (*sig) {
    case SIGPWR: return (*task)->RequestPowerdown();
    case SIGTSTP: return (*task)->Pause();
    case SIGCONT: return (*task)->Resume();
    case kScreenshotSignal: return Screenshot(**task);
    default: return (*task)->Signal(*sig);
  }
}

}  // namespace ndq
