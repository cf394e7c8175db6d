#include "driver/stats.h"

#include "absl/time/clock.h"
#include "host/process_watch.h"

#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>

namespace ndq {
namespace {

namespace driverpb = hashicorp::nomad::plugins::drivers::proto;

void FillCpu(driverpb::TaskResourceUsage* usage, double user_pct, double system_pct, double total_pct) {
  auto* cpu = usage->mutable_cpu();
  cpu->set_user_mode(user_pct);
  cpu->set_system_mode(system_pct);
  cpu->set_percent(total_pct);
  cpu->set_total_ticks(total_pct / 100.0 * CoreMhz());
  for (auto field : {driverpb::CPUUsage::USER_MODE, driverpb::CPUUsage::SYSTEM_MODE, driverpb::CPUUsage::PERCENT,
                     driverpb::CPUUsage::TOTAL_TICKS}) {
    cpu->add_measured_fields(field);
  }
}

void FillUsage(driverpb::TaskResourceUsage* usage, double user_pct, double system_pct, uint64_t rss) {
  FillCpu(usage, user_pct, system_pct, user_pct + system_pct);
  usage->mutable_memory()->set_rss(rss);
  usage->mutable_memory()->add_measured_fields(driverpb::MemoryUsage::RSS);
}

}  // namespace

std::optional<ProcessSample> ReadProcessSample(pid_t pid) {
  std::optional<std::vector<std::string>> fields = ReadProcStat(pid);
  if (!fields || fields->size() <= 24) return std::nullopt;
  // utime is field 14, stime 15, rss (pages) 24.
  const double utime = std::stod((*fields)[14]);
  const double stime = std::stod((*fields)[15]);
  const double rss_pages = std::stod((*fields)[24]);
  const double ns_per_tick = 1e9 / static_cast<double>(::sysconf(_SC_CLK_TCK));
  return ProcessSample{utime * ns_per_tick, stime * ns_per_tick,
                       static_cast<uint64_t>(rss_pages) * static_cast<uint64_t>(::sysconf(_SC_PAGESIZE))};
}

double CoreMhz() {
  static const double mhz = [] {
    std::ifstream in("/proc/cpuinfo");
    std::string line;
    while (std::getline(in, line)) {
      if (line.rfind("cpu MHz", 0) == 0) return std::stod(line.substr(line.find(':') + 1));
    }
    return 1000.0;
  }();
  return mhz;
}

// Percent of one core used between two cumulative nanosecond counters.
double PercentOf(const std::optional<uint64_t>& now, const std::optional<uint64_t>& before, double wall_ns) {
  if (!now || !before || wall_ns <= 0 || *now < *before) return 0;
  return static_cast<double>(*now - *before) / wall_ns * 100.0;
}

// The cgroup's view: everything QEMU (and anything it started) used.
void FillFromCgroup(driverpb::TaskResourceUsage* usage, const CgroupUsage& now, const std::optional<CgroupUsage>& before,
                    double wall_ns) {
  if (now.cpu_total_ns) {
    const CgroupUsage none;
    const CgroupUsage& prev = before ? *before : none;
    FillCpu(usage, PercentOf(now.cpu_user_ns, prev.cpu_user_ns, wall_ns),
            PercentOf(now.cpu_system_ns, prev.cpu_system_ns, wall_ns), PercentOf(now.cpu_total_ns, prev.cpu_total_ns, wall_ns));
  }
  auto* memory = usage->mutable_memory();
  memory->clear_measured_fields();
  // Only what the cgroup gives is set and listed as measured.
  auto put = [memory](const std::optional<uint64_t>& value, void (driverpb::MemoryUsage::*set)(uint64_t),
                      driverpb::MemoryUsage::Fields field) {
    if (!value) return;
    (memory->*set)(*value);
    memory->add_measured_fields(field);
  };
  put(now.memory_rss, &driverpb::MemoryUsage::set_rss, driverpb::MemoryUsage::RSS);
  put(now.memory_cache, &driverpb::MemoryUsage::set_cache, driverpb::MemoryUsage::CACHE);
  put(now.memory_usage, &driverpb::MemoryUsage::set_usage, driverpb::MemoryUsage::USAGE);
  put(now.memory_max_usage, &driverpb::MemoryUsage::set_max_usage, driverpb::MemoryUsage::MAX_USAGE);
  put(now.memory_swap, &driverpb::MemoryUsage::set_swap, driverpb::MemoryUsage::SWAP);
}

driverpb::TaskStats StatsSampler::Sample(const std::string& task_id, const std::vector<pid_t>& pids,
                                         const TaskCgroup* cgroup) {
  driverpb::TaskStats stats;
  stats.set_id(task_id);
  const absl::Time now = absl::Now();
  stats.mutable_timestamp()->set_seconds(absl::ToUnixSeconds(now));
  double user_total = 0, system_total = 0;
  uint64_t rss_total = 0;
  for (pid_t pid : pids) {
    std::optional<ProcessSample> sample = ReadProcessSample(pid);
    if (!sample) continue;
    double user_pct = 0, system_pct = 0;
    if (auto it = previous_.find(pid); it != previous_.end()) {
      const double wall_ns = absl::ToDoubleNanoseconds(now - it->second.at);
      if (wall_ns > 0) {
        user_pct = (sample->user_ns - it->second.sample.user_ns) / wall_ns * 100.0;
        system_pct = (sample->system_ns - it->second.sample.system_ns) / wall_ns * 100.0;
      }
    }
    previous_[pid] = Previous{*sample, now};
    FillUsage(&(*stats.mutable_resource_usage_by_pid())[std::to_string(pid)], user_pct, system_pct, sample->rss_bytes);
    user_total += user_pct;
    system_total += system_pct;
    rss_total += sample->rss_bytes;
  }
  FillUsage(stats.mutable_agg_resource_usage(), user_total, system_total, rss_total);
  if (cgroup != nullptr && cgroup->version != CgroupVersion::kNone) {
    const CgroupUsage usage = ReadCgroupUsage(*cgroup);
    const double wall_ns = previous_cgroup_ ? absl::ToDoubleNanoseconds(now - previous_cgroup_at_) : 0;
    FillFromCgroup(stats.mutable_agg_resource_usage(), usage, previous_cgroup_, wall_ns);
    previous_cgroup_ = usage;
    previous_cgroup_at_ = now;
  }
  return stats;
}

}  // namespace ndq
