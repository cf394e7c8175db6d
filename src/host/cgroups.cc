#include "host/cgroups.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>

#include "base/error_kind.h"
#include "base/timeouts.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "nomadplugin/hclog.h"
#include "base/small_file.h"

namespace ndq {
namespace {

std::optional<uint64_t> ReadNumber(const std::string& path) {
  std::optional<std::string> text = ReadSmallFile(path);
  uint64_t value;
  if (!text || !absl::SimpleAtoi(absl::StripAsciiWhitespace(*text), &value)) return std::nullopt;
  return value;
}

// One "key value" line of a flat-keyed file such as memory.stat or cpu.stat.
std::optional<uint64_t> KeyedValue(const std::optional<std::string>& text, absl::string_view key) {
  if (!text) return std::nullopt;
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(line, absl::MaxSplits(' ', 1));
    uint64_t value;
    if (kv.first == key && absl::SimpleAtoi(kv.second, &value)) return value;
  }
  return std::nullopt;
}

// Writes `value` to DIR/FILE; the error names both, for the operator.
absl::Status WriteFile(const std::string& dir, const std::string& file, const std::string& value) {
  const std::string path = dir + "/" + file;
  const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError("cannot open " + path, errno);
  const ssize_t n = ::write(fd, value.data(), value.size());
  const int err = errno;
  ::close(fd);
  if (n != static_cast<ssize_t>(value.size())) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot write \"", value, "\" to ", path, ": ", std::strerror(n < 0 ? err : EIO)));
  }
  return absl::OkStatus();
}

// mkdir that accepts an existing directory; sets *made when it made it.
absl::Status MakeDir(const std::string& path, bool* made) {
  *made = false;
  if (::mkdir(path.c_str(), 0755) == 0) {
    *made = true;
    return absl::OkStatus();
  }
  if (errno == EEXIST) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat("cannot create cgroup ", path, ": ", std::strerror(errno)));
}

bool IsDir(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string Parent(const std::string& dir) { return dir.substr(0, dir.rfind('/')); }

// A new v1 cpuset cgroup starts with no CPUs and no memory nodes, and takes
// no processes until both are set; they come from its parent.
absl::Status InheritCpuset(const std::string& dir, const std::string& cpus) {
  auto unset = [](const std::optional<std::string>& v) { return !v || absl::StripAsciiWhitespace(*v).empty(); };
  auto from_parent = [&dir](const char* file) {
    return std::string(absl::StripAsciiWhitespace(ReadSmallFile(Parent(dir) + "/" + file).value_or("")));
  };
  if (unset(ReadSmallFile(dir + "/cpuset.mems"))) {
    if (absl::Status status = WriteFile(dir, "cpuset.mems", from_parent("cpuset.mems")); !status.ok()) return status;
  }
  if (!cpus.empty()) return WriteFile(dir, "cpuset.cpus", cpus);
  if (unset(ReadSmallFile(dir + "/cpuset.cpus"))) return WriteFile(dir, "cpuset.cpus", from_parent("cpuset.cpus"));
  return absl::OkStatus();
}

std::vector<std::string> V2Controllers(const std::string& file) {
  std::vector<std::string> out;
  for (absl::string_view name : absl::StrSplit(ReadSmallFile(file).value_or(""), absl::ByAnyChar(" \n"), absl::SkipEmpty())) {
    const auto& ours = CgroupManager::Controllers();
    if (std::find(ours.begin(), ours.end(), name) != ours.end()) out.emplace_back(name);
  }
  return out;
}

bool Has(const std::vector<std::string>& list, const std::string& name) {
  return std::find(list.begin(), list.end(), name) != list.end();
}

}  // namespace

const char* CgroupVersionName(CgroupVersion version) {
  switch (version) {
    case CgroupVersion::kV1: return "v1";
    case CgroupVersion::kV2: return "v2";
    case CgroupVersion::kNone: break;
  }
  return "none";
}

