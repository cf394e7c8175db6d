#include "image/image_cache.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <optional>

#include "base/timeouts.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"

namespace ndq {
namespace {

// Marks a cached image as just used: its mtime is the LRU clock (the content
// never changes, so mtime has no other meaning here).
void Touch(const std::string& path) { ::utimensat(AT_FDCWD, path.c_str(), nullptr, 0); }

// The bytes a directory's files take on disk (a template's RAM file is sparse).
int64_t DiskUse(const std::string& dir) {
  int64_t bytes = 0;
  std::error_code error;
  for (const auto& file : std::filesystem::directory_iterator(dir, error)) {
    struct stat st;
    if (::lstat(file.path().c_str(), &st) == 0 && S_ISREG(st.st_mode)) bytes += static_cast<int64_t>(st.st_blocks) * 512;
  }
  return bytes;
}

// A template a plugin was writing when it died: no start writes one for an hour.
void RemoveStaleStaging(const std::filesystem::directory_entry& staging) {
  std::error_code error;
  const auto written = staging.last_write_time(error);
  if (error || std::filesystem::file_time_type::clock::now() - written < std::chrono::hours(1)) return;
  std::filesystem::remove_all(staging.path(), error);
}

std::optional<int64_t> SizeOf(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return std::nullopt;
  return static_cast<int64_t>(st.st_size);
}

// Holds an exclusive flock for as long as it lives. Waits for another
// process's lock up to `timeout`, or until `cancelled` says so: flock has no
// timeout of its own, so a non-blocking try is repeated with a growing pause.
class FileLock {
 public:
  FileLock(const std::string& path, absl::Duration timeout, const std::function<bool()>& cancelled = {})
      : fd_(::open(path.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600)) {
    if (fd_ < 0) {
      status_ = absl::InternalError(absl::StrCat("cannot open lock ", path, ": ", std::strerror(errno)));
      return;
    }
    const absl::Time deadline = absl::Now() + timeout;
    absl::Duration pause = absl::Milliseconds(5);
    while (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      if (errno != EWOULDBLOCK && errno != EINTR) {
        status_ = absl::InternalError(absl::StrCat("cannot lock ", path, ": ", std::strerror(errno)));
        break;
      }
      if (cancelled && cancelled()) {
        status_ = absl::CancelledError("gave up waiting for another process's download of the image");
        break;
      }
      if (absl::Now() >= deadline) {
        status_ = absl::DeadlineExceededError(absl::StrCat("another process held ", path, " for longer than ",
                                                           absl::FormatDuration(timeout)));
        break;
      }
      absl::SleepFor(std::min(pause, deadline - absl::Now()));
      pause = std::min(pause * 2, absl::Milliseconds(250));
    }
  }
  ~FileLock() {
    if (fd_ >= 0) ::close(fd_);
  }
  const absl::Status& status() const { return status_; }

