#include "vm/task_manager.h"

#include <fcntl.h>
#include <pwd.h>
#include <signal.h>
#include <spawn.h>
#include <linux/nsfs.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <filesystem>
#include <set>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "nomadplugin/hclog.h"
#include "policy/allowlist.h"
#include "base/rollback.h"
#include "base/unique_fd.h"
#include "qemu/cmdline.h"
#include "image/image_probe.h"
#include "host/run_command.h"
#include "host/signals.h"
#include "qemu_driver/supervisor_protocol.h"
#include "image/task_disk.h"
#include "policy/task_config.h"
#include "qemu/vm_spec.h"

extern char** environ;

namespace ndq {
namespace {

namespace log = nomadplugin::hclog;

constexpr char kQmpSocketName[] = "qmp.sock";
// The one directory of a VM's state that QEMU's user may write: its sockets.
constexpr char kRunDirName[] = "run";
// How long RecoverTask waits for a concurrent start or recovery of its task.
constexpr absl::Duration kRecoverWait = absl::Seconds(60);
// How often a start that waits looks whether its caller gave up.
constexpr absl::Duration kCancelCheckInterval = absl::Milliseconds(250);

// A short, stable directory name for a task ID, so socket paths stay far
// below the 108-byte unix socket limit whatever Nomad's data_dir is.
std::string TaskKey(const std::string& id) {
  uint64_t hash = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : id) {
    hash ^= c;
    hash *= 1099511628211ull;
  }
  return absl::StrFormat("%016x", hash);
}

absl::Status ErrnoStatus(const std::string& what) {
  return absl::InternalError(absl::StrCat(what, ": ", std::strerror(errno)));
}

// Starts the supervisor detached from our signal state; its own output goes
// to supervisor.log in the state directory (opened without following links),
// and `image_fds` become its fds 3, 4, ... for QEMU (--pass-fds).
absl::StatusOr<pid_t> SpawnSupervisor(const std::vector<std::string>& argv, int state_fd,
                                      const std::vector<int>& image_fds) {
  UniqueFd log(::openat(state_fd, supervisor::kLogFile, O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (!log.valid()) return ErrnoStatus(absl::StrCat("cannot open ", supervisor::kLogFile));
  // Moved above the target numbers first, so no dup2 below overwrites a
  // source that is still to be moved.
  std::vector<UniqueFd> high;
  for (int fd : image_fds) {
    high.emplace_back(::fcntl(fd, F_DUPFD_CLOEXEC, supervisor::kFirstPassedFd + supervisor::kMaxPassedFds));
    if (!high.back().valid()) return ErrnoStatus("cannot duplicate an image descriptor");
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, log.get(), STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, log.get(), STDERR_FILENO);
  for (size_t i = 0; i < high.size(); ++i) {
    posix_spawn_file_actions_adddup2(&actions, high[i].get(), supervisor::kFirstPassedFd + static_cast<int>(i));
  }
  absl::StatusOr<pid_t> pid = SpawnWithDefaultSignals(argv, &actions, POSIX_SPAWN_SETSID);
  posix_spawn_file_actions_destroy(&actions);
  if (!pid.ok()) {
    return absl::FailedPreconditionError(absl::StrCat("cannot start the VM supervisor: ", pid.status().message()));
  }
  return pid;
}

void RemoveStateDir(const std::string& dir) {
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
}

// Kills a supervisor we started (its QEMU dies with it) and reaps it.
void KillSupervisor(pid_t pid) {
  ::kill(pid, SIGKILL);
  int status;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
}

// The VM's cgroup name: Nomad's own "<alloc>.<task>" on v1, so the cgroup
// Nomad made for the task is the one we fill; the task key otherwise.
std::string CgroupName(const driverpb::TaskConfig& task) {
  const std::string name = absl::StrCat(task.alloc_id(), ".", task.name());
  const bool plain = !task.alloc_id().empty() && !task.name().empty() && name.size() < 200 &&
                     std::all_of(name.begin(), name.end(), [](char c) { return c != '/' && c != '\n' && c != '\0'; });
  return plain ? name : TaskKey(task.id());
}

// Memory: the job's memory_max is the whole process's cap when set; else the
// task's memory plus QEMU's own overhead, so a guest using all of its RAM is
// never killed for QEMU's bookkeeping. CPU shares and reserved cores as Nomad
// gave them.
CgroupLimits PlanCgroupLimits(const driverpb::TaskConfig& task, const PluginConfig& plugin) {
  const driverpb::Resources& resources = task.resources();
  const driverpb::AllocatedMemoryResources& memory = resources.allocated_resources().memory();
  CgroupLimits limits;
  constexpr int64_t kMiB = 1 << 20;
  if (memory.memory_max_mb() > 0) {
    limits.memory_bytes = memory.memory_max_mb() * kMiB;
    limits.memory_soft_bytes = std::min(limits.memory_bytes, memory.memory_mb() * kMiB + plugin.memory_overhead);
  } else if (memory.memory_mb() > 0) {
    limits.memory_bytes = memory.memory_mb() * kMiB + plugin.memory_overhead;
  }
  limits.cpu_shares = resources.linux_resources().cpu_shares() > 0 ? resources.linux_resources().cpu_shares()
                                                                    : resources.allocated_resources().cpu().cpu_shares();
  limits.cpuset = resources.linux_resources().cpuset_cpus();
  limits.pids_max = plugin.pids_limit;
  return limits;
}

// The network namespace the task must run in (Nomad's group network, e.g.
// bridge mode); empty for the host's. Checked before anything starts.
absl::StatusOr<std::string> TaskNetns(const driverpb::TaskConfig& task) {
  const driverpb::NetworkIsolationSpec& spec = task.network_isolation_spec();
  if (spec.mode() == driverpb::NetworkIsolationSpec::HOST || spec.path().empty()) return std::string();
  const std::string& path = spec.path();
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("task network namespace \"", path, "\" cannot be opened: ", std::strerror(errno)));
  }
  const int type = ::ioctl(fd, NS_GET_NSTYPE);
  ::close(fd);
  if (type != CLONE_NEWNET) {
    return absl::InvalidArgumentError(absl::StrCat("task network namespace \"", path, "\" is not a network namespace"));
  }
  return path;
}

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
    : options_(std::move(options)), config_(std::move(config)), fingerprinter_(fingerprinter), events_(events) {}

void TaskManager::Emit(const driverpb::TaskConfig& task, const std::string& message,
                       const std::map<std::string, std::string>& annotations) {
  events_->Publish(TaskEvent{task.id(), task.alloc_id(), task.name(), message, annotations, absl::Now()});
}

std::string TaskManager::CacheDir() const {
  const PluginConfig config = config_();
  if (!config.image_cache_dir.empty()) return config.image_cache_dir;
  if (::geteuid() == 0) return "/var/cache/nomad-driver-qemu/images";
  const char* tmp = std::getenv("TMPDIR");
  return absl::StrCat(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp", "/nomad-driver-qemu-", ::geteuid(), "-images");
}

ImageCache& TaskManager::CacheAt(const std::string& dir) {
  absl::MutexLock lock(&mu_);
  std::unique_ptr<ImageCache>& cache = caches_[dir];
  if (cache == nullptr) cache = std::make_unique<ImageCache>(dir);
  return *cache;
}

void TaskManager::EvictImages(const PluginConfig& plugin) {
  if (plugin.image_cache_max_size <= 0) return;
  std::set<std::string> in_use;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [id, task] : tasks_) {
      if (!task->record().cached_image.empty() && !task->result()) in_use.insert(task->record().cached_image);
    }
  }
  absl::StatusOr<std::vector<std::string>> removed = CacheAt(CacheDir()).Evict(plugin.image_cache_max_size, in_use);
  if (!removed.ok()) {
    log::Warn("image cache eviction failed", {{"error", std::string(removed.status().message())}});
  } else if (!removed->empty()) {
    log::Info("evicted images from the cache", {{"images", *removed}});
  }
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
  task->DrainQmpEvents(absl::Seconds(1));  // QEMU's last events (SHUTDOWN) are relayed before the exit
  ExitResult result = ExitOf(task->record());
  log::Info("VM exited", {{"task_id", id},
                          {"exit_code", result.exit_code},
                          {"signal", result.signal},
                          {"error", result.error}});
  std::map<std::string, std::string> annotations = {{"exit_code", std::to_string(result.exit_code)},
                                                     {"signal", std::to_string(result.signal)}};
  Emit(task->config(), result.error.empty() ? "VM powered off" : "VM exited: " + result.error, annotations);
  task->MarkExited(std::move(result));
}

