// Turns a task's image_source into a disk of its own: the checksum (given, or
// read from checksum_url), the image from the shared cache (downloaded and
// verified once), and a qcow2 overlay in the task dir backed by it, grown to
// disk_size. The cached image is never written to.
#pragma once

#include <functional>
#include <map>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "image/image_cache.h"
#include "policy/plugin_config.h"
#include "policy/task_config.h"
#include "policy/task_request.h"

namespace ndq {

struct TaskDisk {
  std::string overlay;       // the task's disk, in its task dir (the cached image when no overlay was asked for)
  std::string cached_image;  // the shared, read-only backing image
  std::string format;        // of the cached image
  bool cache_hit = false;
};

// Images to fetch through the verified cache for one drive, and the task
// config fields they came from (for messages): the boot disk's image_source
// and mirrors, a disk block's image_source, cdrom_source.
struct SourceRequest {
  std::vector<std::string> sources;
  std::vector<std::string> fields;  // fields[i] names sources[i]
  std::optional<std::string> checksum;
  std::string checksum_field = "checksum";
  std::optional<std::string> checksum_url;  // the boot disk only
  std::optional<std::string> format;        // the image's format; probed when unset
  std::optional<int64_t> size;              // grow the overlay to this many bytes
  // The task's overlay on the cached image (in the task dir); empty: the
  // cached image itself is the drive, read-only (a CD-ROM).
  std::string overlay_name = kBootOverlayName;
};

// Creates `task_dir/name` afresh (whatever the job left there is removed,
// never followed): a qcow2 overlay on `backing`, grown to `size` if given.
absl::Status CreateOverlayIn(const std::string& task_dir, const std::string& name, const std::string& backing,
                             const std::string& backing_format, std::optional<int64_t> size);

// The boot disk's request: image_source, then image_sources.
SourceRequest BootSourceRequest(const TaskConfig& config, const std::vector<std::string>& sources);

// Checks a request without any I/O: URL schemes, network URLs against the
// plugin's image_source_allowlist, the checksum's form, and a checksum
// required unless the operator allows unverified images.
absl::Status CheckSourceRequest(const SourceRequest& request, const PluginConfig& plugin);

// Checks the image options of `config` without any I/O: exactly one of
// image_path and image_source(s), URL schemes, network URLs (sources and
// checksum_url) against the plugin's image_source_allowlist, checksum form, a
// checksum required unless the operator allows unverified images, disk_size.
// Returns the list of sources in order ({} when image_path is used).
absl::StatusOr<std::vector<std::string>> ImageSources(const TaskConfig& config, const PluginConfig& plugin);

// Progress and milestones for the task's event stream: (message, annotations).
using DiskEventSink = std::function<void(const std::string&, const std::map<std::string, std::string>&)>;

// Opens a local source (a file:// URL's path or a plain path), image or
// checksum_url alike, and returns a read-only fd (FetchOptions::open_local).
// `field` names the task config field for its error messages.
using LocalOpener = std::function<absl::StatusOr<int>(const std::string& field, const std::string& path)>;

// Every local source, and a local checksum_url, passes `open_local` first,
// before any lock, lease or byte is read: a refusal is its error as it is.
// `open_local` empty: local sources are opened directly. `cancelled` (may be
// empty) aborts downloads once it says true (Cancelled, nothing left behind).
// `lease` (a task key) leases the cached image to the task (ImageCache::Release
// ends it), so no eviction removes it while the task may use it.
absl::StatusOr<TaskDisk> PrepareTaskDisk(const SourceRequest& request, const std::string& task_dir,
                                         const PluginConfig& plugin, ImageCache& cache, const DiskEventSink& events,
                                         const LocalOpener& open_local = {},
                                         const std::function<bool()>& cancelled = {}, const std::string& lease = "");
// The boot disk's: BootSourceRequest(config, sources).
absl::StatusOr<TaskDisk> PrepareTaskDisk(const TaskConfig& config, const std::vector<std::string>& sources,
                                         const std::string& task_dir, const PluginConfig& plugin, ImageCache& cache,
                                         const DiskEventSink& events, const LocalOpener& open_local = {},
                                         const std::function<bool()>& cancelled = {},
                                         const std::string& lease = "");

}  // namespace ndq
