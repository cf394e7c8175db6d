// The QEMU command line for a planned VM: a pure function, tested with golden
// files (tests/unit/cmdline_golden) and once against the real binary.
#pragma once

#include <string>
#include <vector>

#include "qemu/vm_spec.h"

namespace ndq {

// What the start opened and decided for one launch: the runtime half of the
// command line, as VmSpec is the planned half. Each number is a descriptor in
// QEMU's process (-1, or empty: not opened, so nothing is attached).
struct QemuFiles {
  std::vector<DiskNode> boot;                 // the boot disk's chain, top first
  std::vector<std::vector<DiskNode>> drives;  // [i]: spec.drives[i]'s chain
  int kernel = -1;
  int initrd = -1;
  int firmware_code = -1;  // UEFI: the firmware (read-only) and the task's own variables
  int firmware_vars = -1;
  int tap = -1;             // network_mode = "bridge"
  std::vector<int> shares;  // [i]: spec.shares[i]'s open directory
  // warm_start: boot cold with RAM in a file the driver keeps, or restore.
  WarmMode warm_mode = WarmMode::kOff;
  int warm_memory = -1;  // the RAM's file, reopened by QEMU as /proc/self/fd/N
  int warm_state = -1;   // kRestore: the saved device state; kCold: where it will be saved
};

// Where this VM's control sockets go; chosen by the caller (short paths).
struct RuntimePaths {
  std::string qmp_socket;          // always opened when set
  std::string guest_agent_socket;  // used when spec.guest_agent
  std::string tpm_socket = {};     // swtpm's control socket, used when spec.tpm
};

// A value for QEMU's comma-separated key=value syntax: each ',' is doubled so
// the value can never end early and start another key (file=a,,b is "a,b").
std::string EscapeQemuOptionValue(const std::string& value);

// argv[0] is spec.emulator_path. Nomad's driver layout, plus QMP, -smp and
// bound port forwards:
//   <emulator> -machine type=<machine>,accel=<accel> -name guest=<name>
//   -m <MB>M [-smp <cpus>]
//   [-add-fd fd=<n>,set=<k> -blockdev <file node> -blockdev <format node>]... (bottom layer first)
//   [-device <disk device for drive_interface>,drive=image0]
//   [the same for each drive: disks, CD-ROM, seed] [UEFI pflash nodes]
//   [-kernel /proc/self/fd/N [-initrd ...] [-append ...]] [TPM]
//   -nographic [-sandbox on,...] [-chardev ...qmp0 -mon chardev=qmp0,mode=control]
//   [guest agent channel] [TPM] [-serial mon:stdio -chardev socket,id=console0,...
//   -serial chardev:console0 -vnc unix:...] <args...> [-netdev user,... -device <net_device>,...,mac=...]
//   (network_mode = "bridge": -netdev tap,id=net0,fd=<tap fd> -device <net_device>,netdev=net0,mac=...)
//   [-enable-kvm]
std::vector<std::string> BuildQemuArgv(const VmSpec& spec, const QemuFiles& files, const RuntimePaths& paths);

}  // namespace ndq
