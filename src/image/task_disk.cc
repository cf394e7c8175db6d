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

// Admits every local source before anything else happens, so a refused one
// is answered with admission's own error (it names nothing but the job's
// path) instead of after the cache's lock, and nothing of it is read.
absl::Status AdmitLocalSources(const SourceRequest& request, const LocalOpener& open_local) {
  if (!open_local) return absl::OkStatus();
  std::vector<std::pair<std::string, std::string>> local;  // (field, source)
  for (size_t i = 0; i < request.sources.size(); ++i) local.emplace_back(request.fields[i], request.sources[i]);
  if (request.checksum_url) local.emplace_back("checksum_url", *request.checksum_url);
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
  const SourceRequest& config;
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
  if (req.config.checksum) {
    absl::StatusOr<Checksum> parsed = ParseChecksum(*req.config.checksum);
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("task config \"", req.config.checksum_field, "\": ", parsed.status().message()));
    }
    return std::optional<Checksum>(*parsed);
  }
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
  FetchOptions options = OptionsFor(req.plugin, req.open_local, req.config.fields.front(), req.cancelled);
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
    return absl::Status(cached.status().code(),
                        absl::StrCat("task config \"", req.config.fields.front(), "\": ", cached.status().message()));
  }
  if (cached->hit) events("Image cache hit", {{"image", cached->path}});
  return cached;
}

// The task config's image_format, or else the format probed from the image.
absl::StatusOr<std::string> ImageFormat(const SourceRequest& config, const std::string& image) {
  if (config.format) return *config.format;
  absl::StatusOr<std::string> format = ProbeStandaloneFormat(image);
  if (!format.ok()) {
    return absl::Status(format.status().code(),
                        absl::StrCat("task config \"", config.fields.front(), "\": ", format.status().message()));
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
  disk->overlay = req.task_dir + "/" + req.config.overlay_name;
  absl::Status created = CreateOverlayIn(req.task_dir, req.config.overlay_name, disk->cached_image, disk->format,
                                         req.config.size);
  if (!created.ok()) return created;
  req.events("Task disk created", {{"overlay", disk->overlay}, {"backing", disk->cached_image}});
  return absl::OkStatus();
}

}  // namespace

