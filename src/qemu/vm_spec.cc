#include "qemu/vm_spec.h"

#include <arpa/inet.h>

#include <algorithm>
#include <optional>
#include <set>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "policy/allowlist.h"
#include "qemu/hardware_plan.h"
#include "qemu/network_plan.h"
#include "qemu/share_plan.h"

namespace ndq {
namespace {


// Nomad's qemu driver defaults, so its jobs behave the same here.
constexpr char kDefaultEmulator[] = "x86_64";
constexpr char kDefaultAccelerator[] = "tcg";
constexpr char kDefaultMachineType[] = "pc";
constexpr char kDefaultDriveInterface[] = "ide";
const std::vector<std::string>& Accelerators() {
  static const auto* v = new std::vector<std::string>{"tcg", "kvm"};
  return *v;
}
const std::vector<std::string>& DriveInterfaces() {
  static const auto* v = new std::vector<std::string>{"ide", "scsi", "sd", "mtd", "floppy", "pflash", "virtio", "none"};
  return *v;
}
// Nomad's bounds for the memory a VM gets.
constexpr int64_t kMinMemoryMb = 128;
constexpr int64_t kMaxMemoryMb = 4000000;
// Far above any real CPU number; keeps a hostile cpuset from meaning much.
constexpr int kMaxCpuId = 1 << 16;

// Nomad treats an empty string like an unset option.
std::string OrDefault(const std::optional<std::string>& value, const char* fallback) {
  return value.has_value() && !value->empty() ? *value : fallback;
}

bool IsIpv4(const std::string& ip) {
  in_addr addr;
  return ::inet_pton(AF_INET, ip.c_str(), &addr) == 1;
}

// Letters, digits, '-', '_' and dots: what resolv.conf search domains hold,
// and nothing QEMU's option parser treats specially.
bool IsDomainName(const std::string& name) {
  if (name.empty() || name.size() > 253) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
  });
}

struct HostPort {
  std::string ip;
  int port = 0;
};

// Nomad hands a task its ports in one of two places: task-level network
// blocks in allocated_resources.networks[0] (the only place Nomad's driver
// looks, so its port_map silently fails with group networks) and group-level
// network blocks in resources.ports. Both are read; networks[0] wins when a
// label is in both, as it would in Nomad's driver.
//
// Inside the allocation's own network namespace (bridge mode) traffic for a
// group port arrives at the namespace's address on the port's `to` (Nomad's
// port mapping), so QEMU listens there, on every address of the namespace.
std::map<std::string, HostPort> AllocatedPorts(const TaskResources& resources, bool in_group_netns) {
  std::map<std::string, HostPort> ports;
  if (resources.task_network_ip) {
    for (const TaskPort& port : resources.task_ports) {
      ports.emplace(port.label, HostPort{*resources.task_network_ip, port.value});
    }
  }
  for (const GroupPort& mapping : resources.group_ports) {
    if (in_group_netns) ports.emplace(mapping.label, HostPort{"", mapping.to > 0 ? mapping.to : mapping.value});
    else ports.emplace(mapping.label, HostPort{mapping.host_ip, mapping.value});
  }
  return ports;
}

void PlanPortForwards(const TaskConfig& config, const TaskRequest& task, VmSpec& spec,
                      std::vector<std::string>& problems) {
  if (config.port_map.empty()) return;
  const bool in_group_netns = !task.netns_path.empty();
  const std::map<std::string, HostPort> allocated = AllocatedPorts(task.resources, in_group_netns);
  std::vector<std::string> known;
  for (const auto& [label, unused] : allocated) known.push_back(label);
  const std::string prefix = "task config \"port_map\": ";
  for (const auto& [label, guest_port] : config.port_map) {
    if (guest_port < 1 || guest_port > 65535) {
      problems.push_back(absl::StrCat(prefix, "port ", Quoted(label), " maps to guest port ", guest_port,
                                      ", which is not in 1..65535"));
      continue;
    }
    const auto it = allocated.find(label);
    if (it == allocated.end()) {
      problems.push_back(absl::StrCat(prefix, "unknown port label ", Quoted(label), "; ",
                                      known.empty()
                                          ? std::string("the task has no ports (declare them in a network block)")
                                          : absl::StrCat("the task's ports are ", QuotedList(known))));
      continue;
    }
    const HostPort& host = it->second;
    if (host.port < 1 || host.port > 65535) {
      problems.push_back(absl::StrCat(prefix, "port ", Quoted(label), " was allocated host port ", host.port,
                                      ", which is not in 1..65535"));
      continue;
    }
    // QEMU 7.2's hostfwd takes only IPv4 host addresses ("[::1]" is a "Bad
    // host address"). An empty address binds every one, which is all Nomad's
    // driver ever does; binding the allocated address keeps the VM off the
    // client's other interfaces.
    if (!host.ip.empty() && !IsIpv4(host.ip)) {
      problems.push_back(absl::StrCat(prefix, "port ", Quoted(label), " is allocated on ", Quoted(host.ip),
                                      ", which QEMU's user network cannot forward from (IPv4 only)"));
      continue;
    }
    for (const char* protocol : {"tcp", "udp"}) {
      spec.port_forwards.push_back(PortForward{label, protocol, host.ip, host.port, static_cast<int>(guest_port)});
    }
  }
}

