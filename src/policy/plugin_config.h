// The operator's plugin block in the Nomad client configuration:
//   plugin "qemu" { config { image_paths = [...] ... } }
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "nomadplugin/hclspec.h"

namespace ndq {

struct PluginConfig {
  // Directories (besides the allocation's) that image_path may point into.
  std::vector<std::string> image_paths;
  // QEMU options a job's `args` may use; empty allows every option.
  std::vector<std::string> args_allowlist;
  // Emulator names (e.g. "x86_64") jobs may use; empty allows every one found.
  std::vector<std::string> emulators_allowlist;
  // Where downloaded images are kept, shared by all tasks; empty means the
  // default under the plugin's data directory.
  std::string image_cache_dir;
  // Per-task runtime state (sockets, pid and exit records); must survive a
  // plugin restart and stay short. Empty: /run/nomad-driver-qemu as root,
  // else $TMPDIR/nomad-driver-qemu-UID.
  std::string state_dir;
  // The nomad-qemu-supervisor binary; empty: next to the plugin binary.
  std::string supervisor_path;
  // Accept image_source without a checksum (not recommended).
  bool allow_unverified_images = false;
  // Largest image a download may be, in bytes; 0: no limit.
  int64_t max_image_size = 0;
  // Evict least recently used images no task uses beyond this; 0: no limit.
  int64_t image_cache_max_size = 0;
  // An extra CA certificate (PEM) trusted for https image downloads.
  std::string ca_file;
  // URL prefixes (http:// or https://, a host, optionally a port and path) a
  // job's network image_source(s) and checksum_url must match, redirects
  // included; compared on parsed URLs. Empty: any http/https URL. Link-local
  // addresses are refused unless an entry's host is that address.
  std::vector<std::string> image_source_allowlist;
  // The cgroup under which each VM gets its own (per controller on cgroup v1).
  // "nomad" matches Nomad's own v1 layout, so a task's cgroup Nomad made is reused.
  std::string cgroup_parent = "nomad";
  // Memory QEMU itself needs beyond the guest's RAM (device emulation, TCG's
  // translation cache, page tables); added to the task's memory for the
  // cgroup limit unless the job sets memory_max.
  int64_t memory_overhead = 128ll << 20;
  // Most processes and threads one VM's cgroup may hold; 0: no limit.
  int64_t pids_limit = 1024;
  // Run QEMU under its seccomp sandbox (-sandbox on with obsolete,
  // elevateprivileges, spawn and resourcecontrol denied).
  bool sandbox = true;
  // The unprivileged user every VM's QEMU runs as when the task sets no
  // `user`; empty: QEMU runs as the plugin's user.
  std::string qemu_user;
  // Host bridges a job's network_mode = "bridge" may attach its VM to (by
  // name); empty: bridge networking is off.
  std::vector<std::string> bridges_allowlist;
};

// "20G", "512M", "1.5T", "1048576": bytes (binary units, as qemu-img takes them).
absl::StatusOr<int64_t> ParseSize(const std::string& text);

// A Linux network interface name we accept: 1-15 characters (IFNAMSIZ) of
// [A-Za-z0-9._-], not "." or "..".
bool IsInterfaceName(const std::string& name);

// The hclspec Nomad parses the plugin block against.
nomadplugin::hclspec::Spec PluginConfigSpec();

// Decodes SetConfig's msgpack; every problem names its field.
absl::StatusOr<PluginConfig> DecodePluginConfig(const std::string& msgpack);

}  // namespace ndq