absl::Status CreateOverlayIn(const std::string& task_dir, const std::string& name, const std::string& backing,
                             const std::string& backing_format, std::optional<int64_t> size) {
  const std::string path = task_dir + "/" + name;
  const std::string qemu_img = FindOnPath("qemu-img");
  if (qemu_img.empty()) return ConfigError("qemu-img is not on PATH (package qemu-utils)");
  // The task dir is the job's to write: whatever it left under the overlay's
  // name (a link to a host file, say) is removed, not followed, and the file
  // is created afresh here; qemu-img then writes through our open file.
  UniqueFd dir(::open(task_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir.valid()) return absl::InternalError(absl::StrCat("cannot open task dir ", task_dir, ": ", std::strerror(errno)));
  ::unlinkat(dir.get(), name.c_str(), 0);
  UniqueFd overlay(::openat(dir.get(), name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (!overlay.valid()) return absl::InternalError(absl::StrCat("cannot create ", path, ": ", std::strerror(errno)));
  std::vector<std::string> argv = {qemu_img, "create", "-q", "-f", "qcow2", "-F", backing_format, "-b", backing};
  // With a size given, -u: qemu-img does not open the backing file at all.
  if (size) argv.push_back("-u");
  argv.push_back(absl::StrCat("/proc/", ::getpid(), "/fd/", overlay.get()));
  if (size) argv.push_back(std::to_string(*size));
  absl::StatusOr<CommandResult> created = RunCommand(argv, timeouts::kOverlayCreate);
  if (!created.ok() || created->exit_code != 0) {
    ::unlinkat(dir.get(), name.c_str(), 0);
    return OverlayFailure(absl::StrCat("cannot create the task's disk on ", backing, ": ",
                                       created.ok() ? created->output : std::string(created.status().message())));
  }
  return absl::OkStatus();
}

SourceRequest BootSourceRequest(const TaskConfig& config, const std::vector<std::string>& sources) {
  SourceRequest request;
  request.sources = sources;
  for (size_t i = 0; i < sources.size(); ++i) {
    const bool named = config.image_source.has_value();
    request.fields.push_back(named && i == 0 ? std::string("image_source")
                                             : absl::StrCat("image_sources[", named ? i - 1 : i, "]"));
  }
  request.checksum = config.checksum;
  request.checksum_url = config.checksum_url;
  request.format = config.image_format;
  if (config.disk_size) {
    if (absl::StatusOr<int64_t> size = ParseSize(*config.disk_size); size.ok()) request.size = *size;
  }
  return request;
}

absl::Status CheckSourceRequest(const SourceRequest& request, const PluginConfig& plugin) {
  absl::StatusOr<NetworkSourcePolicy> policy = NetworkSourcePolicy::Create(plugin.image_source_allowlist);
  if (!policy.ok()) return policy.status();
  // Network sources outside the operator's allowlist are refused here, before
  // any I/O; the fetcher checks again (and every redirect, and the address).
  auto check = [&](const std::string& field, const std::string& url) -> absl::Status {
    if (!SupportedSource(url)) {
      return absl::InvalidArgumentError(absl::StrCat("task config \"", field, "\": unsupported URL \"", url,
                                                     "\" (use http://, https://, file:// or an absolute path)"));
    }
    if (!IsNetworkSource(url)) return absl::OkStatus();
    absl::StatusOr<std::string> admitted = policy->Admit(url);
    if (admitted.ok()) return absl::OkStatus();
    return absl::Status(admitted.status().code(), absl::StrCat("task config \"", field, "\": ", admitted.status().message()));
  };
  for (size_t i = 0; i < request.sources.size(); ++i) {
    if (absl::Status s = check(request.fields[i], request.sources[i]); !s.ok()) return s;
  }
  if (request.checksum && request.checksum_url) {
    return absl::InvalidArgumentError("task config: set one of \"checksum\" and \"checksum_url\", not both");
  }
  if (request.checksum) {
    absl::StatusOr<Checksum> parsed = ParseChecksum(*request.checksum);
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("task config \"", request.checksum_field, "\": ", parsed.status().message()));
    }
  } else if (!request.checksum_url && !plugin.allow_unverified_images) {
    return absl::InvalidArgumentError(absl::StrCat("task config \"", request.checksum_field, "\": required for ",
                                                   request.fields.front(),
                                                   "; the plugin config does not set allow_unverified_images"));
  }
  if (request.checksum_url) return check("checksum_url", *request.checksum_url);
  return absl::OkStatus();
}

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
  if (config.disk_size) {
    absl::StatusOr<int64_t> size = ParseSize(*config.disk_size);
    if (!size.ok()) return absl::InvalidArgumentError(absl::StrCat("task config \"disk_size\": ", size.status().message()));
  }
  if (absl::Status checked = CheckSourceRequest(BootSourceRequest(config, sources), plugin); !checked.ok()) {
    return checked;
  }
  return sources;
}

absl::StatusOr<TaskDisk> PrepareTaskDisk(const SourceRequest& request, const std::string& task_dir,
                                         const PluginConfig& plugin, ImageCache& cache, const DiskEventSink& events,
                                         const LocalOpener& open_local, const std::function<bool()>& cancelled,
                                         const std::string& lease) {
  const DiskRequest req{request, request.sources, task_dir, plugin, cache, events, open_local, cancelled, lease};
  if (absl::Status admitted = AdmitLocalSources(request, open_local); !admitted.ok()) return admitted;
  absl::StatusOr<std::optional<Checksum>> checksum = ExpectedChecksum(req);
  if (!checksum.ok()) return checksum.status();
  absl::StatusOr<CachedImage> cached = AcquireImage(req, *checksum);
  if (!cached.ok()) return cached.status();

  TaskDisk disk;
  disk.cached_image = cached->path;
  disk.cache_hit = cached->hit;
  absl::StatusOr<std::string> format = ImageFormat(request, cached->path);
  if (!format.ok()) return format.status();
  disk.format = *std::move(format);
  if (request.overlay_name.empty()) {
    disk.overlay = cached->path;
    return disk;
  }
  if (absl::Status created = CreateOverlay(req, &disk); !created.ok()) return created;
  return disk;
}

absl::StatusOr<TaskDisk> PrepareTaskDisk(const TaskConfig& config, const std::vector<std::string>& sources,
                                         const std::string& task_dir, const PluginConfig& plugin, ImageCache& cache,
                                         const DiskEventSink& events, const LocalOpener& open_local,
                                         const std::function<bool()>& cancelled, const std::string& lease) {
  return PrepareTaskDisk(BootSourceRequest(config, sources), task_dir, plugin, cache, events, open_local, cancelled,
                         lease);
}

}  // namespace ndq
