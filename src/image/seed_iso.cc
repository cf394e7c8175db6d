#include "image/seed_iso.h"

// libisofs.h declares struct burn_source (the image's output stream) only
// when asked to, as libburn is not used here.
#define LIBISOFS_WITHOUT_LIBBURN
#include <fcntl.h>
#include <libisofs.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/error_kind.h"
#include "base/unique_fd.h"

namespace ndq {
namespace {

constexpr char kVolumeId[] = "cidata";
// Every timestamp in the image, so the same files give the same bytes.
constexpr time_t kSeedTime = 946684800;  // 2000-01-01T00:00:00Z
constexpr char kSeedVolumeTime[] = "2000010100000000";
constexpr char kKeysField[] = "cloud_init.ssh_authorized_keys";

// ---- meta-data text ----

void AppendUnicodeEscape(std::string& out, uint32_t code) { absl::StrAppendFormat(&out, "\\u%04x", code); }

// Length of the valid UTF-8 sequence at s[i] and its code point; 0 when invalid.
size_t DecodeUtf8(const std::string& s, size_t i, uint32_t* code) {
  const auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  unsigned char lead = byte(i);
  size_t len = lead >= 0xf0 ? 4 : lead >= 0xe0 ? 3 : lead >= 0xc2 ? 2 : 0;
  if (len == 0 || lead > 0xf4 || i + len > s.size()) return 0;
  uint32_t c = lead & (0x7f >> len);
  for (size_t k = 1; k < len; ++k) {
    if ((byte(i + k) & 0xc0) != 0x80) return 0;
    c = (c << 6) | (byte(i + k) & 0x3f);
  }
  const uint32_t min[] = {0, 0, 0x80, 0x800, 0x10000};
  if (c < min[len] || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff)) return 0;
  *code = c;
  return len;
}

// `value` as a JSON string. It is read as a YAML double-quoted scalar too:
// control characters and every non-ASCII character of the BMP are escaped (YAML
// would fold U+2028 or NEL, and rejects C1 controls raw), characters beyond
// the BMP stay raw (JSON would need surrogate pairs, YAML does not join them),
// and bytes that are not UTF-8 become U+FFFD.
std::string JsonString(const std::string& value) {
  std::string out = "\"";
  for (size_t i = 0; i < value.size();) {
    unsigned char c = static_cast<unsigned char>(value[i]);
    if (c < 0x80) {
      if (c == '"' || c == '\\') {
        out += '\\';
        out += static_cast<char>(c);
      } else if (c < 0x20 || c == 0x7f) {
        AppendUnicodeEscape(out, c);
      } else {
        out += static_cast<char>(c);
      }
      ++i;
      continue;
    }
    uint32_t code = 0;
    size_t len = DecodeUtf8(value, i, &code);
    if (len == 0) {
      AppendUnicodeEscape(out, 0xfffd);
      ++i;
    } else if (code > 0xffff) {
      out.append(value, i, len);
      i += len;
    } else {
      AppendUnicodeEscape(out, code);
      i += len;
    }
  }
  return out + "\"";
}

std::string PublicKeysBlock(const std::vector<std::string>& keys) {
  std::string block = "public-keys:\n";
  for (const std::string& key : keys) absl::StrAppend(&block, "  - ", JsonString(key), "\n");
  return block;
}

size_t SkipSpace(const std::string& text, size_t i) {
  while (i < text.size() && (text[i] == ' ' || text[i] == '\t' || text[i] == '\n' || text[i] == '\r')) ++i;
  return i;
}

// Whether a line at column 0 is the key public-keys, bare or quoted.
bool HasTopLevelPublicKeys(const std::string& text) {
  for (size_t start = 0; start < text.size();) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    std::string_view line(text.data() + start, end - start);
    for (std::string_view key : {"public-keys", "\"public-keys\"", "'public-keys'"}) {
      if (line.substr(0, key.size()) != key) continue;
      size_t colon = line.find_first_not_of(" \t", key.size());
      if (colon != std::string_view::npos && line[colon] == ':') return true;
    }
    start = end + 1;
  }
  return false;
}

// ---- libisofs ----

