#include "qemu_driver/image_cache.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <optional>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace ndq {
namespace {

// Marks a cached image as just used: its mtime is the LRU clock (the content
// never changes, so mtime has no other meaning here).
void Touch(const std::string& path) { ::utimensat(AT_FDCWD, path.c_str(), nullptr, 0); }

std::optional<int64_t> SizeOf(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return std::nullopt;
  return static_cast<int64_t>(st.st_size);
}

// Holds an exclusive flock for as long as it lives.
class FileLock {
 public:
  explicit FileLock(const std::string& path) : fd_(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600)) {
    if (fd_ >= 0) {
      while (::flock(fd_, LOCK_EX) != 0 && errno == EINTR) {
      }
    }
  }
  ~FileLock() {
    if (fd_ >= 0) ::close(fd_);
  }
  bool ok() const { return fd_ >= 0; }

 private:
  int fd_;
};

}  // namespace

ImageCache::ImageCache(std::string dir) : dir_(std::move(dir)) {}

absl::StatusOr<CachedImage> ImageCache::Acquire(const std::string& key, const std::vector<std::string>& sources,
                                                const Downloader& download) {
  if (key.empty() || absl::StrContains(key, '/') || key[0] == '.') {
    return absl::InvalidArgumentError(absl::StrCat("invalid cache key \"", key, "\""));
  }
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
  if (!leader) {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(&flight->done));
    absl::StatusOr<CachedImage> shared = flight->result;
    if (shared.ok()) shared->hit = true;  // this caller caused no download
    return shared;
  }
  absl::StatusOr<CachedImage> result = Fill(key, sources, download);
  absl::MutexLock lock(&mu_);
  flight->result = result;
  flight->done = true;
  flights_.erase(key);
  return result;
}

absl::StatusOr<CachedImage> ImageCache::Fill(const std::string& key, const std::vector<std::string>& sources,
                                             const Downloader& download) {
  std::error_code error;
  std::filesystem::create_directories(dir_, error);
  if (error) return absl::InternalError(absl::StrCat("cannot create image cache ", dir_, ": ", error.message()));
  const std::string path = PathFor(key);
  if (std::optional<int64_t> size = SizeOf(path)) {
    Touch(path);
    return CachedImage{path, true, *size};
  }
  // Another plugin process may be downloading the same image: wait for it,
  // then look again.
  FileLock lock(dir_ + "/." + key + ".lock");
  if (!lock.ok()) return absl::InternalError(absl::StrCat("cannot lock ", dir_, ": ", std::strerror(errno)));
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
    if (name.empty() || name[0] == '.' || !file.is_regular_file() || absl::EndsWith(name, ".part")) continue;
    const int64_t bytes = static_cast<int64_t>(file.file_size());
    entries.push_back({file.path().string(), bytes, file.last_write_time()});
    total += bytes;
  }
  if (error) return absl::InternalError(absl::StrCat("cannot list image cache ", dir_, ": ", error.message()));
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.used < b.used; });
  std::vector<std::string> removed;
  for (const Entry& entry : entries) {
    if (total <= max_bytes) break;
    if (in_use.count(entry.path)) continue;
    // Under the image's lock, so a concurrent download of it is not cut short.
    const std::string key = std::filesystem::path(entry.path).filename().string();
    FileLock lock(dir_ + "/." + key + ".lock");
    if (std::filesystem::remove(entry.path, error)) {
      total -= entry.bytes;
      removed.push_back(entry.path);
    }
  }
  return removed;
}

}  // namespace ndq
