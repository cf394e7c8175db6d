#include "qemu/warm_plan.h"

#include <algorithm>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "qemu/vm_spec.h"

namespace ndq {
namespace {

constexpr char kPrefix[] = "task config \"warm_start\": ";

// What a template cannot carry: state kept in files beside the RAM and the
// boot disk, or bound to this host's other end (a bridge's MAC).
std::vector<std::string> Incompatible(const TaskConfig& config, const VmSpec& spec) {
  std::vector<std::string> found;
  if (spec.network.enabled) found.push_back("network_mode = \"bridge\" (restored guests would share one MAC)");
  if (spec.tpm) found.push_back("tpm (the TPM's state is swtpm's, not QEMU's)");
  if (spec.firmware.uefi) found.push_back("firmware = \"uefi\" (the variable store is a file of its own)");
  if (!config.disks.empty()) found.push_back("disk blocks (only the boot disk is saved)");
  if (config.cdrom || config.cdrom_source) found.push_back("cdrom (only the boot disk is saved)");
  if (config.cloud_init) found.push_back("cloud_init (the seed is per task; save after cloud-init instead)");
  if (config.share_alloc_dirs) found.push_back("share_alloc_dirs (QEMU cannot save a mounted 9p share)");
  if (!spec.shares.empty() && !config.share_alloc_dirs) {
    found.push_back("volume mounts (QEMU cannot save a mounted 9p share)");
  }
  if (spec.image_path.empty()) found.push_back("a VM without a boot disk (image_path or image_source)");
  return found;
}

void PlanReadyPort(const std::string& label, const VmSpec& spec, WarmPlan& warm, std::vector<std::string>& problems) {
  const auto forward = std::find_if(spec.port_forwards.begin(), spec.port_forwards.end(),
                                    [&](const PortForward& f) { return f.label == label && f.protocol == "tcp"; });
  if (forward == spec.port_forwards.end()) {
    std::set<std::string> labels;  // a label forwarded for TCP and UDP is named once
    for (const PortForward& f : spec.port_forwards) labels.insert("\"" + f.label + "\"");
    problems.push_back(absl::StrCat(kPrefix, "ready_port \"", label, "\" is not a TCP port_map label",
                                    labels.empty() ? std::string("; the task config has no port_map")
                                                   : absl::StrCat("; port_map has ", absl::StrJoin(labels, ", "))));
    return;
  }
  warm.ready.port_label = label;
  warm.ready.host_ip = forward->host_ip;
  warm.ready.host_port = forward->host_port;
  warm.ready.guest_port = forward->guest_port;
}

}  // namespace

void PlanWarmStart(const TaskConfig& config, VmSpec& spec, std::vector<std::string>& problems) {
  if (!config.warm_start) return;
  const WarmStartConfig& asked = *config.warm_start;
  WarmPlan warm;
  warm.enabled = true;
  warm.ready.timeout = kWarmReadyTimeout;
  const bool port = asked.ready_port.has_value();
  if (port == asked.ready_agent) {
    problems.push_back(absl::StrCat(kPrefix, "set exactly one of ready_port (a port_map label) and ready_agent = true"));
  } else if (asked.ready_agent) {
    if (!spec.guest_agent) problems.push_back(absl::StrCat(kPrefix, "ready_agent needs guest_agent = true"));
    warm.ready.guest_agent = true;
  } else {
    PlanReadyPort(*asked.ready_port, spec, warm, problems);
  }
  if (asked.warm_pool) {
    if (*asked.warm_pool < 0 || *asked.warm_pool > kMaxWarmPool) {
      problems.push_back(absl::StrCat(kPrefix, "warm_pool must be from 0 to ", kMaxWarmPool, ", got ", *asked.warm_pool));
    } else {
      warm.pool_size = static_cast<int>(*asked.warm_pool);
    }
  }
  const std::vector<std::string> incompatible = Incompatible(config, spec);
  if (!incompatible.empty()) {
    problems.push_back(absl::StrCat(kPrefix, "cannot be used with ", absl::StrJoin(incompatible, ", ")));
  }
  spec.warm = warm;
}

}  // namespace ndq
