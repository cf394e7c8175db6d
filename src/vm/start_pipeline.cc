#include "vm/start_pipeline.h"

#include <fcntl.h>
#include <pwd.h>
#include <signal.h>
#include <linux/nsfs.h>
#include <sched.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/error_kind.h"
#include "base/timeouts.h"
#include "host/process_watch.h"
#include "host/tap_device.h"
#include "qemu/guest_address.h"
#include "image/task_disk.h"
#include "vm/console.h"
#include "vm/pool_handover.h"
#include "vm/fd_table.h"
#include "vm/vm_resources.h"
#include "vm/start_media.h"
#include "nomadplugin/hclog.h"
#include "qemu/cmdline.h"
#include "qemu/share_plan.h"
#include "vm/qemu_process.h"
#include "vm/share_dirs.h"
#include "qemu_driver/supervisor_protocol.h"

namespace ndq {
namespace {

namespace log = nomadplugin::hclog;


// --- stage outputs -------------------------------------------------------------

struct DecodedTask {
  TaskConfig config;
  std::vector<std::string> sources;  // image_source(s); empty for image_path
  std::string netns;                 // empty: the host's network namespace
};

// The image the VM boots: the job's image_path, or the task's overlay on a
// downloaded image. `scope` is what the image's chain may pull in.
struct AdmittedImage {
  std::string field;  // the task config field it came from
  AdmissionScope scope;
};

// The open-disks stage's output: where the boot chain, each drive's chain,
// the kernel and initrd, the firmware and the shared directories went among
// the files QEMU gets (the start's FdTable holds them).
using OpenDisks = QemuFiles;

// Adds a chain's files to `fds`; its nodes, top first.
std::vector<DiskNode> AddChain(std::vector<DiskLayer> layers, FdTable& fds) {
  std::vector<DiskNode> nodes;
  for (DiskLayer& layer : layers) nodes.push_back(DiskNode{layer.format, !layer.writable, fds.Add(std::move(layer.fd))});
  return nodes;
}

// The VM's place on the host: state directory, sockets, cgroup, user.
struct HostPlace {
  // Sockets, options and limits filled in; pids come later, and what the VM
  // owns (state dir, cgroup, ...) only from the resource list (KeepResourcesIn).
  DriverStateRecord record;
  std::string state_dir;  // <state_root>/<task key>
  TaskCgroup cgroup;      // version kNone: none was made
  UniqueFd state_fd;
  std::string run_dir;
  std::string qemu_user;
  CgroupLimits limits;
  std::string tpm_state_dir;  // with tpm: swtpm's state, in the task dir
  std::string tpm_socket;     // with tpm: swtpm's control socket, in run/
};

struct Supervisor {
  pid_t pid = -1;
  uint64_t start_ticks = 0;
  UniqueFd pidfd;
  absl::Time started_at;
};

struct Qemu {
  pid_t pid = -1;
  uint64_t start_ticks = 0;
  UniqueFd pidfd;
  std::unique_ptr<QmpClient> qmp;
};

// network_mode = "bridge": the TAP made for the VM, already among the fds
// QEMU gets.
struct AttachedNic {
  std::string tap_name;  // empty: QEMU's user network
  int tap_fd = -1;       // its number in QEMU's process
};


// --- decode ----------------------------------------------------------------------

// The network namespace the task must run in (Nomad's group network, e.g.
// bridge mode); empty for the host's.
absl::StatusOr<std::string> TaskNetns(const TaskRequest& task) {
  const std::string& path = task.netns_path;
  if (path.empty()) return std::string();
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) {
    return absl::InvalidArgumentError(
        absl::StrCat("task network namespace \"", path, "\" cannot be opened: ", std::strerror(errno)));
  }
  if (::ioctl(fd.get(), NS_GET_NSTYPE) != CLONE_NEWNET) {
    return absl::InvalidArgumentError(absl::StrCat("task network namespace \"", path, "\" is not a network namespace"));
  }
  return path;
}

absl::StatusOr<DecodedTask> Decode(const TaskRequest& task, const PluginConfig& plugin) {
  // Strict: Nomad encodes the job's block against our own schema, so every
  // key it sends is one we know; anything else did not come through Nomad's
  // HCL (e.g. a hand-made option naming a host path to share) and is refused.
  absl::StatusOr<TaskConfig> config = DecodeTaskConfig(task.driver_config, /*reject_unknown=*/true);
  if (!config.ok()) return config.status();
  absl::StatusOr<std::vector<std::string>> sources = ImageSources(*config, plugin);
  if (!sources.ok()) return sources.status();
  absl::StatusOr<std::string> netns = TaskNetns(task);
  if (!netns.ok()) return netns.status();
  return DecodedTask{*std::move(config), *std::move(sources), *std::move(netns)};
}

// --- admit image -------------------------------------------------------------------

// A downloaded image becomes a per-task overlay backed by the cached copy
// (leased for the task). A local source (a path or file://, also for
// checksum_url) passes the same admission as image_path before a byte of it
// is read.
absl::StatusOr<AdmittedImage> AdmitImage(const TaskRequest& task, const DecodedTask& decoded,
                                         const PluginConfig& plugin, const StartDeps& deps, VmResources& owned,
                                         Rollback& rollback) {
  const std::string task_dir = task.task_dir();
  AdmittedImage image{"image_path", AdmissionScope{task_dir, task.alloc_dir, plugin.image_paths}};
  if (decoded.sources.empty()) return image;
  const std::string lease = TaskKey(task.identity.id);
  absl::StatusOr<TaskDisk> disk = PrepareTaskDisk(decoded.config, decoded.sources, task_dir, plugin, *deps.cache,
                                                  deps.emit, AdmittingOpener(image.scope), deps.cancelled, lease);
  if (!disk.ok()) return disk.status();
  owned.leases.push_back(disk->cached_image);
  rollback.Push([overlay = disk->overlay] { ::unlink(overlay.c_str()); });
  image.field = "image_source";  // its overlay is the path planning gave the boot disk
  // The overlay's backing file is that one cached image, nothing else there.
  image.scope.allowed_dirs.push_back(disk->cached_image);
  return image;
}

// --- prepare media --------------------------------------------------------------------

absl::StatusOr<MediaFiles> PrepareMediaFor(const TaskRequest& task, const DecodedTask& decoded,
                                           const PluginConfig& plugin, const VmSpec& spec, const AdmittedImage& image,
                                           const StartDeps& deps, VmResources& owned, Rollback& rollback) {
  const MediaContext context{task,      decoded.config, plugin, image.scope, deps.cache, deps.emit, deps.cancelled,
                             TaskKey(task.identity.id), &owned};
  return PrepareMedia(spec, context, rollback);
}

// --- open disks ----------------------------------------------------------------------

// A file and every file its chain pulls in, admitted and opened.
absl::StatusOr<std::vector<DiskLayer>> OpenChain(const std::string& field, const std::string& path,
                                                 const std::string& format, bool read_only,
                                                 const AdmissionScope& scope) {
  absl::StatusOr<AdmittedFile> top =
      AdmitFile(field, path, scope, read_only ? FileAccess::kReadOnly : FileAccess::kReadWriteIfPossible);
  if (!top.ok()) return top.status();
  return OpenImageChain(*std::move(top), format, field, scope);
}

// A file QEMU reads by name (kernel, initrd), admitted; "" stays unset.
absl::StatusOr<int> PassFile(const std::string& field, const std::string& path, const AdmissionScope& scope,
                             FdTable& fds) {
  if (path.empty()) return -1;
  absl::StatusOr<AdmittedFile> file = AdmitFile(field, path, scope, FileAccess::kReadOnly);
  if (!file.ok()) return file.status();
  return fds.Add(std::move(file->fd));
}

// The firmware: the host's code read-only, the task's variable store read-write.
absl::Status OpenFirmware(const VmSpec& spec, const MediaFiles& media, const AdmissionScope& task_only,
                          OpenDisks& disks, FdTable& fds) {
  if (!spec.firmware.uefi) return absl::OkStatus();
  UniqueFd code(::open(spec.firmware.files.code.c_str(), O_RDONLY | O_CLOEXEC));
  if (!code.valid()) return ErrnoNow("cannot open the UEFI firmware " + spec.firmware.files.code);
  absl::StatusOr<AdmittedFile> vars = AdmitFile("firmware", media.uefi_vars, task_only, FileAccess::kReadWriteIfPossible);
  if (!vars.ok()) return vars.status();
  if (!vars->writable) return ConfigError("the task's UEFI variable store is not writable");
  disks.firmware_code = fds.Add(std::move(code));
  disks.firmware_vars = fds.Add(std::move(vars->fd));
  return absl::OkStatus();
}

// The images, every file their chains pull in, the kernel and the firmware
// are admitted and opened here; QEMU gets the open files, never the paths.
absl::StatusOr<OpenDisks> OpenDisksFor(const VmSpec& spec, const AdmittedImage& image, const MediaFiles& media,
                                       FdTable& fds) {
  OpenDisks disks;
  AdmissionScope scope = image.scope;
  // The cached images this task leased are drive files too (read-only).
  scope.allowed_dirs.insert(scope.allowed_dirs.end(), media.cached_images.begin(), media.cached_images.end());
  if (!spec.image_path.empty()) {
    absl::StatusOr<std::vector<DiskLayer>> boot = OpenChain(image.field, spec.image_path, spec.image_format, false, scope);
    if (!boot.ok()) return boot.status();
    disks.boot = AddChain(*std::move(boot), fds);
  }
  for (size_t i = 0; i < spec.drives.size(); ++i) {
    const Drive& drive = spec.drives[i];
    absl::StatusOr<std::vector<DiskLayer>> chain =
        OpenChain(drive.source.field, media.drives[i].path, media.drives[i].format, drive.read_only, scope);
    if (!chain.ok()) return chain.status();
    disks.drives.push_back(AddChain(*std::move(chain), fds));
  }
  absl::StatusOr<int> kernel = PassFile("kernel", spec.kernel.kernel, scope, fds);
  if (!kernel.ok()) return kernel.status();
  disks.kernel = *kernel;
  absl::StatusOr<int> initrd = PassFile("initrd", spec.kernel.initrd, scope, fds);
  if (!initrd.ok()) return initrd.status();
  disks.initrd = *initrd;
  const AdmissionScope task_only{scope.task_dir, scope.alloc_dir, {}};
  if (absl::Status fw = OpenFirmware(spec, media, task_only, disks, fds); !fw.ok()) return fw;
  absl::StatusOr<std::vector<UniqueFd>> shares = OpenShareDirs(spec.shares, image.scope.alloc_dir);
  if (!shares.ok()) return shares.status();
  for (UniqueFd& dir : *shares) disks.shares.push_back(fds.Add(std::move(dir)));
  if (!fds.Fits(0)) {
    return absl::InvalidArgumentError(absl::StrCat("task config: the VM's disks, their backing files, kernel, firmware "
                                                   "and shared directories come to ", fds.size(), " files; at most ",
                                                   supervisor::kMaxPassedFds, " can be passed to QEMU"));
  }
  return disks;
}

// --- prepare host ----------------------------------------------------------------------

// Memory: the job's memory_max is the whole process's cap when set; else the
// task's memory plus QEMU's own overhead, so a guest using all of its RAM is
// never killed for QEMU's bookkeeping. CPU shares and reserved cores as Nomad
// gave them.
CgroupLimits PlanCgroupLimits(const TaskRequest& task, const PluginConfig& plugin) {
  const TaskResources& resources = task.resources;
  CgroupLimits limits;
  constexpr int64_t kMiB = 1 << 20;
  if (resources.memory_max_mb > 0) {
    limits.memory_bytes = resources.memory_max_mb * kMiB;
    limits.memory_soft_bytes = std::min(limits.memory_bytes, resources.memory_mb * kMiB + plugin.memory_overhead);
  } else if (resources.memory_mb > 0) {
    limits.memory_bytes = resources.memory_mb * kMiB + plugin.memory_overhead;
  }
  limits.cpu_shares = resources.cpu_shares;
  limits.cpuset = resources.cpuset_cpus;
  limits.pids_max = plugin.pids_limit;
  return limits;
}

// The VM's cgroup name: Nomad's own "<alloc>.<task>" on v1, so the cgroup
// Nomad made for the task is the one we fill; the task key otherwise.
std::string CgroupName(const TaskRequest& task) {
  const TaskIdentity& who = task.identity;
  const std::string name = absl::StrCat(who.alloc_id, ".", who.name);
  const bool plain = !who.alloc_id.empty() && !who.name.empty() && name.size() < 200 &&
                     std::all_of(name.begin(), name.end(), [](char c) { return c != '/' && c != '\n' && c != '\0'; });
  return plain ? name : TaskKey(who.id);
}

// QEMU's user: the task's, else the plugin's qemu_user; checked to exist.
absl::StatusOr<std::optional<passwd>> QemuUser(const TaskRequest& task, const PluginConfig& plugin,
                                               std::string* name) {
  *name = task.user.empty() ? plugin.qemu_user : task.user;
  if (name->empty()) return std::optional<passwd>();
  const passwd* pw = ::getpwnam(name->c_str());
  if (pw == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(task.user.empty() ? "plugin config \"qemu_user\"" : "task user",
                                                   " \"", *name, "\" does not exist"));
  }
  return std::optional<passwd>(*pw);
}

