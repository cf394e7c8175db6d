// Planning of the VM's network mode: "user" (QEMU's user network, the
// default; port_map forwards host ports into the guest) or "bridge" (a TAP
// on a host bridge the operator allows in bridges_allowlist; the guest gets
// its own address on that network, optionally advertised to Nomad).
// Pure: no I/O.
#pragma once

#include <string>
#include <vector>

#include "policy/plugin_config.h"
#include "policy/task_config.h"
#include "qemu/vm_spec.h"

namespace ndq {

// advertise_timeout's default and upper bound: a guest's DHCP normally takes
// seconds; TCG boots of large images take a minute or more.
inline constexpr int64_t kDefaultAdvertiseTimeoutMs = 2 * 60 * 1000;
inline constexpr int64_t kMaxAdvertiseTimeoutMs = 10 * 60 * 1000;

// network_mode, bridge, advertise_address, advertise_timeout and, in bridge
// mode, port_map (guest ports only). Fills spec.network; records every
// problem with its option's name. Runs before the user network's port
// forwards, which are planned only when !spec.network.enabled.
void PlanNetworkMode(const TaskConfig& config, const PluginConfig& plugin, VmSpec& spec,
                     std::vector<std::string>& problems);

}  // namespace ndq
