#include "image/vm_template.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/match.h"
#include "absl/synchronization/mutex.h"
#include "base/error_kind.h"
#include "base/file_identity.h"
#include "base/small_file.h"
#include "image/checksum.h"
#include "image/task_disk.h"
#include "nlohmann/json.hpp"

namespace ndq {
namespace {

// Bump when a template's layout or meaning changes; templates of another
// format are never used (RemoveOtherFormats). 2: the key holds the job.
constexpr int kFormatVersion = 2;
constexpr char kManifest[] = "manifest.json";
constexpr size_t kChunk = 1 << 20;

// Files already hashed by this process (templates are checked once, images
// hashed once, per identity).
absl::Mutex digest_mu;
std::map<FileIdentity, std::string>& Digests() ABSL_EXCLUSIVE_LOCKS_REQUIRED(digest_mu) {
  static auto* digests = new std::map<FileIdentity, std::string>();
  return *digests;
}
// The large files' digests, also kept in a file for the next launch (KeepDigestsIn).
struct KeptDigests {
  std::string path;
  std::map<FileIdentity, std::string> digests;
};
KeptDigests& Kept() ABSL_EXCLUSIVE_LOCKS_REQUIRED(digest_mu) {
  static auto* kept = new KeptDigests();
  return *kept;
}
// Enough for every image and template of a busy cache; the oldest go first.
constexpr size_t kMaxKeptDigests = 1024;

nlohmann::json KeptDigestsJson(const KeptDigests& kept) {
  nlohmann::json entries = nlohmann::json::array();
  for (const auto& [id, digest] : kept.digests) {
    entries.push_back({id.device, id.inode, id.size, id.mtime_ns, id.ctime_ns, digest});
  }
  return {{"format", 1}, {"xxh3_128", entries}};
}

void LoadKeptDigests(const std::string& text, KeptDigests& kept) {
  const nlohmann::json doc = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!doc.is_object() || doc.value("format", 0) != 1) return;
  const nlohmann::json entries = doc.value("xxh3_128", nlohmann::json::array());
  if (!entries.is_array()) return;
  for (const nlohmann::json& e : entries) {
    if (!e.is_array() || e.size() != 6 || !e[5].is_string()) continue;
    bool numbers = true;
    for (size_t i = 0; i < 5; ++i) numbers = numbers && e[i].is_number_integer();
    if (!numbers) continue;
    const FileIdentity id{e[0].get<uint64_t>(), e[1].get<uint64_t>(), e[2].get<uint64_t>(), e[3].get<int64_t>(),
                          e[4].get<int64_t>()};
    kept.digests[id] = e[5].get<std::string>();
  }
}

std::string Hex128(XXH128_hash_t hash) {
  return absl::StrFormat("%016x%016x", hash.high64, hash.low64);
}

bool AllZero(const char* data, size_t len) {
  return len == 0 || (data[0] == 0 && std::memcmp(data, data + 1, len - 1) == 0);
}


// Makes the staging name unique per process and call.
std::string StagingName(const std::string& key) {
  static std::atomic<int> counter{0};
  return absl::StrCat(".", kTemplatePrefix, key, ".", ::getpid(), ".", counter++, ".staging");
}

std::optional<nlohmann::json> ReadManifest(const std::string& dir) {
  std::optional<std::string> text = ReadSmallFile(dir + "/" + kManifest);
  if (!text) return std::nullopt;
  nlohmann::json manifest = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (!manifest.is_object()) return std::nullopt;
  return manifest;
}

nlohmann::json OwnerJson(const TemplateOwner& owner) {
  return {{"namespace", owner.namespace_name}, {"job_id", owner.job_id}, {"task_group", owner.task_group},
          {"task", owner.task}};
}

nlohmann::json IdentityJson(const TemplateIdentity& id) {
  return {{"owner", OwnerJson(id.owner)},    {"image_digest", id.image_digest}, {"config_digest", id.config_digest},
          {"qemu_version", id.qemu_version}, {"machine", id.machine},           {"memory_mb", id.memory_mb}};
}

// Checks one file of a template against its manifest entry; opens it read-only.
absl::StatusOr<UniqueFd> CheckedFile(const std::string& dir, const nlohmann::json& entry, const std::string& name) {
  if (!entry.is_object() || !entry.value("bytes", nlohmann::json()).is_number_integer() ||
      !entry.value("xxh3", nlohmann::json()).is_string()) {
    return absl::DataLossError(absl::StrCat(name, " is missing from the manifest"));
  }
  UniqueFd fd(::open((dir + "/" + name).c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
  if (!fd.valid()) return absl::DataLossError(absl::StrCat(name, ": ", std::strerror(errno)));
  struct stat st;
  if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode)) return absl::DataLossError(name + " is not a file");
  const int64_t want = entry["bytes"].get<int64_t>();
  if (st.st_size != want) {
    return absl::DataLossError(absl::StrCat(name, " has ", st.st_size, " bytes, the manifest says ", want));
  }
  absl::StatusOr<std::string> digest = ContentDigest(fd.get());
  if (!digest.ok()) return digest.status();
  if (*digest != entry["xxh3"].get<std::string>()) return absl::DataLossError(name + " does not match its checksum");
  return fd;
}

}  // namespace