// The state directory is root's (0711: QEMU's user may pass, not list or
// write); QEMU's sockets go in run/, the one place its user may write.
absl::Status MakeStateDir(const std::string& root, const std::string& id, const std::optional<passwd>& user,
                          HostPlace& place, VmResources& owned) {
  if (::mkdir(root.c_str(), 0711) != 0 && errno != EEXIST) return ErrnoNow("cannot create " + root);
  const std::string& dir = place.state_dir;
  if (::mkdir(dir.c_str(), 0711) != 0) {
    if (errno == EEXIST) {
      return absl::AlreadyExistsError(absl::StrCat("task ", id, " already has a state directory ", dir, " (started twice?)"));
    }
    return ErrnoNow("cannot create " + dir);
  }
  owned.state_dir = dir;
  place.state_fd.reset(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!place.state_fd.valid()) return ErrnoNow("cannot open " + dir);
  if (::mkdirat(place.state_fd.get(), supervisor::kRunDir, 0700) != 0) return ErrnoNow("cannot create " + place.run_dir);
  if (user && ::fchownat(place.state_fd.get(), supervisor::kRunDir, user->pw_uid, user->pw_gid, AT_SYMLINK_NOFOLLOW) != 0) {
    return ErrnoNow("cannot hand " + place.run_dir + " to user " + place.qemu_user);
  }
  return absl::OkStatus();
}

