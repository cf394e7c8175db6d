#include "qemu/network_plan.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "qemu/hardware_plan.h"

namespace ndq {
namespace {


// A job's value echoed in a message, cut short: it is the job's own text,
// but a 10 kB "bridge" should not become a 10 kB error.
std::string Shown(const std::string& value) {
  constexpr size_t kMaxShown = 40;
  return Quoted(value.size() <= kMaxShown ? value : value.substr(0, kMaxShown) + "...");
}

// Which bridge: the job's, or the only one the operator allows. The error
// for a bridge outside the allowlist is the same whether or not the host has
// an interface of that name.
void PlanBridge(const TaskConfig& config, const PluginConfig& plugin, VmSpec& spec,
                std::vector<std::string>& problems) {
  const std::vector<std::string>& allowed = plugin.bridges_allowlist;
  if (allowed.empty()) {
    problems.push_back(absl::StrCat(TaskConfigField("network_mode"),
                                    ": \"bridge\" is not enabled on this client (the plugin's bridges_allowlist is empty)"));
    return;
  }
  if (!config.bridge) {
    if (allowed.size() == 1) {
      spec.network.bridge = allowed[0];
    } else {
      problems.push_back(absl::StrCat(TaskConfigField("bridge"), " must be set with network_mode = \"bridge\": this client allows ",
                                      QuotedList(allowed)));
    }
    return;
  }
  const std::string& bridge = *config.bridge;
  if (!IsInterfaceName(bridge)) {
    problems.push_back(absl::StrCat(TaskConfigField("bridge"), ": ", Shown(bridge),
                                    " is not an interface name (1 to 15 characters of A-Z a-z 0-9 . _ -)"));
  } else if (std::find(allowed.begin(), allowed.end(), bridge) == allowed.end()) {
    problems.push_back(absl::StrCat(TaskConfigField("bridge"), ": ", Shown(bridge), " is not in the plugin's bridges_allowlist ",
                                    QuotedList(allowed)));
  } else {
    spec.network.bridge = bridge;
  }
}

// port_map in bridge mode: no host port is forwarded (the guest has its own
// address); the labels name guest ports for Nomad's driver network.
void PlanGuestPorts(const TaskConfig& config, VmSpec& spec, std::vector<std::string>& problems) {
  for (const auto& [label, guest_port] : config.port_map) {
    if (guest_port < 1 || guest_port > 65535) {
      problems.push_back(absl::StrCat(TaskConfigField("port_map"), ": port ", Shown(label), " maps to guest port ", guest_port,
                                      ", which is not in 1..65535"));
      continue;
    }
    spec.network.guest_ports[label] = static_cast<int>(guest_port);
  }
}

void PlanAdvertise(const TaskConfig& config, VmSpec& spec, std::vector<std::string>& problems) {
  if (config.advertise_timeout && !config.advertise_address) {
    problems.push_back(absl::StrCat(TaskConfigField("advertise_timeout"), ": only with advertise_address = true"));
  }
  if (!config.advertise_address) return;
  if (!config.guest_agent) {
    problems.push_back(absl::StrCat(TaskConfigField("advertise_address"),
                                    ": needs guest_agent = true (the guest's address is read from its guest agent)"));
  }
  spec.network.advertise_address = true;
  spec.network.advertise_timeout_ms = kDefaultAdvertiseTimeoutMs;
  if (!config.advertise_timeout) return;
  absl::Duration timeout;
  if (!absl::ParseDuration(*config.advertise_timeout, &timeout) || timeout <= absl::ZeroDuration() ||
      timeout > absl::Milliseconds(kMaxAdvertiseTimeoutMs)) {
    problems.push_back(absl::StrCat(TaskConfigField("advertise_timeout"), ": ", Shown(*config.advertise_timeout),
                                    " is not a duration from 1s to 10m (e.g. \"90s\", \"2m\")"));
    return;
  }
  spec.network.advertise_timeout_ms = absl::ToInt64Milliseconds(timeout);
}

}  // namespace

void PlanNetworkMode(const TaskConfig& config, const PluginConfig& plugin, VmSpec& spec,
                     std::vector<std::string>& problems) {
  const std::string mode = config.network_mode.value_or("user");
  if (mode != "user" && mode != "bridge") {
    problems.push_back(absl::StrCat(TaskConfigField("network_mode"), ": ", Shown(mode),
                                    " is not supported; use \"user\" or \"bridge\""));
    return;
  }
  if (mode == "user") {
    // The user network's guest address is always 10.0.2.15, behind NAT:
    // nothing worth advertising, and no bridge to choose.
    if (config.bridge) problems.push_back(absl::StrCat(TaskConfigField("bridge"), ": only with network_mode = \"bridge\""));
    if (config.advertise_address) {
      problems.push_back(absl::StrCat(TaskConfigField("advertise_address"),
                                      ": only with network_mode = \"bridge\" (QEMU's user network has no routable "
                                      "guest address)"));
    }
    if (config.advertise_timeout) {
      problems.push_back(absl::StrCat(TaskConfigField("advertise_timeout"), ": only with network_mode = \"bridge\""));
    }
    return;
  }
  spec.network.enabled = true;
  // The boot watch's port is a host port forward of the user network, which
  // bridge mode does not have.
  if (config.boot_ready_port) {
    problems.push_back(absl::StrCat(TaskConfigField("boot_ready_port"),
                                    ": not with network_mode = \"bridge\" (port_map forwards no host port there); "
                                    "let boot_timeout watch the guest agent instead (guest_agent = true)"));
  }
  PlanBridge(config, plugin, spec, problems);
  PlanGuestPorts(config, spec, problems);
  PlanAdvertise(config, spec, problems);
}

}  // namespace ndq
