// Resource isolation for VMs with Linux control groups, on cgroup v1 (one
// hierarchy per controller, as on hybrid hosts) and v2 (one unified tree).
//
// Each VM gets one cgroup per controller (v1) or one cgroup (v2). QEMU joins
// it in the supervisor's child before exec, so every byte QEMU allocates is
// charged there. On v2, Nomad (1.7+) creates the task's cgroup itself and
// names it in LinuxResources.cpuset_cgroup; we use that one when it exists.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace ndq {

enum class CgroupVersion { kNone, kV1, kV2 };
const char* CgroupVersionName(CgroupVersion version);  // "none", "v1", "v2"

// The cgroup filesystems mounted on this host.
struct CgroupMounts {
  CgroupVersion version = CgroupVersion::kNone;
  std::string unified;                          // the cgroup2 mount point (v2 only)
  std::map<std::string, std::string> v1;        // controller -> its hierarchy's mount point
};

// Reads /proc/self/mountinfo's format. A host with v1 controllers mounted is
// v1 even when an empty cgroup2 tree sits beside them (hybrid).
CgroupMounts ParseCgroupMounts(absl::string_view mountinfo);
CgroupMounts DetectCgroupMounts();

// What one VM may use.
struct CgroupLimits {
  int64_t memory_bytes = 0;       // hard limit; 0: none
  int64_t memory_soft_bytes = 0;  // what to protect/reclaim down to under pressure; 0: none
  int64_t cpu_shares = 0;         // Nomad's CPU share (MHz); v2 converts it to a weight
  std::string cpuset;             // reserved cores, e.g. "0-1"; empty: inherit
  int64_t pids_max = 0;           // 0: no limit
};

// cgroup v1 cpu.shares -> v2 cpu.weight, the conversion runc and systemd use.
int64_t CpuSharesToWeight(int64_t shares);

// The cgroups one VM runs in. Stored in the driver state so a restarted
// plugin can read its stats and remove it.
struct TaskCgroup {
  CgroupVersion version = CgroupVersion::kNone;
  // controller -> directory; on v2 every controller maps to the same one.
  std::map<std::string, std::string> dirs;
  // Directories we made (and so remove); Nomad's own are left to Nomad.
  std::vector<std::string> created;

  // The cgroup.procs files QEMU joins, one per distinct directory.
  std::vector<std::string> ProcsFiles() const;
  std::string Dir(const std::string& controller) const;  // "" when not isolated by it
};

// Usage read from a VM's cgroup; a field is nullopt when the host does not
// expose it.
struct CgroupUsage {
  std::optional<uint64_t> memory_usage, memory_max_usage, memory_rss, memory_cache, memory_swap;
  std::optional<uint64_t> cpu_user_ns, cpu_system_ns, cpu_total_ns;
  std::optional<uint64_t> pids;
};
CgroupUsage ReadCgroupUsage(const TaskCgroup& cgroup);

// How many times the kernel's OOM killer fired inside the cgroup.
uint64_t CgroupOomKills(const TaskCgroup& cgroup);

// Kills whatever is still in the cgroup and removes the directories we made.
void RemoveTaskCgroup(const TaskCgroup& cgroup);

// Whether the driver can isolate VMs on this host, found out once (creating
// the parent cgroups is the test).
struct CgroupSupport {
  CgroupVersion version = CgroupVersion::kNone;
  bool usable = false;
  std::vector<std::string> controllers;  // the ones we use and may write
  std::string problem;                   // why not usable, for the log and the fingerprint
};

class CgroupManager {
 public:
  // The controllers the driver uses.
  static const std::vector<std::string>& Controllers();

  explicit CgroupManager(CgroupMounts mounts);

  // Probes (once per parent name) by creating `parent` under each controller.
  CgroupSupport Support(const std::string& parent);

  // Makes the VM's cgroup(s) named `name` under `parent` (or adopts Nomad's
  // v2 task cgroup `nomad_cgroup` when it exists) and writes the limits.
  // nullopt when isolation is unavailable on this host. A limit that cannot
  // be written is an error, and then nothing is left behind.
  absl::StatusOr<std::optional<TaskCgroup>> Create(const std::string& parent, const std::string& name,
                                                   const std::string& nomad_cgroup, const CgroupLimits& limits);

 private:
  const CgroupMounts mounts_;
  absl::Mutex mu_;
  std::map<std::string, CgroupSupport> support_ ABSL_GUARDED_BY(mu_);  // by parent
};

}  // namespace ndq
