// The QEMU command line for a planned VM: a pure function, tested with golden
// files (tests/unit/cmdline_golden) and once against the real binary.
#pragma once

#include <string>
#include <vector>

#include "qemu/vm_spec.h"

namespace ndq {

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
std::vector<std::string> BuildQemuArgv(const VmSpec& spec, const RuntimePaths& paths);

}  // namespace ndq
