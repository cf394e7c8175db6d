#include "qemu_driver/cmdline.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "qemu_driver/allowlist.h"

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
  // The image path is absolute (resolved), so QEMU cannot read a protocol
  // prefix such as "nbd:" or "json:" into it; only commas need care.
  std::string drive = absl::StrCat("file=", esc(spec.image_path), ",if=", esc(spec.drive_interface), ",id=image0");
  if (!spec.image_format.empty()) absl::StrAppend(&drive, ",format=", esc(spec.image_format));
  argv.insert(argv.end(), {"-drive", drive, "-nographic"});

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
