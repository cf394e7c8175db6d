// A planned warm_start VM as two tasks of one job would have it: the same VM,
// with the per-task values (name, paths, host port, MAC, console) of `name`
// and `host_port`. Shared by the template key's and the warm pool's tests.
#pragma once

#include <string>

#include "qemu/vm_spec.h"

namespace ndq::testing {

inline VmSpec WarmTaskSpec(const std::string& name, int host_port) {
  VmSpec spec;
  spec.emulator = "x86_64";
  spec.emulator_path = "/usr/bin/qemu-system-x86_64";
  spec.machine_type = "pc";
  spec.accelerator = "tcg";
  spec.drive_interface = "virtio";
  spec.memory_mb = 256;
  spec.name = name;
  spec.image_path = "/var/nomad/alloc/" + name + "/web/local/disk.qcow2";
  spec.port_forwards = {PortForward{"http", "tcp", "10.0.0." + std::to_string(host_port % 200), host_port, 80}};
  spec.mac_address = "52:54:00:" + std::to_string(host_port % 90 + 10) + ":00:01";
  spec.guest_agent = true;
  spec.console = ConsolePlan{true, "/alloc/" + name + "/console", "/alloc/" + name + "/console/serial.sock",
                             "/alloc/" + name + "/console/vnc.sock"};
  spec.warm.enabled = true;
  spec.warm.ready.guest_port = 80;
  return spec;
}

}  // namespace ndq::testing
