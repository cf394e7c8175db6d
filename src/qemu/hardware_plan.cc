#include "qemu/hardware_plan.h"

#include <algorithm>
#include <map>
#include <cstdint>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace ndq {
namespace {

const std::vector<std::string>& DiskInterfaces() {
  static const auto* v = new std::vector<std::string>{"virtio", "scsi", "ide", "nvme"};
  return *v;
}
// Packer's disk_cache values, which are QEMU's -drive cache= modes.
const std::vector<std::string>& CacheModes() {
  static const auto* v = new std::vector<std::string>{"writeback", "writethrough", "none", "unsafe", "directsync"};
  return *v;
}
const std::vector<std::string>& DiscardModes() {
  static const auto* v = new std::vector<std::string>{"unmap", "ignore"};
  return *v;
}
const std::vector<std::string>& DiskFormats() {
  static const auto* v = new std::vector<std::string>{"raw", "qcow2", "vmdk", "vdi", "vhdx", "vpc", "qed"};
  return *v;
}
// Each drive costs at least one passed fd; this keeps a job within the budget.
constexpr size_t kMaxDisks = 16;
// x86 Linux's COMMAND_LINE_SIZE is 2048 with the terminating NUL: 2047 bytes
// of text. More is refused rather than cut.
constexpr size_t kMaxKernelCmdline = 2047;
// virtio-blk and ATA carry 20 bytes of serial.
constexpr size_t kMaxSerial = 20;

bool Contains(const std::vector<std::string>& list, const std::string& value) {
  return std::find(list.begin(), list.end(), value) != list.end();
}


// Checks an optional choice; returns the value, or "" when unset or refused.
std::string Choice(const std::string& field, const std::optional<std::string>& value,
                   const std::vector<std::string>& allowed, std::vector<std::string>& problems) {
  if (!value) return "";
  if (Contains(allowed, *value)) return *value;
  problems.push_back(absl::StrCat(TaskConfigField(field), ": ", Quoted(*value), " is not supported; use one of ",
                                  QuotedList(allowed)));
  return "";
}

// Letters, digits, '.', '_' and '-': names QEMU and guests take as they are.
bool IsPlainName(const std::string& s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) {
    return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-';
  });
}

int64_t SizeOrProblem(const std::string& field, const std::optional<std::string>& text,
                      std::vector<std::string>& problems) {
  if (!text) return 0;
  absl::StatusOr<int64_t> bytes = ParseSize(*text);
  if (!bytes.ok()) {
    problems.push_back(absl::StrCat(TaskConfigField(field), ": ", bytes.status().message()));
    return 0;
  }
  if (*bytes < 512) problems.push_back(absl::StrCat(TaskConfigField(field), ": ", Quoted(*text), " is too small for a disk"));
  return *bytes;
}

// Where a disk block's file comes from.
void PlanDiskSource(const DiskConfig& disk, const std::string& name, const PluginConfig& plugin, Drive& drive,
                    std::vector<std::string>& problems) {
  DriveSource& source = drive.source;
  source.size_bytes = SizeOrProblem(name + ".size", disk.size, problems);
  source.format = Choice(name + ".format", disk.format, DiskFormats(), problems);
  if (disk.image_path && disk.image_source) {
    problems.push_back(absl::StrCat(TaskConfigField(name), ": set at most one of \"image_path\" and \"image_source\""));
    return;
  }
  if (disk.checksum && !disk.image_source) {
    problems.push_back(absl::StrCat(TaskConfigField(name + ".checksum"), ": only checks an image_source download"));
  }
  if (disk.image_path) {
    source.origin = DriveOrigin::kJobFile;
    source.field = name + ".image_path";
    source.path = *disk.image_path;
    if (source.path.empty()) problems.push_back(absl::StrCat(TaskConfigField(source.field), ": must not be empty"));
  } else if (disk.image_source) {
    source.origin = DriveOrigin::kDownload;
    source.field = name + ".image_source";
    source.urls = {*disk.image_source};
    if (disk.image_source->empty()) problems.push_back(absl::StrCat(TaskConfigField(source.field), ": must not be empty"));
    source.checksum = disk.checksum.value_or("");
    if (source.checksum.empty() && !plugin.allow_unverified_images) {
      problems.push_back(absl::StrCat(TaskConfigField(name + ".checksum"),
                                      ": required for image_source; the plugin config does not set "
                                      "allow_unverified_images"));
    }
  } else {
    source.origin = DriveOrigin::kBlank;
    source.field = name + ".size";
    if (!disk.size) {
      problems.push_back(absl::StrCat(TaskConfigField(name), ": set image_path, image_source, or size for a blank disk"));
    }
    if (source.format.empty()) source.format = "raw";
    if (source.format != "raw" && source.format != "qcow2") {
      problems.push_back(absl::StrCat(TaskConfigField(name + ".format"), ": a blank disk is \"raw\" or \"qcow2\""));
    }
  }
}

