#include "qemu/cmdline.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "policy/allowlist.h"
#include "qemu/hardware_plan.h"

namespace ndq {

// Verified with QEMU 7.2.22: with a file literally named "a,file=b.img" and a
// second file "b.img" in a temp dir,
//   -drive file=DIR/a,,file=b.img,if=none,id=d0,format=raw
// opens "DIR/a,file=b.img" (monitor `info block`), while the unescaped
//   -drive file=DIR/a,file=b.img,...
// opens "b.img": a later key silently replaces the first. Likewise
// -name x,,debug-threads=on names the VM "x,debug-threads=on", and a chardev
// path=DIR/q,,s.sock creates the socket "q,s.sock".
std::string EscapeQemuOptionValue(const std::string& value) { return absl::StrReplaceAll(value, {{",", ",,"}}); }

namespace {

// The QEMU node name of layer `i` of drive `base` (0 is what the guest sees).
std::string NodeName(const std::string& base, size_t i) { return i == 0 ? base : absl::StrCat(base, "-b", i); }

// Node options for a Packer-style cache mode and a discard mode, set on every
// node of a chain (-blockdev nodes do not inherit them).
std::string NodeTuning(const std::string& cache, const std::string& discard) {
  std::string out;
  if (cache == "none" || cache == "directsync") out += ",cache.direct=on";
  if (cache == "unsafe") out += ",cache.no-flush=on";
  if (!discard.empty()) absl::StrAppend(&out, ",discard=", EscapeQemuOptionValue(discard));
  return out;
}

// Device options for the guest-visible side of the same modes.
std::string DeviceTuning(const std::string& cache, const std::string& serial, int boot_index) {
  std::string out;
  if (cache == "writethrough" || cache == "directsync") out += ",write-cache=off";
  if (!serial.empty()) absl::StrAppend(&out, ",serial=", EscapeQemuOptionValue(serial));
  if (boot_index > 0) absl::StrAppend(&out, ",bootindex=", boot_index);
  return out;
}

// Writes -add-fd and -blockdev nodes for a chain, bottom layer first.
class NodeWriter {
 public:
  explicit NodeWriter(std::vector<std::string>& argv) : argv_(argv) {}

  // Each layer is an fd set QEMU got from the driver (-add-fd), a file node
  // reading it (/dev/fdset/N) and a format node on top, with the backing
  // chain linked explicitly, so QEMU never opens an image by name. Defined
  // bottom-up, as a node must exist before another names it.
  void Chain(const std::string& base, const std::vector<DiskNode>& nodes, const std::string& tuning) {
    const auto esc = EscapeQemuOptionValue;
    // Fd set numbers follow the chain top first, continuing after earlier chains.
    const size_t first_set = sets_ + 1;
    sets_ += nodes.size();
    for (size_t i = nodes.size(); i-- > 0;) {
      const DiskNode& node = nodes[i];
      const std::string set = absl::StrCat(first_set + i);
      const std::string name = NodeName(base, i);
      const std::string read_only = node.read_only ? ",read-only=on" : "";
      std::string format = absl::StrCat("driver=", esc(node.format), ",node-name=", name, ",file=", name, "-file");
      if (i + 1 < nodes.size()) absl::StrAppend(&format, ",backing=", NodeName(base, i + 1));
      absl::StrAppend(&format, read_only, tuning);
      argv_.insert(argv_.end(), {"-add-fd", absl::StrCat("fd=", node.fd, ",set=", set), "-blockdev",
                                 absl::StrCat("driver=file,node-name=", name, "-file,filename=/dev/fdset/", set,
                                              read_only, tuning),
                                 "-blockdev", format});
    }
  }

 private:
  std::vector<std::string>& argv_;
  size_t sets_ = 0;
};

// What -drive if=X would have attached for the boot disk, as devices taking the node.
void AppendBootDevice(const VmSpec& spec, std::vector<std::string>& argv) {
  const std::string& iface = spec.drive_interface;
  const std::string tuning = DeviceTuning(spec.boot_cache, "", spec.boot_index);
  if (iface == "ide") {
    argv.insert(argv.end(), {"-device", "ide-hd,drive=image0" + tuning});
  } else if (iface == "virtio") {
    argv.insert(argv.end(), {"-device", "virtio-blk,drive=image0" + tuning});
  } else if (iface == "scsi") {
    argv.insert(argv.end(), {"-device", "lsi53c895a,id=scsi0", "-device", "scsi-hd,drive=image0,bus=scsi0.0" + tuning});
  } else if (iface == "floppy") {
    argv.insert(argv.end(), {"-device", "floppy,drive=image0"});
  } else if (iface == "sd") {
    argv.insert(argv.end(), {"-device", "sd-card,drive=image0"});
  } else if (iface == "pflash") {
    argv.insert(argv.end(), {"-machine", "pflash0=image0"});
  }
  // "none": the job attaches image0 itself through args (-device ...,drive=image0).
}

bool IsQ35(const VmSpec& spec) { return IsQ35Machine(spec.machine_type); }

// IDE devices are placed explicitly: QEMU puts an unplaced one on the first
// bus and fails once that bus is full ("IDE unit 1 is in use", measured with
// 7.2). pc has two buses of two units, q35's AHCI six ports of one; slot 2
// (pc: secondary master; q35: port 2) holds QEMU's own empty default CD-ROM.
class IdeSlots {
 public:
  IdeSlots(const VmSpec& spec, const QemuFiles& files) : q35_(IsQ35(spec)) {
    // The boot disk, when IDE, took the first slot by QEMU's own choice.
    if (!files.boot.empty() && spec.drive_interface == "ide") next_ = 1;
  }
  std::string Next() {
    if (next_ == kIdeDefaultCdromSlot) ++next_;
    const int slot = next_++;
    return q35_ ? absl::StrCat("bus=ide.", slot, ",") : absl::StrCat("bus=ide.", slot / 2, ",unit=", slot % 2, ",");
  }

