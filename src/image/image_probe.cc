#include "image/image_probe.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>

#include <nlohmann/json.hpp>

#include "base/error_kind.h"
#include "base/timeouts.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "host/run_command.h"
#include "base/unique_fd.h"

namespace ndq {
namespace {

// The qcow2 header fields we need (all big-endian), from QEMU's qcow2 spec:
// magic at 0, version at 4, backing file offset at 8 and size at 16, and in
// version 3 the incompatible feature bits at 72, whose bit 2 means the guest
// data lives in an external file named by a header extension.
constexpr char kQcow2Magic[4] = {'Q', 'F', 'I', '\xfb'};
constexpr uint64_t kExternalDataFileBit = 1u << 2;
constexpr int kMaxChain = 16;

uint64_t BigEndian(const unsigned char* p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v = (v << 8) | p[i];
  return v;
}

absl::Status CheckBackingName(const std::string& image, const std::string& name) {
  if (absl::StartsWith(name, "json:") || absl::StrContains(name, "://")) {
    return absl::InvalidArgumentError(absl::StrCat("image ", image, " names its backing file as a protocol (\"", name,
                                                   "\"), which is not allowed"));
  }
  return absl::OkStatus();
}

std::string Absolute(const std::string& image, const std::string& name) {
  if (!name.empty() && name[0] == '/') return name;
  return (std::filesystem::path(image).parent_path() / name).lexically_normal().string();
}

// The backing file name of the qcow2 image open at `fd`; nullopt when it has
// none or is not a qcow2 image (*is_qcow2 says which).
absl::StatusOr<std::optional<std::string>> Qcow2BackingOf(int fd, const std::string& path, bool* is_qcow2) {
  *is_qcow2 = false;
  unsigned char header[104] = {};
  const ssize_t n = ::pread(fd, header, sizeof header, 0);
  if (n < 72 || std::memcmp(header, kQcow2Magic, 4) != 0) return std::optional<std::string>();
  *is_qcow2 = true;
  const uint64_t version = BigEndian(header + 4, 4);
  if (version >= 3 && n >= 80 && (BigEndian(header + 72, 8) & kExternalDataFileBit) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("image ", path, " keeps its data in an external file, which is not allowed"));
  }
  const uint64_t offset = BigEndian(header + 8, 8);
  const uint64_t size = BigEndian(header + 16, 4);
  if (offset == 0 || size == 0) return std::optional<std::string>();
  if (size > 1023) return absl::InvalidArgumentError(absl::StrCat("image ", path, " has a malformed backing file name"));
  std::string name(size, '\0');
  const ssize_t got = ::pread(fd, name.data(), size, static_cast<off_t>(offset));
  if (got != static_cast<ssize_t>(size)) {
    return absl::InvalidArgumentError(absl::StrCat("image ", path, " has a truncated header"));
  }
  if (name.find('\0') != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("image ", path, " has a malformed backing file name"));
  }
  return std::optional<std::string>(name);
}

absl::StatusOr<std::optional<std::string>> Qcow2Backing(const std::string& path, bool* is_qcow2) {
  *is_qcow2 = false;
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return absl::NotFoundError(absl::StrCat("cannot open image ", path, ": ", std::strerror(errno)));
  return Qcow2BackingOf(fd.get(), path, is_qcow2);
}