void PlanDisk(const DiskConfig& disk, size_t index, const PluginConfig& plugin, VmSpec& spec,
              std::vector<std::string>& problems) {
  const std::string name = absl::StrCat("disk[", index, "]");
  Drive drive;
  drive.id = absl::StrCat("disk", index + 1);
  drive.interface = disk.interface ? Choice(name + ".interface", disk.interface, DiskInterfaces(), problems) : "virtio";
  drive.cache = Choice(name + ".cache", disk.cache, CacheModes(), problems);
  drive.discard = Choice(name + ".discard", disk.discard, DiscardModes(), problems);
  drive.read_only = disk.readonly;
  if (disk.serial) {
    if (!IsPlainName(*disk.serial) || disk.serial->size() > kMaxSerial) {
      problems.push_back(absl::StrCat(TaskConfigField(name + ".serial"), ": ", Quoted(*disk.serial), " must be 1 to ",
                                      kMaxSerial, " letters, digits, '.', '_' or '-'"));
    } else {
      drive.serial = *disk.serial;
    }
  }
  // NVMe controllers need a serial; the drive's own name is a stable one.
  if (drive.interface == "nvme" && drive.serial.empty()) drive.serial = drive.id;
  PlanDiskSource(disk, name, plugin, drive, problems);
  spec.drives.push_back(std::move(drive));
}

// Two NVMe controllers with one serial look to Linux like two paths to one
// namespace (it may join them as multipath): each serial once.
void CheckNvmeSerials(const VmSpec& spec, std::vector<std::string>& problems) {
  std::map<std::string, size_t> first;  // serial -> its first disk block
  for (size_t i = 0; i < spec.drives.size(); ++i) {
    const Drive& drive = spec.drives[i];
    if (drive.interface != "nvme") continue;
    auto [it, added] = first.emplace(drive.serial, i);
    if (!added) {
      problems.push_back(absl::StrCat(TaskConfigField(absl::StrCat("disk[", i, "].serial")), ": ", Quoted(drive.serial),
                                      " is already disk[", it->second, "]'s NVMe serial"));
    }
  }
}

void PlanCdrom(const TaskConfig& config, const PluginConfig& plugin, VmSpec& spec, std::vector<std::string>& problems) {
  if (config.cdrom_checksum && !config.cdrom_source) {
    problems.push_back(absl::StrCat(TaskConfigField("cdrom_checksum"), ": only checks a cdrom_source download"));
  }
  if (!config.cdrom && !config.cdrom_source) return;
  if (config.cdrom && config.cdrom_source) {
    problems.push_back("task config: set at most one of \"cdrom\" and \"cdrom_source\"");
    return;
  }
  Drive drive;
  drive.id = "cdrom0";
  drive.media = DriveMedia::kCdrom;
  drive.interface = "ide";
  drive.read_only = true;
  drive.source.format = "raw";
  if (config.cdrom) {
    drive.source.field = "cdrom";
    drive.source.path = *config.cdrom;
    if (config.cdrom->empty()) problems.push_back(absl::StrCat(TaskConfigField("cdrom"), ": must not be empty"));
  } else {
    drive.source.origin = DriveOrigin::kDownload;
    drive.source.field = "cdrom_source";
    drive.source.urls = {*config.cdrom_source};
    if (config.cdrom_source->empty()) problems.push_back(absl::StrCat(TaskConfigField("cdrom_source"), ": must not be empty"));
    drive.source.checksum = config.cdrom_checksum.value_or("");
    if (drive.source.checksum.empty() && !plugin.allow_unverified_images) {
      problems.push_back(absl::StrCat(TaskConfigField("cdrom_checksum"),
                                      ": required for cdrom_source; the plugin config does not set "
                                      "allow_unverified_images"));
    }
  }
  spec.drives.push_back(std::move(drive));
}

