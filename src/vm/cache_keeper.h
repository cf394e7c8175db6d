// The image caches tasks use, one object per directory (so a download in
// flight is shared by every task that needs it), and their eviction.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "image/image_cache.h"

namespace ndq {

class CacheKeeper {
 public:
  // The cache in `dir`, made on first use; lives as long as the keeper.
  ImageCache& At(const std::string& dir);
  // Keeps the cache in `dir` under `max_bytes` (<= 0: no bound), sparing the
  // images in `in_use`; what it removed, or why it could not, goes to the log.
  void Evict(const std::string& dir, int64_t max_bytes, const std::set<std::string>& in_use);

 private:
  absl::Mutex mu_;
  std::map<std::string, std::unique_ptr<ImageCache>> caches_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ndq