std::string TemplateOwner::Describe() const {
  return absl::StrCat("task \"", task, "\" of job \"", job_id, "\" (group \"", task_group, "\", namespace \"",
                      namespace_name, "\")");
}

std::string TemplateIdentity::Key() const {
  absl::StatusOr<Hasher> hasher = Hasher::Create("sha256");
  const std::string text = absl::StrCat("ndq-warm-template ", kFormatVersion, "\n", IdentityJson(*this).dump());
  hasher->Update(text.data(), text.size());
  return hasher->FinalHex();
}

void KeepDigestsIn(const std::string& path) {
  std::optional<std::string> text = ReadSmallFile(path, nullptr, 16 << 20);
  absl::MutexLock lock(&digest_mu);
  Kept().path = path;
  if (text) LoadKeptDigests(*text, Kept());
}

absl::StatusOr<std::string> ContentDigest(int fd) {
  struct stat st;
  if (::fstat(fd, &st) != 0) return ErrnoNow("cannot stat a file to hash");
  const FileIdentity identity = FileIdentity::Of(st);
  {
    absl::MutexLock lock(&digest_mu);
    auto it = Digests().find(identity);
    if (it != Digests().end()) return it->second;
    auto kept = Kept().digests.find(identity);
    if (kept != Kept().digests.end()) return kept->second;
  }
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> state(XXH3_createState(), XXH3_freeState);
  XXH3_128bits_reset(state.get());
  std::unique_ptr<char[]> buffer(new char[kChunk]);
  off_t offset = 0;
  for (;;) {
    const ssize_t n = ::pread(fd, buffer.get(), kChunk, offset);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoNow("cannot read a file to hash");
    if (n == 0) break;
    XXH3_128bits_update(state.get(), buffer.get(), static_cast<size_t>(n));
    offset += n;
  }
  std::string digest = Hex128(XXH3_128bits_digest(state.get()));
  absl::MutexLock lock(&digest_mu);
  // Every task's own overlay is a new identity: forget them all now and then
  // rather than grow for the plugin's lifetime (a forgotten file is hashed again).
  constexpr size_t kMaxRemembered = 4096;
  if (Digests().size() >= kMaxRemembered) Digests().clear();
  Digests()[identity] = digest;
  KeptDigests& kept = Kept();
  if (!kept.path.empty() && st.st_size >= kKeptDigestMinBytes) {
    if (kept.digests.size() >= kMaxKeptDigests) {
      auto oldest = std::min_element(kept.digests.begin(), kept.digests.end(), [](const auto& a, const auto& b) {
        return a.first.ctime_ns < b.first.ctime_ns;
      });
      kept.digests.erase(oldest);
    }
    kept.digests[identity] = digest;
    // Under the lock, so two writers never interleave; a lost write costs a hash.
    if (absl::Status written = WriteSmallFileAtomically(kept.path, KeptDigestsJson(kept).dump()); !written.ok()) {
      kept.path.clear();  // once is enough: digests stay in this process's memory
    }
  }
  return digest;
}

