#include "vm/warm_pool.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/error_kind.h"
#include "base/rollback.h"
#include "base/small_file.h"
#include "base/timeouts.h"
#include "host/process_watch.h"
#include "nomadplugin/hclog.h"
#include "qemu/cmdline.h"
#include "qemu/guest_agent_client.h"
#include "qemu_driver/supervisor_protocol.h"
#include "vm/fd_table.h"
#include "vm/pool_handover.h"
#include "vm/qemu_process.h"
#include "vm/warm_start.h"

namespace ndq {
namespace {

namespace log = nomadplugin::hclog;
using json = nlohmann::json;

constexpr absl::Duration kSlotStepTimeout = timeouts::kPoolSlotStep;
constexpr absl::Duration kWarmUpProbe = timeouts::kPoolWarmUpProbe;


std::string NewSlotName() {
  static thread_local std::mt19937_64 random{std::random_device{}()};
  return absl::StrFormat("p%016x", random());
}

bool Exited(const UniqueFd& pidfd) { return !pidfd.valid() || PidfdExited(pidfd.get()); }

// A port on 127.0.0.1 nothing listens on now (the warm-up's forward).
absl::StatusOr<int> FreeLocalPort() {
  UniqueFd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (!s.valid() || ::bind(s.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(s.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    return ErrnoNow("cannot find a free local port for the warm-up");
  }
  return ntohs(addr.sin_port);
}

// Connects to the guest's ready port through `port`, half-closes, and waits
// for the guest to close its side: the guest has accepted and served a
// connection, as the readiness watch made it do before the template was saved.
void ProbeOnce(int port) {
  UniqueFd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (!s.valid() || ::connect(s.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) return;
  ::shutdown(s.get(), SHUT_WR);
  const absl::Time deadline = absl::Now() + kWarmUpProbe;
  char buffer[4096];
  for (;;) {
    pollfd pfd = {s.get(), POLLIN, 0};
    const int ms = static_cast<int>(absl::ToInt64Milliseconds(deadline - absl::Now()));
    if (ms <= 0 || ::poll(&pfd, 1, ms) <= 0) return;
    if (::read(s.get(), buffer, sizeof buffer) <= 0) return;
  }
}

// Runs the restored guest for one served connection (or one agent ping),
// then pauses it again: TCG translates the guest's code on first use, and
// that first use is most of a restore's time (measured: a restored test
// guest's first answer 180-220 ms, 13-45 ms after one warm-up).
absl::Status WarmUp(QmpClient& qmp, const PoolRecipe& recipe, const std::string& run_dir) {
  const BootWatchPlan& ready = recipe.spec.warm.ready;
  if (ready.guest_agent) {
    if (absl::Status cont = qmp.Cont(timeouts::kQmpCommand); !cont.ok()) return cont;
    absl::StatusOr<std::unique_ptr<GuestAgentClient>> agent =
        GuestAgentClient::Connect(run_dir + "/" + supervisor::kGuestAgentSocket, kSlotStepTimeout);
    if (agent.ok()) (void)(*agent)->Ping(kWarmUpProbe);
    return qmp.Stop(timeouts::kQmpCommand);
  }
  if (ready.guest_port <= 0) return absl::OkStatus();
  absl::StatusOr<int> port = FreeLocalPort();
  if (!port.ok()) return port.status();
  const PortForward forward{ready.port_label, "tcp", "127.0.0.1", *port, ready.guest_port};
  if (absl::Status added = AddHostForward(qmp, forward); !added.ok()) return added;
  absl::Status status = qmp.Cont(timeouts::kQmpCommand);
  if (status.ok()) ProbeOnce(*port);
  if (absl::Status stopped = qmp.Stop(timeouts::kQmpCommand); status.ok()) status = stopped;
  if (absl::Status removed = RemoveHostForward(qmp, forward); status.ok()) status = removed;
  return status;
}

// <dir>/run, QEMU's user's to write its sockets in (the slot dir is root's).
absl::Status MakeSlotDir(const std::string& dir, const std::string& qemu_user) {
  if (::mkdir(dir.c_str(), 0711) != 0) return ErrnoNow("cannot create " + dir);
  const std::string run = dir + "/" + supervisor::kRunDir;
  if (::mkdir(run.c_str(), 0700) != 0) return ErrnoNow("cannot create " + run);
  if (qemu_user.empty()) return absl::OkStatus();
  const passwd* pw = ::getpwnam(qemu_user.c_str());
  if (pw == nullptr) return absl::NotFoundError(absl::StrCat("QEMU's user ", qemu_user, " does not exist"));
  if (::chown(run.c_str(), pw->pw_uid, pw->pw_gid) != 0) return ErrnoNow("cannot hand " + run + " to " + qemu_user);
  return absl::OkStatus();
}

// Written once the supervisor runs (so a relaunched plugin can remove a slot
// that never got ready, processes and all) and again, ready, once it is.
absl::Status WriteManifest(const PooledVm& vm, const std::string& template_dir, bool ready) {
  const json manifest = {{"key", vm.key},
                         {"ready", ready},
                         {"template_dir", template_dir},
                         {"supervisor_pid", vm.supervisor_pid},
                         {"supervisor_start_ticks", vm.supervisor_start_ticks},
                         {"qemu_pid", vm.qemu_pid},
                         {"qemu_start_ticks", vm.qemu_start_ticks}};
  return WriteSmallFileAtomically(vm.dir + "/" + kSlotManifest, manifest.dump());
}

// QEMU's pid from the supervisor's pid file, checked to be the process that
// answers on `qmp`.
absl::Status FindQemu(PooledVm& vm, absl::Time deadline) {
  absl::StatusOr<QemuProcess> qemu = FindSupervisedQemu(vm.dir, vm.supervisor_pidfd.get(), deadline);
  if (!qemu.ok()) {
    return absl::Status(qemu.status().code(), absl::StrCat("a pooled QEMU's pid: ", qemu.status().message()));
  }
  vm.qemu_pid = qemu->pid;
  vm.qemu_start_ticks = qemu->start_ticks;
  vm.qemu_pidfd = std::move(qemu->pidfd);
  return vm.qmp->CheckServedBy(vm.qemu_pid);
}

// Kills a slot's supervisor (QEMU dies with it), waits for QEMU, removes the dir.
void Remove(VmHost& host, PooledVm& vm) {
  if (!Exited(vm.supervisor_pidfd)) {
    if (vm.our_child) {
      host.KillSupervisor(vm.supervisor_pid);
    } else {
      ::syscall(SYS_pidfd_send_signal, vm.supervisor_pidfd.get(), SIGKILL, nullptr, 0);
    }
  } else if (vm.our_child) {
    ::waitpid(vm.supervisor_pid, nullptr, WNOHANG);
  }
  if (vm.qemu_pidfd.valid()) {
    pollfd gone = {vm.qemu_pidfd.get(), POLLIN, 0};
    ::poll(&gone, 1, static_cast<int>(absl::ToInt64Milliseconds(timeouts::kKillWait)));
  }
  if (vm.qmp) vm.qmp->Close();
  std::error_code ignored;
  if (!vm.dir.empty()) std::filesystem::remove_all(vm.dir, ignored);
}

// The supervisor of a slot that left no manifest (the plugin died between
// spawning it and writing one): a process of our own user whose argv has
// "--state-dir <dir>"; QEMU dies with it.
void KillSupervisorOf(const std::string& dir) {
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", error)) {
    const std::string name = entry.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    struct stat st;
    if (::stat(entry.path().c_str(), &st) != 0 || st.st_uid != ::geteuid()) continue;
    std::optional<std::string> cmdline = ReadSmallFile(entry.path().string() + "/cmdline");
    if (!cmdline || cmdline->find(absl::StrCat(supervisor::kArgStateDir, std::string(1, '\0'), dir, std::string(1, '\0'))) ==
                        std::string::npos) {
      continue;
    }
    const pid_t pid = std::stoi(name);
    if (absl::StatusOr<int> fd = OpenVerifiedPidfd(pid, ProcessStartTicks(pid).value_or(0)); fd.ok()) {
      ::syscall(SYS_pidfd_send_signal, *fd, SIGKILL, nullptr, 0);
      ::close(*fd);
    }
  }
}

// A slot a previous plugin left: usable when its manifest is there (it got
// ready), its supervisor and QEMU are the processes it names, its template
// is still there, and QEMU answers QMP with the guest paused.
// Fills `*vm` as far as it gets, so a slot it refuses is removed with the
// processes it found.
absl::Status AdoptSlot(const std::string& dir, PooledVm* vm, std::string* template_dir) {
  vm->dir = dir;
  std::optional<std::string> text = ReadSmallFile(dir + "/" + kSlotManifest);
  if (!text) {
    // The plugin died between spawning its supervisor and writing one.
    KillSupervisorOf(dir);
    return absl::NotFoundError("no manifest: its supervisor never ran");
  }
  json manifest = json::parse(*text, nullptr, false);
  if (!manifest.is_object()) return absl::NotFoundError("its manifest is unreadable");
  vm->key = manifest.value("key", "");
  *template_dir = manifest.value("template_dir", "");
  vm->supervisor_pid = manifest.value("supervisor_pid", -1);
  vm->supervisor_start_ticks = manifest.value("supervisor_start_ticks", uint64_t{0});
  vm->qemu_pid = manifest.value("qemu_pid", -1);
  vm->qemu_start_ticks = manifest.value("qemu_start_ticks", uint64_t{0});
  if (absl::StatusOr<int> fd = OpenVerifiedPidfd(vm->supervisor_pid, vm->supervisor_start_ticks); fd.ok()) {
    vm->supervisor_pidfd.reset(*fd);
  }
  if (absl::StatusOr<int> fd = OpenVerifiedPidfd(vm->qemu_pid, vm->qemu_start_ticks); fd.ok()) {
    vm->qemu_pidfd.reset(*fd);
  }
  if (Exited(vm->supervisor_pidfd) || Exited(vm->qemu_pidfd)) return absl::NotFoundError("its QEMU is gone");
  if (!manifest.value("ready", false)) return absl::NotFoundError("it never got ready");
  struct stat st;
  if (vm->key.empty() || template_dir->empty() || ::stat(template_dir->c_str(), &st) != 0) {
    return absl::NotFoundError("its template is gone");
  }
  absl::StatusOr<std::unique_ptr<QmpClient>> qmp =
      QmpClient::Connect(dir + "/" + supervisor::kRunDir + "/" + supervisor::kQmpSocket, timeouts::kQmpCommand);
  if (!qmp.ok()) return qmp.status();
  vm->qmp = *std::move(qmp);
  if (absl::Status served = vm->qmp->CheckServedBy(vm->qemu_pid); !served.ok()) return served;
  absl::StatusOr<std::string> state = vm->qmp->QueryStatus(timeouts::kQmpCommand);
  if (!state.ok()) return state.status();
  if (*state != "paused") return absl::FailedPreconditionError("its guest is " + *state + ", not paused");
  return absl::OkStatus();
}

}  // namespace

VmSpec PoolSpec(const VmSpec& task_spec) {
  VmSpec spec = task_spec;
  spec.name = "warm-pool";
  spec.mac_address.clear();  // the NIC's MAC is in the template's state
  spec.port_forwards.clear();
  spec.own_nic = true;  // the user network stays, for the forwards added at handover
  spec.console = ConsolePlan{};
  spec.boot_watch = BootWatchPlan{};
  return spec;
}

std::vector<std::string> PooledQemuArgv(const VmSpec& pool_spec, const QemuFiles& files, const std::string& run_dir) {
  std::vector<std::string> argv = BuildQemuArgv(
      pool_spec, files,
      RuntimePaths{run_dir + "/" + supervisor::kQmpSocket, pool_spec.guest_agent ? run_dir + "/" + supervisor::kGuestAgentSocket : "", ""});
  argv.push_back("-S");  // paused once the state is loaded, until a task takes it
  return argv;
}

WarmPool::WarmPool(VmHost* host) : host_(host) { worker_ = std::thread([this] { Run(); }); }

WarmPool::~WarmPool() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    wake_.Signal();
  }
  worker_.join();
  // The ready QEMUs stay for the next plugin; only our sessions close.
  absl::MutexLock lock(&mu_);
  for (auto& [key, entry] : entries_) {
    for (auto& vm : entry.ready) {
      if (vm->qmp) vm->qmp->Close();
    }
  }
}

void WarmPool::ExpectAdoption() {
  absl::MutexLock lock(&mu_);
  adopting_ = true;
}

void WarmPool::Adopt(const std::string& state_root) {
  const std::string dir = state_root + "/" + kPoolDirName;
  absl::Cleanup adopted_all = [this] {
    absl::MutexLock lock(&mu_);
    adopting_ = false;
  };
  {
    absl::MutexLock lock(&mu_);
    if (!dir_.empty()) return;  // adopted at the first SetConfig; the slots since are this plugin's own
  }
  int adopted = 0, removed = 0;
  std::error_code error;
  for (const auto& item : std::filesystem::directory_iterator(dir, error)) {
    std::string template_dir;
    auto vm = std::make_shared<PooledVm>();
    if (absl::Status usable = AdoptSlot(item.path().string(), vm.get(), &template_dir); !usable.ok()) {
      log::Debug("warm pool: removing a slot", {{"dir", vm->dir}, {"reason", std::string(usable.message())}});
      Remove(*host_, *vm);  // with the supervisor it found, if that one is still the slot's
      ++removed;
      continue;
    }
    absl::MutexLock lock(&mu_);
    Entry& entry = entries_[vm->key];
    entry.ready.push_back(std::move(vm));
    entry.template_dir = template_dir;
    entry.used = absl::Now();
    ++adopted;
  }
  absl::MutexLock lock(&mu_);
  dir_ = dir;
  if (adopted + removed > 0) log::Info("warm pool adopted", {{"ready", adopted}, {"removed", removed}});
  wake_.Signal();
}

std::shared_ptr<PooledVm> WarmPool::Take(const std::string& key) {
  std::vector<std::shared_ptr<PooledVm>> dead;
  std::shared_ptr<PooledVm> taken;
  {
    absl::MutexLock lock(&mu_);
    auto adopted = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !adopting_; };
    mu_.AwaitWithTimeout(absl::Condition(&adopted), kAdoptWait);
    auto it = entries_.find(key);
    if (it == entries_.end()) return nullptr;
    Entry& entry = it->second;
    entry.used = absl::Now();
    while (!taken && !entry.ready.empty()) {
      std::shared_ptr<PooledVm> vm = std::move(entry.ready.front());
      entry.ready.pop_front();
      if (Exited(vm->supervisor_pidfd) || Exited(vm->qemu_pidfd)) {
        dead.push_back(std::move(vm));
      } else {
        taken = std::move(vm);
      }
    }
    entry.refill_after = absl::Now() + kPoolRefillDelay;
    wake_.Signal();
  }
  for (auto& vm : dead) {
    log::Info("warm pool: a pooled QEMU had died; removed", {{"dir", vm->dir}, {"template", key}});
    Remove(*host_, *vm);
  }
  return taken;
}