CgroupMounts ParseCgroupMounts(absl::string_view mountinfo) {
  CgroupMounts mounts;
  for (absl::string_view line : absl::StrSplit(mountinfo, '\n', absl::SkipEmpty())) {
    // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS
    const std::vector<absl::string_view> fields = absl::StrSplit(line, ' ');
    const auto dash = std::find(fields.begin(), fields.end(), "-");
    if (fields.size() < 5 || dash == fields.end() || fields.end() - dash < 4) continue;
    const std::string mount_point(fields[4]);
    const absl::string_view fstype = dash[1];
    if (fstype == "cgroup2") {
      mounts.unified = mount_point;
    } else if (fstype == "cgroup") {
      for (absl::string_view option : absl::StrSplit(dash[3], ',')) {
        if (Has(CgroupManager::Controllers(), std::string(option))) mounts.v1.emplace(option, mount_point);
      }
    }
  }
  if (!mounts.v1.empty()) mounts.version = CgroupVersion::kV1;
  else if (!mounts.unified.empty()) mounts.version = CgroupVersion::kV2;
  return mounts;
}

CgroupMounts DetectCgroupMounts() { return ParseCgroupMounts(ReadSmallFile("/proc/self/mountinfo").value_or("")); }

int64_t CpuSharesToWeight(int64_t shares) {
  if (shares <= 0) return 0;
  shares = std::clamp<int64_t>(shares, 2, 262144);
  return 1 + ((shares - 2) * 9999) / 262142;
}

std::vector<std::string> TaskCgroup::ProcsFiles() const {
  std::set<std::string> distinct;
  for (const auto& [controller, dir] : dirs) distinct.insert(dir + "/cgroup.procs");
  return {distinct.begin(), distinct.end()};
}

std::string TaskCgroup::Dir(const std::string& controller) const {
  auto it = dirs.find(controller);
  return it == dirs.end() ? "" : it->second;
}

CgroupUsage ReadCgroupUsage(const TaskCgroup& cgroup) {
  CgroupUsage usage;
  const std::string memory = cgroup.Dir("memory");
  const std::string pids = cgroup.Dir("pids");
  if (!pids.empty()) usage.pids = ReadNumber(pids + "/pids.current");
  if (cgroup.version == CgroupVersion::kV1) {
    if (!memory.empty()) {
      usage.memory_usage = ReadNumber(memory + "/memory.usage_in_bytes");
      usage.memory_max_usage = ReadNumber(memory + "/memory.max_usage_in_bytes");
      const std::optional<std::string> stat = ReadSmallFile(memory + "/memory.stat");
      usage.memory_rss = KeyedValue(stat, "total_rss");
      usage.memory_cache = KeyedValue(stat, "total_cache");
      usage.memory_swap = KeyedValue(stat, "total_swap");  // only with swap accounting
    }
    if (const std::string cpuacct = cgroup.Dir("cpuacct"); !cpuacct.empty()) {
      usage.cpu_total_ns = ReadNumber(cpuacct + "/cpuacct.usage");
      const std::optional<std::string> stat = ReadSmallFile(cpuacct + "/cpuacct.stat");
      const double ns_per_tick = 1e9 / static_cast<double>(::sysconf(_SC_CLK_TCK));
      if (auto user = KeyedValue(stat, "user")) usage.cpu_user_ns = static_cast<uint64_t>(*user * ns_per_tick);
      if (auto system = KeyedValue(stat, "system")) usage.cpu_system_ns = static_cast<uint64_t>(*system * ns_per_tick);
    }
  } else if (cgroup.version == CgroupVersion::kV2 && !cgroup.dirs.empty()) {
    const std::string dir = cgroup.dirs.begin()->second;
    if (!memory.empty()) {
      usage.memory_usage = ReadNumber(memory + "/memory.current");
      usage.memory_max_usage = ReadNumber(memory + "/memory.peak");  // Linux 5.19+
      usage.memory_swap = ReadNumber(memory + "/memory.swap.current");
      const std::optional<std::string> stat = ReadSmallFile(memory + "/memory.stat");
      usage.memory_rss = KeyedValue(stat, "anon");
      usage.memory_cache = KeyedValue(stat, "file");
    }
    // cpu.stat is there even without the cpu controller.
    const std::optional<std::string> stat = ReadSmallFile(dir + "/cpu.stat");
    if (auto v = KeyedValue(stat, "usage_usec")) usage.cpu_total_ns = *v * 1000;
    if (auto v = KeyedValue(stat, "user_usec")) usage.cpu_user_ns = *v * 1000;
    if (auto v = KeyedValue(stat, "system_usec")) usage.cpu_system_ns = *v * 1000;
  }
  return usage;
}