void CheckDocument(const std::string& name, const std::optional<std::string>& inline_text,
                   const std::optional<std::string>& file, std::vector<std::string>& problems) {
  if (inline_text && file) {
    problems.push_back(absl::StrCat(TaskConfigField("cloud_init." + name), ": set at most one of \"", name, "\" and \"", name,
                                    "_file\""));
  }
  if (file && file->empty()) problems.push_back(absl::StrCat(TaskConfigField("cloud_init." + name + "_file"), ": must not be empty"));
}

// The seed is built at start; here its options are checked and its drive
// planned: read-only virtio, which cloud images find by the label cidata.
void PlanSeed(const TaskConfig& config, VmSpec& spec, std::vector<std::string>& problems) {
  if (!config.cloud_init) return;
  const CloudInitConfig& c = *config.cloud_init;
  CheckDocument("user_data", c.user_data, c.user_data_file, problems);
  CheckDocument("meta_data", c.meta_data, c.meta_data_file, problems);
  CheckDocument("network_config", c.network_config, c.network_config_file, problems);
  CheckDocument("vendor_data", c.vendor_data, c.vendor_data_file, problems);
  Drive drive;
  drive.id = "seed0";
  drive.interface = "virtio";
  drive.read_only = true;
  drive.source.origin = DriveOrigin::kSeed;
  drive.source.field = "cloud_init";
  drive.source.format = "raw";
  spec.drives.push_back(std::move(drive));
}

// boot_order picks disk or CD-ROM first (bootindex). Whenever the VM has more
// drives than its boot disk, the boot disk gets an index too: SeaBIOS would
// otherwise try a blank data disk first and stop there (measured with the
// test guest). A plain job's command line stays as Nomad's.
void PlanBootOrder(const TaskConfig& config, VmSpec& spec, std::vector<std::string>& problems) {
  Drive* cdrom = nullptr;
  for (Drive& drive : spec.drives) {
    if (drive.media == DriveMedia::kCdrom) cdrom = &drive;
  }
  const bool has_disk = !spec.image_path.empty();
  const std::string order = config.boot_order.value_or(cdrom != nullptr && !has_disk ? "cdrom" : "disk");
  if (order != "disk" && order != "cdrom") {
    problems.push_back(absl::StrCat(TaskConfigField("boot_order"), ": ", Quoted(order), " is not supported; use \"disk\" or \"cdrom\""));
    return;
  }
  if (order == "cdrom" && cdrom == nullptr) {
    problems.push_back(absl::StrCat(TaskConfigField("boot_order"), ": \"cdrom\" needs cdrom or cdrom_source"));
    return;
  }
  if (order == "disk" && !has_disk && config.boot_order) {
    problems.push_back(absl::StrCat(TaskConfigField("boot_order"), ": \"disk\" needs image_path or image_source"));
    return;
  }
  if (spec.drives.empty() || !spec.kernel.kernel.empty()) return;
  // Only these boot disk devices take a bootindex.
  const bool disk_bootable = has_disk && (spec.drive_interface == "ide" || spec.drive_interface == "virtio" ||
                                          spec.drive_interface == "scsi");
  if (has_disk && !disk_bootable && cdrom != nullptr && order == "disk") {
    // Only the CD-ROM could take an index, and an indexed device boots
    // before every other: the CD-ROM would come first.
    if (config.boot_order) {
      problems.push_back(absl::StrCat(TaskConfigField("boot_order"), ": \"disk\" cannot come before the CD-ROM with drive_interface ",
                                      Quoted(spec.drive_interface),
                                      " (only ide, virtio and scsi boot disks take a boot index)"));
    }
    return;  // unset: the firmware's own order, as without boot_order
  }
  if (cdrom != nullptr) cdrom->boot_index = order == "cdrom" ? 1 : 2;
  if (disk_bootable) spec.boot_index = order == "disk" || cdrom == nullptr ? 1 : 2;
}

// Six pairs of hex digits separated by ':'; lower-cased.
bool ParseMac(const std::string& text, std::string* normal, uint8_t* first) {
  const std::vector<std::string> parts = absl::StrSplit(text, ':');
  if (parts.size() != 6) return false;
  std::vector<std::string> lower;
  for (const std::string& part : parts) {
    if (part.size() != 2 || !absl::ascii_isxdigit(static_cast<unsigned char>(part[0])) ||
        !absl::ascii_isxdigit(static_cast<unsigned char>(part[1]))) {
      return false;
    }
    lower.push_back(absl::AsciiStrToLower(part));
  }
  *first = static_cast<uint8_t>(std::stoi(lower[0], nullptr, 16));
  *normal = absl::StrJoin(lower, ":");
  return true;
}

}  // namespace