// libisofs keeps global state; it is set up once for the process. Locale
// setup is skipped (setlocale is not thread-safe, and every name is ASCII),
// and its messages are not printed: errors come back as codes.
absl::Status InitLibisofs() {
  static std::once_flag once;
  static int result = 0;
  std::call_once(once, [] {
    result = iso_init_with_flag(1);
    if (result >= 0) iso_set_msgs_severities(const_cast<char*>("NEVER"), const_cast<char*>("NEVER"),
                                             const_cast<char*>("seed_iso"));
  });
  if (result < 0) return absl::InternalError(absl::StrCat("libisofs init failed: ", iso_error_to_msg(result)));
  return absl::OkStatus();
}

absl::Status IsoError(const std::string& what, int code) {
  absl::Status status = absl::InternalError(absl::StrCat("seed image: ", what, ": ", iso_error_to_msg(code)));
  // The one failure with a cause outside the driver.
  return code == static_cast<int>(ISO_OUT_OF_MEM) ? WithKind(status, ErrorKind::kHostResource) : status;
}

struct ImageUnref {
  void operator()(IsoImage* image) const { iso_image_unref(image); }
};
struct OptsFree {
  void operator()(IsoWriteOpts* opts) const { iso_write_opts_free(opts); }
};
// Stops the generator thread if it is still running, then frees the source.
struct BurnSourceFree {
  void operator()(burn_source* source) const {
    source->cancel(source);
    source->free_data(source);
    std::free(source);
  }
};
using ImagePtr = std::unique_ptr<IsoImage, ImageUnref>;
using OptsPtr = std::unique_ptr<IsoWriteOpts, OptsFree>;
using BurnSourcePtr = std::unique_ptr<burn_source, BurnSourceFree>;

void SetTimes(IsoNode* node) {
  iso_node_set_atime(node, kSeedTime);
  iso_node_set_mtime(node, kSeedTime);
  iso_node_set_ctime(node, kSeedTime);
}

// Adds a read-only file holding a copy of `content` to the image's root.
absl::Status AddFile(IsoImage* image, const char* name, const std::string& content) {
  // The memory stream takes a malloc'd buffer and frees it; never empty, so
  // an empty file still has a buffer to own.
  auto* buffer = static_cast<unsigned char*>(std::malloc(content.empty() ? 1 : content.size()));
  if (buffer == nullptr) return IsoError(absl::StrCat("copying ", name), ISO_OUT_OF_MEM);
  if (!content.empty()) std::memcpy(buffer, content.data(), content.size());
  IsoStream* stream = nullptr;
  int rc = iso_memory_stream_new(buffer, content.size(), &stream);
  if (rc < 0) {
    std::free(buffer);
    return IsoError(absl::StrCat("copying ", name), rc);
  }
  IsoFile* file = nullptr;
  rc = iso_image_add_new_file(image, iso_image_get_root(image), name, stream, &file);
  if (rc < 0) {
    iso_stream_unref(stream);  // only a file that was made owns the stream
    return IsoError(absl::StrCat("adding ", name), rc);
  }
  iso_node_set_permissions(reinterpret_cast<IsoNode*>(file), 0444);
  SetTimes(reinterpret_cast<IsoNode*>(file));
  return absl::OkStatus();
}

absl::StatusOr<ImagePtr> BuildImage(const SeedFiles& files) {
  IsoImage* raw = nullptr;
  int rc = iso_image_new(kVolumeId, &raw);
  if (rc < 0) return IsoError("creating the image", rc);
  ImagePtr image(raw);
  iso_image_set_volume_id(image.get(), kVolumeId);
  SetTimes(reinterpret_cast<IsoNode*>(iso_image_get_root(image.get())));
  std::vector<std::pair<const char*, const std::string*>> entries = {{"user-data", &files.user_data},
                                                                     {"meta-data", &files.meta_data}};
  if (files.network_config) entries.emplace_back("network-config", &*files.network_config);
  if (files.vendor_data) entries.emplace_back("vendor-data", &*files.vendor_data);
  for (const auto& [name, content] : entries) {
    if (absl::Status added = AddFile(image.get(), name, *content); !added.ok()) return added;
  }
  return image;
}