uint64_t CgroupOomKills(const TaskCgroup& cgroup) {
  const std::string memory = cgroup.Dir("memory");
  if (memory.empty()) return 0;
  if (cgroup.version == CgroupVersion::kV1) return KeyedValue(ReadSmallFile(memory + "/memory.oom_control"), "oom_kill").value_or(0);
  return KeyedValue(ReadSmallFile(memory + "/memory.events"), "oom_kill").value_or(0);
}

void RemoveTaskCgroup(const TaskCgroup& cgroup) {
  for (const std::string& dir : cgroup.created) {
    // Normally empty by now (QEMU has exited); anything left would pin it.
    if (cgroup.version == CgroupVersion::kV2) WriteFile(dir, "cgroup.kill", "1").IgnoreError();
    const absl::Time deadline = absl::Now() + timeouts::kCgroupDrain;
    int result;
    while ((result = ::rmdir(dir.c_str())) != 0 && errno == EBUSY && absl::Now() < deadline) {
      for (absl::string_view pid_text :
           absl::StrSplit(ReadSmallFile(dir + "/cgroup.procs").value_or(""), '\n', absl::SkipEmpty())) {
        pid_t pid;
        if (absl::SimpleAtoi(pid_text, &pid) && pid > 0) ::kill(pid, SIGKILL);
      }
      absl::SleepFor(absl::Milliseconds(10));
    }
    const int err = result == 0 ? 0 : errno;
    if (err != 0 && err != ENOENT) {
      nomadplugin::hclog::Warn("cannot remove a VM's cgroup", {{"cgroup", dir},
                                                               {"error", std::strerror(err)},
                                                               {"procs", ReadSmallFile(dir + "/cgroup.procs").value_or("?")}});
    }
  }
}

const std::vector<std::string>& CgroupManager::Controllers() {
  static const std::vector<std::string> controllers = {"cpu", "cpuacct", "cpuset", "memory", "pids"};
  return controllers;
}

CgroupManager::CgroupManager(CgroupMounts mounts) : mounts_(std::move(mounts)) {}

CgroupSupport CgroupManager::Support(const std::string& parent) {
  absl::MutexLock lock(&mu_);
  if (auto it = support_.find(parent); it != support_.end()) return it->second;
  CgroupSupport support;
  support.version = mounts_.version;
  bool made = false;
  if (mounts_.version == CgroupVersion::kNone) {
    support.problem = "no cgroup filesystem is mounted";
  } else if (mounts_.version == CgroupVersion::kV1) {
    for (const auto& [controller, mount] : mounts_.v1) {
      const std::string dir = mount + "/" + parent;
      absl::Status status = MakeDir(dir, &made);
      if (status.ok() && controller == "cpuset") status = InheritCpuset(dir, "");
      if (!status.ok()) {
        support.problem = std::string(status.message());
        break;
      }
      support.controllers.push_back(controller);
    }
  } else {
    // The parent's subtree_control decides what its children may use.
    const std::vector<std::string> offered = V2Controllers(mounts_.unified + "/cgroup.controllers");
    std::string enable;
    for (const std::string& c : offered) absl::StrAppend(&enable, enable.empty() ? "" : " ", "+", c);
    const std::string dir = mounts_.unified + "/" + parent;
    absl::Status status = enable.empty() ? absl::OkStatus() : WriteFile(mounts_.unified, "cgroup.subtree_control", enable);
    if (status.ok()) status = MakeDir(dir, &made);
    if (status.ok() && !enable.empty()) status = WriteFile(dir, "cgroup.subtree_control", enable);
    if (!status.ok()) support.problem = std::string(status.message());
    else support.controllers = V2Controllers(dir + "/cgroup.subtree_control");
  }
  if (support.problem.empty() && !Has(support.controllers, "memory")) {
    support.problem = absl::StrCat("the memory controller is not available to cgroup \"", parent, "\"");
  }
  support.usable = support.problem.empty();
  support_[parent] = support;
  return support;
}

