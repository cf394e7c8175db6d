#include "vm/warm_start.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <pwd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "base/error_kind.h"
#include "base/timeouts.h"
#include "image/checksum.h"
#include "image/image_probe.h"
#include "image/task_disk.h"
#include "nomadplugin/hclog.h"
#include "qemu/cmdline.h"
#include "qemu/control_socket.h"
#include "vm/warm_pool.h"

namespace ndq {
namespace {

namespace log = nomadplugin::hclog;


constexpr char kStateFdName[] = "warm-state";

std::string Short(const std::string& key) { return key.substr(0, 12); }

std::string Millis(absl::Duration d) { return std::to_string(absl::ToInt64Milliseconds(d)); }

// The boot disk's size as the guest sees it (the overlay gets the same).
absl::StatusOr<int64_t> BootDiskSize(int fd, const std::string& format) {
  if (format != "qcow2" && format != "raw") {
    return absl::InvalidArgumentError(
        absl::StrCat("task config \"warm_start\": the boot image is ", format, "; warm starts take qcow2 or raw images"));
  }
  absl::StatusOr<int64_t> size = ImageVirtualSize(fd, format);
  if (!size.ok()) return absl::InvalidArgumentError(absl::StrCat("task config \"warm_start\": ", size.status().message()));
  return size;
}

// A file of ours opened again read-only (a read-only node needs a read-only fd).
absl::StatusOr<UniqueFd> ReopenReadOnly(int fd) {
  UniqueFd ro(::open(absl::StrCat("/proc/self/fd/", fd).c_str(), O_RDONLY | O_CLOEXEC));
  if (!ro.valid()) return ErrnoNow("cannot reopen the boot image read-only");
  return ro;
}

// The planned boot chain, every layer read-only: the warm VM writes only to
// its own overlay on top.
absl::StatusOr<std::vector<DiskNode>> ReadOnlyBase(const WarmContext& c) {
  std::vector<DiskNode> base = c.boot;
  for (DiskNode& node : base) {
    if (node.read_only) continue;
    absl::StatusOr<UniqueFd> ro = ReopenReadOnly(c.local_fd(node.fd));
    if (!ro.ok()) return ro.status();
    node = DiskNode{node.format, true, c.pass(*std::move(ro))};
  }
  return base;
}

absl::StatusOr<TemplateIdentity> IdentityFor(const WarmContext& c) {
  TemplateIdentity id;
  const TaskIdentity& who = c.task.identity;
  id.owner = TemplateOwner{who.namespace_name, who.job_id, who.task_group, who.name};
  std::vector<std::string> digests;
  for (const DiskNode& node : c.boot) {
    absl::StatusOr<std::string> digest = ContentDigest(c.local_fd(node.fd));
    if (!digest.ok()) return digest.status();
    digests.push_back(*digest);
  }
  id.image_digest = absl::StrJoin(digests, "+");
  id.config_digest = WarmConfigDigest(c.spec, c.boot, c.qemu_user);
  id.qemu_version = c.qemu_version;
  id.machine = c.spec.machine_type;
  id.memory_mb = c.spec.memory_mb;
  return id;
}

std::optional<std::pair<uid_t, gid_t>> NonRootOwner(const std::string& user) {
  if (user.empty()) return std::nullopt;
  const passwd* pw = ::getpwnam(user.c_str());
  if (pw == nullptr || pw->pw_uid == 0) return std::nullopt;
  return std::make_pair(pw->pw_uid, pw->pw_gid);
}

}  // namespace

absl::StatusOr<UniqueFd> CopyOverlayInto(const std::string& from, const std::string& task_dir, const std::string& name) {
  UniqueFd in(::open(from.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
  if (!in.valid()) return ErrnoNow("cannot open " + from);
  UniqueFd dir(::open(task_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir.valid()) return ErrnoNow("cannot open task dir " + task_dir);
  ::unlinkat(dir.get(), name.c_str(), 0);
  UniqueFd out(::openat(dir.get(), name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (!out.valid()) return ErrnoNow(absl::StrCat("cannot create ", task_dir, "/", name));
  char buffer[1 << 16];
  for (;;) {
    const ssize_t n = ::read(in.get(), buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoNow("cannot read " + from);
    if (n == 0) break;
    if (::write(out.get(), buffer, static_cast<size_t>(n)) != n) return ErrnoNow(absl::StrCat("cannot write ", task_dir, "/", name));
  }
  return out;
}

namespace {

absl::StatusOr<WarmStart> Restore(const WarmContext& c, OpenedTemplate opened, std::vector<DiskNode> base,
                                  Rollback& rollback) {
  const std::string task_dir = c.task.task_dir();
  absl::StatusOr<UniqueFd> overlay =
      CopyOverlayInto(opened.dir + "/" + kTemplateOverlay, task_dir, kWarmDiskName);
  if (!overlay.ok()) return overlay.status();
  rollback.Push([path = task_dir + "/" + kWarmDiskName] { ::unlink(path.c_str()); });
  WarmStart warm;
  warm.mode = WarmMode::kRestore;
  warm.key = opened.key;
  warm.template_dir = opened.dir;
  warm.boot.push_back(DiskNode{"qcow2", false, c.pass(*std::move(overlay))});
  warm.boot.push_back(DiskNode{"qcow2", true, c.pass(std::move(opened.disk))});
  warm.boot.insert(warm.boot.end(), base.begin(), base.end());
  warm.memory_fd = c.pass(std::move(opened.ram));
  warm.state_fd = c.pass(std::move(opened.state));
  return warm;
}

// A pooled QEMU already runs the template: the task only needs its own
// overlay, attached at handover.
absl::StatusOr<WarmStart> FromPool(const WarmContext& c, const std::string& template_dir,
                                   std::shared_ptr<PooledVm> pooled, Rollback& rollback) {
  const std::string task_dir = c.task.task_dir();
  absl::StatusOr<UniqueFd> overlay = CopyOverlayInto(template_dir + "/" + kTemplateOverlay, task_dir, kWarmDiskName);
  if (!overlay.ok()) {
    c.pool->Discard(*pooled);
    return overlay.status();
  }
  rollback.Push([path = task_dir + "/" + kWarmDiskName] { ::unlink(path.c_str()); });
  // Until the VM is registered, a failed start removes the pooled QEMU (after
  // the handover's first step, its directory is the task's state dir).
  rollback.Push([pool = c.pool, pooled] { pool->Discard(*pooled); });
  WarmStart warm;
  warm.mode = WarmMode::kRestore;
  warm.key = pooled->key;
  warm.template_dir = template_dir;
  warm.pooled = std::move(pooled);
  warm.task_overlay = *std::move(overlay);
  return warm;
}

// What the pool starts this template's QEMUs from: the image's layers as
// this start opened them (read-only), kept open by the recipe.
absl::StatusOr<std::shared_ptr<PoolRecipe>> RecipeFor(const WarmContext& c, const TemplateIdentity& id,
                                                      const std::vector<DiskNode>& base) {
  auto recipe = std::make_shared<PoolRecipe>();
  recipe->identity = id;
  recipe->key = id.Key();
  recipe->cache_dir = c.cache->dir();
  recipe->spec = PoolSpec(c.spec);
  for (const DiskNode& node : base) {
    auto fd = std::make_shared<UniqueFd>(::fcntl(c.local_fd(node.fd), F_DUPFD_CLOEXEC, 0));
    if (!fd->valid()) return ErrnoNow("cannot keep an image layer open for the warm pool");
    recipe->base.push_back(std::move(fd));
    recipe->base_formats.push_back(node.format);
  }
  recipe->qemu_user = c.qemu_user;
  recipe->supervisor_path = c.supervisor_path;
  recipe->size = c.spec.warm.pool_size;
  return recipe;
}

absl::StatusOr<UniqueFd> Memfd(const char* name, int64_t bytes) {
  UniqueFd fd(::memfd_create(name, MFD_CLOEXEC));
  if (!fd.valid()) return ErrnoNow("cannot create the warm VM's memory file");
  if (::ftruncate(fd.get(), bytes) != 0) return ErrnoNow("cannot size the warm VM's memory file");
  return fd;
}

absl::StatusOr<UniqueFd> Dup(int fd) {
  UniqueFd copy(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
  if (!copy.valid()) return ErrnoNow("cannot duplicate a file descriptor");
  return copy;
}

absl::StatusOr<WarmStart> Cold(const WarmContext& c, TemplateIdentity id, std::vector<DiskNode> base,
                               int64_t disk_size, Rollback& rollback) {
  const std::string task_dir = c.task.task_dir();
  if (absl::Status made = CreateOverlayIn(task_dir, kWarmDiskName, c.spec.image_path, base.front().format, disk_size);
      !made.ok()) {
    return made;
  }
  rollback.Push([path = task_dir + "/" + kWarmDiskName] { ::unlink(path.c_str()); });
  UniqueFd dir(::open(task_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  UniqueFd disk(::openat(dir.get(), kWarmDiskName, O_RDWR | O_NOFOLLOW | O_CLOEXEC));
  if (!disk.valid()) return ErrnoNow(absl::StrCat("cannot open ", task_dir, "/", kWarmDiskName));
  auto capture = std::make_shared<WarmCapture>();
  capture->ram_bytes = c.spec.memory_mb << 20;
  absl::StatusOr<UniqueFd> ram = Memfd("ndq-warm-ram", capture->ram_bytes);
  if (!ram.ok()) return ram.status();
  absl::StatusOr<UniqueFd> state = Memfd("ndq-warm-state", 0);
  if (!state.ok()) return state.status();
  absl::StatusOr<UniqueFd> ram_copy = Dup(ram->get());
  absl::StatusOr<UniqueFd> disk_reader = ReopenReadOnly(disk.get());
  for (const absl::Status& s : {ram_copy.status(), disk_reader.status()}) {
    if (!s.ok()) return s;
  }
  capture->identity = std::move(id);
  capture->cache_dir = c.cache->dir();
  capture->ram = *std::move(ram_copy);
  capture->state = *std::move(state);
  capture->disk = *std::move(disk_reader);
  capture->disk_size = disk_size;
  capture->qemu_owner = NonRootOwner(c.qemu_user);

  WarmStart warm;
  warm.mode = WarmMode::kCold;
  warm.key = capture->identity.Key();
  warm.boot.push_back(DiskNode{"qcow2", false, c.pass(std::move(disk))});
  warm.boot.insert(warm.boot.end(), base.begin(), base.end());
  warm.memory_fd = c.pass(*std::move(ram));
  warm.capture = std::move(capture);
  return warm;
}

// Polls query-migrate (backing off from 1 ms) until the migration ends.
template <typename Execute>
absl::Status AwaitMigration(const Execute& execute, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  absl::Duration pause = absl::Milliseconds(1);
  for (;;) {
    absl::StatusOr<nlohmann::json> info = execute("query-migrate", nullptr);
    if (!info.ok()) return info.status();
    const std::string status = control_socket::StringMember(*info, "status");
    if (status == "completed") return absl::OkStatus();
    if (status == "failed" || status == "cancelled") {
      return absl::InternalError(absl::StrCat("QEMU's migration ", status, ": ",
                                              control_socket::StringMember(*info, "error-desc", "no reason given")));
    }
    if (absl::Now() + pause > deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("QEMU's migration did not finish within ", absl::FormatDuration(timeout)));
    }
    absl::SleepFor(pause);
    pause = std::min(pause * 2, absl::Milliseconds(50));
  }
}

const nlohmann::json& IgnoreSharedCapability() {
  static const nlohmann::json* caps =
      new nlohmann::json{{"capabilities", {{{"capability", "x-ignore-shared"}, {"state", true}}}}};
  return *caps;
}

}  // namespace

std::string WarmConfigDigest(const VmSpec& spec, const std::vector<DiskNode>& boot, const std::string& qemu_user) {
  VmSpec c = spec;
  c.name.clear();
  c.mac_address.clear();  // the saved NIC keeps the template's MAC anyway
  for (PortForward& forward : c.port_forwards) {
    forward.host_ip.clear();
    forward.host_port = 0;
  }
  c.console.dir.clear();
  c.console.serial_socket.clear();
  c.console.vnc_socket.clear();
  c.boot_watch = BootWatchPlan{};
  c.warm = WarmPlan{};
  QemuFiles files;  // only the boot chain: the other files are refused with warm_start
  files.boot = boot;
  for (DiskNode& node : files.boot) node.read_only = true;
  std::vector<std::string> argv = BuildQemuArgv(c, files, RuntimePaths{"qmp", c.guest_agent ? "qga" : "", "tpm"});
  argv[0] = c.emulator;  // the version is in the key; the binary's path is not
  argv.push_back("--qemu-user=" + qemu_user);
  absl::StatusOr<Hasher> hasher = Hasher::Create("sha256");
  for (const std::string& arg : argv) hasher->Update(arg.c_str(), arg.size() + 1);  // with its NUL
  return hasher->FinalHex();
}

absl::StatusOr<WarmStart> PrepareWarmStart(const WarmContext& c, Rollback& rollback) {
  if (!c.spec.warm.enabled) return WarmStart{};
  if (c.boot.empty()) return absl::InvalidArgumentError("task config \"warm_start\": the VM has no boot disk");
  absl::StatusOr<int64_t> disk_size = BootDiskSize(c.local_fd(c.boot.front().fd), c.boot.front().format);
  if (!disk_size.ok()) return disk_size.status();
  absl::StatusOr<TemplateIdentity> id = IdentityFor(c);
  if (!id.ok()) return id.status();
  absl::StatusOr<std::vector<DiskNode>> base = ReadOnlyBase(c);
  if (!base.ok()) return base.status();
  const std::string key = id->Key();
  const TemplateStore store(c.cache->dir());
  std::string reason;
  const bool pooling = c.pool != nullptr && c.poolable && c.spec.warm.pool_size > 0;
  // Leased before it is opened, so eviction cannot take it meanwhile.
  if (absl::Status leased = c.cache->Lease(kTemplatePrefix + key, c.lease); leased.ok()) {
    std::optional<absl::StatusOr<WarmStart>> warm;
    if (std::shared_ptr<PooledVm> pooled = pooling ? c.pool->Take(key) : nullptr) {
      warm = FromPool(c, store.DirFor(key), std::move(pooled), rollback);
    }
    if (!warm || !warm->ok()) {
      absl::StatusOr<OpenedTemplate> opened = store.Open(*id);
      if (opened.ok()) {
        warm = Restore(c, *std::move(opened), *base, rollback);
      } else {
        reason = std::string(opened.status().message());
      }
    }
    if (warm && warm->ok()) {
      c.owned.leases.push_back(store.DirFor(key));  // eviction spares it while this VM maps it
      if (pooling) {
        absl::StatusOr<std::shared_ptr<PoolRecipe>> recipe = RecipeFor(c, *id, *base);
        if (recipe.ok()) c.pool->Want(*std::move(recipe));
      }
      return *std::move(warm);
    }
    c.cache->Release(store.DirFor(key), c.lease);
    if (warm && reason.empty()) return warm->status();  // the template is there, the restore failed
  } else {
    reason = std::string(leased.message());
  }
  c.emit(absl::StrCat("Warm start: booting cold (", reason, ")"),
         {{"warm_start", "cold"}, {"warm_reason", reason}, {"warm_template", key}});
  return Cold(c, *std::move(id), *std::move(base), *disk_size, rollback);
}

absl::Status LoadTemplateState(QmpClient& qmp, int state_fd) {
  auto execute = [&qmp](const std::string& command, const nlohmann::json& arguments) {
    return qmp.Execute(command, arguments, timeouts::kQmpCommand);
  };
  absl::Status status = execute("migrate-set-capabilities", IgnoreSharedCapability()).status();
  if (status.ok()) status = execute("migrate-incoming", {{"uri", absl::StrCat("fd:", state_fd)}}).status();
  if (status.ok()) status = AwaitMigration(execute, timeouts::kWarmMigrate);
  return status;
}

absl::Status RestoreState(QmpClient& qmp, const WarmStart& warm, const std::string& cache_dir,
                          const TaskEventSink& emit) {
  if (warm.mode != WarmMode::kRestore) return absl::OkStatus();
  const absl::Time started = absl::Now();
  absl::Status status = LoadTemplateState(qmp, warm.state_fd);
  if (status.ok()) status = qmp.Cont(timeouts::kQmpCommand);
  if (!status.ok()) {
    TemplateStore(cache_dir).Remove(warm.key);
    return WithKind(absl::FailedPreconditionError(absl::StrCat(
                        "task config \"warm_start\": restoring template ", Short(warm.key), " failed: ", status.message(),
                        "; the template was removed, so the next start boots cold")),
                    ErrorKind::kQemuFailed);
  }
  const absl::Duration took = absl::Now() - started;
  emit(absl::StrCat("Warm start: restored from template ", Short(warm.key), " in ",
                    absl::FormatDuration(absl::Trunc(took, absl::Milliseconds(1)))),
       {{"warm_start", "restored"}, {"warm_template", warm.key}, {"warm_restore_ms", Millis(took)}});
  return absl::OkStatus();
}

absl::Status SetGuestClock(VmTask& vm) {
  absl::StatusOr<std::shared_ptr<GuestAgentClient>> agent = vm.GuestAgent(timeouts::kQmpCommand);
  if (!agent.ok()) return agent.status();
  const int64_t now_ns = absl::ToUnixNanos(absl::Now());
  absl::StatusOr<nlohmann::json> set = (*agent)->Execute("guest-set-time", {{"time", now_ns}}, timeouts::kQmpCommand);
  if (GuestAgentSessionBroken(set.status())) vm.DropGuestAgent(*agent);
  return set.status();
}

absl::StatusOr<SavedTemplate> SaveTemplate(VmTask& vm, WarmCapture& capture) {
  const absl::Time started = absl::Now();
  auto execute = [&vm](const std::string& command, const nlohmann::json& arguments) {
    return vm.ExecuteQmp(command, arguments, timeouts::kQmpCommand);
  };
  // QEMU 7.2 migrates out only to an fd it was given by name (getfd).
  if (absl::Status given = vm.ExecuteQmp("getfd", {{"fdname", kStateFdName}}, timeouts::kQmpCommand, capture.state.get()).status();
      !given.ok()) {
    return given;
  }
  TemplateStore store(capture.cache_dir);
  TemplateStore::Writer writer(store, capture.identity);
  if (absl::Status begun = writer.Begin(); !begun.ok()) return begun;
  if (absl::Status stopped = execute("stop", nullptr).status(); !stopped.ok()) return stopped;
  bool resumed = false;
  auto resume = [&] {
    if (resumed) return;
    resumed = true;
    if (absl::Status cont = execute("cont", nullptr).status(); !cont.ok()) {
      log::Warn("warm_start: the VM could not be resumed after saving", {{"error", std::string(cont.message())}});
    }
  };
  absl::Cleanup always_resume = resume;
  absl::Status status = execute("migrate-set-capabilities", IgnoreSharedCapability()).status();
  if (status.ok()) status = execute("migrate", {{"uri", absl::StrCat("fd:", kStateFdName)}}).status();
  if (status.ok()) status = AwaitMigration(execute, timeouts::kWarmMigrate);
  struct stat state_st, disk_st;
  if (status.ok() && (::fstat(capture.state.get(), &state_st) != 0 || ::fstat(capture.disk.get(), &disk_st) != 0)) {
    status = ErrnoNow("cannot stat the saved state");
  }
  // Migration flushed the disk and left it inactive: its file is stable
  // until the guest resumes.
  if (status.ok()) status = writer.CopyFd(kTemplateRam, capture.ram.get(), capture.ram_bytes);
  if (status.ok()) status = writer.CopyFd(kTemplateState, capture.state.get(), state_st.st_size);
  if (status.ok()) status = writer.CopyFd(kTemplateDisk, capture.disk.get(), disk_st.st_size);
  resume();
  const absl::Duration paused = absl::Now() - started;
  if (status.ok()) status = writer.MakeOverlay(capture.disk_size);
  if (status.ok() && capture.qemu_owner) writer.GiveRamTo(capture.qemu_owner->first, capture.qemu_owner->second);
  if (status.ok()) status = writer.Publish();
  if (!status.ok()) return status;
  SavedTemplate saved;
  saved.key = capture.identity.Key();
  saved.paused = paused;
  saved.total = absl::Now() - started;
  saved.ram_bytes = writer.bytes(kTemplateRam);
  saved.state_bytes = writer.bytes(kTemplateState);
  saved.disk_bytes = writer.bytes(kTemplateDisk);
  return saved;
}

}  // namespace ndq
