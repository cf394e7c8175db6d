#include "qemu/cmdline.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "policy/allowlist.h"

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

// The QEMU node name of disk layer `i` (0 is the image the guest sees).
std::string DiskNodeName(size_t i) { return i == 0 ? "image0" : absl::StrCat("image0-b", i); }

// Each disk layer is an fd set QEMU got from the driver (-add-fd), a file
// node reading it (/dev/fdset/N) and a format node on top, with the backing
// chain linked explicitly, so QEMU never opens an image by name. Defined
// bottom-up, as a node must exist before another names it.
void AppendDisk(const VmSpec& spec, std::vector<std::string>& argv) {
  const auto esc = EscapeQemuOptionValue;
  for (size_t i = spec.disk.size(); i-- > 0;) {
    const DiskNode& node = spec.disk[i];
    const std::string set = absl::StrCat(i + 1);
    const std::string name = DiskNodeName(i);
    const std::string read_only = node.read_only ? ",read-only=on" : "";
    std::string format = absl::StrCat("driver=", esc(node.format), ",node-name=", name, ",file=", name, "-file");
    if (i + 1 < spec.disk.size()) absl::StrAppend(&format, ",backing=", DiskNodeName(i + 1));
    absl::StrAppend(&format, read_only);
    argv.insert(argv.end(), {"-add-fd", absl::StrCat("fd=", node.fd, ",set=", set), "-blockdev",
                             absl::StrCat("driver=file,node-name=", name, "-file,filename=/dev/fdset/", set, read_only),
                             "-blockdev", format});
  }
  if (spec.disk.empty()) return;
  // What -drive if=X would have attached, as devices taking the node.
  const std::string& iface = spec.drive_interface;
  if (iface == "ide") {
    argv.insert(argv.end(), {"-device", "ide-hd,drive=image0"});
  } else if (iface == "virtio") {
    argv.insert(argv.end(), {"-device", "virtio-blk,drive=image0"});
  } else if (iface == "scsi") {
    argv.insert(argv.end(), {"-device", "lsi53c895a,id=scsi0", "-device", "scsi-hd,drive=image0,bus=scsi0.0"});
  } else if (iface == "floppy") {
    argv.insert(argv.end(), {"-device", "floppy,drive=image0"});
  } else if (iface == "sd") {
    argv.insert(argv.end(), {"-device", "sd-card,drive=image0"});
  } else if (iface == "pflash") {
    argv.insert(argv.end(), {"-machine", "pflash0=image0"});
  }
  // "none": the job attaches image0 itself through args (-device ...,drive=image0).
}

}  // namespace

std::vector<std::string> BuildQemuArgv(const VmSpec& spec, const RuntimePaths& paths) {
  const auto esc = EscapeQemuOptionValue;
  std::vector<std::string> argv = {
      spec.emulator_path,
      "-machine",
      absl::StrCat("type=", esc(spec.machine_type), ",accel=", esc(spec.accelerator)),
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
  AppendDisk(spec, argv);
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
  argv.insert(argv.end(), spec.args.begin(), spec.args.end());

  std::vector<std::string> netdev;
  for (const std::string& search : spec.dns_searches) netdev.push_back("dnssearch=" + esc(search));
  for (const PortForward& forward : spec.port_forwards) {
    netdev.push_back(absl::StrCat("hostfwd=", esc(forward.protocol), ":", esc(forward.host_ip), ":", forward.host_port,
                                  "-:", forward.guest_port));
  }
  // Without forwards or DNS settings QEMU's default network is left alone, as
  // in Nomad's driver.
  if (!netdev.empty()) {
    argv.insert(argv.end(), {"-netdev", absl::StrCat("user,id=user.0,", absl::StrJoin(netdev, ",")), "-device",
                             "virtio-net,netdev=user.0"});
  }
  if (spec.accelerator == "kvm") argv.push_back("-enable-kvm");
  return argv;
}

}  // namespace ndq
