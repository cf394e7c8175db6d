#include "policy/task_config.h"

#include "nomadplugin/config_reader.h"

namespace ndq {

namespace hs = nomadplugin::hclspec;
using nomadplugin::ConfigReader;

namespace {

hs::Spec CloudInitSpec() {
  return hs::Object({
      {"user_data", hs::Attr("user_data", "string")},
      {"user_data_file", hs::Attr("user_data_file", "string")},
      {"meta_data", hs::Attr("meta_data", "string")},
      {"meta_data_file", hs::Attr("meta_data_file", "string")},
      {"network_config", hs::Attr("network_config", "string")},
      {"network_config_file", hs::Attr("network_config_file", "string")},
      {"vendor_data", hs::Attr("vendor_data", "string")},
      {"vendor_data_file", hs::Attr("vendor_data_file", "string")},
      {"ssh_authorized_keys", hs::Attr("ssh_authorized_keys", "list(string)")},
  });
}

hs::Spec DiskSpec() {
  return hs::Object({
      {"image_path", hs::Attr("image_path", "string")},
      {"image_source", hs::Attr("image_source", "string")},
      {"checksum", hs::Attr("checksum", "string")},
      {"size", hs::Attr("size", "string")},
      {"format", hs::Attr("format", "string")},
      {"interface", hs::Attr("interface", "string")},
      {"cache", hs::Attr("cache", "string")},
      {"discard", hs::Attr("discard", "string")},
      {"serial", hs::Attr("serial", "string")},
      {"readonly", hs::Attr("readonly", "bool")},
  });
}

hs::Spec WarmStartSpec() {
  return hs::Object({
      {"ready_port", hs::Attr("ready_port", "string")},
      {"ready_agent", hs::Attr("ready_agent", "bool")},
      {"warm_pool", hs::Attr("warm_pool", "number")},
  });
}

// Names of an Object spec's attributes, for reject_unknown.
std::vector<absl::string_view> Names(const hs::Spec& spec) {
  std::vector<absl::string_view> names;
  for (const auto& [name, unused] : spec.object().attributes()) names.push_back(name);
  return names;
}

CloudInitConfig DecodeCloudInit(ConfigReader& r) {
  CloudInitConfig c;
  c.user_data = r.String("user_data");
  c.user_data_file = r.String("user_data_file");
  c.meta_data = r.String("meta_data");
  c.meta_data_file = r.String("meta_data_file");
  c.network_config = r.String("network_config");
  c.network_config_file = r.String("network_config_file");
  c.vendor_data = r.String("vendor_data");
  c.vendor_data_file = r.String("vendor_data_file");
  c.ssh_authorized_keys = r.StringList("ssh_authorized_keys").value_or(std::vector<std::string>{});
  return c;
}

DiskConfig DecodeDisk(ConfigReader& r) {
  DiskConfig d;
  d.image_path = r.String("image_path");
  d.image_source = r.String("image_source");
  d.checksum = r.String("checksum");
  d.size = r.String("size");
  d.format = r.String("format");
  d.interface = r.String("interface");
  d.cache = r.String("cache");
  d.discard = r.String("discard");
  d.serial = r.String("serial");
  d.readonly = r.Bool("readonly").value_or(false);
  return d;
}

// The blocks: cloud_init, warm_start and disk.
void DecodeBlocks(ConfigReader& reader, bool reject_unknown, TaskConfig& config) {
  if (std::optional<ConfigReader> block = reader.Block("warm_start")) {
    if (reject_unknown) block->RejectUnknownFields(Names(WarmStartSpec()));
    config.warm_start = WarmStartConfig{block->String("ready_port"), block->Bool("ready_agent").value_or(false),
                                        block->Integer("warm_pool")};
    reader.Absorb(*block);
  }
  if (std::optional<ConfigReader> block = reader.Block("cloud_init")) {
    if (reject_unknown) block->RejectUnknownFields(Names(CloudInitSpec()));
    config.cloud_init = DecodeCloudInit(*block);
    reader.Absorb(*block);
  }
  for (ConfigReader& block : reader.BlockList("disk")) {
    if (reject_unknown) block.RejectUnknownFields(Names(DiskSpec()));
    config.disks.push_back(DecodeDisk(block));
    reader.Absorb(block);
  }
}

void DecodeHardware(ConfigReader& r, TaskConfig& c) {
  c.disk_interface = r.String("disk_interface");
  c.disk_cache = r.String("disk_cache");
  c.disk_discard = r.String("disk_discard");
  c.kernel = r.String("kernel");
  c.initrd = r.String("initrd");
  c.kernel_cmdline = r.String("kernel_cmdline");
  c.cdrom = r.String("cdrom");
  c.cdrom_source = r.String("cdrom_source");
  c.cdrom_checksum = r.String("cdrom_checksum");
  c.boot_order = r.String("boot_order");
  c.net_device = r.String("net_device");
  c.mac_address = r.String("mac_address");
  c.firmware = r.String("firmware");
  c.secure_boot = r.Bool("secure_boot").value_or(false);
  c.tpm = r.Bool("tpm").value_or(false);
}

void DecodeNetwork(ConfigReader& r, TaskConfig& c) {
  c.network_mode = r.String("network_mode");
  c.bridge = r.String("bridge");
  c.advertise_address = r.Bool("advertise_address").value_or(false);
  c.advertise_timeout = r.String("advertise_timeout");
}

// The console and the boot watch.
void DecodeConsole(ConfigReader& r, TaskConfig& c) {
  c.console = r.Bool("console").value_or(false);
  c.boot_timeout = r.String("boot_timeout");
  c.boot_ready_port = r.String("boot_ready_port");
}

}  // namespace

nomadplugin::hclspec::Spec TaskConfigSpec() {
  // image_path is optional here, unlike Nomad's driver, because image_source
  // may stand in its place; exactly one of them is checked at start.
  return hs::Object({
      {"image_path", hs::Attr("image_path", "string")},
      {"image_source", hs::Attr("image_source", "string")},
      {"image_sources", hs::Attr("image_sources", "list(string)")},
      {"checksum", hs::Attr("checksum", "string")},
      {"checksum_url", hs::Attr("checksum_url", "string")},
      {"image_format", hs::Attr("image_format", "string")},
      {"disk_size", hs::Attr("disk_size", "string")},
      {"emulator", hs::Attr("emulator", "string")},
      {"machine_type", hs::Attr("machine_type", "string")},
      {"drive_interface", hs::Attr("drive_interface", "string")},
      {"accelerator", hs::Attr("accelerator", "string")},
      {"cpus", hs::Attr("cpus", "number")},
      {"instance_type", hs::Attr("instance_type", "string")},
      {"graceful_shutdown", hs::Attr("graceful_shutdown", "bool")},
      {"guest_agent", hs::Attr("guest_agent", "bool")},
      {"args", hs::Attr("args", "list(string)")},
      {"port_map", hs::Attr("port_map", "list(map(number))")},
      {"disk_interface", hs::Attr("disk_interface", "string")},
      {"disk_cache", hs::Attr("disk_cache", "string")},
      {"disk_discard", hs::Attr("disk_discard", "string")},
      {"disk", hs::BlockList("disk", DiskSpec())},
      {"cloud_init", hs::Block("cloud_init", false, CloudInitSpec())},
      {"warm_start", hs::Block("warm_start", false, WarmStartSpec())},
      {"kernel", hs::Attr("kernel", "string")},
      {"initrd", hs::Attr("initrd", "string")},
      {"kernel_cmdline", hs::Attr("kernel_cmdline", "string")},
      {"cdrom", hs::Attr("cdrom", "string")},
      {"cdrom_source", hs::Attr("cdrom_source", "string")},
      {"cdrom_checksum", hs::Attr("cdrom_checksum", "string")},
      {"boot_order", hs::Attr("boot_order", "string")},
      {"net_device", hs::Attr("net_device", "string")},
      {"mac_address", hs::Attr("mac_address", "string")},
      {"firmware", hs::Attr("firmware", "string")},
      {"secure_boot", hs::Attr("secure_boot", "bool")},
      {"tpm", hs::Attr("tpm", "bool")},
      // networking
      {"network_mode", hs::Attr("network_mode", "string")},
      {"bridge", hs::Attr("bridge", "string")},
      {"advertise_address", hs::Attr("advertise_address", "bool")},
      {"advertise_timeout", hs::Attr("advertise_timeout", "string")},
      // Shares (qemu/share_plan.h). No option names a host path: only Nomad's
      // own alloc dirs and volume mounts are ever shared.
      {"share_alloc_dirs", hs::Attr("share_alloc_dirs", "bool")},
      {"console", hs::Attr("console", "bool")},
      {"boot_timeout", hs::Attr("boot_timeout", "string")},
      {"boot_ready_port", hs::Attr("boot_ready_port", "string")},
  });
}

absl::StatusOr<TaskConfig> DecodeTaskConfig(const std::string& msgpack, bool reject_unknown) {
  absl::StatusOr<nomadplugin::ConfigReader> reader =
      nomadplugin::ConfigReader::FromMsgpack(msgpack, "task config");
  if (!reader.ok()) return reader.status();
  if (reject_unknown) {
    reader->RejectUnknownFields(Names(TaskConfigSpec()));
  }
  TaskConfig config;
  config.image_path = reader->String("image_path");
  config.image_source = reader->String("image_source");
  config.image_sources = reader->StringList("image_sources").value_or(std::vector<std::string>{});
  config.checksum = reader->String("checksum");
  config.checksum_url = reader->String("checksum_url");
  config.image_format = reader->String("image_format");
  config.disk_size = reader->String("disk_size");
  config.emulator = reader->String("emulator");
  config.machine_type = reader->String("machine_type");
  config.drive_interface = reader->String("drive_interface");
  config.accelerator = reader->String("accelerator");
  config.cpus = reader->Integer("cpus");
  config.instance_type = reader->String("instance_type");
  config.graceful_shutdown = reader->Bool("graceful_shutdown").value_or(false);
  config.guest_agent = reader->Bool("guest_agent").value_or(false);
  config.args = reader->StringList("args").value_or(std::vector<std::string>{});
  config.port_map = reader->IntegerMapList("port_map").value_or(std::map<std::string, int64_t>{});
  DecodeHardware(*reader, config);
  DecodeNetwork(*reader, config);
  config.share_alloc_dirs = reader->Bool("share_alloc_dirs").value_or(false);
  DecodeConsole(*reader, config);
  DecodeBlocks(*reader, reject_unknown, config);
  if (absl::Status status = reader->status(); !status.ok()) return status;
  return config;
}

}  // namespace ndq