void WarmPool::Want(std::shared_ptr<PoolRecipe> recipe) {
  absl::MutexLock lock(&mu_);
  Entry& entry = entries_[recipe->key];
  entry.template_dir = TemplateStore(recipe->cache_dir).DirFor(recipe->key);
  entry.recipe = std::move(recipe);
  entry.used = absl::Now();
  entry.refill_after = absl::Now() + kPoolRefillDelay;
  wake_.Signal();
}

void WarmPool::Prune() {
  absl::MutexLock lock(&mu_);
  wake_.Signal();  // the worker checks every template on its next pass
}

void WarmPool::Discard(PooledVm& vm) { Remove(*host_, vm); }

int WarmPool::Ready(const std::string& key) {
  absl::MutexLock lock(&mu_);
  int n = 0;
  for (const auto& [k, entry] : entries_) {
    if (key.empty() || k == key) n += static_cast<int>(entry.ready.size());
  }
  return n;
}

bool WarmPool::AwaitReady(const std::string& key, int count, absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto it = entries_.find(key);
    return it != entries_.end() && static_cast<int>(it->second.ready.size()) >= count;
  };
  return mu_.AwaitWithTimeout(absl::Condition(&enough), timeout);
}

void WarmPool::Run() {
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
    }
    const bool more = Tend();
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    if (!more) wake_.WaitWithTimeout(&mu_, absl::Seconds(1));
  }
}