// `opened_as` is what qemu-img opens (the path, or /proc/PID/fd/N for a file
// the driver holds open); `path` names it in messages.
absl::StatusOr<ImageInfo> ProbeWithQemuImg(const std::string& path, const std::string& opened_as = "") {
  const std::string qemu_img = FindOnPath("qemu-img");
  if (qemu_img.empty()) return ConfigError("qemu-img is not on PATH (package qemu-utils)");
  std::vector<std::string> argv = {qemu_img, "info", "--output=json", "-U"};
  if (opened_as.empty()) argv.push_back("--backing-chain");
  argv.push_back(opened_as.empty() ? path : opened_as);
  absl::StatusOr<CommandResult> out = RunCommand(argv, timeouts::kImageProbe);
  if (!out.ok()) return out.status();
  if (out->exit_code != 0) return absl::InvalidArgumentError(absl::StrCat("qemu-img cannot read ", path, ": ", out->output));
  nlohmann::json chain = nlohmann::json::parse(out->output, nullptr, false);
  // With --backing-chain qemu-img prints a list; opening one file alone, an object.
  if (chain.is_object()) chain = nlohmann::json::array({chain});
  if (!chain.is_array() || chain.empty()) return absl::InternalError(absl::StrCat("qemu-img info gave nothing for ", path));
  ImageInfo info;
  info.format = chain[0].value("format", "");
  for (const nlohmann::json& image : chain) {
    if (!image.is_object()) continue;
    if (image.contains("backing-filename")) {
      const std::string name = image["backing-filename"].get<std::string>();
      if (absl::Status status = CheckBackingName(path, name); !status.ok()) return status;
      info.backing.push_back(image.value("full-backing-filename", Absolute(image.value("filename", path), name)));
    }
    const nlohmann::json specific = image.value("format-specific", nlohmann::json::object());
    const nlohmann::json data = specific.is_object() ? specific.value("data", nlohmann::json::object()) : nlohmann::json();
    if (data.is_object() && data.contains("data-file")) {
      return absl::InvalidArgumentError(absl::StrCat("image ", path, " keeps its data in an external file, which is not allowed"));
    }
  }
  return info;
}

}  // namespace

absl::StatusOr<int64_t> ImageVirtualSize(int fd, const std::string& format) {
  if (format == "raw") {
    struct stat st;
    if (::fstat(fd, &st) != 0) return ErrnoError("cannot stat the image", errno);
    return static_cast<int64_t>(st.st_size);
  }
  if (format == "qcow2") {
    unsigned char header[32];
    if (::pread(fd, header, sizeof header, 0) != static_cast<ssize_t>(sizeof header) ||
        std::memcmp(header, "QFI\xfb", 4) != 0) {
      return absl::InvalidArgumentError("the image is too short for a qcow2 header, or not qcow2");
    }
    return static_cast<int64_t>(BigEndian(header + 24, 8));
  }
  absl::StatusOr<CommandResult> info =
      RunCommand({FindOnPath("qemu-img"), "info", "--output=json", "-f", format, absl::StrCat("/proc/self/fd/", fd)},
                 timeouts::kImageProbe);
  if (!info.ok()) return info.status();
  const nlohmann::json parsed = nlohmann::json::parse(info->output, nullptr, false);
  if (info->exit_code != 0 || !parsed.is_object() || !parsed.contains("virtual-size")) {
    return absl::InvalidArgumentError("qemu-img cannot read the image's size");
  }
  return parsed["virtual-size"].get<int64_t>();
}

absl::StatusOr<ImageInfo> ProbeImage(const std::string& path) {
  ImageInfo info;
  std::string current = path;
  for (int depth = 0; depth < kMaxChain; ++depth) {
    bool is_qcow2 = false;
    absl::StatusOr<std::optional<std::string>> backing = Qcow2Backing(current, &is_qcow2);
    if (!backing.ok()) return backing.status();
    if (!is_qcow2) {
      // Anything else (raw, vmdk, a non-qcow2 backing file) is qemu-img's to describe.
      absl::StatusOr<ImageInfo> rest = ProbeWithQemuImg(current);
      if (!rest.ok()) return rest.status();
      if (depth == 0) return rest;
      info.backing.insert(info.backing.end(), rest->backing.begin(), rest->backing.end());
      return info;
    }
    if (depth == 0) info.format = "qcow2";
    if (!backing->has_value()) return info;
    if (absl::Status status = CheckBackingName(current, **backing); !status.ok()) return status;
    current = Absolute(current, **backing);
    info.backing.push_back(current);
  }
  return absl::InvalidArgumentError(absl::StrCat("image ", path, " has a backing chain deeper than ", kMaxChain));
}