ExitResult TaskManager::ExitOf(const DriverStateRecord& record) {
  ExitResult result = LoadExitResult(record.state_dir);
  // A SIGKILL with the cgroup's OOM counter up: the memory limit ended the VM.
  if (result.signal == SIGKILL && CgroupOomKills(record.cgroup) > 0) {
    result.oom_killed = true;
    result.error = absl::StrCat("QEMU was killed by the kernel's OOM killer: the VM reached its cgroup memory limit of ",
                                record.memory_limit_bytes >> 20, " MiB");
  }
  return result;
}

void TaskManager::EmitIsolation(const driverpb::TaskConfig& task, const VmSpec& spec, const PluginConfig& plugin,
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

absl::StatusOr<driverpb::TaskHandle> TaskManager::Start(const driverpb::TaskConfig& task,
                                                        const std::function<bool()>& cancelled) {
  const std::string& id = task.id();
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
  // Everything made for the task, undone in reverse if the start fails.
  Rollback rollback;
  auto gave_up = [&cancelled]() { return cancelled && cancelled(); };
  const absl::Status caller_left =
      absl::CancelledError("StartTask was cancelled (the caller gave up or the plugin is shutting down)");

  absl::StatusOr<TaskConfig> config = DecodeTaskConfig(task.msgpack_driver_config());
  if (!config.ok()) return config.status();
  const PluginConfig plugin = config_();
  absl::StatusOr<std::vector<std::string>> sources = ImageSources(*config, plugin);
  if (!sources.ok()) return sources.status();
  absl::StatusOr<std::string> netns = TaskNetns(task);
  if (!netns.ok()) return netns.status();

  const std::string task_dir = task.alloc_dir() + "/" + task.name();
  AdmissionScope scope{task_dir, task.alloc_dir(), plugin.image_paths};
  std::string image_field = "image_path", cached_image;
  if (!sources->empty()) {
    // A downloaded image becomes a per-task overlay backed by the cached copy.
    // A local source (a path or file://, also for checksum_url) passes the
    // same admission as image_path before a byte of it is read.
    const LocalOpener admit_local = [&scope](const std::string& field, const std::string& path) -> absl::StatusOr<int> {
      absl::StatusOr<AdmittedFile> file = AdmitFile(field, path, scope, FileAccess::kReadOnly);
      if (!file.ok()) return file.status();
      return file->fd.release();
    };
    absl::StatusOr<TaskDisk> disk = PrepareTaskDisk(
        *config, *sources, task_dir, plugin, CacheAt(CacheDir()),
        [&](const std::string& message, const std::map<std::string, std::string>& annotations) {
          Emit(task, message, annotations);
        },
        admit_local, gave_up, TaskKey(id));
    if (!disk.ok()) return gave_up() ? caller_left : disk.status();
    rollback.Push([this, cached = disk->cached_image, lease = TaskKey(id)] { CacheAt(CacheDir()).Release(cached, lease); });
    const std::string overlay = disk->overlay;
    rollback.Push([overlay] { ::unlink(overlay.c_str()); });
    cached_image = disk->cached_image;
    image_field = "image_source";
    config->image_path = disk->overlay;
    config->image_source.reset();
    config->image_sources.clear();
    config->checksum.reset();
    config->checksum_url.reset();
    config->disk_size.reset();
    config->image_format.reset();
    // The overlay's backing file is that one cached image, nothing else there.
    scope.allowed_dirs.push_back(cached_image);
  }
  if (gave_up()) return caller_left;
  absl::StatusOr<VmSpec> spec = PlanVm(*config, task, plugin, fingerprinter_->Emulators());
  if (!spec.ok()) return spec.status();

  // The image and every file its chain pulls in are admitted and opened here;
  // QEMU gets the open files, never the paths.
  absl::StatusOr<AdmittedFile> top =
      AdmitFile(image_field, spec->image_path, scope, FileAccess::kReadWriteIfPossible);
  if (!top.ok()) return top.status();
  absl::StatusOr<std::vector<DiskLayer>> layers = OpenImageChain(*std::move(top), spec->image_format, image_field, scope);
  if (!layers.ok()) return layers.status();
  if (static_cast<int>(layers->size()) > supervisor::kMaxPassedFds) {
    return absl::InvalidArgumentError(absl::StrCat("task config \"", image_field, "\": the image has too many layers"));
  }
  for (size_t i = 0; i < layers->size(); ++i) {
    spec->disk.push_back(DiskNode{(*layers)[i].format, !(*layers)[i].writable,
                                  supervisor::kFirstPassedFd + static_cast<int>(i)});
  }

  // The state directory is root's (0711: QEMU's user may pass, not list or
  // write); QEMU's sockets go in run/, the one place its user may write.
  const std::string root = StateRoot();
  if (::mkdir(root.c_str(), 0711) != 0 && errno != EEXIST) return ErrnoStatus("cannot create " + root);
  DriverStateRecord record;
  record.state_dir = absl::StrCat(root, "/", TaskKey(id));
  const std::string run_dir = record.state_dir + "/" + kRunDirName;
  record.qmp_socket = run_dir + "/" + kQmpSocketName;
  record.guest_agent = spec->guest_agent;
  record.graceful_shutdown = spec->graceful_shutdown;
  record.cached_image = cached_image;
  if (spec->guest_agent) record.guest_agent_socket = run_dir + "/qga.sock";
  if (record.qmp_socket.size() >= 100) {
    return absl::FailedPreconditionError(absl::StrCat(
        "state_dir \"", root, "\" is too long: QMP socket path ", record.qmp_socket, " exceeds the unix socket limit"));
  }
  const std::string qemu_user = task.user().empty() ? plugin.qemu_user : task.user();
  const passwd* pw = nullptr;
  if (!qemu_user.empty()) {
    pw = ::getpwnam(qemu_user.c_str());
    if (pw == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(task.user().empty() ? "plugin config \"qemu_user\"" : "task user",
                                                     " \"", qemu_user, "\" does not exist"));
    }
  }
  if (::mkdir(record.state_dir.c_str(), 0711) != 0) {
    if (errno == EEXIST) {
      return absl::AlreadyExistsError(
          absl::StrCat("task ", id, " already has a state directory ", record.state_dir, " (started twice?)"));
    }
    return ErrnoStatus("cannot create " + record.state_dir);
  }
  rollback.Push([dir = record.state_dir] { RemoveStateDir(dir); });
  UniqueFd state_fd(::open(record.state_dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!state_fd.valid()) return ErrnoStatus("cannot open " + record.state_dir);
  if (::mkdirat(state_fd.get(), kRunDirName, 0700) != 0) return ErrnoStatus("cannot create " + run_dir);
  if (pw != nullptr && ::fchownat(state_fd.get(), kRunDirName, pw->pw_uid, pw->pw_gid, AT_SYMLINK_NOFOLLOW) != 0) {
    return ErrnoStatus("cannot hand " + run_dir + " to user " + qemu_user);
  }

  const CgroupLimits limits = PlanCgroupLimits(task, plugin);
  absl::StatusOr<std::optional<TaskCgroup>> cgroup =
      cgroups_.Create(plugin.cgroup_parent, CgroupName(task), task.resources().linux_resources().cpuset_cgroup(), limits);
  if (!cgroup.ok()) return cgroup.status();
  if (*cgroup) {
    record.cgroup = **cgroup;
    record.memory_limit_bytes = limits.memory_bytes;
    rollback.Push([made = record.cgroup] { RemoveTaskCgroup(made); });
  }

  const std::vector<std::string> qemu_argv =
      BuildQemuArgv(*spec, RuntimePaths{record.qmp_socket, record.guest_agent_socket});
  supervisor::Placement placement{record.cgroup.ProcsFiles(), *netns, static_cast<int>(layers->size())};
  const std::vector<std::string> argv = supervisor::SupervisorArgv(
      plugin.supervisor_path.empty() ? options_.supervisor_path : plugin.supervisor_path, record.state_dir,
      task.stdout_path().empty() ? "/dev/null" : task.stdout_path(),
      task.stderr_path().empty() ? "/dev/null" : task.stderr_path(), qemu_user, qemu_argv, placement);
  log::Debug("starting VM", {{"task_id", id}, {"argv", qemu_argv}});
  if (gave_up()) return caller_left;

  record.started_at = absl::Now();
  std::vector<int> image_fds;
  for (const DiskLayer& layer : *layers) image_fds.push_back(layer.fd.get());
  absl::StatusOr<pid_t> supervisor = SpawnSupervisor(argv, state_fd.get(), image_fds);
  if (!supervisor.ok()) return supervisor.status();
  layers->clear();  // QEMU holds them now; ours would only keep the files open
  record.supervisor_pid = *supervisor;
  rollback.Push([pid = record.supervisor_pid] { KillSupervisor(pid); });
  record.supervisor_start_ticks = ProcessStartTicks(*supervisor).value_or(0);
  absl::StatusOr<int> opened_pidfd = OpenVerifiedPidfd(record.supervisor_pid, 0);
  if (!opened_pidfd.ok()) return opened_pidfd.status();
  UniqueFd supervisor_pidfd(*opened_pidfd);

  // QEMU is up once its QMP socket answers; a supervisor that exits first
  // means QEMU failed to start, and its record says why. Waited in slices so
  // a caller that gives up is noticed.
  std::unique_ptr<QmpClient> qmp;
  const absl::Time deadline = absl::Now() + options_.start_timeout;
  absl::Status socket = absl::DeadlineExceededError("no QMP socket yet");
  while (!gave_up() && absl::Now() < deadline) {
    socket = WaitForPathOrExit(run_dir, kQmpSocketName, supervisor_pidfd.get(),
                               std::min(deadline, absl::Now() + kCancelCheckInterval));
    if (socket.code() != absl::StatusCode::kDeadlineExceeded) break;
  }
  if (gave_up()) return caller_left;
  if (socket.ok()) {
    // The socket exists from bind(); Connect retries the instant until listen().
    absl::StatusOr<std::unique_ptr<QmpClient>> client =
        QmpClient::Connect(record.qmp_socket, std::max(deadline - absl::Now(), absl::Seconds(1)));
    if (client.ok()) qmp = std::move(*client);
    else socket = client.status();
  }
  if (qmp == nullptr) {
    if (PidfdExited(supervisor_pidfd.get())) {
      ::waitpid(record.supervisor_pid, nullptr, 0);
      const ExitResult exit = ExitOf(record);
      return absl::FailedPreconditionError(absl::StrCat(
          "QEMU failed to start: ", exit.error.empty() ? "it exited at once with code 0" : exit.error));
    }
    return absl::DeadlineExceededError(absl::StrCat(
        "QEMU did not answer on its QMP socket within ", absl::FormatDuration(options_.start_timeout), " (",
        socket.message(), "; is the task's stdout FIFO being read?)"));
  }

  // The supervisor records the pid right after exec succeeds, but a loaded
  // machine may run QEMU up to its QMP socket before the supervisor runs again.
  absl::Status pid_file = WaitForPathOrExit(record.state_dir, supervisor::kPidFile, supervisor_pidfd.get(),
                                            absl::Now() + absl::Seconds(10));
  std::string pid_problem(pid_file.message());
  std::optional<pid_t> qemu_pid;
  if (pid_file.ok()) qemu_pid = supervisor::ReadQemuPid(record.state_dir, &pid_problem);
  UniqueFd qemu_pidfd;
  if (qemu_pid) {
    record.qemu_pid = *qemu_pid;
    record.qemu_start_ticks = ProcessStartTicks(*qemu_pid).value_or(0);
    absl::StatusOr<int> fd = OpenVerifiedPidfd(*qemu_pid, record.qemu_start_ticks);
    if (fd.ok()) qemu_pidfd.reset(*fd);
  }
  if (!qemu_pidfd.valid()) {
    return absl::InternalError("QEMU answered on QMP but its pid could not be read: " + pid_problem);
  }
  // Connected before the pid was known: check now that QEMU itself answered.
  if (absl::Status served = qmp->CheckServedBy(record.qemu_pid); !served.ok()) return served;
  absl::StatusOr<std::string> run_state = qmp->QueryStatus();
  // The last point to give up: after this the VM is registered and Nomad holds it.
  if (gave_up()) return caller_left;

  driverpb::TaskHandle handle;
  handle.set_version(1);
  *handle.mutable_config() = task;
  handle.set_state(driverpb::RUNNING);
  handle.set_driver_state(record.Encode());
  auto vm = std::make_shared<VmTask>(task, record, supervisor_pidfd.release(), qemu_pidfd.release(), std::move(qmp));
  vm->SetEventSink([this, task](const std::string& message, const std::map<std::string, std::string>& annotations) {
    Emit(task, message, annotations);
  });
  if (absl::Status status = Track(vm); !status.ok()) {
    absl::MutexLock lock(&mu_);
    tasks_.erase(id);
    return status;
  }
  rollback.Commit();  // the VM owns what was made now
  log::Info("VM started", {{"task_id", id},
                           {"qemu_pid", record.qemu_pid},
                           {"supervisor_pid", record.supervisor_pid},
                           {"run_state", run_state.ok() ? *run_state : std::string(run_state.status().message())}});
  Emit(task, absl::StrCat("Started QEMU (pid ", record.qemu_pid, ")"),
       {{"qemu_pid", std::to_string(record.qemu_pid)}, {"supervisor_pid", std::to_string(record.supervisor_pid)}});
  EmitIsolation(task, *spec, plugin, limits, record, *netns);
  EvictImages(plugin);
  return handle;
}

absl::Status TaskManager::Recover(const driverpb::TaskHandle& handle) {
  const std::string& id = handle.config().id();
  if (id.empty()) return absl::InvalidArgumentError("task handle has no task id");
  {
    // A concurrent start or recovery of the same task is waited for, so one
    // VM is never watched twice; this one then only confirms it.
    absl::MutexLock lock(&mu_);
    auto settled = [this, &id]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return starting_.count(id) == 0; };
    if (!mu_.AwaitWithTimeout(absl::Condition(&settled), kRecoverWait)) {
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
  absl::StatusOr<DriverStateRecord> record = DriverStateRecord::Decode(handle.driver_state());
  if (!record.ok()) return WithTaskPrefix(record.status(), id);
  struct stat st;
  if (::stat(record->state_dir.c_str(), &st) != 0) {
    return absl::NotFoundError(absl::StrCat("task ", id, ": state directory ", record->state_dir, " is gone"));
  }

  int supervisor_pidfd = -1, qemu_pidfd = -1;
  if (absl::StatusOr<int> fd = OpenVerifiedPidfd(record->supervisor_pid, record->supervisor_start_ticks); fd.ok()) {
    supervisor_pidfd = *fd;
  }
  if (absl::StatusOr<int> fd = OpenVerifiedPidfd(record->qemu_pid, record->qemu_start_ticks); fd.ok()) {
    qemu_pidfd = *fd;
  }
  auto vm = std::make_shared<VmTask>(handle.config(), *record, supervisor_pidfd, qemu_pidfd, nullptr);
  const driverpb::TaskConfig task = handle.config();
  vm->SetEventSink([this, task](const std::string& message, const std::map<std::string, std::string>& annotations) {
    Emit(task, message, annotations);
  });
  if (supervisor_pidfd < 0) {
    // The VM ended while the plugin was away; its supervisor left the record.
    vm->MarkExited(ExitOf(*record));
  }
  Emit(task, supervisor_pidfd >= 0 ? "Reattached to the running VM after a plugin restart"
                                    : "The VM exited while the plugin was not running");
  log::Info("task recovered", {{"task_id", id},
                               {"running", supervisor_pidfd >= 0},
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
  {
    absl::MutexLock lock(&mu_);
    tasks_.erase(id);
  }
  RemoveTaskCgroup((*task)->record().cgroup);
  RemoveStateDir((*task)->record().state_dir);
  CacheAt(CacheDir()).Release((*task)->record().cached_image, TaskKey(id));
  log::Debug("task destroyed", {{"task_id", id}});
  return absl::OkStatus();
}

absl::StatusOr<driverpb::InspectTaskResponse> TaskManager::Inspect(const std::string& id) {
  absl::StatusOr<std::shared_ptr<VmTask>> task = Find(id);
  if (!task.ok()) return task.status();
  const VmTask& vm = **task;
  driverpb::InspectTaskResponse response;
  driverpb::TaskStatus* status = response.mutable_task();
  status->set_id(id);
  status->set_name(vm.config().name());
  status->mutable_started_at()->set_seconds(absl::ToUnixSeconds(vm.record().started_at));
  const std::optional<ExitResult> result = vm.result();
  status->set_state(result ? driverpb::EXITED : driverpb::RUNNING);
  if (result) {
    status->mutable_completed_at()->set_seconds(absl::ToUnixSeconds(result->completed_at));
    status->mutable_result()->set_exit_code(result->exit_code);
    status->mutable_result()->set_signal(result->signal);
    status->mutable_result()->set_oom_killed(result->oom_killed);
  }
  auto& attrs = *response.mutable_driver()->mutable_attributes();
  attrs["qemu_pid"] = std::to_string(vm.record().qemu_pid);
  attrs["supervisor_pid"] = std::to_string(vm.record().supervisor_pid);
  attrs["qmp_socket"] = vm.record().qmp_socket;
  attrs["state_dir"] = vm.record().state_dir;
  return response;
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
    default: return (*task)->Signal(*sig);
  }
}

}  // namespace ndq