std::string TaskConfigField(const std::string& name) { return absl::StrCat("task config ", Quoted(name)); }

namespace {

// Each IDE device takes a slot of its own: more than the machine has would
// fail QEMU's start ("IDE unit ... is in use") rather than planning.
void CheckIdeSlots(bool has_disk, const VmSpec& spec, std::vector<std::string>& problems) {
  int used = has_disk && spec.drive_interface == "ide" ? 1 : 0;
  for (const Drive& drive : spec.drives) {
    if (drive.media == DriveMedia::kCdrom || drive.interface == "ide") ++used;
  }
  const int slots = UsableIdeSlots(spec.machine_type);
  if (used <= slots) return;
  problems.push_back(absl::StrCat("task config: ", used, " IDE devices (the boot disk when drive_interface is \"ide\", ",
                                  "disk blocks with interface \"ide\", the CD-ROM), but machine \"",
                                  spec.machine_type.empty() ? "pc" : spec.machine_type, "\" has room for ", slots,
                                  "; use interface \"virtio\", \"scsi\" or \"nvme\" for the others"));
}

}  // namespace

bool BootsWithoutImage(const TaskConfig& config) {
  return config.cdrom.has_value() || config.cdrom_source.has_value() || config.kernel.has_value();
}

void PlanDrives(const TaskConfig& config, const PluginConfig& plugin, VmSpec& spec,
                std::vector<std::string>& problems) {
  const bool has_disk = !spec.image_path.empty();
  if (!has_disk && config.disk_cache) problems.push_back(TaskConfigField("disk_cache") + ": the task has no boot disk");
  if (!has_disk && config.disk_discard) problems.push_back(TaskConfigField("disk_discard") + ": the task has no boot disk");
  spec.boot_cache = Choice("disk_cache", config.disk_cache, CacheModes(), problems);
  spec.boot_discard = Choice("disk_discard", config.disk_discard, DiscardModes(), problems);
  if (config.disks.size() > kMaxDisks) {
    problems.push_back(absl::StrCat("task config \"disk\": at most ", kMaxDisks, " disk blocks, not ", config.disks.size()));
    return;
  }
  for (size_t i = 0; i < config.disks.size(); ++i) PlanDisk(config.disks[i], i, plugin, spec, problems);
  CheckNvmeSerials(spec, problems);
  PlanCdrom(config, plugin, spec, problems);
  PlanSeed(config, spec, problems);
  PlanBootOrder(config, spec, problems);
  CheckIdeSlots(has_disk, spec, problems);
}

void PlanKernel(const TaskConfig& config, VmSpec& spec, std::vector<std::string>& problems) {
  if (!config.kernel) {
    if (config.initrd) problems.push_back(absl::StrCat(TaskConfigField("initrd"), ": needs kernel"));
    if (config.kernel_cmdline) problems.push_back(absl::StrCat(TaskConfigField("kernel_cmdline"), ": needs kernel"));
    return;
  }
  KernelBoot& boot = spec.kernel;
  boot.kernel = *config.kernel;
  if (boot.kernel.empty()) problems.push_back(absl::StrCat(TaskConfigField("kernel"), ": must not be empty"));
  if (config.initrd) {
    boot.initrd = *config.initrd;
    if (boot.initrd.empty()) problems.push_back(absl::StrCat(TaskConfigField("initrd"), ": must not be empty"));
  }
  const std::string cmdline = config.kernel_cmdline.value_or("");
  const bool printable = std::all_of(cmdline.begin(), cmdline.end(), [](char c) {
    return static_cast<unsigned char>(c) >= 0x20 && c != 0x7f;
  });
  if (!printable || cmdline.size() > kMaxKernelCmdline) {
    problems.push_back(absl::StrCat(TaskConfigField("kernel_cmdline"), ": must be one line of printable characters, at most ",
                                    kMaxKernelCmdline, " bytes"));
  } else {
    boot.cmdline = cmdline;
  }
}