// swtpm keeps the TPM's state in the task dir, so it lasts as long as the
// alloc (like the UEFI variables); its user is QEMU's. The directory is made
// without following links and handed over through its open fd.
absl::Status MakeTpmStateDir(const std::string& task_dir, const std::optional<passwd>& user, HostPlace& place,
                             Rollback& rollback) {
  UniqueFd dir(::open(task_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir.valid()) return ErrnoNow("cannot open task dir " + task_dir);
  const std::string path = task_dir + "/" + kTpmStateDirName;
  // swtpm's own option syntax (dir=PATH,mode=...) cannot quote a comma.
  if (path.find(',') != std::string::npos || place.run_dir.find(',') != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("task config \"tpm\": the task's directory ", task_dir, " holds a comma, which swtpm cannot take"));
  }
  if (::mkdirat(dir.get(), kTpmStateDirName, 0700) == 0) {
    rollback.Push([path] { ::rmdir(path.c_str()); });  // only while still empty
  } else if (errno != EEXIST) {
    return ErrnoNow("cannot create " + path);
  }
  UniqueFd tpm(::openat(dir.get(), kTpmStateDirName, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!tpm.valid()) return RefusedError(absl::StrCat(path, " is not a directory the driver made"));
  if (user && ::fchown(tpm.get(), user->pw_uid, user->pw_gid) != 0) {
    return ErrnoNow("cannot hand " + path + " to user " + place.qemu_user);
  }
  place.tpm_state_dir = path;
  place.tpm_socket = place.run_dir + "/swtpm.sock";
  return absl::OkStatus();
}

absl::StatusOr<HostPlace> PrepareHost(const TaskRequest& task, const PluginConfig& plugin, const VmSpec& spec,
                                      const StartDeps& deps, VmResources& owned, Rollback& rollback) {
  HostPlace place;
  DriverStateRecord& record = place.record;
  place.state_dir = absl::StrCat(deps.state_root, "/", TaskKey(task.identity.id));
  place.run_dir = place.state_dir + "/" + supervisor::kRunDir;
  record.qmp_socket = place.run_dir + "/" + supervisor::kQmpSocket;
  record.guest_agent = spec.guest_agent;
  record.graceful_shutdown = spec.graceful_shutdown;
  if (spec.guest_agent) record.guest_agent_socket = place.run_dir + "/" + supervisor::kGuestAgentSocket;
  if (record.qmp_socket.size() >= 100) {
    return ConfigError(absl::StrCat("state_dir \"", deps.state_root, "\" is too long: QMP socket path ",
                                    record.qmp_socket, " exceeds the unix socket limit"));
  }
  absl::StatusOr<std::optional<passwd>> user = QemuUser(task, plugin, &place.qemu_user);
  if (!user.ok()) return user.status();
  if (absl::Status made = MakeStateDir(deps.state_root, task.identity.id, *user, place, owned); !made.ok()) return made;
  if (spec.tpm) {
    if (absl::Status made = MakeTpmStateDir(task.task_dir(), *user, place, rollback); !made.ok()) return made;
  }
  record.alloc_dir = task.alloc_dir;  // screenshots go to its alloc/logs
  if (spec.console.enabled) {
    std::optional<std::pair<uid_t, gid_t>> owner;
    if (*user) owner = std::make_pair((*user)->pw_uid, (*user)->pw_gid);
    Rollback console;  // removes what it made if it fails part-way
    if (absl::Status made = MakeConsoleDir(spec.console, owner, console); !made.ok()) return made;
    console.Commit();
    owned.console_dir = spec.console.dir;
  }

  place.limits = PlanCgroupLimits(task, plugin);
  absl::StatusOr<std::optional<TaskCgroup>> cgroup = deps.host->CreateCgroup(
      plugin.cgroup_parent, CgroupName(task), task.resources.cpuset_cgroup, place.limits);
  if (!cgroup.ok()) return cgroup.status();
  if (*cgroup) {
    owned.cgroup = place.cgroup = **cgroup;
    record.memory_limit_bytes = place.limits.memory_bytes;
  }
  return place;
}

// --- warm start -------------------------------------------------------------------------

// What a pooled QEMU cannot take on at handover: a network namespace (QEMU
// would have to have been started in it), console sockets, a kernel and
// initrd passed by name.
bool PoolableTask(const TaskRequest& task, const VmSpec& spec) {
  return task.netns_path.empty() && !spec.console.enabled && spec.kernel.kernel.empty() && !spec.network.enabled;
}

absl::StatusOr<WarmStart> PrepareWarm(const TaskRequest& task, const VmSpec& spec, const OpenDisks& disks,
                                      FdTable& fds, const HostPlace& place, const HostCapabilities& host,
                                      const StartDeps& deps, VmResources& owned, Rollback& rollback) {
  if (!spec.warm.enabled) return WarmStart{};
  const auto version = host.versions.find(spec.emulator);
  const WarmContext context{task,
                            spec,
                            disks.boot,
                            version == host.versions.end() ? "" : version->second,
                            place.qemu_user,
                            deps.cache,
                            TaskKey(task.identity.id),
                            deps.emit,
                            [&fds](UniqueFd fd) { return fds.Add(std::move(fd)); },
                            [&fds](int in_qemu) { return fds.Local(in_qemu); },
                            owned,
                            deps.pool,
                            deps.supervisor_path,
                            PoolableTask(task, spec)};
  absl::StatusOr<WarmStart> warm = PrepareWarmStart(context, rollback);
  if (warm.ok() && !fds.Fits(0)) {
    return absl::InvalidArgumentError(absl::StrCat("task config \"warm_start\": the VM's files come to ", fds.size(),
                                                   "; at most ", supervisor::kMaxPassedFds, " can be passed to QEMU"));
  }
  return warm;
}

// --- attach network ---------------------------------------------------------------------

// A TAP named after the task, attached to the allowed bridge; its fd joins
// the files QEMU gets. The TAP is not persistent: once the fds here and in
// the supervisor are closed, QEMU's is the only one and the TAP ends with
// QEMU. The undo only removes a leftover (closing the fd already does).
absl::StatusOr<AttachedNic> AttachNetwork(const TaskRequest& task, const VmSpec& spec, FdTable& fds,
                                          const StartDeps& deps, VmResources& owned) {
  if (!spec.network.enabled) return AttachedNic{};
  if (!fds.Fits(1)) {
    return absl::InvalidArgumentError(absl::StrCat("task config: the VM's disks and files leave no room for the "
                                                   "bridge's TAP among the ", supervisor::kMaxPassedFds,
                                                   " files QEMU can be given"));
  }
  const std::string name = TapName(TaskKey(task.identity.id));
  absl::StatusOr<UniqueFd> tap = CreateBridgedTap(name, spec.network.bridge);
  if (!tap.ok()) {
    return absl::Status(tap.status().code(), absl::StrCat("network_mode = \"bridge\": ", tap.status().message()));
  }
  owned.tap = name;  // its fd closing removes it; Release removes a leftover
  AttachedNic nic{name, fds.Add(*std::move(tap))};
  deps.emit(absl::StrCat("NIC ", spec.mac_address, " attached to bridge ", spec.network.bridge, " through TAP ", name),
            {{"bridge", spec.network.bridge}, {"tap", name}, {"mac", spec.mac_address}});
  return nic;
}

// Whether QEMU's user may open every shared directory (qemu/share_plan.h).
absl::Status SharesReadable(const VmSpec& spec, const OpenDisks& disks, const FdTable& fds, const HostPlace& place) {
  std::vector<int> dirs;
  for (int passed : disks.shares) dirs.push_back(fds.Local(passed));
  return CheckSharesReadable(spec.shares, dirs, place.qemu_user);
}

// --- launch ---------------------------------------------------------------------------

// What QEMU gets, from the stages that opened it: the disks as opened, or
// the warm start's chain in their place, and the TAP.
QemuFiles FilesFor(const OpenDisks& disks, const WarmStart& warm, const AttachedNic& nic) {
  QemuFiles files = disks;
  if (warm.mode != WarmMode::kOff) files.boot = warm.boot;
  files.warm_mode = warm.mode;
  files.warm_memory = warm.memory_fd;
  files.warm_state = warm.state_fd;
  files.tap = nic.tap_fd;
  return files;
}

UniqueFd DupFd(const UniqueFd& fd) { return UniqueFd(::fcntl(fd.get(), F_DUPFD_CLOEXEC, 0)); }

// warm_pool: the pooled QEMU's supervisor becomes the task's (its slot dir
// the task's state dir). Its rollback is the warm start stage's Discard.
absl::StatusOr<Supervisor> TakePooledSupervisor(PooledVm& pooled, const HostPlace& place) {
  if (absl::Status moved = MoveSlotInto(pooled, place.state_dir); !moved.ok()) return moved;
  Supervisor supervisor;
  supervisor.started_at = absl::Now();
  supervisor.pid = pooled.supervisor_pid;
  supervisor.start_ticks = pooled.supervisor_start_ticks;
  supervisor.pidfd = DupFd(pooled.supervisor_pidfd);
  if (!supervisor.pidfd.valid()) return ErrnoNow("cannot keep the pooled VM's supervisor pidfd");
  return supervisor;
}

// warm_pool: the pooled QEMU, its QMP session already open (the guest paused).
absl::StatusOr<Qemu> TakePooledQemu(PooledVm& pooled) {
  Qemu qemu;
  qemu.pid = pooled.qemu_pid;
  qemu.start_ticks = pooled.qemu_start_ticks;
  qemu.pidfd = DupFd(pooled.qemu_pidfd);
  if (!qemu.pidfd.valid() || !pooled.qmp) return absl::UnavailableError("the pooled QEMU has no QMP session");
  if (PidfdExited(qemu.pidfd.get())) return absl::UnavailableError("the pooled QEMU exited before its handover");
  qemu.qmp = std::move(pooled.qmp);
  return qemu;
}

// warm_pool: the task's overlay, forwards, cgroup and log paths attached to
// the pooled QEMU, then the guest resumed.
absl::Status AttachPooled(const TaskRequest& task, const VmSpec& spec, const WarmStart& warm, const HostPlace& place,
                          Qemu& qemu, const StartDeps& deps) {
  const absl::Time started = absl::Now();
  TaskParts parts;
  parts.overlay_fd = warm.task_overlay.get();
  parts.forwards = spec.port_forwards;
  parts.cgroup_procs = place.cgroup.ProcsFiles();
  parts.stdout_path = task.stdout_path;
  parts.stderr_path = task.stderr_path;
  if (absl::Status attached = AttachTaskParts(*qemu.qmp, *warm.pooled, place.state_dir, parts); !attached.ok()) {
    return WithKind(absl::UnavailableError(absl::StrCat("task config \"warm_start\": handing a pooled QEMU to the task failed: ",
                                                        attached.message())),
                    ErrorKind::kQemuFailed);
  }
  const absl::Duration took = absl::Now() - started;
  deps.emit(absl::StrCat("Warm start: restored from template ", warm.key.substr(0, 12), " in ",
                         absl::FormatDuration(absl::Trunc(took, absl::Milliseconds(1))), " (a pooled QEMU)"),
            {{"warm_start", "restored"},
             {"warm_template", warm.key},
             {"warm_pool", "taken"},
             {"warm_restore_ms", std::to_string(absl::ToInt64Milliseconds(took))}});
  return absl::OkStatus();
}

absl::StatusOr<Supervisor> Launch(const TaskRequest& task, const VmSpec& spec, const QemuFiles& files, FdTable& fds,
                                  const HostPlace& place, const std::string& netns, const std::string& swtpm,
                                  const StartDeps& deps, Rollback& rollback) {
  const DriverStateRecord& record = place.record;
  const std::vector<std::string> qemu_argv =
      BuildQemuArgv(spec, files, RuntimePaths{record.qmp_socket, record.guest_agent_socket, place.tpm_socket});
  supervisor::Placement placement{place.cgroup.ProcsFiles(), netns, static_cast<int>(fds.size())};
  if (spec.tpm) {
    placement.swtpm_path = swtpm;
    placement.swtpm_state_dir = place.tpm_state_dir;
    placement.swtpm_socket = place.tpm_socket;
  }
  const std::vector<std::string> argv = supervisor::SupervisorArgv(
      deps.supervisor_path, place.state_dir, task.stdout_path.empty() ? "/dev/null" : task.stdout_path,
      task.stderr_path.empty() ? "/dev/null" : task.stderr_path, place.qemu_user, qemu_argv, placement);
  log::Debug("starting VM", {{"task_id", task.identity.id}, {"argv", qemu_argv}});

  Supervisor supervisor;
  supervisor.started_at = absl::Now();
  absl::StatusOr<pid_t> pid = deps.host->SpawnSupervisor(argv, place.state_fd.get(), fds.Locals());
  if (!pid.ok()) return pid.status();
  fds.Close();  // QEMU holds them now; ours would only keep the files open
  supervisor.pid = *pid;
  rollback.Push([host = deps.host, pid = *pid] { host->KillSupervisor(pid); });
  supervisor.start_ticks = ProcessStartTicks(*pid).value_or(0);
  absl::StatusOr<int> pidfd = OpenVerifiedPidfd(*pid, 0);
  if (!pidfd.ok()) return pidfd.status();
  supervisor.pidfd.reset(*pidfd);
  return supervisor;
}

// --- await QMP --------------------------------------------------------------------------

// Where a stage's time goes, phase by phase, in one debug line at its end:
// each mark is the time since `since` (the supervisor's launch).
class PhaseTrace {
 public:
  PhaseTrace(const char* stage, absl::Time since) : stage_(stage), since_(since) {}
  ~PhaseTrace() { log::Debug("start stage phases", {{"stage", stage_}, {"ms_since_launch", marks_}}); }
  void Mark(const std::string& phase) {
    marks_.push_back({phase, absl::ToDoubleMilliseconds(absl::Now() - since_)});
  }

 private:
  const char* stage_;
  absl::Time since_;
  nlohmann::json marks_ = nlohmann::json::array();  // [phase, ms] in order
};

bool GaveUp(const StartDeps& deps) { return deps.cancelled && deps.cancelled(); }

// Why QEMU did not come up: its exit record when the supervisor is gone,
// else the QMP wait's own error.
absl::Status NoQmp(const HostPlace& place, Supervisor& supervisor, const absl::Status& socket,
                   absl::Duration timeout) {
  // QEMU closing the socket means it is on its way out: give the supervisor a
  // moment to record why, so the error carries QEMU's own words.
  if (!absl::IsDeadlineExceeded(socket)) {
    pollfd exited = {supervisor.pidfd.get(), POLLIN, 0};
    ::poll(&exited, 1, static_cast<int>(absl::ToInt64Milliseconds(timeouts::kKillWait)));
  }
  if (PidfdExited(supervisor.pidfd.get())) {
    ::waitpid(supervisor.pid, nullptr, 0);
    const ExitResult exit = FinalExit(place.state_dir, place.cgroup, place.limits.memory_bytes);
    return WithKind(absl::FailedPreconditionError(absl::StrCat(
                        "QEMU failed to start: ", exit.error.empty() ? "it exited at once with code 0" : exit.error)),
                    ErrorKind::kQemuFailed);
  }
  return absl::DeadlineExceededError(absl::StrCat("QEMU did not answer on its QMP socket within ",
                                                  absl::FormatDuration(timeout), " (", socket.message(), ")"));
}

// QEMU is up once its QMP socket answers; a supervisor that exits first
// means QEMU failed to start, and its record says why. Waited in slices so
// a caller that gives up is noticed.
absl::StatusOr<std::unique_ptr<QmpClient>> ConnectQmp(const HostPlace& place, Supervisor& supervisor,
                                                      const StartDeps& deps, PhaseTrace& trace) {
  const absl::Time deadline = absl::Now() + deps.qmp_timeout;
  absl::Status socket = absl::DeadlineExceededError("no QMP socket yet");
  while (!GaveUp(deps) && absl::Now() < deadline) {
    socket = WaitForPathOrExit(place.run_dir, supervisor::kQmpSocket, supervisor.pidfd.get(),
                               std::min(deadline, absl::Now() + timeouts::kCancelCheck));
    if (socket.code() != absl::StatusCode::kDeadlineExceeded) break;
  }
  trace.Mark("QMP socket there");
  if (GaveUp(deps)) return StartCancelled();
  if (socket.ok()) {
    // The socket exists from bind(); Connect retries the instant until listen().
    absl::StatusOr<std::unique_ptr<QmpClient>> client =
        QmpClient::Connect(place.record.qmp_socket, std::max(deadline - absl::Now(), absl::Seconds(1)));
    if (client.ok()) return client;
    socket = client.status();
  }
  return NoQmp(place, supervisor, socket, deps.qmp_timeout);
}

// The supervisor records the pid right after exec succeeds, but a loaded
// machine may run QEMU up to its QMP socket before the supervisor runs again.
absl::StatusOr<Qemu> AwaitQmp(const HostPlace& place, Supervisor& supervisor, const StartDeps& deps) {
  Qemu qemu;
  PhaseTrace trace("await QMP", supervisor.started_at);
  absl::StatusOr<std::unique_ptr<QmpClient>> qmp = ConnectQmp(place, supervisor, deps, trace);
  if (!qmp.ok()) return qmp.status();
  qemu.qmp = *std::move(qmp);
  trace.Mark("QMP handshake done");
  absl::StatusOr<QemuProcess> process =
      FindSupervisedQemu(place.state_dir, supervisor.pidfd.get(), absl::Now() + timeouts::kPidFileWait);
  if (!process.ok()) {
    return absl::InternalError(
        absl::StrCat("QEMU answered on QMP but its pid could not be read: ", process.status().message()));
  }
  qemu.pid = process->pid;
  qemu.start_ticks = process->start_ticks;
  qemu.pidfd = std::move(process->pidfd);
  // Connected before the pid was known: check now that QEMU itself answered.
  // (No query-status: the handshake already proved QEMU answers commands.)
  if (absl::Status served = qemu.qmp->CheckServedBy(qemu.pid); !served.ok()) return served;
  trace.Mark("pid verified");
  return qemu;
}

// --- await address ------------------------------------------------------------------------

// advertise_address: the guest's IPv4 address on the bridged NIC, from its
// guest agent, within advertise_timeout; returned to Nomad as the driver
// network (port_map's labels name guest ports there).
absl::StatusOr<AdvertisedNetwork> AwaitAddress(const VmSpec& spec, const HostPlace& place, const Qemu& qemu,
                                               const StartDeps& deps) {
  AdvertisedNetwork network;
  if (!spec.network.advertise_address) return network;
  const absl::Duration timeout = absl::Milliseconds(spec.network.advertise_timeout_ms);
  const absl::Time started = absl::Now();
  absl::StatusOr<std::string> ip = AwaitGuestAddress(GuestAddressWait{
      place.record.guest_agent_socket, qemu.pid, qemu.pidfd.get(), spec.mac_address, started + timeout, deps.cancelled});
  if (!ip.ok()) return ip.status();
  network.ip = *ip;
  network.port_map = spec.network.guest_ports;
  deps.emit(absl::StrCat("Guest address ", network.ip, " on bridge ", spec.network.bridge,
                         " (advertised to Nomad as the driver network)"),
            {{"address", network.ip},
             {"bridge", spec.network.bridge},
             {"mac", spec.mac_address},
             {"wait_ms", std::to_string(absl::ToInt64Milliseconds(absl::Now() - started))}});
  return network;
}

// --- the runner ----------------------------------------------------------------------------

// Runs one stage: the test hook and the caller's cancellation first; a
// stage that fails after the caller gave up reports the cancellation. Every
// error leaves tagged with the stage's name (StageOf).
template <typename Stage>
auto RunStage(StartStage stage, const StartDeps& deps, Stage&& run) -> decltype(run()) {
  const char* name = StartStageName(stage);
  if (deps.before_stage) {
    if (absl::Status injected = deps.before_stage(stage); !injected.ok()) return WithStage(injected, name);
  }
  if (GaveUp(deps)) return WithStage(StartCancelled(), name);
  const absl::Time started = absl::Now();
  auto result = run();
  log::Debug("start stage done", {{"stage", name}, {"ms", absl::ToDoubleMilliseconds(absl::Now() - started)}});
  if (!result.ok()) {
    if (GaveUp(deps)) return WithStage(StartCancelled(), name);
    log::Debug("start stage failed", {{"stage", name}, {"error", std::string(result.status().message())}});
    return WithStage(result.status(), name);
  }
  return result;
}

}  // namespace