void PlanImage(const TaskConfig& config, const TaskRequest& task, VmSpec& spec, std::vector<std::string>& problems) {
  if (config.image_path.has_value() && config.image_source.has_value()) {
    problems.push_back("task config: set exactly one of \"image_path\" and \"image_source\", not both");
    return;
  }
  if (config.image_source.has_value() || !config.image_sources.empty()) {
    // The admit-image stage fetches the source and makes this overlay on it;
    // its format is probed when it is opened, like any image's.
    spec.image_path = task.task_dir() + "/" + kBootOverlayName;
    return;
  }
  if (config.checksum.has_value() || config.checksum_url.has_value()) {
    problems.push_back("task config \"checksum\": only checks image_source downloads; it is not used with image_path");
  }
  if (!config.image_path.has_value()) {
    if (BootsWithoutImage(config)) {
      if (config.image_format) problems.push_back("task config \"image_format\": the task has no image_path");
      return;
    }
    problems.push_back("task config \"image_path\" must be set (or boot from cdrom, cdrom_source or kernel)");
    return;
  }
  if (config.image_path->empty()) {
    problems.push_back("task config \"image_path\": must not be empty");
    return;
  }
  // Admitted and opened at start (AdmitFile), where the file is handed to QEMU.
  spec.image_path = *config.image_path;
  if (config.image_format.has_value()) spec.image_format = *config.image_format;
}

}  // namespace

std::string EmulatorName(const TaskConfig& config) {
  // "qemu-system-x86_64" is accepted as Nomad 1.11.1 required the full name.
  const std::string given = OrDefault(config.emulator, kDefaultEmulator);
  absl::string_view name = given;
  absl::ConsumePrefix(&name, "qemu-system-");
  return std::string(name);
}

