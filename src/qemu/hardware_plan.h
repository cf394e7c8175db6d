// Planning of a VM's hardware beyond the boot image: more drives (disk
// blocks, CD-ROM, cloud-init seed), direct kernel boot, the NIC, firmware and
// TPM. Each function checks its options, records every problem with the
// option's name in `problems`, and fills its part of the spec. Pure: no I/O.
#pragma once

#include <string>
#include <vector>

#include "base/quoted.h"
#include "host/capabilities.h"
#include "policy/plugin_config.h"
#include "policy/task_config.h"
#include "policy/task_request.h"
#include "qemu/vm_spec.h"

namespace ndq {

// Whether `machine_type` is a q35 machine ("q35" or a versioned "pc-q35-*").
inline bool IsQ35Machine(const std::string& machine_type) {
  return machine_type == "q35" || machine_type.rfind("pc-q35-", 0) == 0;
}

// IDE devices the driver can place, each on an explicit slot (qemu/cmdline.cc):
// pc has two buses of two units, q35's AHCI six ports, and slot 2 keeps
// QEMU's own default CD-ROM.
inline constexpr int kIdeDefaultCdromSlot = 2;
inline int UsableIdeSlots(const std::string& machine_type) { return (IsQ35Machine(machine_type) ? 6 : 4) - 1; }


// How messages name a task config option: task config "name".
std::string TaskConfigField(const std::string& name);

// Whether the config boots without a boot disk (a CD-ROM or a kernel), so
// image_path is not required.
bool BootsWithoutImage(const TaskConfig& config);

// disk_interface/disk_cache/disk_discard, disk blocks, the CD-ROM, the seed
// drive and the boot order. Runs after the boot image is planned.
void PlanDrives(const TaskConfig& config, const PluginConfig& plugin, VmSpec& spec,
                std::vector<std::string>& problems);

void PlanKernel(const TaskConfig& config, VmSpec& spec, std::vector<std::string>& problems);

// net_device (checked against the emulator's NIC models) and mac_address.
void PlanNic(const TaskConfig& config, const TaskRequest& task, const HostCapabilities& host, VmSpec& spec,
             std::vector<std::string>& problems);

// firmware, secure_boot (q35 and SMM) and tpm, against what the host has.
// Runs before the machine type is checked, as Secure Boot changes its default.
void PlanFirmware(const TaskConfig& config, const HostCapabilities& host, VmSpec& spec,
                  std::vector<std::string>& problems);

}  // namespace ndq