const char* StartStageName(StartStage stage) {
  switch (stage) {
    case StartStage::kDecode: return "decode";
    case StartStage::kAdmitImage: return "admit image";
    case StartStage::kPlanVm: return "plan VM";
    case StartStage::kPrepareMedia: return "prepare media";
    case StartStage::kOpenDisks: return "open disks";
    case StartStage::kPrepareHost: return "prepare host";
    case StartStage::kWarmStart: return "warm start";
    case StartStage::kAttachNetwork: return "attach network";
    case StartStage::kLaunch: return "launch supervisor";
    case StartStage::kAwaitQmp: return "await QMP";
    case StartStage::kRestoreState: return "restore state";
    case StartStage::kAwaitAddress: return "await address";
  }
  return "?";
}

std::string TaskKey(const std::string& id) {
  uint64_t hash = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : id) {
    hash ^= c;
    hash *= 1099511628211ull;
  }
  return absl::StrFormat("%016x", hash);
}

ExitResult FinalExit(const std::string& state_dir, const TaskCgroup& cgroup, int64_t memory_limit_bytes) {
  ExitResult result = LoadExitResult(state_dir);
  // A SIGKILL with the cgroup's OOM counter up: the memory limit ended the VM.
  if (result.signal == SIGKILL && CgroupOomKills(cgroup) > 0) {
    result.oom_killed = true;
    result.error = absl::StrCat("QEMU was killed by the kernel's OOM killer: the VM reached its cgroup memory limit of ",
                                memory_limit_bytes >> 20, " MiB");
  }
  return result;
}