// Rock Ridge (Linux's isofs uses its names) and Joliet (exact names for
// readers without Rock Ridge), fixed owners, modes and times.
absl::StatusOr<OptsPtr> WriteOptions() {
  IsoWriteOpts* raw = nullptr;
  int rc = iso_write_opts_new(&raw, 0);
  if (rc < 0) return IsoError("write options", rc);
  OptsPtr opts(raw);
  iso_write_opts_set_rockridge(opts.get(), 1);
  iso_write_opts_set_joliet(opts.get(), 1);
  // The label as written, "cidata", not ISO 9660's upper case "CIDATA": what
  // genisoimage -V writes and what every NoCloud guide shows in blkid.
  iso_write_opts_set_relaxed_vol_atts(opts.get(), 1);
  iso_write_opts_set_replace_mode(opts.get(), 1, 1, 1, 1);
  iso_write_opts_set_default_dir_mode(opts.get(), 0555);
  iso_write_opts_set_default_file_mode(opts.get(), 0444);
  iso_write_opts_set_default_uid(opts.get(), 0);
  iso_write_opts_set_default_gid(opts.get(), 0);
  iso_write_opts_set_replace_timestamps(opts.get(), 2);
  iso_write_opts_set_default_timestamp(opts.get(), kSeedTime);
  iso_write_opts_set_always_gmt(opts.get(), 1);
  char volume_time[sizeof(kSeedVolumeTime)];
  std::memcpy(volume_time, kSeedVolumeTime, sizeof(volume_time));
  rc = iso_write_opts_set_pvd_times(opts.get(), kSeedTime, kSeedTime, 0, 0, volume_time);
  if (rc < 0) return IsoError("volume times", rc);
  return opts;
}

