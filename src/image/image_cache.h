// The shared image cache: downloaded images stored once by checksum, shared by
// every task on the node, read-only, with one download per image however many
// tasks (in this process or another) ask for it at once.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace ndq {

struct CachedImage {
  std::string path;
  bool hit = false;  // already cached: no download happened for this call
  int64_t bytes = 0;
};

class ImageCache {
 public:
  // Fetches `source` into `dest` atomically (a partial or unverified file is
  // never left at `dest`) and returns the bytes written.
  using Downloader = std::function<absl::StatusOr<int64_t>(const std::string& source, const std::string& dest)>;

  explicit ImageCache(std::string dir);

  struct AcquireOptions {
    // Names the user of the image (a task key); the image then carries a
    // lease file `.lease-<key>-<lease>` until Release, which eviction in any
    // process, before or after a plugin restart, respects.
    std::string lease;
    // Asked while waiting (for another caller's download or another
    // process's lock); once true, Acquire gives up with Cancelled.
    std::function<bool()> cancelled;
    // The longest Acquire waits for another process's lock on the image.
    absl::Duration lock_timeout = absl::Hours(1);
  };

  // The cached file for `key` (e.g. "sha256-<hex>"), downloaded from the first
  // source that works when absent. Callers asking for the same key at once
  // share one download; another process doing the same waits on a file lock.
  absl::StatusOr<CachedImage> Acquire(const std::string& key, const std::vector<std::string>& sources,
                                      const Downloader& download, const AcquireOptions& options);
  absl::StatusOr<CachedImage> Acquire(const std::string& key, const std::vector<std::string>& sources,
                                      const Downloader& download) {
    return Acquire(key, sources, download, AcquireOptions{});
  }
  // Leases the entry `key` (a warm-start template's directory name) the way
  // Acquire leases an image: eviction spares it until Release.
  absl::Status Lease(const std::string& key, const std::string& lease);
  // Ends the lease `lease` on the image at `path` (a path Acquire returned).
  void Release(const std::string& path, const std::string& lease);

  // Removes least recently used images (and warm-start templates, tpl-*), never one in `in_use` (paths) nor one
  // with a lease, until the cache holds at most `max_bytes`. Returns the paths
  // removed.
  absl::StatusOr<std::vector<std::string>> Evict(int64_t max_bytes, const std::set<std::string>& in_use);

  // How many callers wait for another caller's download of `key` (tests).
  int WaitersFor(const std::string& key);

  std::string PathFor(const std::string& key) const { return dir_ + "/" + key; }
  const std::string& dir() const { return dir_; }

 private:
  // One download under way; callers asking for the same key wait for its result.
  // It has its own lock because clang's -Wthread-safety cannot tie a nested
  // struct's fields to the cache's mu_. Never held together with mu_.
  struct Flight {
    absl::Mutex mu;
    bool done ABSL_GUARDED_BY(mu) = false;
    int waiters ABSL_GUARDED_BY(mu) = 0;
    absl::StatusOr<CachedImage> result ABSL_GUARDED_BY(mu) = absl::UnknownError("download did not finish");
  };
  absl::StatusOr<CachedImage> AcquireUnleased(const std::string& key, const std::vector<std::string>& sources,
                                              const Downloader& download, const AcquireOptions& options);
  absl::StatusOr<CachedImage> Fill(const std::string& key, const std::vector<std::string>& sources,
                                   const Downloader& download, const AcquireOptions& options);
  // Writes the lease file for `key` under the image's lock, where eviction
  // looks for it; the image itself need not exist yet.
  absl::Status TakeLease(const std::string& key, const AcquireOptions& options);
  // Creates the cache directory (and its parents) when missing.
  absl::Status MakeDir() const;

  const std::string dir_;
  absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<Flight>> flights_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ndq
