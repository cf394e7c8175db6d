#include "image/task_disk.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <utility>

#include "base/timeouts.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "image/checksum.h"
#include "image/fetcher.h"
#include "image/image_probe.h"
#include "host/run_command.h"
#include "policy/source_policy.h"
#include "base/error_kind.h"
#include "base/unique_fd.h"

namespace ndq {
namespace {

bool IsNetworkSource(const std::string& source) {
  return absl::StartsWith(source, "http://") || absl::StartsWith(source, "https://");
}

bool SupportedSource(const std::string& source) {
  if (absl::StartsWith(source, "http://") || absl::StartsWith(source, "https://") ||
      absl::StartsWith(source, "file://")) {
    return true;
  }
  return !absl::StrContains(source, "://") && !source.empty() && source[0] == '/';
}

std::string BaseName(const std::string& url) {
  std::string path = url.substr(0, url.find_first_of("?#"));
  return path.substr(path.rfind('/') + 1);
}

FetchOptions OptionsFor(const PluginConfig& plugin, const LocalOpener& open_local, const std::string& field,
                        const std::function<bool()>& cancelled) {
  FetchOptions options;
  options.cancelled = cancelled;
  options.max_bytes = plugin.max_image_size;
  options.ca_file = plugin.ca_file;
  options.url_allowlist = plugin.image_source_allowlist;
  if (open_local) options.open_local = [open_local, field](const std::string& path) { return open_local(field, path); };
  return options;
}

// The task config field that names sources[i] (image_source first, then image_sources).
std::string SourceField(const TaskConfig& config, size_t i) {
  if (config.image_source) {
    if (i == 0) return "image_source";
    --i;
  }
  return absl::StrCat("image_sources[", i, "]");
}

// Admits every local source before anything else happens, so a refused one
// is answered with admission's own error (it names nothing but the job's
// path) instead of after the cache's lock, and nothing of it is read.
absl::Status AdmitLocalSources(const TaskConfig& config, const std::vector<std::string>& sources,
                               const LocalOpener& open_local) {
  if (!open_local) return absl::OkStatus();
  std::vector<std::pair<std::string, std::string>> local;  // (field, source)
  for (size_t i = 0; i < sources.size(); ++i) {
    local.emplace_back(SourceField(config, i), sources[i]);
  }
  if (config.checksum_url) local.emplace_back("checksum_url", *config.checksum_url);
  for (const auto& [field, source] : local) {
    std::optional<absl::StatusOr<std::string>> path = LocalSourcePath(source);
    if (!path) continue;  // a network source
    if (!path->ok()) return absl::InvalidArgumentError(absl::StrCat("task config \"", field, "\": ", path->status().message()));
    absl::StatusOr<int> fd = open_local(field, **path);
    if (!fd.ok()) return fd.status();
    ::close(*fd);  // opened (and checked) again when it is read
  }
  return absl::OkStatus();
}

// Where a checksum file is fetched to: the cache directory, which only the
// driver writes (never the task dir, where a job could plant links).
std::string ScratchDir(ImageCache& cache) {
  std::error_code ignored;
  std::filesystem::create_directories(cache.dir(), ignored);
  return cache.dir();
}

// The checksum file's entry for the image's file name.
absl::StatusOr<Checksum> ChecksumFromUrl(const std::string& checksum_url, const std::string& image_url,
                                         const PluginConfig& plugin, const std::string& scratch_dir,
                                         const LocalOpener& open_local, const std::function<bool()>& cancelled) {
  const std::string dest = scratch_dir + "/.checksum-" + std::to_string(::getpid()) + "-" +
                           std::to_string(reinterpret_cast<uintptr_t>(&dest));
  // The same policy as for the image: allowlist, redirects, link-local, open_local.
  FetchOptions options = OptionsFor(plugin, open_local, "checksum_url", cancelled);
  options.max_bytes = 1 << 20;
  absl::StatusOr<FetchResult> fetched = FetchVerified(checksum_url, std::nullopt, dest, options);
  if (!fetched.ok()) {
    return absl::Status(fetched.status().code(), absl::StrCat("task config \"checksum_url\": ", fetched.status().message()));
  }
  std::ifstream in(dest);
  std::stringstream content;
  content << in.rdbuf();
  std::filesystem::remove(dest);
  absl::StatusOr<Checksum> checksum = ChecksumFromFile(content.str(), BaseName(image_url), "");
  if (!checksum.ok()) {
    return absl::Status(checksum.status().code(), absl::StrCat("task config \"checksum_url\": ", checksum.status().message()));
  }
  return checksum;
}

// PrepareTaskDisk's arguments, for the steps it takes.
struct DiskRequest {
  const TaskConfig& config;
  const std::vector<std::string>& sources;
  const std::string& task_dir;
  const PluginConfig& plugin;
  ImageCache& cache;
  const DiskEventSink& events;
  const LocalOpener& open_local;
  const std::function<bool()>& cancelled;
  const std::string& lease;
};

// The checksum the image must have: the task config's checksum, or the entry
// in checksum_url's file; none when the plugin allows unverified images.
absl::StatusOr<std::optional<Checksum>> ExpectedChecksum(const DiskRequest& req) {
  if (req.config.checksum) return std::optional<Checksum>(*ParseChecksum(*req.config.checksum));
  if (!req.config.checksum_url) return std::optional<Checksum>();
  absl::StatusOr<Checksum> fetched = ChecksumFromUrl(*req.config.checksum_url, req.sources.front(), req.plugin,
                                                     ScratchDir(req.cache), req.open_local, req.cancelled);
  if (!fetched.ok()) return fetched.status();
  return std::optional<Checksum>(*fetched);
}

// Verified images are shared by content; unverified ones only by URL.
std::string CacheKey(const std::optional<Checksum>& checksum, const std::string& source) {
  if (checksum) return absl::StrCat(checksum->type, "-", checksum->hex);
  Hasher hasher = *Hasher::Create("sha256");
  hasher.Update(source.data(), source.size());
  return "url-" + hasher.FinalHex();
}

// The cached image for the task's sources, downloaded (and verified against
// `checksum`) unless the cache holds it already.
absl::StatusOr<CachedImage> AcquireImage(const DiskRequest& req, const std::optional<Checksum>& checksum) {
  const DiskEventSink& events = req.events;
  FetchOptions options = OptionsFor(req.plugin, req.open_local, "image_source", req.cancelled);
  ImageCache::Downloader download = [&](const std::string& source,
                                        const std::string& dest) -> absl::StatusOr<int64_t> {
    events("Downloading image", {{"source", source}});
    FetchOptions with_progress = options;
    with_progress.progress_interval = absl::Seconds(5);
    with_progress.progress = [&](int64_t done, int64_t total, double rate) {
      events(absl::StrFormat("Downloading image: %s", total > 0 ? absl::StrFormat("%.0f%%", 100.0 * done / total) : "?"),
             {{"bytes", std::to_string(done)},
              {"total_bytes", std::to_string(total)},
              {"bytes_per_second", absl::StrFormat("%.0f", rate)}});
    };
    absl::StatusOr<FetchResult> result = FetchVerified(source, checksum, dest, with_progress);
    if (!result.ok()) return result.status();
    events("Image downloaded and verified",
           {{"bytes", std::to_string(result->bytes)}, {"seconds", absl::StrFormat("%.2f", absl::ToDoubleSeconds(result->took))}});
    return result->bytes;
  };
  ImageCache::AcquireOptions acquire;
  acquire.lease = req.lease;
  acquire.cancelled = req.cancelled;
  absl::StatusOr<CachedImage> cached = req.cache.Acquire(CacheKey(checksum, req.sources.front()), req.sources, download, acquire);
  if (!cached.ok()) {
    return absl::Status(cached.status().code(), absl::StrCat("task config \"image_source\": ", cached.status().message()));
  }
  if (cached->hit) events("Image cache hit", {{"image", cached->path}});
  return cached;
}

// The task config's image_format, or else the format probed from the image.
absl::StatusOr<std::string> ImageFormat(const TaskConfig& config, const std::string& image) {
  if (config.image_format) return *config.image_format;
  absl::StatusOr<std::string> format = ProbeStandaloneFormat(image);
  if (!format.ok()) {
    return absl::Status(format.status().code(), absl::StrCat("task config \"image_source\": ", format.status().message()));
  }
  return format;
}

// Why qemu-img could not write the overlay: a full or over-quota disk may
// have room later (retryable); anything else is the image or the job's size.
absl::Status OverlayFailure(const std::string& message) {
  for (int err : {ENOSPC, EDQUOT, ENOMEM, EMFILE}) {
    if (message.find(std::strerror(err)) != std::string::npos) {
      return WithKind(absl::ResourceExhaustedError(message), ErrorKind::kHostResource);
    }
  }
  return absl::InvalidArgumentError(message);
}

// Creates disk->overlay in the task dir: a qcow2 file backed by the cached image.
absl::Status CreateOverlay(const DiskRequest& req, TaskDisk* disk) {
  constexpr char kOverlayName[] = "image-overlay.qcow2";
  disk->overlay = req.task_dir + "/" + kOverlayName;
  const std::string qemu_img = FindOnPath("qemu-img");
  if (qemu_img.empty()) return absl::FailedPreconditionError("qemu-img is not on PATH (package qemu-utils)");
  // The task dir is the job's to write: whatever it left under the overlay's
  // name (a link to a host file, say) is removed, not followed, and the file
  // is created afresh here; qemu-img then writes through our open file.
  UniqueFd dir(::open(req.task_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir.valid()) return absl::InternalError(absl::StrCat("cannot open task dir ", req.task_dir, ": ", std::strerror(errno)));
  ::unlinkat(dir.get(), kOverlayName, 0);
  UniqueFd overlay(::openat(dir.get(), kOverlayName, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (!overlay.valid()) {
    return absl::InternalError(absl::StrCat("cannot create ", disk->overlay, ": ", std::strerror(errno)));
  }
  std::vector<std::string> argv = {qemu_img, "create", "-q", "-f", "qcow2", "-F", disk->format, "-b", disk->cached_image,
                                   absl::StrCat("/proc/", ::getpid(), "/fd/", overlay.get())};
  if (req.config.disk_size) argv.push_back(std::to_string(*ParseSize(*req.config.disk_size)));
  absl::StatusOr<CommandResult> created = RunCommand(argv, timeouts::kOverlayCreate);
  if (!created.ok() || created->exit_code != 0) {
    ::unlinkat(dir.get(), kOverlayName, 0);
    return OverlayFailure(absl::StrCat("cannot create the task's disk on ", disk->cached_image, ": ",
                                       created.ok() ? created->output : std::string(created.status().message())));
  }
  req.events("Task disk created", {{"overlay", disk->overlay}, {"backing", disk->cached_image}});
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ImageSources(const TaskConfig& config, const PluginConfig& plugin) {
  std::vector<std::string> sources;
  if (config.image_source) sources.push_back(*config.image_source);
  sources.insert(sources.end(), config.image_sources.begin(), config.image_sources.end());
  if (sources.empty()) {
    if (config.disk_size) return absl::InvalidArgumentError("task config \"disk_size\": only applies to image_source");
    return sources;
  }
  if (config.image_path) {
    return absl::InvalidArgumentError("task config: set exactly one of \"image_path\" and \"image_source\", not both");
  }
  absl::StatusOr<NetworkSourcePolicy> policy = NetworkSourcePolicy::Create(plugin.image_source_allowlist);
  if (!policy.ok()) return policy.status();
  // Network sources outside the operator's allowlist are refused here, before
  // any I/O; the fetcher checks again (and every redirect, and the address).
  auto check_network = [&](const std::string& field, const std::string& url) -> absl::Status {
    if (!IsNetworkSource(url)) return absl::OkStatus();
    absl::StatusOr<std::string> admitted = policy->Admit(url);
    if (admitted.ok()) return absl::OkStatus();
    return absl::Status(admitted.status().code(),
                        absl::StrCat("task config \"", field, "\": ", admitted.status().message()));
  };
  for (size_t i = 0; i < sources.size(); ++i) {
    const std::string& source = sources[i];
    const std::string field = SourceField(config, i);
    if (!SupportedSource(source)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "task config \"", field, "\": unsupported URL \"", source, "\" (use http://, https://, file:// or an absolute path)"));
    }
    if (absl::Status s = check_network(field, source); !s.ok()) return s;
  }
  if (config.checksum && config.checksum_url) {
    return absl::InvalidArgumentError("task config: set one of \"checksum\" and \"checksum_url\", not both");
  }
  if (config.checksum) {
    absl::StatusOr<Checksum> parsed = ParseChecksum(*config.checksum);
    if (!parsed.ok()) return absl::InvalidArgumentError(absl::StrCat("task config \"checksum\": ", parsed.status().message()));
  } else if (!config.checksum_url && !plugin.allow_unverified_images) {
    return absl::InvalidArgumentError(
        "task config \"checksum\": required for image_source (or checksum_url); the plugin config does not set "
        "allow_unverified_images");
  }
  if (config.checksum_url && !SupportedSource(*config.checksum_url)) {
    return absl::InvalidArgumentError(absl::StrCat("task config \"checksum_url\": unsupported URL \"", *config.checksum_url, "\""));
  }
  if (config.checksum_url) {
    if (absl::Status s = check_network("checksum_url", *config.checksum_url); !s.ok()) return s;
  }
  if (config.disk_size) {
    absl::StatusOr<int64_t> size = ParseSize(*config.disk_size);
    if (!size.ok()) return absl::InvalidArgumentError(absl::StrCat("task config \"disk_size\": ", size.status().message()));
  }
  return sources;
}

absl::StatusOr<TaskDisk> PrepareTaskDisk(const TaskConfig& config, const std::vector<std::string>& sources,
                                         const std::string& task_dir, const PluginConfig& plugin, ImageCache& cache,
                                         const DiskEventSink& events, const LocalOpener& open_local,
                                         const std::function<bool()>& cancelled, const std::string& lease) {
  const DiskRequest req{config, sources, task_dir, plugin, cache, events, open_local, cancelled, lease};
  if (absl::Status admitted = AdmitLocalSources(config, sources, open_local); !admitted.ok()) return admitted;
  absl::StatusOr<std::optional<Checksum>> checksum = ExpectedChecksum(req);
  if (!checksum.ok()) return checksum.status();
  absl::StatusOr<CachedImage> cached = AcquireImage(req, *checksum);
  if (!cached.ok()) return cached.status();

  TaskDisk disk;
  disk.cached_image = cached->path;
  disk.cache_hit = cached->hit;
  absl::StatusOr<std::string> format = ImageFormat(config, cached->path);
  if (!format.ok()) return format.status();
  disk.format = *std::move(format);
  if (absl::Status created = CreateOverlay(req, &disk); !created.ok()) return created;
  return disk;
}

}  // namespace ndq
