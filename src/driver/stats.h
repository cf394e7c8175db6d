// Resource usage of a VM in the form Nomad's TaskStats expects: per process
// (QEMU and its supervisor) from /proc, and in aggregate from the VM's cgroup
// when it has one (else the sum of the processes).
#pragma once

#include <sys/types.h>

#include <map>
#include <optional>
#include <vector>

#include "absl/time/time.h"
#include "host/cgroups.h"
#include "nomad/driver.pb.h"

namespace ndq {

struct ProcessSample {
  double user_ns = 0;
  double system_ns = 0;
  uint64_t rss_bytes = 0;
};

// nullopt when the process is gone.
std::optional<ProcessSample> ReadProcessSample(pid_t pid);

// MHz of one core, for Nomad's total_ticks (CPU expressed in MHz, as tasks reserve it).
double CoreMhz();

// Turns successive samples into Nomad's usage: CPU percent over the interval
// since the previous call (100 = one core busy), RSS now.
class StatsSampler {
 public:
  // `cgroup` may be null or of version kNone: no cgroup.
  hashicorp::nomad::plugins::drivers::proto::TaskStats Sample(const std::string& task_id,
                                                              const std::vector<pid_t>& pids,
                                                              const TaskCgroup* cgroup = nullptr);

 private:
  struct Previous {
    ProcessSample sample;
    absl::Time at;
  };
  std::map<pid_t, Previous> previous_;
  std::optional<CgroupUsage> previous_cgroup_;
  absl::Time previous_cgroup_at_;
};

}  // namespace ndq
