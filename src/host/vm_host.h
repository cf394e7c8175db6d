// What starting a VM does to the host, behind one small interface: the start
// pipeline makes cgroups and runs the supervisor only through it, so a test
// can make each of these fail (tests/fakes/fake_vm_host.h) and check that
// everything made before was undone.
#pragma once

#include <sys/types.h>

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "host/cgroups.h"

namespace ndq {

class VmHost {
 public:
  virtual ~VmHost() = default;

  // CgroupManager::Create: the VM's cgroup(s) with `limits`; nullopt when
  // this host has no usable isolation.
  virtual absl::StatusOr<std::optional<TaskCgroup>> CreateCgroup(const std::string& parent, const std::string& name,
                                                                 const std::string& nomad_cgroup,
                                                                 const CgroupLimits& limits) = 0;
  virtual void RemoveCgroup(const TaskCgroup& cgroup) = 0;

  // Starts the supervisor detached from our signal state, its output in
  // supervisor.log under `state_fd`, `image_fds` as its fds 3, 4, ...
  virtual absl::StatusOr<pid_t> SpawnSupervisor(const std::vector<std::string>& argv, int state_fd,
                                                const std::vector<int>& image_fds) = 0;
  // Kills a supervisor we started (its QEMU dies with it) and reaps it.
  virtual void KillSupervisor(pid_t pid) = 0;
};

// The real host: cgroupfs and posix_spawn.
class SystemVmHost : public VmHost {
 public:
  explicit SystemVmHost(CgroupManager* cgroups) : cgroups_(cgroups) {}
  absl::StatusOr<std::optional<TaskCgroup>> CreateCgroup(const std::string& parent, const std::string& name,
                                                         const std::string& nomad_cgroup,
                                                         const CgroupLimits& limits) override;
  void RemoveCgroup(const TaskCgroup& cgroup) override;
  absl::StatusOr<pid_t> SpawnSupervisor(const std::vector<std::string>& argv, int state_fd,
                                        const std::vector<int>& image_fds) override;
  void KillSupervisor(pid_t pid) override;

 private:
  CgroupManager* const cgroups_;
};

}  // namespace ndq