absl::StatusOr<OpenedTemplate> TemplateStore::Open(const TemplateIdentity& id) const {
  const std::string key = id.Key();
  const std::string dir = DirFor(key);
  std::optional<nlohmann::json> manifest = ReadManifest(dir);
  if (!manifest) {
    struct stat st;
    if (::lstat(dir.c_str(), &st) != 0) return absl::NotFoundError(ExplainMiss(id));
    Remove(key);
    return absl::DataLossError(absl::StrCat("template ", key.substr(0, 12), " failed its check (no readable manifest) and was removed"));
  }
  OpenedTemplate opened{key, dir, {}, {}, {}, 0};
  const nlohmann::json files = manifest->value("files", nlohmann::json::object());
  struct Part {
    const char* name;
    UniqueFd* fd;
  };
  for (const Part& part : {Part{kTemplateRam, &opened.ram}, Part{kTemplateState, &opened.state},
                           Part{kTemplateDisk, &opened.disk}}) {
    absl::StatusOr<UniqueFd> fd = CheckedFile(dir, files.value(part.name, nlohmann::json()), part.name);
    if (!fd.ok()) {
      Remove(key);
      return absl::DataLossError(
          absl::StrCat("template ", key.substr(0, 12), " failed its check (", fd.status().message(), ") and was removed"));
    }
    *part.fd = *std::move(fd);
  }
  opened.ram_bytes = files[kTemplateRam]["bytes"].get<int64_t>();
  ::utimensat(AT_FDCWD, dir.c_str(), nullptr, 0);  // recently used, for eviction
  return opened;
}

void TemplateStore::Remove(const std::string& key) const {
  // Renamed away first, so no start opens a half-removed template.
  const std::string doomed = absl::StrCat(dir_, "/", StagingName(key));
  std::error_code ignored;
  if (::rename(DirFor(key).c_str(), doomed.c_str()) == 0) std::filesystem::remove_all(doomed, ignored);
}

int TemplateStore::RemoveOtherFormats() const {
  int removed = 0;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(dir_, error)) {
    const std::string name = entry.path().filename().string();
    if (!absl::StartsWith(name, kTemplatePrefix) || !entry.is_directory(error)) continue;
    std::optional<nlohmann::json> manifest = ReadManifest(entry.path().string());
    // No manifest at all: a broken template; Open removes it when asked for.
    if (!manifest || manifest->value("format", 0) == kFormatVersion) continue;
    Remove(name.substr(std::strlen(kTemplatePrefix)));
    ++removed;
  }
  return removed;
}

std::string TemplateStore::ExplainMiss(const TemplateIdentity& id) const {
  // The owner's most recent template.
  std::optional<nlohmann::json> latest;
  std::filesystem::file_time_type latest_time;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(dir_, error)) {
    const std::string name = entry.path().filename().string();
    if (!absl::StartsWith(name, kTemplatePrefix) || !entry.is_directory(error)) continue;
    std::optional<nlohmann::json> manifest = ReadManifest(entry.path().string());
    if (!manifest || manifest->value("identity", nlohmann::json()).value("owner", nlohmann::json()) != OwnerJson(id.owner)) {
      continue;
    }
    const auto time = entry.last_write_time(error);
    if (!latest || time > latest_time) {
      latest = (*manifest)["identity"];
      latest_time = time;
    }
  }
  if (!latest) return "no template yet";
  std::vector<std::string> changed;
  if (latest->value("qemu_version", "") != id.qemu_version) {
    changed.push_back(absl::StrCat("QEMU's version changed (the template is from ", latest->value("qemu_version", "?"),
                                   ", this is ", id.qemu_version, ")"));
  }
  if (latest->value("image_digest", "") != id.image_digest) changed.push_back("the image changed");
  if (latest->value("machine", "") != id.machine) changed.push_back("the machine type changed");
  if (latest->value("memory_mb", int64_t{0}) != id.memory_mb || latest->value("config_digest", "") != id.config_digest) {
    changed.push_back("the VM's configuration changed (args, memory, CPUs or devices)");
  }
  if (changed.empty()) return "no template yet";
  return absl::StrCat("no template fits: ", absl::StrJoin(changed, ", "), " since the last template of ",
                      id.owner.Describe());
}

// --- writing --------------------------------------------------------------------

TemplateStore::Writer::Writer(const TemplateStore& store, TemplateIdentity id) : store_(store), id_(std::move(id)) {}

TemplateStore::Writer::~Writer() {
  if (staging_.empty() || published_) return;
  std::error_code ignored;
  std::filesystem::remove_all(staging_, ignored);
}