absl::Status StartCancelled() {
  return absl::CancelledError("StartTask was cancelled (the caller gave up or the plugin is shutting down)");
}

// The started VM, from the stages' outputs: what DestroyTask and recovery need.
LaunchedVm Assemble(VmSpec spec, DecodedTask decoded, HostPlace place, WarmStart warm, Supervisor supervisor, Qemu qemu,
                    bool restored, AdvertisedNetwork network, const VmResources& owned) {
  LaunchedVm vm;
  vm.record = std::move(place.record);
  vm.record.started_at = supervisor.started_at;
  vm.record.supervisor_pid = supervisor.pid;
  vm.record.supervisor_start_ticks = supervisor.start_ticks;
  vm.record.qemu_pid = qemu.pid;
  vm.record.qemu_start_ticks = qemu.start_ticks;
  KeepResourcesIn(owned, vm.record);  // released by DestroyTask from here on
  vm.record.network = std::move(network);
  if (warm.mode != WarmMode::kOff) {
    vm.record.warm_start = restored ? "restored" : "cold";
    vm.record.warm_template = warm.key;
  }
  vm.warm_capture = std::move(warm.capture);
  vm.supervisor_pidfd = std::move(supervisor.pidfd);
  vm.qemu_pidfd = std::move(qemu.pidfd);
  vm.qmp = std::move(qemu.qmp);
  vm.spec = std::move(spec);
  vm.limits = place.limits;
  vm.netns = decoded.netns;
  return vm;
}

