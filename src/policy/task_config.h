// The `config` block of a job's task with driver = "qemu", as Nomad's own qemu
// driver defines it, plus image_source/checksum from the original driver.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "nomadplugin/hclspec.h"

namespace ndq {

// cloud_init { ... }: a NoCloud seed the driver builds for the guest. Each
// document is given inline or as a file (`*_file`, admitted like any file
// the job names), not both.
// warm_start { ... }: save the VM once its guest is ready and start later
// tasks of the same config from that saved state (src/vm/warm_start.h).
struct WarmStartConfig {
  std::optional<std::string> ready_port;  // a port_map label that must answer TCP from the guest
  bool ready_agent = false;               // the guest agent answers guest-ping
  std::optional<int64_t> warm_pool;       // QEMUs kept started for the template (default 1, 0: none)
};

struct CloudInitConfig {
  std::optional<std::string> user_data, user_data_file;
  std::optional<std::string> meta_data, meta_data_file;
  std::optional<std::string> network_config, network_config_file;
  std::optional<std::string> vendor_data, vendor_data_file;
  std::vector<std::string> ssh_authorized_keys;
};

// disk { ... }: one more drive. From image_path, image_source (+ checksum),
// or neither: a blank disk of `size` in the task dir.
struct DiskConfig {
  std::optional<std::string> image_path;
  std::optional<std::string> image_source;
  std::optional<std::string> checksum;
  std::optional<std::string> size;
  std::optional<std::string> format;
  std::optional<std::string> interface;
  std::optional<std::string> cache;
  std::optional<std::string> discard;
  std::optional<std::string> serial;
  bool readonly = false;
};

struct TaskConfig {
  std::optional<std::string> image_path;
  std::optional<std::string> image_source;
  // Mirrors of the same file, tried in order (image_source, if set, first).
  std::vector<std::string> image_sources;
  std::optional<std::string> checksum;
  // A sha256sum-style (GNU or BSD) file holding the checksum of image_source.
  std::optional<std::string> checksum_url;
  // Format of the image ("qcow2", "raw", ...); probed when unset.
  std::optional<std::string> image_format;
  // Size to grow the task's disk to, e.g. "20G".
  std::optional<std::string> disk_size;
  std::optional<std::string> emulator;
  std::optional<std::string> machine_type;
  std::optional<std::string> drive_interface;
  std::optional<std::string> accelerator;
  // vCPUs, overriding the count of the task's reserved cores.
  std::optional<int64_t> cpus;
  // pycloudlib-style size, "c<cpus>m<memory MB>", e.g. "c2m1024".
  std::optional<std::string> instance_type;
  bool graceful_shutdown = false;
  bool guest_agent = false;
  std::vector<std::string> args;
  // port label -> guest port
  std::map<std::string, int64_t> port_map;

  // The boot disk's drive options (drive_interface stays as an alias).
  std::optional<std::string> disk_interface;
  std::optional<std::string> disk_cache;
  std::optional<std::string> disk_discard;
  std::vector<DiskConfig> disks;  // `disk` blocks, in order
  std::optional<CloudInitConfig> cloud_init;
  std::optional<WarmStartConfig> warm_start;
  // Direct kernel boot.
  std::optional<std::string> kernel;
  std::optional<std::string> initrd;
  std::optional<std::string> kernel_cmdline;
  // A CD-ROM: a local ISO, or one downloaded through the verified cache.
  std::optional<std::string> cdrom;
  std::optional<std::string> cdrom_source;
  std::optional<std::string> cdrom_checksum;
  std::optional<std::string> boot_order;  // "disk" or "cdrom"
  // The NIC.
  std::optional<std::string> net_device;
  std::optional<std::string> mac_address;
  // Firmware and security devices.
  std::optional<std::string> firmware;  // "bios" or "uefi"
  bool secure_boot = false;
  bool tpm = false;

  // Networking (src/qemu/network_plan.h): "user" (QEMU's user network,
  // port_map forwards host ports) or "bridge" (a TAP on an operator-allowed
  // host bridge; port_map only names guest ports for the driver network).
  std::optional<std::string> network_mode;
  std::optional<std::string> bridge;
  // Wait at start for the guest agent to report the NIC's IPv4 address and
  // return it to Nomad as the driver network (address_mode = "driver").
  bool advertise_address = false;
  std::optional<std::string> advertise_timeout;  // a duration, e.g. "2m"
  // Shares: the alloc's alloc/, the task's local/ and secrets/ over virtio-9p.
  bool share_alloc_dirs = false;

  // The console you can see: QEMU's VNC server and an interactive serial
  // port (ttyS1) on unix sockets in the task dir (never TCP).
  bool console = false;
  // How long the guest has to become ready (a duration like "90s"); ready is
  // the guest agent answering guest-ping (guest_agent = true) or the
  // port_map label boot_ready_port answering TCP.
  std::optional<std::string> boot_timeout;
  std::optional<std::string> boot_ready_port;
};

nomadplugin::hclspec::Spec TaskConfigSpec();

// Decodes the task's msgpack config (types only; what the values mean is
// checked when a task starts). With `reject_unknown`, misspelt options in
// hand-written task files are errors rather than silently ignored.
absl::StatusOr<TaskConfig> DecodeTaskConfig(const std::string& msgpack, bool reject_unknown = false);

}  // namespace ndq