 private:
  bool q35_;
  int next_ = 0;
};

// The device that shows a planned drive to the guest.
void AppendDriveDevice(const Drive& drive, IdeSlots& ide, bool* scsi_controller, std::vector<std::string>& argv) {
  const std::string tail = absl::StrCat("drive=", drive.id, DeviceTuning(drive.cache, drive.serial, drive.boot_index));
  if (drive.media == DriveMedia::kCdrom) {
    argv.insert(argv.end(), {"-device", "ide-cd," + ide.Next() + tail});
  } else if (drive.interface == "virtio") {
    argv.insert(argv.end(), {"-device", "virtio-blk-pci," + tail});
  } else if (drive.interface == "ide") {
    argv.insert(argv.end(), {"-device", "ide-hd," + ide.Next() + tail});
  } else if (drive.interface == "nvme") {
    argv.insert(argv.end(), {"-device", "nvme," + tail});
  } else if (drive.interface == "scsi") {
    if (!*scsi_controller) argv.insert(argv.end(), {"-device", "virtio-scsi-pci,id=vscsi0"});
    *scsi_controller = true;
    argv.insert(argv.end(), {"-device", "scsi-hd,bus=vscsi0.0," + tail});
  }
}

bool HasFirmware(const VmSpec& spec, const QemuFiles& files) {
  return spec.firmware.uefi && files.firmware_code >= 0 && files.firmware_vars >= 0;
}

void AppendDrives(const VmSpec& spec, const QemuFiles& files, std::vector<std::string>& argv) {
  NodeWriter nodes(argv);
  nodes.Chain("image0", files.boot, NodeTuning(spec.boot_cache, spec.boot_discard));
  if (!files.boot.empty()) AppendBootDevice(spec, argv);
  bool scsi_controller = false;
  IdeSlots ide(spec, files);
  for (size_t i = 0; i < spec.drives.size() && i < files.drives.size(); ++i) {
    const Drive& drive = spec.drives[i];
    if (files.drives[i].empty()) continue;  // not opened: nothing to attach
    nodes.Chain(drive.id, files.drives[i], NodeTuning(drive.cache, drive.discard));
    AppendDriveDevice(drive, ide, &scsi_controller, argv);
  }
  // UEFI: the firmware's code (read-only) and the task's own variable store
  // are pflash nodes like any disk, named by the machine's pflash0/pflash1.
  const Firmware& fw = spec.firmware;
  if (HasFirmware(spec, files)) {
    nodes.Chain("fw-code", {DiskNode{"raw", true, files.firmware_code}}, "");
    nodes.Chain("fw-vars", {DiskNode{"raw", false, files.firmware_vars}}, "");
    if (fw.secure_boot) argv.insert(argv.end(), {"-global", "driver=cfi.pflash01,property=secure,value=on"});
  }
}

// QEMU opens -kernel and -initrd by name: it gets the admitted files as
// /proc/self/fd/N, which reopens exactly the inode the driver checked.
void AppendKernel(const KernelBoot& boot, const QemuFiles& files, std::vector<std::string>& argv) {
  if (boot.kernel.empty() || files.kernel < 0) return;
  argv.insert(argv.end(), {"-kernel", absl::StrCat("/proc/self/fd/", files.kernel)});
  if (files.initrd >= 0) argv.insert(argv.end(), {"-initrd", absl::StrCat("/proc/self/fd/", files.initrd)});
  if (!boot.cmdline.empty()) argv.insert(argv.end(), {"-append", boot.cmdline});
}

// swtpm's socket; CRB is the interface q35 guests (Windows 11) expect.
void AppendTpm(const VmSpec& spec, const RuntimePaths& paths, std::vector<std::string>& argv) {
  if (!spec.tpm) return;
  const bool q35 = IsQ35(spec);
  argv.insert(argv.end(), {"-chardev", absl::StrCat("socket,id=tpm0-chr,path=", EscapeQemuOptionValue(paths.tpm_socket)),
                           "-tpmdev", "emulator,id=tpm0,chardev=tpm0-chr", "-device",
                           q35 ? "tpm-crb,tpmdev=tpm0" : "tpm-tis,tpmdev=tpm0"});
}

// virtio-9p shares (qemu/share_plan.h). The root is the directory the driver
// opened and checked, reopened by QEMU through /proc/self/fd/N; only the tag
// is spliced, commas doubled.
// security_model=mapped-xattr: the guest's owners and modes are kept in
// user.virtfs.* xattrs, never applied to the host file. The host sees every
// file the guest writes as an ordinary file owned by QEMU's user, mode fmode
// (0644; directories dmode 0755). So it works for the unprivileged qemu_user
// (passthrough would have to chown to the guest's uid, which needs root), and
// a guest's setuid bit or chmod never reaches the host. Measured with QEMU
// 7.2 running as root: the guest's `chmod 4755` on a copied busybox left
// -rwsr-xr-x root on the host with security_model=none (a setuid-root binary
// in the alloc dir), -rw-r--r-- with mapped-xattr (the guest still sees
// 4755). The cost: a writable share needs user xattrs on its file
// system (ext4, xfs, btrfs, tmpfs from Linux 6.6; not NFS before 4.2).
// multidevs=remap: a volume may span file systems (submounts); remapping keeps
// inode numbers unique in the guest instead of QEMU only warning.
void AppendShares(const VmSpec& spec, const QemuFiles& files, std::vector<std::string>& argv) {
  for (size_t i = 0; i < spec.shares.size() && i < files.shares.size(); ++i) {
    const Share& share = spec.shares[i];
    if (files.shares[i] < 0) continue;  // not opened: nothing to share
    const std::string id = absl::StrCat("share", i);
    argv.insert(argv.end(), {"-fsdev",
                             absl::StrCat("local,id=", id, ",path=/proc/self/fd/", files.shares[i],
                                          ",security_model=mapped-xattr,fmode=0644,dmode=0755,multidevs=remap", share.read_only ? ",readonly=on" : ""),
                             "-device",
                             absl::StrCat("virtio-9p-pci,fsdev=", id, ",mount_tag=", EscapeQemuOptionValue(share.tag))});
  }
}

// console = true: ttyS0 stays on stdio (the task log, as -nographic had it:
// the first -serial replaces that default, so it is named again), ttyS1 is
// an interactive console on a unix socket, and VNC listens on another.
// Verified with QEMU 7.2.22: -vnc works beside -nographic, and both socket
// paths take doubled commas ("-vnc unix:DIR/a,,b/vnc.sock").
void AppendConsole(const ConsolePlan& console, std::vector<std::string>& argv) {
  if (!console.enabled) return;
  argv.insert(argv.end(),
              {"-serial", "mon:stdio", "-chardev",
               absl::StrCat("socket,id=console0,path=", EscapeQemuOptionValue(console.serial_socket),
                            ",server=on,wait=off"),
               "-serial", "chardev:console0", "-vnc", "unix:" + EscapeQemuOptionValue(console.vnc_socket)});
}

// warm_start (vm/warm_start.h). The guest's RAM is a file the driver opened:
// shared while a cold VM runs (so the driver can copy it into a template,
// and migration with x-ignore-shared leaves it out of the state file), and
// mapped copy-on-write from the template when restoring (share=off: every
// restored VM reads the template's page cache and copies only the pages it
// writes). QEMU 7.2 reopens mem-path itself, so it gets /proc/self/fd/N.
// vmgenid: its generation ID is not part of the saved state, so each QEMU
// start tells the restored guest it was cloned (Linux reseeds its RNG).
// -incoming defer: the state is loaded over QMP after the capabilities are set.
void AppendWarmStart(const VmSpec& spec, const QemuFiles& files, std::vector<std::string>& argv) {
  if (files.warm_mode == WarmMode::kOff || files.warm_memory < 0) return;
  argv.insert(argv.end(),
              {"-object",
               absl::StrCat("memory-backend-file,id=warm-ram,size=", spec.memory_mb, "M,mem-path=/proc/self/fd/",
                            files.warm_memory, ",share=", files.warm_mode == WarmMode::kCold ? "on" : "off"),
               "-machine", "memory-backend=warm-ram", "-device", "vmgenid"});
  if (files.warm_mode == WarmMode::kRestore) argv.insert(argv.end(), {"-incoming", "defer"});
}

// The -machine value: type and accelerator, plus what UEFI and Secure Boot need.
std::string MachineOption(const VmSpec& spec, const QemuFiles& files) {
  const auto esc = EscapeQemuOptionValue;
  std::string out = absl::StrCat("type=", esc(spec.machine_type), ",accel=", esc(spec.accelerator));
  if (HasFirmware(spec, files)) out += ",pflash0=fw-code,pflash1=fw-vars";
  if (spec.firmware.secure_boot) out += ",smm=on";
  return out;
}

// QEMU's user network: port_map's host forwards and the DNS search list.
void AppendUserNic(const VmSpec& spec, std::vector<std::string>& argv) {
  const auto esc = EscapeQemuOptionValue;
  std::vector<std::string> netdev;
  for (const std::string& search : spec.dns_searches) netdev.push_back("dnssearch=" + esc(search));
  for (const PortForward& forward : spec.port_forwards) {
    netdev.push_back(absl::StrCat("hostfwd=", esc(forward.protocol), ":", esc(forward.host_ip), ":", forward.host_port,
                                  "-:", forward.guest_port));
  }
  // Without any network option QEMU's default network is left alone, as in
  // Nomad's driver.
  if (!netdev.empty() || spec.own_nic) {
    std::string nic = absl::StrCat(spec.net_device.empty() ? "virtio-net" : esc(spec.net_device), ",netdev=user.0");
    if (!spec.mac_address.empty()) absl::StrAppend(&nic, ",mac=", esc(spec.mac_address));
    argv.insert(argv.end(), {"-netdev", absl::StrCat("user,id=user.0", netdev.empty() ? "" : ",", absl::StrJoin(netdev, ",")),
                             "-device", nic});
  }
}

// network_mode = "bridge": the TAP the driver made and attached to the
// bridge, handed over open (QEMU never creates or configures a network
// device itself, so it needs no privilege and runs no ifup script).
void AppendBridgeNic(const VmSpec& spec, const QemuFiles& files, std::vector<std::string>& argv) {
  if (files.tap < 0) return;  // not opened: nothing to attach
  std::string nic = absl::StrCat(EscapeQemuOptionValue(spec.net_device), ",netdev=net0");
  if (!spec.mac_address.empty()) absl::StrAppend(&nic, ",mac=", EscapeQemuOptionValue(spec.mac_address));
  argv.insert(argv.end(), {"-netdev", absl::StrCat("tap,id=net0,fd=", files.tap), "-device", nic});
}

}  // namespace

std::vector<std::string> BuildQemuArgv(const VmSpec& spec, const QemuFiles& files, const RuntimePaths& paths) {
  const auto esc = EscapeQemuOptionValue;
  std::vector<std::string> argv = {
      spec.emulator_path,
      "-machine",
      MachineOption(spec, files),
      // guest= spelled out: "-name a=b" would read "a" as a key and fail.
      "-name",
      absl::StrCat("guest=", esc(spec.name)),
      "-m",
      absl::StrCat(spec.memory_mb, "M"),
  };
  // The job's own -smp (Nomad's rule) wins over the cpuset count.
  if (spec.cpus > 0 && !ArgsUseOption(spec.args, "smp")) {
    argv.insert(argv.end(), {"-smp", absl::StrCat(spec.cpus)});
  }
  AppendDrives(spec, files, argv);
  AppendKernel(spec.kernel, files, argv);
  argv.push_back("-nographic");
  if (spec.sandbox) {
    // QEMU's seccomp filter: no obsolete syscalls, no setuid/setgid or
    // capability changes, no fork/exec, no scheduler or affinity changes.
    argv.insert(argv.end(),
                {"-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"});
  }

  // -chardev + -mon rather than "-qmp unix:PATH,...": in that short form PATH
  // is an implied key, so a path containing '=' is misread (measured: "Invalid
  // parameter"); path= takes any value once commas are doubled.
  if (!paths.qmp_socket.empty()) {
    argv.insert(argv.end(),
                {"-chardev", absl::StrCat("socket,id=qmp0,path=", esc(paths.qmp_socket), ",server=on,wait=off"), "-mon",
                 "chardev=qmp0,mode=control"});
  }
  if (spec.guest_agent) {
    argv.insert(argv.end(),
                {"-chardev", absl::StrCat("socket,path=", esc(paths.guest_agent_socket), ",server=on,wait=off,id=qga0"),
                 "-device", "virtio-serial", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"});
  }
  AppendTpm(spec, paths, argv);
  AppendShares(spec, files, argv);
  AppendConsole(spec.console, argv);
  AppendWarmStart(spec, files, argv);
  argv.insert(argv.end(), spec.args.begin(), spec.args.end());

  if (spec.network.enabled) AppendBridgeNic(spec, files, argv);
  else AppendUserNic(spec, argv);
  if (spec.accelerator == "kvm") argv.push_back("-enable-kvm");
  return argv;
}

}  // namespace ndq
