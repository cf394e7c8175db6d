// The start's "prepare media" stage: makes or fetches the files a planned VM's
// extra drives and firmware need, in the task dir or the image cache, so the
// next stage can admit and open them like the boot image:
//  - a `disk` block's blank disk (created sparse once, kept for the alloc),
//    its download (an overlay on the verified cached image) or its own file
//    (an overlay when `size` grows it);
//  - the CD-ROM's download (the cached image itself, read-only);
//  - the cloud-init seed (rebuilt at each start from the job's documents);
//  - the task's copy of the UEFI variable store (made once, kept).
// Everything made by this start is removed again if the start fails; the
// cache leases it takes go into the VM's resources (vm/vm_resources.h).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/rollback.h"
#include "image/image_cache.h"
#include "image/task_disk.h"
#include "policy/allowlist.h"
#include "policy/plugin_config.h"
#include "policy/task_config.h"
#include "policy/task_request.h"
#include "qemu/vm_spec.h"
#include "vm/vm_resources.h"
#include "vm/vm_task.h"

namespace ndq {

// The file behind each planned drive, and what the task holds in the cache.
struct MediaFiles {
  struct DriveFile {
    std::string path;    // what the open-disks stage admits
    std::string format;  // forced format of the top file; empty: probed
  };
  std::vector<DriveFile> drives;           // one per spec.drives, in order
  std::vector<std::string> cached_images;  // leased to the task; admitted as drive files
  std::string uefi_vars;                   // the task's variable store; empty without UEFI
};

struct MediaContext {
  const TaskRequest& task;
  const TaskConfig& config;
  const PluginConfig& plugin;
  const AdmissionScope& scope;  // what job-named files may be
  ImageCache* cache = nullptr;
  TaskEventSink emit;
  std::function<bool()> cancelled;
  std::string lease;  // the task key, for cache leases
  VmResources* owned = nullptr;  // where the leases taken are recorded (released with the VM)
};

// Opens a local download source (a path or file:// URL) only through
// admission in `scope`, read-only: what image_source, a disk's image_source
// and cdrom_source hand the fetcher. `scope` must outlive the opener.
LocalOpener AdmittingOpener(const AdmissionScope& scope);

absl::StatusOr<MediaFiles> PrepareMedia(const VmSpec& spec, const MediaContext& context, Rollback& rollback);

// Limits on what a job hands the driver to put in its seed.
inline constexpr int64_t kMaxCloudInitFileBytes = 16 << 20;

// File names in the task dir.
inline constexpr char kSeedFileName[] = "cidata.iso";
inline constexpr char kUefiVarsFileName[] = "uefi-vars.fd";
inline constexpr char kTpmStateDirName[] = "tpm";

}  // namespace ndq