bool WarmPool::Tend() {
  std::vector<std::shared_ptr<PooledVm>> remove;
  std::shared_ptr<PoolRecipe> next;
  absl::Time wake_at = absl::InfiniteFuture();
  {
    absl::MutexLock lock(&mu_);
    if (dir_.empty()) return false;
    const absl::Time now = absl::Now();
    for (auto it = entries_.begin(); it != entries_.end();) {
      Entry& entry = it->second;
      struct stat st;
      const bool gone = ::stat(entry.template_dir.c_str(), &st) != 0;
      const bool idle = now - entry.used > kPoolIdle;
      for (auto vm = entry.ready.begin(); vm != entry.ready.end();) {
        if (gone || idle || Exited((*vm)->supervisor_pidfd) || Exited((*vm)->qemu_pidfd)) {
          remove.push_back(std::move(*vm));
          vm = entry.ready.erase(vm);
        } else {
          ++vm;
        }
      }
      if ((gone || idle) && entry.launching == 0) {
        it = entries_.erase(it);
        continue;
      }
      const bool short_of = entry.recipe && !gone && !idle &&
                            static_cast<int>(entry.ready.size()) + entry.launching < entry.recipe->size;
      if (short_of && !next) {
        if (now >= entry.refill_after) {
          next = entry.recipe;
          ++entry.launching;
        } else {
          wake_at = std::min(wake_at, entry.refill_after);
        }
      }
      ++it;
    }
  }
  for (auto& vm : remove) {
    log::Debug("warm pool: removing a slot (QEMU gone, template gone or idle)", {{"dir", vm->dir}, {"template", vm->key}});
    Remove(*host_, *vm);
  }
  if (!next) {
    if (wake_at != absl::InfiniteFuture()) {
      absl::MutexLock lock(&mu_);
      wake_.WaitWithTimeout(&mu_, std::max(wake_at - absl::Now(), absl::ZeroDuration()));
      return true;
    }
    return false;
  }
  const absl::Time started = absl::Now();
  absl::StatusOr<std::shared_ptr<PooledVm>> vm = Launch(*next);
  std::shared_ptr<PooledVm> unwanted;
  {
    absl::MutexLock lock(&mu_);
    auto it = entries_.find(next->key);
    Entry* entry = it == entries_.end() ? nullptr : &it->second;
    if (entry != nullptr) --entry->launching;
    if (!vm.ok()) {
      log::Warn("warm pool: a QEMU for the template could not be made ready; the pool stops refilling it",
                {{"template", next->key}, {"error", std::string(vm.status().message())}});
      if (entry != nullptr && entry->recipe == next) entry->recipe = nullptr;  // the next restore brings a new one
      return true;
    }
    if (entry == nullptr) {
      unwanted = *std::move(vm);  // its template was dropped meanwhile
    } else {
      entry->ready.push_back(*std::move(vm));
      log::Debug("warm pool: QEMU ready", {{"template", next->key},
                                          {"ready", static_cast<int>(entry->ready.size())},
                                          {"ms", absl::ToDoubleMilliseconds(absl::Now() - started)}});
    }
  }
  if (unwanted) Remove(*host_, *unwanted);
  return true;
}