absl::StatusOr<std::optional<TaskCgroup>> CgroupManager::Create(const std::string& parent, const std::string& name,
                                                                const std::string& nomad_cgroup,
                                                                const CgroupLimits& limits) {
  const CgroupSupport support = Support(parent);
  if (!support.usable) return std::optional<TaskCgroup>();
  TaskCgroup cgroup;
  cgroup.version = support.version;
  auto fail = [&cgroup](const absl::Status& status) -> absl::StatusOr<std::optional<TaskCgroup>> {
    RemoveTaskCgroup(cgroup);
    return absl::Status(status.code(), absl::StrCat("cannot isolate the VM: ", status.message()));
  };
  auto make = [&cgroup](const std::string& dir) {
    bool made = false;
    absl::Status status = MakeDir(dir, &made);
    if (made) cgroup.created.push_back(dir);
    return status;
  };
  absl::Status status;
  if (support.version == CgroupVersion::kV1) {
    for (const std::string& controller : support.controllers) {
      std::string dir = mounts_.v1.at(controller) + "/" + parent + "/" + name;
      // Nomad's shared or reserved cpuset for the task, when it made one.
      const bool nomad_cpuset = controller == "cpuset" && !nomad_cgroup.empty() && IsDir(nomad_cgroup);
      if (nomad_cpuset) dir = nomad_cgroup;
      else if (!(status = make(dir)).ok()) return fail(status);
      cgroup.dirs[controller] = dir;
      if (controller == "memory") {
        if (limits.memory_bytes > 0) status = WriteFile(dir, "memory.limit_in_bytes", std::to_string(limits.memory_bytes));
        if (status.ok() && limits.memory_soft_bytes > 0) {
          status = WriteFile(dir, "memory.soft_limit_in_bytes", std::to_string(limits.memory_soft_bytes));
        }
      } else if (controller == "cpu" && limits.cpu_shares > 0) {
        status = WriteFile(dir, "cpu.shares", std::to_string(std::max<int64_t>(2, limits.cpu_shares)));
      } else if (controller == "cpuset" && !nomad_cpuset) {
        status = InheritCpuset(dir, limits.cpuset);
      } else if (controller == "pids" && limits.pids_max > 0) {
        status = WriteFile(dir, "pids.max", std::to_string(limits.pids_max));
      }
      if (!status.ok()) return fail(status);
    }
    return std::optional<TaskCgroup>(std::move(cgroup));
  }
  // v2: one directory, Nomad's when it made it for this task.
  std::string dir = mounts_.unified + "/" + parent + "/" + name;
  if (!nomad_cgroup.empty() && nomad_cgroup.rfind(mounts_.unified + "/", 0) == 0 && IsDir(nomad_cgroup)) {
    dir = nomad_cgroup;
  } else if (!(status = make(dir)).ok()) {
    return fail(status);
  }
  const std::vector<std::string> controllers = V2Controllers(dir + "/cgroup.controllers");
  for (const std::string& controller : controllers) cgroup.dirs[controller] = dir;
  if (cgroup.dirs.empty()) cgroup.dirs["unified"] = dir;
  if (Has(controllers, "memory") && limits.memory_bytes > 0) {
    status = WriteFile(dir, "memory.max", std::to_string(limits.memory_bytes));
  }
  if (status.ok() && Has(controllers, "memory") && limits.memory_soft_bytes > 0) {
    status = WriteFile(dir, "memory.low", std::to_string(limits.memory_soft_bytes));
  }
  if (status.ok() && Has(controllers, "cpu") && limits.cpu_shares > 0) {
    status = WriteFile(dir, "cpu.weight", std::to_string(CpuSharesToWeight(limits.cpu_shares)));
  }
  if (status.ok() && Has(controllers, "cpuset") && !limits.cpuset.empty()) {
    status = WriteFile(dir, "cpuset.cpus", limits.cpuset);
  }
  if (status.ok() && Has(controllers, "pids") && limits.pids_max > 0) {
    status = WriteFile(dir, "pids.max", std::to_string(limits.pids_max));
  }
  if (!status.ok()) return fail(status);
  return std::optional<TaskCgroup>(std::move(cgroup));
}

}  // namespace ndq
