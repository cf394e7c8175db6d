// Turns a job's task config, the task request (resources, ports, DNS) and the operator's plugin
// config into a checked, fully defaulted description of the VM to start.
// Pure apart from resolving image_path on the file system.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "host/capabilities.h"
#include "qemu/console_plan.h"
#include "qemu/warm_plan.h"
#include "policy/plugin_config.h"
#include "policy/task_config.h"
#include "policy/task_request.h"

namespace ndq {

// One host port forwarded into the guest (QEMU user networking, hostfwd=).
struct PortForward {
  std::string label;     // the Nomad port label from port_map
  std::string protocol;  // "tcp" or "udp"
  std::string host_ip;   // IPv4 address to bind; empty binds every address
  int host_port = 0;
  int guest_port = 0;

  bool operator==(const PortForward& o) const {
    return label == o.label && protocol == o.protocol && host_ip == o.host_ip && host_port == o.host_port &&
           guest_port == o.guest_port;
  }
};

// One layer of a disk as QEMU sees it: a node fed from an fd the driver
// opened and admitted (QEMU's -add-fd), never a path QEMU opens itself. Made
// at start (qemu/cmdline.h's QemuFiles), never by planning.
struct DiskNode {
  std::string format;  // QEMU block driver: "qcow2", "raw", ...
  bool read_only = true;
  int fd = -1;  // the descriptor's number in QEMU's process
  bool operator==(const DiskNode& o) const { return format == o.format && read_only == o.read_only && fd == o.fd; }
};

// Where a drive's file comes from. Planning only checks and records this;
// the start's media stage makes or fetches the file, and the open-disks stage
// admits and opens it like the boot image.
enum class DriveOrigin {
  kJobFile,   // a path the job names (admitted at start)
  kDownload,  // urls + checksum, through the verified image cache
  kBlank,     // a sparse disk of size_bytes the driver creates in the task dir
  kSeed,      // the cloud-init seed the driver builds
};

struct DriveSource {
  DriveOrigin origin = DriveOrigin::kJobFile;
  std::string field;  // the task config field it came from, for messages
  std::string path;   // kJobFile: the job's path
  std::vector<std::string> urls;  // kDownload: tried in order
  std::string checksum;           // kDownload: "sha256:..." (empty: unverified)
  std::string format;             // empty: probed
  int64_t size_bytes = 0;         // kBlank: its size; kDownload/kJobFile: grow an overlay to it
};

enum class DriveMedia { kDisk, kCdrom };

// A drive other than the boot disk: a `disk` block, the CD-ROM or the seed.
struct Drive {
  std::string id;  // QEMU node name: "disk1".., "cdrom0", "seed0"
  DriveMedia media = DriveMedia::kDisk;
  std::string interface;  // virtio, scsi, ide or nvme (a CD-ROM: ide)
  std::string cache;      // Packer's disk_cache values; empty: QEMU's default (writeback)
  std::string discard;    // "unmap", "ignore"; empty: QEMU's default
  std::string serial;
  bool read_only = false;
  int boot_index = 0;  // 1 boots first; 0: not a boot device
  DriveSource source;
};

// Direct kernel boot: the files are admitted and handed over as fds;
// QEMU reads them through /proc/self/fd (it opens -kernel by name).
struct KernelBoot {
  std::string kernel;  // as the job wrote it
  std::string initrd;
  std::string cmdline;
};

struct Firmware {
  bool uefi = false;
  bool secure_boot = false;
  FirmwareFiles files;  // the host's OVMF code and vars template
};

// network_mode = "bridge" (src/qemu/network_plan.h): the NIC is a TAP the
// driver makes on an operator-allowed host bridge and hands QEMU as an fd.
struct BridgeNetwork {
  bool enabled = false;  // network_mode = "bridge" (even when the bridge was refused)
  std::string bridge;    // the host bridge, one of bridges_allowlist
  // Wait for the guest agent to report the NIC's IPv4 address at start.
  bool advertise_address = false;
  int64_t advertise_timeout_ms = 0;
  // port_map in bridge mode: label -> guest port, for Nomad's driver network.
  std::map<std::string, int> guest_ports;
};

// A host directory shown to the guest over virtio-9p (qemu/share_plan.h).
// QEMU gets the directory the driver opened and checked, as /proc/self/fd/N.
enum class ShareOrigin { kAllocDir, kVolume };
struct Share {
  std::string tag;        // the guest's mount tag: "alloc", "local", "secrets" or a volume's destination
  ShareOrigin origin = ShareOrigin::kAllocDir;
  std::string host_path;  // kAllocDir: the dir's name under the alloc ("alloc", "<task>/local"); kVolume: Nomad's path
  bool read_only = false;
  bool operator==(const Share& o) const {
    return tag == o.tag && origin == o.origin && host_path == o.host_path && read_only == o.read_only;
  }
};

struct VmSpec {
  std::string emulator;       // "x86_64", without "qemu-system-"
  std::string emulator_path;  // the binary found by the fingerprinter
  std::string machine_type;   // "pc" unless set
  std::string accelerator;    // "tcg" or "kvm"
  std::string drive_interface;
  std::string image_path;    // as the job wrote it; admitted and opened at start (AdmitFile)
  std::string image_format;  // the job's image_format; empty: probed at start
  // QEMU runs under its seccomp sandbox (-sandbox on,...).
  bool sandbox = false;
  int64_t memory_mb = 0;
  int64_t memory_max_mb = 0;  // Nomad's memory_max (oversubscription); 0 when unset
  int cpus = 0;               // CPUs in the task's cpuset; 0 when Nomad gave none
  std::string name;           // the task name, shown by QEMU (-name)
  bool graceful_shutdown = false;
  bool guest_agent = false;
  std::vector<std::string> args;  // the job's extra QEMU arguments, checked
  std::vector<PortForward> port_forwards;
  // The task's DNS search domains, given to the guest by QEMU's DHCP server.
  std::vector<std::string> dns_searches;
  // The task's DNS servers are NOT given to the guest: QEMU's user network
  // cannot forward to a chosen resolver (its dns= only moves the guest-visible
  // proxy address; queries still go to the host's resolvers). They are kept
  // here so the caller can tell the operator they were ignored.
  std::vector<std::string> ignored_dns_servers;