absl::StatusOr<std::shared_ptr<PooledVm>> WarmPool::Launch(const PoolRecipe& recipe) {
  std::string root;
  {
    absl::MutexLock lock(&mu_);
    root = dir_;
  }
  absl::StatusOr<OpenedTemplate> opened = TemplateStore(recipe.cache_dir).Open(recipe.identity);
  if (!opened.ok()) return opened.status();
  auto vm = std::make_shared<PooledVm>();
  vm->key = recipe.key;
  vm->dir = root + "/" + NewSlotName();
  const std::string run_dir = vm->dir + "/" + supervisor::kRunDir;
  // Made with the first slot: a plugin whose jobs never pool leaves no trace.
  if (::mkdir(root.c_str(), 0700) != 0 && errno != EEXIST) return ErrnoNow("cannot create the warm pool's dir " + root);
  Rollback undo;
  undo.Push([this, vm] { Remove(*host_, *vm); });
  if (absl::Status made = MakeSlotDir(vm->dir, recipe.qemu_user); !made.ok()) return made;
  absl::StatusOr<UniqueFd> overlay = CopyOverlayInto(opened->dir + "/" + kTemplateOverlay, vm->dir, kSlotOverlay);
  if (!overlay.ok()) return overlay.status();

  FdTable fds;
  QemuFiles files;
  files.boot.push_back(DiskNode{"qcow2", false, fds.Add(*std::move(overlay))});
  files.boot.push_back(DiskNode{"qcow2", true, fds.Add(std::move(opened->disk))});
  for (size_t i = 0; i < recipe.base.size(); ++i) {
    UniqueFd layer(::fcntl(recipe.base[i]->get(), F_DUPFD_CLOEXEC, 0));
    if (!layer.valid()) return ErrnoNow("cannot duplicate an image layer's fd");
    files.boot.push_back(DiskNode{recipe.base_formats[i], true, fds.Add(std::move(layer))});
  }
  files.warm_mode = WarmMode::kRestore;
  files.warm_memory = fds.Add(std::move(opened->ram));
  files.warm_state = fds.Add(std::move(opened->state));
  if (!fds.Fits(0)) return absl::ResourceExhaustedError("too many files for a pooled QEMU");
  const std::vector<std::string> qemu_argv = PooledQemuArgv(recipe.spec, files, run_dir);
  supervisor::Placement placement;
  placement.passed_fds = static_cast<int>(fds.size());
  placement.pooled = true;
  const std::vector<std::string> argv =
      supervisor::SupervisorArgv(recipe.supervisor_path, vm->dir, "", "", recipe.qemu_user, qemu_argv, placement);
  UniqueFd dir_fd(::open(vm->dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir_fd.valid()) return ErrnoNow("cannot open " + vm->dir);
  absl::StatusOr<pid_t> pid = host_->SpawnSupervisor(argv, dir_fd.get(), fds.Locals());
  if (!pid.ok()) return pid.status();
  fds.Close();
  vm->supervisor_pid = *pid;
  vm->our_child = true;
  vm->supervisor_start_ticks = ProcessStartTicks(*pid).value_or(0);
  absl::StatusOr<int> pidfd = OpenVerifiedPidfd(*pid, 0);
  if (!pidfd.ok()) return pidfd.status();
  vm->supervisor_pidfd.reset(*pidfd);
  if (absl::Status written = WriteManifest(*vm, opened->dir, false); !written.ok()) return written;

  const absl::Time deadline = absl::Now() + kSlotStepTimeout;
  if (absl::Status there = WaitForPathOrExit(run_dir, supervisor::kQmpSocket, vm->supervisor_pidfd.get(), deadline); !there.ok()) {
    return absl::Status(there.code(), absl::StrCat("a pooled QEMU did not start: ", there.message()));
  }
  absl::StatusOr<std::unique_ptr<QmpClient>> qmp = QmpClient::Connect(run_dir + "/" + supervisor::kQmpSocket, kSlotStepTimeout);
  if (!qmp.ok()) return qmp.status();
  vm->qmp = *std::move(qmp);
  if (absl::Status found = FindQemu(*vm, deadline); !found.ok()) return found;
  if (absl::Status loaded = LoadTemplateState(*vm->qmp, files.warm_state); !loaded.ok()) return loaded;
  if (absl::Status warmed = WarmUp(*vm->qmp, recipe, run_dir); !warmed.ok()) return warmed;
  if (absl::Status written = WriteManifest(*vm, opened->dir, true); !written.ok()) return written;
  undo.Commit();
  return vm;
}

}  // namespace ndq