namespace {

void PlanEmulator(const TaskConfig& config, const PluginConfig& plugin, const HostCapabilities& host, VmSpec& spec,
                  std::vector<std::string>& problems) {
  const std::map<std::string, std::string>& emulators = host.emulators;
  spec.emulator = EmulatorName(config);
  if (absl::Status allowed = CheckEmulatorAllowed(spec.emulator, plugin.emulators_allowlist); !allowed.ok()) {
    problems.push_back(std::string(allowed.message()));
    return;
  }
  const auto it = emulators.find(spec.emulator);
  if (it == emulators.end()) {
    std::vector<std::string> available;
    for (const auto& [emulator, unused] : emulators) available.push_back(emulator);
    problems.push_back(absl::StrCat("task config \"emulator\": ", Quoted(spec.emulator), " (qemu-system-",
                                    spec.emulator, ") was not found on this client; ",
                                    available.empty() ? std::string("no qemu-system-* binary was found")
                                                      : absl::StrCat("available: ", QuotedList(available))));
    return;
  }
  spec.emulator_path = it->second;
}

// The boot disk's interface: drive_interface, or its newer name disk_interface.
std::string BootInterface(const TaskConfig& config, std::vector<std::string>& problems) {
  if (config.disk_interface && config.drive_interface && *config.disk_interface != *config.drive_interface) {
    problems.push_back("task config: \"disk_interface\" and its alias \"drive_interface\" disagree; set one");
  }
  return OrDefault(config.disk_interface ? config.disk_interface : config.drive_interface, kDefaultDriveInterface);
}

// A machine the emulator does not list is refused here rather than by QEMU.
void CheckMachineOffered(const HostCapabilities& host, const VmSpec& spec, std::vector<std::string>& problems) {
  const auto machines = host.machines.find(spec.emulator);
  if (machines == host.machines.end() || machines->second.empty()) return;
  if (std::find(machines->second.begin(), machines->second.end(), spec.machine_type) != machines->second.end()) return;
  problems.push_back(absl::StrCat("task config \"machine_type\": ", Quoted(spec.machine_type),
                                  " is not a machine of qemu-system-", spec.emulator,
                                  " on this client (see the node attribute driver.qemu.machines)"));
}

void PlanMachine(const TaskConfig& config, const HostCapabilities& host, VmSpec& spec,
                 std::vector<std::string>& problems) {
  spec.accelerator = OrDefault(config.accelerator, kDefaultAccelerator);
  if (std::find(Accelerators().begin(), Accelerators().end(), spec.accelerator) == Accelerators().end()) {
    problems.push_back(absl::StrCat("task config \"accelerator\": ", Quoted(spec.accelerator),
                                    " is not supported; use one of ", absl::StrJoin(Accelerators(), ", ")));
  }
  // Secure Boot planned q35 already when the job named no machine.
  const std::string planned = spec.machine_type.empty() ? kDefaultMachineType : spec.machine_type;
  spec.machine_type = OrDefault(config.machine_type, planned.c_str());
  if (absl::StripAsciiWhitespace(spec.machine_type).empty()) {
    problems.push_back("task config \"machine_type\" must not be blank");
  } else if (spec.machine_type.find(',') != std::string::npos) {
    problems.push_back(absl::StrCat("task config \"machine_type\": ", Quoted(spec.machine_type),
                                    " must be a machine name only (no commas); use args for machine properties"));
  } else {
    CheckMachineOffered(host, spec, problems);
  }
  spec.drive_interface = BootInterface(config, problems);
  if (std::find(DriveInterfaces().begin(), DriveInterfaces().end(), spec.drive_interface) == DriveInterfaces().end()) {
    problems.push_back(absl::StrCat("task config \"drive_interface\": ", Quoted(spec.drive_interface),
                                    " is not supported; use one of ", absl::StrJoin(DriveInterfaces(), ", ")));
  } else if (spec.drive_interface == "mtd") {
    // Boards attach mtd drives by index (-drive if=mtd); no -device takes a
    // node, so the driver cannot hand QEMU an opened image there.
    problems.push_back(
        "task config \"drive_interface\": \"mtd\" cannot take the image the driver opens for QEMU; use \"none\" "
        "and attach it with args if the plugin's args_allowlist permits");
  } else if (spec.drive_interface == "pflash" && spec.firmware.uefi) {
    problems.push_back("task config \"drive_interface\": \"pflash\" is where the UEFI firmware goes; not with "
                       "firmware = \"uefi\"");
  }
}

void PlanResources(const TaskResources& resources, VmSpec& spec, std::vector<std::string>& problems) {
  spec.memory_mb = resources.memory_mb;
  spec.memory_max_mb = resources.memory_max_mb;
  if (spec.memory_mb < kMinMemoryMb || spec.memory_mb > kMaxMemoryMb) {
    problems.push_back(absl::StrCat("task resources \"memory\": ", spec.memory_mb, " MB is out of range; a VM needs ",
                                    kMinMemoryMb, " to ", kMaxMemoryMb, " MB"));
  }
  absl::StatusOr<int> cpus = CountCpuset(resources.cpuset_cpus);
  if (!cpus.ok()) {
    problems.push_back(absl::StrCat("task resources \"cpuset_cpus\": ", cpus.status().message()));
  } else {
    spec.cpus = *cpus;
  }
}

// cpus and instance_type, for users coming from pycloudlib and Packer: they
// size the VM within what Nomad reserved for the task.
void PlanSize(const TaskConfig& config, VmSpec& spec, std::vector<std::string>& problems) {
  constexpr int64_t kMaxCpus = 288;  // QEMU 7.2's limit for x86 q35; pc allows fewer
  if (config.cpus && config.instance_type) {
    problems.push_back("task config: set one of \"cpus\" and \"instance_type\", not both");
    return;
  }
  if (config.cpus) {
    if (*config.cpus < 1 || *config.cpus > kMaxCpus) {
      problems.push_back(absl::StrCat("task config \"cpus\": ", *config.cpus, " is out of range; use 1 to ", kMaxCpus));
    } else {
      spec.cpus = static_cast<int>(*config.cpus);
    }
  }
  if (!config.instance_type) return;
  const std::string& type = *config.instance_type;
  int64_t cpus = 0, memory = 0;
  const size_t m = type.find('m');
  if (type.size() < 4 || type[0] != 'c' || m == std::string::npos ||
      !absl::SimpleAtoi(absl::string_view(type).substr(1, m - 1), &cpus) ||
      !absl::SimpleAtoi(absl::string_view(type).substr(m + 1), &memory)) {
    problems.push_back(absl::StrCat("task config \"instance_type\": ", Quoted(type),
                                    " is not of the form c<cpus>m<memory MB>, e.g. c2m1024"));
    return;
  }
  if (cpus < 1 || cpus > kMaxCpus) {
    problems.push_back(absl::StrCat("task config \"instance_type\": ", cpus, " CPUs is out of range; use 1 to ", kMaxCpus));
  }
  const int64_t reserved = std::max(spec.memory_mb, spec.memory_max_mb);
  if (memory < kMinMemoryMb || memory > reserved) {
    problems.push_back(absl::StrCat("task config \"instance_type\": ", memory, " MB of memory must be at least ",
                                    kMinMemoryMb, " and at most the task's reserved memory (", reserved, " MB)"));
  }
  spec.cpus = static_cast<int>(cpus);
  spec.memory_mb = memory;
}

// What QEMU's user network can do with the task's dns block, measured with
// QEMU 7.2.22 / libslirp 4.7.0 by speaking DHCP and DNS to it as a guest:
//  - dnssearch= puts the domains in the DHCP offer (option 119): honoured.
//  - dns= is the guest-visible address of QEMU's DNS proxy, which always
//    forwards to the HOST's resolvers (/etc/resolv.conf), never to that
//    address. Nomad's driver passes servers[0] there: with dns=8.8.8.8 the
//    guest is told to use 8.8.8.8, QEMU sends its queries to the host's
//    resolver, and the replies come back from the host resolver's address,
//    which resolvers that check the source (glibc) drop. A server inside the
//    virtual network is only moved; 10.0.2.2 and IPv6 addresses stop QEMU.
// So servers are not passed to QEMU; they are reported as ignored.
void PlanDns(const TaskRequest& task, VmSpec& spec, std::vector<std::string>& problems) {
  for (const std::string& search : task.dns_searches) {
    if (!IsDomainName(search)) {
      problems.push_back(absl::StrCat("task dns \"searches\": ", Quoted(search), " is not a domain name"));
      continue;
    }
    spec.dns_searches.push_back(search);
  }
  spec.ignored_dns_servers = task.dns_servers;
}

// Digits only (SimpleAtoi alone would take signs and spaces).
bool ParseCpuId(absl::string_view text, int* id) {
  if (text.empty() || text.size() > 5) return false;
  if (!std::all_of(text.begin(), text.end(),
                   [](char c) { return absl::ascii_isdigit(static_cast<unsigned char>(c)); })) {
    return false;
  }
  return absl::SimpleAtoi(text, id) && *id < kMaxCpuId;
}

}  // namespace