  // The boot disk's tuning (disk_cache, disk_discard) and boot index.
  std::string boot_cache;
  std::string boot_discard;
  int boot_index = 0;
  std::vector<Drive> drives;  // `disk` blocks in order, then the CD-ROM, then the seed
  KernelBoot kernel;           // kernel empty: the firmware boots a drive
  // The NIC: model and MAC (always set; stable per alloc and task unless the
  // job gives one). QEMU's default NIC is left alone when the job sets no
  // network option at all, as in Nomad's driver.
  std::string net_device;
  std::string mac_address;
  bool own_nic = false;  // the driver attaches the NIC (forwards, DNS, net_device or mac_address set)
  Firmware firmware;
  bool tpm = false;
  BridgeNetwork network;  // enabled: the NIC is on a host bridge, not QEMU's user network
  std::vector<Share> shares;  // share_alloc_dirs, then Nomad's volume mounts
  // The console and the boot watch (qemu/console_plan.h).
  ConsolePlan console;
  BootWatchPlan boot_watch;
  WarmPlan warm;  // warm_start: boot cold and save, or restore a saved VM
};

// Checks everything and applies Nomad's defaults (emulator x86_64, accelerator
// tcg, machine pc, drive interface ide). All problems come back together in
// one InvalidArgument error, each naming its option. `emulators` maps emulator
// names to binary paths, as the fingerprinter found them.
//
// Planning reads no file and fetches nothing: with image_source the boot disk
// is the overlay the start will make in the task dir (kBootOverlayName), so a
// job that cannot run is refused before its image is downloaded.
absl::StatusOr<VmSpec> PlanVm(const TaskConfig& config, const TaskRequest& task, const PluginConfig& plugin,
                              const HostCapabilities& host);

// The emulator a job asks for ("x86_64" by default; "qemu-system-" dropped):
// the one binary a start needs the facts of.
std::string EmulatorName(const TaskConfig& config);

// The MAC a task gets when its job names none: locally administered,
// unicast, and the same for the same alloc and task, so a restarted task
// keeps its address.
std::string StableMacAddress(const std::string& alloc_id, const std::string& task_name);

// Number of CPUs in a cpuset list such as "0-3,8,10-11" (7); empty is 0.
absl::StatusOr<int> CountCpuset(const std::string& cpuset);

}  // namespace ndq