absl::Status TemplateStore::Writer::Begin() {
  if (::mkdir(store_.dir_.c_str(), 0700) != 0 && errno != EEXIST) return ErrnoNow("cannot create " + store_.dir_);
  staging_ = absl::StrCat(store_.dir_, "/", StagingName(id_.Key()));
  if (::mkdir(staging_.c_str(), 0700) != 0) {
    const absl::Status failed = ErrnoNow("cannot create " + staging_);
    staging_.clear();
    return failed;
  }
  return absl::OkStatus();
}

absl::Status TemplateStore::Writer::CopyFd(const std::string& name, int fd, int64_t bytes) {
  const std::string path = staging_ + "/" + name;
  UniqueFd out(::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (!out.valid()) return ErrnoNow("cannot create " + path);
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> state(XXH3_createState(), XXH3_freeState);
  XXH3_128bits_reset(state.get());
  std::unique_ptr<char[]> buffer(new char[kChunk]);
  for (int64_t offset = 0; offset < bytes;) {
    const size_t want = static_cast<size_t>(std::min<int64_t>(kChunk, bytes - offset));
    const ssize_t n = ::pread(fd, buffer.get(), want, offset);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoNow("cannot read what goes into " + path);
    if (n == 0) return absl::DataLossError(absl::StrCat(path, ": the source ended at ", offset, " of ", bytes, " bytes"));
    XXH3_128bits_update(state.get(), buffer.get(), static_cast<size_t>(n));
    // Zero runs (most of a fresh guest's RAM) stay holes.
    if (!AllZero(buffer.get(), static_cast<size_t>(n))) {
      for (ssize_t done = 0; done < n;) {
        const ssize_t w = ::pwrite(out.get(), buffer.get() + done, static_cast<size_t>(n - done), offset + done);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) return ErrnoNow("cannot write " + path);
        done += w;
      }
    }
    offset += n;
  }
  if (::ftruncate(out.get(), bytes) != 0 || ::fsync(out.get()) != 0) return ErrnoNow("cannot write " + path);
  files_.push_back(File{name, bytes, Hex128(XXH3_128bits_digest(state.get()))});
  return absl::OkStatus();
}

absl::Status TemplateStore::Writer::MakeOverlay(int64_t disk_size) {
  // Its backing name is only a label: QEMU gets every layer as an fd.
  return CreateOverlayIn(staging_, kTemplateOverlay, store_.DirFor(id_.Key()) + "/" + kTemplateDisk, "qcow2", disk_size);
}

void TemplateStore::Writer::GiveRamTo(uid_t uid, gid_t gid) { ram_owner_ = std::make_pair(uid, gid); }

int64_t TemplateStore::Writer::bytes(const std::string& name) const {
  for (const File& file : files_) {
    if (file.name == name) return file.bytes;
  }
  return 0;
}

absl::Status TemplateStore::Writer::Publish() {
  nlohmann::json files = nlohmann::json::object();
  for (const File& file : files_) files[file.name] = {{"bytes", file.bytes}, {"xxh3", file.digest}};
  const nlohmann::json manifest = {{"format", kFormatVersion}, {"key", id_.Key()}, {"identity", IdentityJson(id_)},
                                   {"files", files}};
  const std::string path = staging_ + "/" + kManifest;
  UniqueFd out(::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (!out.valid()) return ErrnoNow("cannot create " + path);
  const std::string text = manifest.dump(2);
  if (::write(out.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size()) || ::fsync(out.get()) != 0) {
    return ErrnoNow("cannot write " + path);
  }
  for (const File& file : files_) ::chmod((staging_ + "/" + file.name).c_str(), 0400);
  // QEMU 7.2 opens its memory file read-write even to map it privately: an
  // unprivileged QEMU user must own the RAM file (templates are keyed by
  // that user, so no other user's VM maps it).
  if (ram_owner_) {
    const std::string ram = staging_ + "/" + kTemplateRam;
    if (::chown(ram.c_str(), ram_owner_->first, ram_owner_->second) != 0 || ::chmod(ram.c_str(), 0600) != 0) {
      return ErrnoNow("cannot hand " + ram + " to QEMU's user");
    }
  }
  if (::rename(staging_.c_str(), store_.DirFor(id_.Key()).c_str()) != 0) {
    if (errno == EEXIST || errno == ENOTEMPTY) return absl::AlreadyExistsError("another start saved this template first");
    return ErrnoNow("cannot publish template " + store_.DirFor(id_.Key()));
  }
  published_ = true;
  return absl::OkStatus();
}

}  // namespace ndq