absl::StatusOr<int> CountCpuset(const std::string& cpuset) {
  if (absl::StripAsciiWhitespace(cpuset).empty()) return 0;
  std::set<std::pair<int, int>> ranges;
  for (absl::string_view part : absl::StrSplit(cpuset, ',')) {
    part = absl::StripAsciiWhitespace(part);
    const std::vector<absl::string_view> bounds = absl::StrSplit(part, absl::MaxSplits('-', 1));
    int first = 0, last = 0;
    if (!ParseCpuId(bounds[0], &first) || !ParseCpuId(bounds.back(), &last) || first > last) {
      return absl::InvalidArgumentError(
          absl::StrCat(Quoted(std::string(part)), " in ", Quoted(cpuset), " is not a CPU number or range like 0-3"));
    }
    ranges.emplace(first, last);
  }
  // Merge overlapping ranges so "0-3,2" counts 4 CPUs.
  int count = 0, covered_to = -1;
  for (const auto& [first, last] : ranges) {
    if (last <= covered_to) continue;
    count += last - std::max(first, covered_to + 1) + 1;
    covered_to = last;
  }
  return count;
}

absl::StatusOr<VmSpec> PlanVm(const TaskConfig& config, const TaskRequest& task, const PluginConfig& plugin,
                              const HostCapabilities& host) {
  VmSpec spec;
  std::vector<std::string> problems;
  PlanImage(config, task, spec, problems);
  PlanEmulator(config, plugin, host, spec, problems);
  PlanFirmware(config, host, spec, problems);
  PlanMachine(config, host, spec, problems);
  PlanResources(task.resources, spec, problems);
  PlanSize(config, spec, problems);
  if (absl::Status args = CheckArgsAllowed(config.args, plugin.args_allowlist); !args.ok()) {
    problems.push_back(std::string(args.message()));
  }
  spec.args = config.args;
  PlanNetworkMode(config, plugin, spec, problems);
  if (!spec.network.enabled) PlanPortForwards(config, task, spec, problems);
  PlanDns(task, spec, problems);
  PlanNic(config, task, host, spec, problems);
  PlanKernel(config, spec, problems);
  PlanDrives(config, plugin, spec, problems);
  PlanShares(config, task, spec, problems);
  spec.name = task.identity.name;
  spec.graceful_shutdown = config.graceful_shutdown;
  spec.guest_agent = config.guest_agent;
  spec.sandbox = plugin.sandbox;
  PlanConsole(config, task, spec, problems);
  PlanWarmStart(config, spec, problems);
  if (!problems.empty()) return absl::InvalidArgumentError(absl::StrJoin(problems, "; "));
  return spec;
}

}  // namespace ndq