absl::Status WriteAll(int fd, const unsigned char* data, size_t size) {
  while (size > 0) {
    ssize_t n = ::write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoError("writing the seed image", errno);
    data += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

// Runs libisofs' generator and copies its output to `fd`. It is read one
// 2048-byte block at a time: a read asking for more than what is left gets
// EOF and loses the rest, so only the block size is safe.
absl::Status GenerateInto(IsoImage* image, IsoWriteOpts* opts, int fd) {
  constexpr size_t kBlock = 2048;
  burn_source* raw = nullptr;
  int rc = iso_image_create_burn_source(image, opts, &raw);
  if (rc < 0) return IsoError("starting the image writer", rc);
  BurnSourcePtr source(raw);
  const off_t expected = source->get_size(source.get());
  std::vector<unsigned char> buffer(32 * kBlock);
  size_t filled = 0;
  off_t total = 0;
  for (;;) {
    int n = source->read_xt(source.get(), buffer.data() + filled, static_cast<int>(kBlock));
    if (n < 0) return absl::InternalError("seed image: libisofs failed while generating the image");
    filled += static_cast<size_t>(n);
    total += n;
    if (filled == buffer.size() || (n == 0 && filled > 0)) {
      if (absl::Status written = WriteAll(fd, buffer.data(), filled); !written.ok()) return written;
      filled = 0;
    }
    if (n == 0) break;
  }
  if (total != expected) {
    return absl::InternalError(absl::StrFormat("seed image: libisofs produced %d of %d bytes", total, expected));
  }
  return absl::OkStatus();
}

// ---- the file ----

// A new file beside `path` (so the rename stays in one filesystem), mode 0644
// whatever the umask. *tmp_path gets its name.
absl::StatusOr<UniqueFd> CreateTemp(const std::string& path, std::string* tmp_path) {
  size_t slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "" : path.substr(0, slash + 1);
  std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  thread_local std::mt19937_64 random{std::random_device{}()};
  for (int attempt = 0; attempt < 16; ++attempt) {
    *tmp_path = absl::StrFormat("%s.%s.tmp-%016x", dir, base, random());
    UniqueFd fd(::open(tmp_path->c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
    if (fd.valid()) {
      if (::fchmod(fd.get(), 0644) != 0) {
        int err = errno;
        ::unlink(tmp_path->c_str());
        return ErrnoError(absl::StrCat("setting the mode of ", *tmp_path), err);
      }
      return fd;
    }
    if (errno != EEXIST) return ErrnoError(absl::StrCat("creating ", *tmp_path), errno);
  }
  return absl::InternalError(absl::StrCat("no free temporary name beside ", path));
}

// Fills the open temp file, flushes it to disk and renames it over `path`.
absl::Status FinishFile(IsoImage* image, IsoWriteOpts* opts, UniqueFd fd, const std::string& tmp_path,
                        const std::string& path) {
  if (absl::Status generated = GenerateInto(image, opts, fd.get()); !generated.ok()) return generated;
  // Without the sync, a crash after the rename could leave an empty image.
  if (::fsync(fd.get()) != 0) return ErrnoError(absl::StrCat("syncing ", tmp_path), errno);
  if (::close(fd.release()) != 0) return ErrnoError(absl::StrCat("closing ", tmp_path), errno);
  if (::rename(tmp_path.c_str(), path.c_str()) != 0) {
    return ErrnoError(absl::StrCat("renaming the seed image to ", path), errno);
  }
  return absl::OkStatus();
}

}  // namespace

std::string DefaultMetaData(const std::string& instance_id, const std::string& hostname,
                            const std::vector<std::string>& ssh_keys) {
  std::string text =
      absl::StrCat("instance-id: ", JsonString(instance_id), "\nlocal-hostname: ", JsonString(hostname), "\n");
  if (!ssh_keys.empty()) text += PublicKeysBlock(ssh_keys);
  return text;
}

absl::StatusOr<std::string> AddSshKeys(const std::string& meta_data, const std::vector<std::string>& keys) {
  if (keys.empty()) return meta_data;
  size_t first = SkipSpace(meta_data, 0);
  if (first < meta_data.size() && meta_data[first] == '{') {
    return absl::InvalidArgumentError(absl::StrCat(
        kKeysField, " cannot be added to JSON meta-data: give the keys in meta-data's public-keys instead"));
  }
  if (HasTopLevelPublicKeys(meta_data)) {
    return absl::InvalidArgumentError(absl::StrCat(
        kKeysField, " cannot be used when meta-data already has public-keys: give the keys in one place"));
  }
  std::string text = meta_data;
  if (!text.empty() && text.back() != '\n') text += '\n';
  return text + PublicKeysBlock(keys);
}

absl::Status CheckSshKey(const std::string& key, size_t index) {
  const std::string field = absl::StrCat(kKeysField, "[", index, "]");
  if (key.size() > kMaxSshKeyBytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s is %d bytes, more than the %d a key may have", field, key.size(), kMaxSshKeyBytes));
  }
  for (size_t i = 0; i < key.size();) {
    unsigned char c = static_cast<unsigned char>(key[i]);
    if (c == '\n' || c == '\r') return absl::InvalidArgumentError(absl::StrCat(field, " must be one line"));
    if (c < 0x20 || c == 0x7f) {
      return absl::InvalidArgumentError(absl::StrFormat("%s has a control character (0x%02x)", field, c));
    }
    if (c < 0x80) {
      ++i;
      continue;
    }
    uint32_t code = 0;
    size_t len = DecodeUtf8(key, i, &code);
    if (len == 0) return absl::InvalidArgumentError(absl::StrCat(field, " is not valid UTF-8"));
    if (code <= 0x9f || code == 0x2028 || code == 0x2029) {
      return absl::InvalidArgumentError(absl::StrFormat("%s has a control character (U+%04X)", field, code));
    }
    i += len;
  }
  for (const char* prefix : {"ssh-", "ecdsa-", "sk-"}) {
    if (key.rfind(prefix, 0) == 0) return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat(field, " does not start with a known key type (ssh-..., ecdsa-..., sk-...)"));
}

absl::Status WriteSeedIso(const SeedFiles& files, const std::string& path) {
  if (path.empty()) return absl::InvalidArgumentError("seed image: empty path");
  if (absl::Status init = InitLibisofs(); !init.ok()) return init;
  absl::StatusOr<ImagePtr> image = BuildImage(files);
  if (!image.ok()) return image.status();
  absl::StatusOr<OptsPtr> opts = WriteOptions();
  if (!opts.ok()) return opts.status();
  std::string tmp_path;
  absl::StatusOr<UniqueFd> fd = CreateTemp(path, &tmp_path);
  if (!fd.ok()) return fd.status();
  absl::Status finished = FinishFile(image->get(), opts->get(), *std::move(fd), tmp_path, path);
  if (!finished.ok()) ::unlink(tmp_path.c_str());
  return finished;
}

}  // namespace ndq