std::string StableMacAddress(const std::string& alloc_id, const std::string& task_name) {
  uint64_t hash = 1469598103934665603ull;  // FNV-1a over "alloc/task"
  for (unsigned char c : absl::StrCat(alloc_id, "/", task_name)) {
    hash ^= c;
    hash *= 1099511628211ull;
  }
  uint8_t bytes[6];
  for (int i = 0; i < 6; ++i) bytes[i] = static_cast<uint8_t>(hash >> (8 * i));
  bytes[0] = static_cast<uint8_t>((bytes[0] & 0xfc) | 0x02);  // locally administered, unicast
  return absl::StrFormat("%02x:%02x:%02x:%02x:%02x:%02x", bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5]);
}

void PlanNic(const TaskConfig& config, const TaskRequest& task, const HostCapabilities& host, VmSpec& spec,
             std::vector<std::string>& problems) {
  spec.own_nic = !spec.port_forwards.empty() || !spec.dns_searches.empty() || config.net_device.has_value() ||
                 config.mac_address.has_value();
  // "virtio-net" is QEMU's name for the bus's virtio NIC (virtio-net-pci on x86).
  spec.net_device = config.net_device.value_or("virtio-net");
  const auto models = host.net_devices.find(spec.emulator);
  if (!IsPlainName(spec.net_device)) {
    problems.push_back(absl::StrCat(TaskConfigField("net_device"), ": ", Quoted(spec.net_device), " is not a device name"));
  } else if (config.net_device && spec.net_device != "virtio-net" && models != host.net_devices.end() &&
             !models->second.empty() && !Contains(models->second, spec.net_device)) {
    problems.push_back(absl::StrCat(TaskConfigField("net_device"), ": ", Quoted(spec.net_device), " is not a NIC model of qemu-system-",
                                    spec.emulator, "; it has ", QuotedList(models->second)));
  }
  if (!config.mac_address) {
    spec.mac_address = StableMacAddress(task.identity.alloc_id, task.identity.name);
    return;
  }
  uint8_t first = 0;
  if (!ParseMac(*config.mac_address, &spec.mac_address, &first)) {
    problems.push_back(absl::StrCat(TaskConfigField("mac_address"), ": ", Quoted(*config.mac_address),
                                    " is not a MAC address like 02:00:00:12:34:56"));
  } else if (first & 0x01) {
    problems.push_back(absl::StrCat(TaskConfigField("mac_address"), ": ", Quoted(*config.mac_address),
                                    " is a multicast address; a NIC needs a unicast one (first byte even)"));
  } else if (spec.mac_address == "00:00:00:00:00:00") {
    problems.push_back(absl::StrCat(TaskConfigField("mac_address"), ": the all-zero address is not usable"));
  }
}

void PlanFirmware(const TaskConfig& config, const HostCapabilities& host, VmSpec& spec,
                  std::vector<std::string>& problems) {
  const std::string kind = config.firmware.value_or("bios");
  if (kind != "bios" && kind != "uefi") {
    problems.push_back(absl::StrCat(TaskConfigField("firmware"), ": ", Quoted(kind), " is not supported; use \"bios\" or \"uefi\""));
  }
  if (config.secure_boot && kind != "uefi") {
    problems.push_back(absl::StrCat(TaskConfigField("secure_boot"), ": needs firmware = \"uefi\""));
  }
  if (kind == "uefi") {
    const std::optional<FirmwareFiles>& files = config.secure_boot ? host.secure_boot : host.uefi;
    if (!files) {
      problems.push_back(absl::StrCat(TaskConfigField(config.secure_boot ? "secure_boot" : "firmware"), ": this client has no ",
                                      config.secure_boot ? "Secure Boot " : "", "UEFI firmware (Debian package ovmf)"));
    } else {
      spec.firmware = Firmware{true, config.secure_boot, *files};
    }
  }
  if (config.secure_boot) {
    // SMM keeps the firmware's variable store from the guest; QEMU has it on q35.
    const std::string machine = config.machine_type.value_or("q35");
    if (machine != "q35" && machine.rfind("pc-q35-", 0) != 0) {
      problems.push_back(absl::StrCat(TaskConfigField("secure_boot"), ": needs a q35 machine (for SMM); machine_type is ",
                                      Quoted(machine)));
    }
    if (!config.machine_type) spec.machine_type = "q35";
  }
  if (config.tpm) {
    if (host.swtpm.empty()) {
      problems.push_back(absl::StrCat(TaskConfigField("tpm"), ": swtpm is not installed on this client (Debian packages swtpm, "
                                                    "swtpm-tools)"));
    }
    spec.tpm = true;
  }
}

}  // namespace ndq
