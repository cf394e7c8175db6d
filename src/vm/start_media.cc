#include "vm/start_media.h"

#include <fcntl.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <nlohmann/json.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "base/error_kind.h"
#include "base/timeouts.h"
#include "base/unique_fd.h"
#include "host/run_command.h"
#include "image/image_probe.h"
#include "image/seed_iso.h"
#include "image/task_disk.h"
#include "qemu/hardware_plan.h"

namespace ndq {
namespace {


std::string Gib(int64_t bytes) { return absl::StrFormat("%.2f GiB", static_cast<double>(bytes) / (1 << 30)); }

absl::Status CheckNotShrunk(const std::string& field, int64_t wanted, int64_t image) {
  if (wanted >= image) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(TaskConfigField(field), ": ", Gib(wanted), " is below the image's own size (", Gib(image), ")"));
}

// A blank disk is made once and kept for the alloc: a restarted task finds
// its data. Created here without following links; an existing one is
// admitted and opened at the next stage like any task-dir file.
absl::Status EnsureBlankDisk(const std::string& task_dir, const Drive& drive, const std::string& name,
                             Rollback& rollback) {
  UniqueFd dir(::open(task_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir.valid()) return ErrnoError("cannot open task dir " + task_dir, errno);
  UniqueFd file(::openat(dir.get(), name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (!file.valid()) {
    if (errno == EEXIST) return absl::OkStatus();
    return ErrnoError(absl::StrCat("cannot create ", task_dir, "/", name), errno);
  }
  const std::string path = task_dir + "/" + name;
  rollback.Push([path] { ::unlink(path.c_str()); });
  const int64_t size = drive.source.size_bytes;
  if (drive.source.format == "raw") {
    if (::ftruncate(file.get(), size) != 0) return ErrnoError("cannot size " + path, errno);
    return absl::OkStatus();
  }
  absl::StatusOr<CommandResult> made =
      RunCommand({FindOnPath("qemu-img"), "create", "-q", "-f", "qcow2",
                  absl::StrCat("/proc/", ::getpid(), "/fd/", file.get()), std::to_string(size)},
                 timeouts::kOverlayCreate);
  if (!made.ok() || made->exit_code != 0) {
    return WithKind(absl::ResourceExhaustedError(absl::StrCat("cannot create the blank disk ", path, ": ",
                                                              made.ok() ? made->output : made.status().message())),
                    ErrorKind::kHostResource);
  }
  return absl::OkStatus();
}

// A job file grown by `size`: an overlay in the task dir, the file untouched.
absl::StatusOr<MediaFiles::DriveFile> GrowJobFile(const Drive& drive, const MediaContext& ctx, Rollback& rollback) {
  const DriveSource& source = drive.source;
  absl::StatusOr<AdmittedFile> file = AdmitFile(source.field, source.path, ctx.scope, FileAccess::kReadOnly);
  if (!file.ok()) return file.status();
  absl::StatusOr<std::vector<DiskLayer>> chain = OpenImageChain(*std::move(file), source.format, source.field, ctx.scope);
  if (!chain.ok()) return chain.status();
  const DiskLayer& top = chain->front();
  absl::StatusOr<int64_t> size = ImageVirtualSize(top.fd.get(), top.format);
  if (!size.ok()) return size.status();
  const std::string block = source.field.substr(0, source.field.find('.'));
  if (absl::Status s = CheckNotShrunk(block + ".size", source.size_bytes, *size); !s.ok()) return s;
  if (source.size_bytes == *size) return MediaFiles::DriveFile{source.path, source.format};
  const std::string name = drive.id + "-overlay.qcow2";
  const std::string task_dir = ctx.task.task_dir();
  absl::Status made = CreateOverlayIn(task_dir, name, top.path, top.format, source.size_bytes);
  if (!made.ok()) return made;
  rollback.Push([path = task_dir + "/" + name] { ::unlink(path.c_str()); });
  return MediaFiles::DriveFile{task_dir + "/" + name, "qcow2"};
}

// A download through the verified cache: a disk gets its own overlay, a
// CD-ROM reads the cached image itself (read-only).
absl::StatusOr<MediaFiles::DriveFile> Download(const Drive& drive, const MediaContext& ctx, MediaFiles& media,
                                               Rollback& rollback) {
  const DriveSource& source = drive.source;
  SourceRequest request;
  request.sources = source.urls;
  request.fields = {source.field};
  if (!source.checksum.empty()) request.checksum = source.checksum;
  // "disk[0].image_source" → "disk[0].checksum"; the CD-ROM's is cdrom_checksum.
  const std::string block = source.field.substr(0, source.field.find('.'));
  request.checksum_field = drive.media == DriveMedia::kCdrom ? "cdrom_checksum" : block + ".checksum";
  if (!source.format.empty()) request.format = source.format;
  if (source.size_bytes > 0) request.size = source.size_bytes;
  request.overlay_name = drive.media == DriveMedia::kCdrom ? "" : drive.id + "-overlay.qcow2";
  if (absl::Status checked = CheckSourceRequest(request, ctx.plugin); !checked.ok()) return checked;
  absl::StatusOr<TaskDisk> disk = PrepareTaskDisk(request, ctx.task.task_dir(), ctx.plugin, *ctx.cache, ctx.emit,
                                                  AdmittingOpener(ctx.scope), ctx.cancelled, ctx.lease);
  if (!disk.ok()) return disk.status();
  ctx.owned->leases.push_back(disk->cached_image);
  media.cached_images.push_back(disk->cached_image);
  if (drive.media == DriveMedia::kCdrom) return MediaFiles::DriveFile{disk->cached_image, disk->format};
  rollback.Push([overlay = disk->overlay] { ::unlink(overlay.c_str()); });
  if (source.size_bytes > 0) {
    UniqueFd cached(::open(disk->cached_image.c_str(), O_RDONLY | O_CLOEXEC));
    absl::StatusOr<int64_t> size = ImageVirtualSize(cached.get(), disk->format);
    if (!size.ok()) return size.status();
    if (absl::Status s = CheckNotShrunk(block + ".size", source.size_bytes, *size); !s.ok()) return s;
  }
  return MediaFiles::DriveFile{disk->overlay, "qcow2"};
}

// --- the cloud-init seed ---------------------------------------------------------

// A document given inline or as a file the job names (admitted, size-capped).
absl::StatusOr<std::optional<std::string>> Document(const std::string& name, const std::optional<std::string>& text,
                                                    const std::optional<std::string>& file, const MediaContext& ctx) {
  if (text) return text;
  if (!file) return std::optional<std::string>();
  const std::string field = "cloud_init." + name + "_file";
  absl::StatusOr<AdmittedFile> admitted = AdmitFile(field, *file, ctx.scope, FileAccess::kReadOnly);
  if (!admitted.ok()) return admitted.status();
  struct stat st;
  if (::fstat(admitted->fd.get(), &st) != 0) return ErrnoError("cannot stat " + field, errno);
  if (!S_ISREG(st.st_mode) || st.st_size > kMaxCloudInitFileBytes) {
    return absl::InvalidArgumentError(absl::StrCat(TaskConfigField(field), ": must be a regular file of at most ",
                                                   kMaxCloudInitFileBytes >> 20, " MiB"));
  }
  std::string content(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < content.size()) {
    const ssize_t n = ::pread(admitted->fd.get(), &content[done], content.size() - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return ErrnoError("cannot read " + field, n < 0 ? errno : EIO);
    done += static_cast<size_t>(n);
  }
  return std::optional<std::string>(std::move(content));
}

// The task name as a hostname: lower-case letters, digits and '-'.
std::string HostnameFor(const std::string& name) {
  std::string out;
  for (char c : name) {
    const unsigned char u = static_cast<unsigned char>(c);
    out.push_back(absl::ascii_isalnum(u) ? absl::ascii_tolower(u) : '-');
    if (out.size() == 63) break;
  }
  while (!out.empty() && out.front() == '-') out.erase(out.begin());
  while (!out.empty() && out.back() == '-') out.pop_back();
  return out.empty() ? "vm" : out;
}

absl::StatusOr<SeedFiles> SeedContent(const MediaContext& ctx) {
  const CloudInitConfig& c = *ctx.config.cloud_init;
  for (size_t i = 0; i < c.ssh_authorized_keys.size(); ++i) {
    if (absl::Status s = CheckSshKey(c.ssh_authorized_keys[i], i); !s.ok()) return s;
  }
  SeedFiles files;
  absl::StatusOr<std::optional<std::string>> user = Document("user_data", c.user_data, c.user_data_file, ctx);
  if (!user.ok()) return user.status();
  files.user_data = user->value_or("");
  absl::StatusOr<std::optional<std::string>> meta = Document("meta_data", c.meta_data, c.meta_data_file, ctx);
  if (!meta.ok()) return meta.status();
  if (*meta) {
    absl::StatusOr<std::string> with_keys =
        c.ssh_authorized_keys.empty() ? absl::StatusOr<std::string>(**meta) : AddSshKeys(**meta, c.ssh_authorized_keys);
    if (!with_keys.ok()) return with_keys.status();
    files.meta_data = *std::move(with_keys);
  } else {
    // NoCloud's instance-id: the alloc's, so cloud-init runs once per alloc.
    files.meta_data = DefaultMetaData(ctx.task.identity.alloc_id, HostnameFor(ctx.task.identity.name),
                                      c.ssh_authorized_keys);
  }
  absl::StatusOr<std::optional<std::string>> network =
      Document("network_config", c.network_config, c.network_config_file, ctx);
  if (!network.ok()) return network.status();
  files.network_config = *network;
  absl::StatusOr<std::optional<std::string>> vendor = Document("vendor_data", c.vendor_data, c.vendor_data_file, ctx);
  if (!vendor.ok()) return vendor.status();
  files.vendor_data = *vendor;
  return files;
}

absl::StatusOr<MediaFiles::DriveFile> BuildSeed(const MediaContext& ctx, Rollback& rollback) {
  absl::StatusOr<SeedFiles> files = SeedContent(ctx);
  if (!files.ok()) return files.status();
  const std::string path = ctx.task.task_dir() + "/" + kSeedFileName;
  const absl::Time started = absl::Now();
  if (absl::Status written = WriteSeedIso(*files, path); !written.ok()) return written;
  rollback.Push([path] { ::unlink(path.c_str()); });
  if (ctx.emit) {
    ctx.emit("cloud-init seed built",
             {{"path", path}, {"milliseconds", absl::StrFormat("%.2f", absl::ToDoubleMilliseconds(absl::Now() - started))}});
  }
  return MediaFiles::DriveFile{path, "raw"};
}

// --- UEFI variables ------------------------------------------------------------------

// The task's own copy of the firmware's variable store, made once per alloc
// (boot entries and enrolled keys survive a restart).
absl::StatusOr<std::string> EnsureUefiVars(const VmSpec& spec, const MediaContext& ctx, Rollback& rollback) {
  const std::string task_dir = ctx.task.task_dir();
  UniqueFd dir(::open(task_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir.valid()) return ErrnoError("cannot open task dir " + task_dir, errno);
  UniqueFd copy(::openat(dir.get(), kUefiVarsFileName, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
  const std::string path = task_dir + "/" + kUefiVarsFileName;
  if (!copy.valid()) {
    if (errno == EEXIST) return path;
    return ErrnoError("cannot create " + path, errno);
  }
  rollback.Push([path] { ::unlink(path.c_str()); });
  UniqueFd from(::open(spec.firmware.files.vars.c_str(), O_RDONLY | O_CLOEXEC));
  struct stat st;
  if (!from.valid() || ::fstat(from.get(), &st) != 0) {
    return ErrnoError("cannot read the UEFI variable template " + spec.firmware.files.vars, errno);
  }
  off_t offset = 0;
  while (offset < st.st_size) {
    const ssize_t n = ::sendfile(copy.get(), from.get(), &offset, static_cast<size_t>(st.st_size - offset));
    if (n <= 0) return ErrnoError("cannot copy the UEFI variables to " + path, n < 0 ? errno : EIO);
  }
  return path;
}

absl::StatusOr<MediaFiles::DriveFile> PrepareDrive(const Drive& drive, const MediaContext& ctx, MediaFiles& media,
                                                   Rollback& rollback) {
  const DriveSource& source = drive.source;
  switch (source.origin) {
    case DriveOrigin::kJobFile:
      if (source.size_bytes > 0) return GrowJobFile(drive, ctx, rollback);
      return MediaFiles::DriveFile{source.path, source.format};
    case DriveOrigin::kDownload:
      return Download(drive, ctx, media, rollback);
    case DriveOrigin::kBlank: {
      const std::string name = absl::StrCat(drive.id, ".", source.format);
      if (absl::Status s = EnsureBlankDisk(ctx.task.task_dir(), drive, name, rollback); !s.ok()) return s;
      return MediaFiles::DriveFile{ctx.task.task_dir() + "/" + name, source.format};
    }
    case DriveOrigin::kSeed:
      return BuildSeed(ctx, rollback);
  }
  return absl::InternalError("unknown drive origin");
}

}  // namespace

LocalOpener AdmittingOpener(const AdmissionScope& scope) {
  return [&scope](const std::string& field, const std::string& path) -> absl::StatusOr<int> {
    absl::StatusOr<AdmittedFile> file = AdmitFile(field, path, scope, FileAccess::kReadOnly);
    if (!file.ok()) return file.status();
    return file->fd.release();
  };
}

absl::StatusOr<MediaFiles> PrepareMedia(const VmSpec& spec, const MediaContext& context, Rollback& rollback) {
  MediaFiles media;
  for (const Drive& drive : spec.drives) {
    if (context.cancelled && context.cancelled()) return absl::CancelledError("StartTask was cancelled");
    absl::StatusOr<MediaFiles::DriveFile> file = PrepareDrive(drive, context, media, rollback);
    if (!file.ok()) return file.status();
    media.drives.push_back(*std::move(file));
  }
  if (spec.firmware.uefi) {
    absl::StatusOr<std::string> vars = EnsureUefiVars(spec, context, rollback);
    if (!vars.ok()) return vars.status();
    media.uefi_vars = *std::move(vars);
  }
  return media;
}

}  // namespace ndq