absl::StatusOr<LaunchedVm> RunStartPipeline(const TaskRequest& task, const PluginConfig& plugin,
                                            const StartDeps& deps, Rollback& rollback) {
  // What the VM will own, as the stages make it; released as one if the start fails.
  auto owned = std::make_shared<VmResources>();
  rollback.Push([owned, host = deps.host, cache = deps.cache, lease = TaskKey(task.identity.id)] {
    Release(*owned, *host, *cache, lease);
  });
  FdTable fds;  // every file QEMU gets; each stage adds its own
  absl::StatusOr<DecodedTask> decoded = RunStage(StartStage::kDecode, deps, [&] { return Decode(task, plugin); });
  if (!decoded.ok()) return decoded.status();
  HostCapabilities host;
  absl::StatusOr<VmSpec> spec = RunStage(StartStage::kPlanVm, deps, [&] {
    host = deps.capabilities(EmulatorName(decoded->config));
    return PlanVm(decoded->config, task, plugin, host);
  });
  if (!spec.ok()) return spec.status();
  absl::StatusOr<AdmittedImage> image = RunStage(StartStage::kAdmitImage, deps, [&] {
    return AdmitImage(task, *decoded, plugin, deps, *owned, rollback);
  });
  if (!image.ok()) return image.status();
  absl::StatusOr<MediaFiles> media = RunStage(StartStage::kPrepareMedia, deps, [&] {
    return PrepareMediaFor(task, *decoded, plugin, *spec, *image, deps, *owned, rollback);
  });
  if (!media.ok()) return media.status();
  absl::StatusOr<OpenDisks> disks =
      RunStage(StartStage::kOpenDisks, deps, [&] { return OpenDisksFor(*spec, *image, *media, fds); });
  if (!disks.ok()) return disks.status();
  absl::StatusOr<HostPlace> place = RunStage(StartStage::kPrepareHost, deps, [&] {
    return PrepareHost(task, plugin, *spec, deps, *owned, rollback);
  });
  if (!place.ok()) return place.status();
  if (absl::Status shares = SharesReadable(*spec, *disks, fds, *place); !shares.ok()) {
    return WithStage(shares, StartStageName(StartStage::kPrepareHost));
  }
  absl::StatusOr<WarmStart> warm = RunStage(StartStage::kWarmStart, deps, [&] {
    return PrepareWarm(task, *spec, *disks, fds, *place, host, deps, *owned, rollback);
  });
  if (!warm.ok()) return warm.status();
  absl::StatusOr<AttachedNic> nic = RunStage(StartStage::kAttachNetwork, deps, [&] {
    return AttachNetwork(task, *spec, fds, deps, *owned);
  });
  if (!nic.ok()) return nic.status();
  PooledVm* const pooled = warm->pooled.get();
  absl::StatusOr<Supervisor> supervisor = RunStage(StartStage::kLaunch, deps, [&] {
    if (pooled != nullptr) return TakePooledSupervisor(*pooled, *place);
    return Launch(task, *spec, FilesFor(*disks, *warm, *nic), fds, *place, decoded->netns, host.swtpm, deps, rollback);
  });
  if (!supervisor.ok()) return supervisor.status();
  absl::StatusOr<Qemu> qemu = RunStage(StartStage::kAwaitQmp, deps, [&] {
    if (pooled != nullptr) return TakePooledQemu(*pooled);
    return AwaitQmp(*place, *supervisor, deps);
  });
  if (!qemu.ok()) return qemu.status();
  absl::StatusOr<bool> restored = RunStage(StartStage::kRestoreState, deps, [&]() -> absl::StatusOr<bool> {
    absl::Status loaded = pooled != nullptr ? AttachPooled(task, *spec, *warm, *place, *qemu, deps)
                                            : RestoreState(*qemu->qmp, *warm, deps.cache->dir(), deps.emit);
    if (!loaded.ok()) return loaded;
    return warm->mode == WarmMode::kRestore;
  });
  if (!restored.ok()) return restored.status();
  absl::StatusOr<AdvertisedNetwork> network =
      RunStage(StartStage::kAwaitAddress, deps, [&] { return AwaitAddress(*spec, *place, *qemu, deps); });
  if (!network.ok()) return network.status();

  return Assemble(*std::move(spec), *std::move(decoded), *std::move(place), *std::move(warm), *std::move(supervisor),
                  *std::move(qemu), *restored, *std::move(network), *owned);
}

}  // namespace ndq