 private:
  int fd_;
  absl::Status status_;
};

std::string LeasePrefix(const std::string& key) { return ".lease-" + key + "-"; }

// Whether any task, in this plugin process or a previous one, holds a lease
// on the image `key`.
bool HasLease(const std::string& dir, const std::string& key) {
  const std::string prefix = LeasePrefix(key);
  std::error_code error;
  for (const auto& file : std::filesystem::directory_iterator(dir, error)) {
    if (absl::StartsWith(file.path().filename().string(), prefix)) return true;
  }
  return false;
}

// Eviction's locks: held only while a file is created or removed.
constexpr absl::Duration kShortLock = timeouts::kCacheKeyLock;

}  // namespace

ImageCache::ImageCache(std::string dir) : dir_(std::move(dir)) {}

absl::StatusOr<CachedImage> ImageCache::Acquire(const std::string& key, const std::vector<std::string>& sources,
                                                const Downloader& download, const AcquireOptions& options) {
  if (key.empty() || absl::StrContains(key, '/') || key[0] == '.') {
    return absl::InvalidArgumentError(absl::StrCat("invalid cache key \"", key, "\""));
  }
  if (absl::StrContains(options.lease, '/')) {
    return absl::InvalidArgumentError(absl::StrCat("invalid lease name \"", options.lease, "\""));
  }
  // The lease comes first: eviction (under the same key lock) skips a leased
  // key, so the image cannot be removed between its download and its use.
  if (!options.lease.empty()) {
    if (absl::Status leased = TakeLease(key, options); !leased.ok()) return leased;
  }
  absl::StatusOr<CachedImage> result = AcquireUnleased(key, sources, download, options);
  if (!result.ok() && !options.lease.empty()) Release(PathFor(key), options.lease);
  return result;
}

absl::StatusOr<CachedImage> ImageCache::AcquireUnleased(const std::string& key, const std::vector<std::string>& sources,
                                                        const Downloader& download, const AcquireOptions& options) {
  std::shared_ptr<Flight> flight;
  bool leader = false;
  {
    absl::MutexLock lock(&mu_);
    auto it = flights_.find(key);
    if (it == flights_.end()) {
      flight = std::make_shared<Flight>();
      flights_[key] = flight;
      leader = true;
    } else {
      flight = it->second;
    }
  }
  absl::StatusOr<CachedImage> result = absl::UnknownError("no result");
  if (!leader) {
    absl::MutexLock lock(&flight->mu);
    ++flight->waiters;
    // Woken by the leader; the slices only look for a caller that gave up.
    while (!flight->mu.AwaitWithTimeout(absl::Condition(&flight->done), absl::Milliseconds(250))) {
      if (options.cancelled && options.cancelled()) {
        --flight->waiters;
        return absl::CancelledError("gave up waiting for the image's download");
      }
    }
    --flight->waiters;
    result = flight->result;
    if (result.ok()) result->hit = true;  // this caller caused no download
  } else {
    result = Fill(key, sources, download, options);
    {
      // Whoever asks from now on starts afresh (and finds the file cached).
      absl::MutexLock lock(&mu_);
      flights_.erase(key);
    }
    absl::MutexLock lock(&flight->mu);
    flight->result = result;
    flight->done = true;
  }
  return result;
}

absl::Status ImageCache::TakeLease(const std::string& key, const AcquireOptions& options) {
  // The lease comes before any download, so on a fresh cache it makes the directory.
  if (absl::Status made = MakeDir(); !made.ok()) return made;
  FileLock lock(dir_ + "/." + key + ".lock", kShortLock, options.cancelled);
  if (!lock.status().ok()) return lock.status();
  const std::string lease = dir_ + "/" + LeasePrefix(key) + options.lease;
  const int fd = ::open(lease.c_str(), O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) return absl::InternalError(absl::StrCat("cannot write lease ", lease, ": ", std::strerror(errno)));
  ::close(fd);
  return absl::OkStatus();
}

absl::Status ImageCache::MakeDir() const {
  std::error_code error;
  std::filesystem::create_directories(dir_, error);
  if (error) return absl::InternalError(absl::StrCat("cannot create image cache ", dir_, ": ", error.message()));
  return absl::OkStatus();
}

absl::Status ImageCache::Lease(const std::string& key, const std::string& lease) {
  if (lease.empty() || absl::StrContains(lease, '/') || absl::StrContains(key, '/')) {
    return absl::InvalidArgumentError(absl::StrCat("invalid lease \"", lease, "\" on \"", key, "\""));
  }
  AcquireOptions options;
  options.lease = lease;
  return TakeLease(key, options);
}

void ImageCache::Release(const std::string& path, const std::string& lease) {
  if (path.empty() || lease.empty()) return;
  const std::string key = std::filesystem::path(path).filename().string();
  ::unlink((dir_ + "/" + LeasePrefix(key) + lease).c_str());
}

int ImageCache::WaitersFor(const std::string& key) {
  std::shared_ptr<Flight> flight;
  {
    absl::MutexLock lock(&mu_);
    auto it = flights_.find(key);
    if (it == flights_.end()) return 0;
    flight = it->second;
  }
  absl::MutexLock lock(&flight->mu);
  return flight->waiters;
}

absl::StatusOr<CachedImage> ImageCache::Fill(const std::string& key, const std::vector<std::string>& sources,
                                             const Downloader& download, const AcquireOptions& options) {
  if (absl::Status made = MakeDir(); !made.ok()) return made;
  const std::string path = PathFor(key);
  if (std::optional<int64_t> size = SizeOf(path)) {
    Touch(path);
    return CachedImage{path, true, *size};
  }
  // Another plugin process may be downloading the same image: wait for it,
  // then look again.
  FileLock lock(dir_ + "/." + key + ".lock", options.lock_timeout, options.cancelled);
  if (!lock.status().ok()) return lock.status();
  if (std::optional<int64_t> size = SizeOf(path)) {
    Touch(path);
    return CachedImage{path, true, *size};
  }
  if (sources.empty()) return absl::InvalidArgumentError("no image source given");
  std::vector<std::string> failures;
  for (const std::string& source : sources) {
    absl::StatusOr<int64_t> bytes = download(source, path);
    if (bytes.ok()) {
      ::chmod(path.c_str(), 0444);  // tasks get overlays; the cached image is never written
      Touch(path);
      return CachedImage{path, false, *bytes};
    }
    failures.push_back(absl::StrCat(source, ": ", bytes.status().message()));
  }
  return absl::UnavailableError(absl::StrCat("no source worked: ", absl::StrJoin(failures, "; ")));
}

absl::StatusOr<std::vector<std::string>> ImageCache::Evict(int64_t max_bytes, const std::set<std::string>& in_use) {
  struct Entry {
    std::string path;
    int64_t bytes;
    std::filesystem::file_time_type used;
  };
  std::vector<Entry> entries;
  int64_t total = 0;
  std::error_code error;
  for (const auto& file : std::filesystem::directory_iterator(dir_, error)) {
    const std::string name = file.path().filename().string();
    if (absl::StartsWith(name, ".tpl-") && absl::EndsWith(name, ".staging")) {
      RemoveStaleStaging(file);
      continue;
    }
    if (name.empty() || name[0] == '.' || absl::EndsWith(name, ".part")) continue;
    std::optional<int64_t> bytes;
    if (file.is_regular_file()) bytes = static_cast<int64_t>(file.file_size());
    // A warm-start template (image/vm_template.h) is one entry: its files' disk use.
    if (absl::StartsWith(name, "tpl-") && file.is_directory()) bytes = DiskUse(file.path().string());
    if (!bytes) continue;
    entries.push_back({file.path().string(), *bytes, file.last_write_time()});
    total += *bytes;
  }
  if (error) return absl::InternalError(absl::StrCat("cannot list image cache ", dir_, ": ", error.message()));
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.used < b.used; });
  std::vector<std::string> removed;
  for (const Entry& entry : entries) {
    if (total <= max_bytes) break;
    if (in_use.count(entry.path)) continue;
    // Under the image's lock, so a concurrent download of it is not cut
    // short and a lease being taken is seen.
    const std::string key = std::filesystem::path(entry.path).filename().string();
    FileLock lock(dir_ + "/." + key + ".lock", kShortLock);
    if (!lock.status().ok() || HasLease(dir_, key)) continue;
    if (std::filesystem::remove_all(entry.path, error) > 0) {
      total -= entry.bytes;
      removed.push_back(entry.path);
    }
  }
  return removed;
}

}  // namespace ndq