absl::StatusOr<std::string> ProbeStandaloneFormat(const std::string& path) {
  bool is_qcow2 = false;
  absl::StatusOr<std::optional<std::string>> backing = Qcow2Backing(path, &is_qcow2);
  if (!backing.ok()) return backing.status();
  if (is_qcow2) {
    if (backing->has_value()) {
      return absl::InvalidArgumentError(
          absl::StrCat("the downloaded image names a backing file (\"", **backing, "\"); it must stand alone"));
    }
    return std::string("qcow2");
  }
  // Without --backing-chain qemu-img opens the file alone.
  absl::StatusOr<ImageInfo> info = ProbeWithQemuImg(path, path);
  if (!info.ok()) return info.status();
  if (!info->backing.empty()) {
    return absl::InvalidArgumentError("the downloaded image names a backing file; it must stand alone");
  }
  return info->format;
}

absl::StatusOr<std::vector<DiskLayer>> OpenImageChain(AdmittedFile top, const std::string& top_format,
                                                      const std::string& field, const AdmissionScope& scope) {
  std::vector<DiskLayer> chain;
  chain.push_back(DiskLayer{top.path, top_format, std::move(top.fd), top.writable});
  for (int depth = 0;; ++depth) {
    DiskLayer& layer = chain.back();
    bool is_qcow2 = false;
    absl::StatusOr<std::optional<std::string>> backing = Qcow2BackingOf(layer.fd.get(), layer.path, &is_qcow2);
    if (!backing.ok()) return absl::Status(backing.status().code(), absl::StrCat("task config \"", field, "\": ", backing.status().message()));
    if (layer.format.empty() && is_qcow2) layer.format = "qcow2";
    if (layer.format.empty()) {
      // Not qcow2: qemu-img names the format, reading the file we hold.
      absl::StatusOr<ImageInfo> info =
          ProbeWithQemuImg(layer.path, absl::StrCat("/proc/", ::getpid(), "/fd/", layer.fd.get()));
      if (!info.ok()) return absl::Status(info.status().code(), absl::StrCat("task config \"", field, "\": ", info.status().message()));
      if (!info->backing.empty()) {
        return absl::InvalidArgumentError(absl::StrCat("task config \"", field, "\": image ", layer.path, " (", info->format,
                                                       ") has a backing file; only qcow2 images may have one"));
      }
      layer.format = info->format;
    }
    // A layer read as something other than qcow2 (image_format = "raw") has no chain.
    if (layer.format != "qcow2" || !is_qcow2 || !backing->has_value()) return chain;
    if (depth + 1 >= kMaxChain) {
      return absl::InvalidArgumentError(
          absl::StrCat("task config \"", field, "\": image ", chain.front().path, " has a backing chain deeper than ", kMaxChain));
    }
    if (absl::Status status = CheckBackingName(layer.path, **backing); !status.ok()) {
      return absl::Status(status.code(), absl::StrCat("task config \"", field, "\": ", status.message()));
    }
    // Relative names are relative to the image's own directory, as QEMU reads them.
    const std::string name = Absolute(layer.path, **backing);
    absl::StatusOr<AdmittedFile> next = AdmitFile(field, name, scope, FileAccess::kReadOnly);
    if (!next.ok()) {
      // The image names the file, so the message may too; where it leads stays unsaid.
      const std::string prefix = absl::StrCat("task config \"", field, "\": ");
      std::string why(next.status().message());
      if (absl::StartsWith(why, prefix)) why.erase(0, prefix.size());
      return absl::Status(next.status().code(), absl::StrCat(prefix, "image ", layer.path, ": its backing file \"",
                                                             **backing, "\" is refused: ", why));
    }
    chain.push_back(DiskLayer{next->path, "", std::move(next->fd), false});
  }
}

}  // namespace ndq
