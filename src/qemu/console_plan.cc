#include "qemu/console_plan.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "qemu/hardware_plan.h"
#include "qemu/vm_spec.h"

namespace ndq {
namespace {

constexpr char kConsoleDirName[] = "console";
constexpr char kSerialSocketName[] = "serial.sock";
constexpr char kVncSocketName[] = "vnc.sock";

void PlanConsoleSockets(const TaskRequest& task, ConsolePlan& plan, std::vector<std::string>& problems) {
  plan.enabled = true;
  plan.dir = task.task_dir() + "/" + kConsoleDirName;
  plan.serial_socket = plan.dir + "/" + kSerialSocketName;
  plan.vnc_socket = plan.dir + "/" + kVncSocketName;
  const std::string& longest = plan.serial_socket.size() > plan.vnc_socket.size() ? plan.serial_socket : plan.vnc_socket;
  if (longest.size() > kMaxUnixSocketPath) {
    problems.push_back(absl::StrCat("task config \"console\": the console socket ", Quoted(longest), " is ",
                                    longest.size(), " bytes long, over the unix socket limit of ", kMaxUnixSocketPath,
                                    "; use a shorter Nomad data_dir (or task name)"));
    return;
  }
  // -vnc's value starts with an implied key: an '=' before the first ','
  // would make QEMU read the path as key=value (commas are doubled).
  const size_t eq = plan.vnc_socket.find('='), comma = plan.vnc_socket.find(',');
  if (eq != std::string::npos && (comma == std::string::npos || eq < comma)) {
    problems.push_back(absl::StrCat("task config \"console\": the task directory ", Quoted(task.task_dir()),
                                    " holds an '=', which QEMU's -vnc cannot take in a socket path"));
  }
}

// "90s", "2m30s", "1.5h": Go's duration syntax, as Nomad's own durations.
void PlanBootTimeout(const TaskConfig& config, VmSpec& spec, std::vector<std::string>& problems) {
  const std::string prefix = "task config \"boot_timeout\": ";
  absl::Duration timeout;
  if (!absl::ParseDuration(*config.boot_timeout, &timeout) || timeout == absl::InfiniteDuration() ||
      timeout == -absl::InfiniteDuration()) {
    problems.push_back(absl::StrCat(prefix, Quoted(*config.boot_timeout),
                                    " is not a duration such as \"90s\" or \"5m\""));
    return;
  }
  if (timeout < kMinBootTimeout || timeout > kMaxBootTimeout) {
    problems.push_back(absl::StrCat(prefix, Quoted(*config.boot_timeout), " is out of range; use ",
                                    absl::FormatDuration(kMinBootTimeout), " to ",
                                    absl::FormatDuration(kMaxBootTimeout)));
    return;
  }
  if (!spec.guest_agent && !config.boot_ready_port) {
    problems.push_back(prefix + "needs something that answers when the guest is up: set guest_agent = true or "
                                "boot_ready_port to a port_map label");
    return;
  }
  spec.boot_watch.timeout = timeout;
  spec.boot_watch.guest_agent = spec.guest_agent;
}

void PlanReadyPort(const TaskConfig& config, VmSpec& spec, std::vector<std::string>& problems) {
  const std::string& label = *config.boot_ready_port;
  const std::string prefix = "task config \"boot_ready_port\": ";
  if (!config.boot_timeout) {
    problems.push_back(prefix + "needs boot_timeout, the time the port has to answer");
    return;
  }
  if (config.port_map.count(label) == 0) {
    std::vector<std::string> labels;
    for (const auto& [known, unused] : config.port_map) labels.push_back(known);
    problems.push_back(absl::StrCat(prefix, Quoted(label), " is not a port_map label; ",
                                    labels.empty() ? std::string("the task config has no port_map")
                                                   : absl::StrCat("port_map has ", QuotedList(labels))));
    return;
  }
  const auto forward = std::find_if(spec.port_forwards.begin(), spec.port_forwards.end(), [&](const PortForward& f) {
    return f.label == label && f.protocol == "tcp";
  });
  if (forward == spec.port_forwards.end()) return;  // port_map named the problem already
  spec.boot_watch.port_label = label;
  spec.boot_watch.host_ip = forward->host_ip;
  spec.boot_watch.host_port = forward->host_port;
  spec.boot_watch.guest_port = forward->guest_port;
}

}  // namespace

void PlanConsole(const TaskConfig& config, const TaskRequest& task, VmSpec& spec, std::vector<std::string>& problems) {
  if (config.console) PlanConsoleSockets(task, spec.console, problems);
  if (config.boot_timeout) PlanBootTimeout(config, spec, problems);
  if (config.boot_ready_port) PlanReadyPort(config, spec, problems);
  if (spec.boot_watch.timeout == absl::ZeroDuration()) spec.boot_watch = BootWatchPlan{};
}

}  // namespace ndq
