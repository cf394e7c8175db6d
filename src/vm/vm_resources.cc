#include "vm/vm_resources.h"

#include <filesystem>

#include "host/tap_device.h"
#include "nomadplugin/hclog.h"
#include "vm/console.h"

namespace ndq {

namespace log = nomadplugin::hclog;

VmResources ResourcesOf(const DriverStateRecord& record) {
  VmResources resources;
  resources.state_dir = record.state_dir;
  resources.cgroup = record.cgroup;
  resources.tap = record.tap_name;
  resources.console_dir = record.console_dir;
  resources.leases = record.cached_images;
  return resources;
}

void KeepResourcesIn(const VmResources& resources, DriverStateRecord& record) {
  record.state_dir = resources.state_dir;
  record.cgroup = resources.cgroup;
  record.tap_name = resources.tap;
  record.console_dir = resources.console_dir;
  record.cached_images = resources.leases;
}

void Release(const VmResources& resources, VmHost& host, ImageCache& cache, const std::string& lease) {
  // A bridged VM's TAP goes with QEMU's last fd; one still there (made
  // persistent by someone) is removed.
  if (!resources.tap.empty()) {
    if (absl::Status removed = DeleteTap(resources.tap); !removed.ok()) {
      log::Warn("leftover TAP not removed", {{"tap", resources.tap}, {"error", std::string(removed.message())}});
    }
  }
  host.RemoveCgroup(resources.cgroup);
  RemoveConsoleDir(resources.console_dir);
  if (!resources.state_dir.empty()) {
    std::error_code ignored;
    std::filesystem::remove_all(resources.state_dir, ignored);
  }
  for (const std::string& leased : resources.leases) cache.Release(leased, lease);
}

}  // namespace ndq
