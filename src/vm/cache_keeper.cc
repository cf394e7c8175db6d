#include "vm/cache_keeper.h"

#include <vector>

#include "nomadplugin/hclog.h"

namespace ndq {

namespace log = nomadplugin::hclog;

ImageCache& CacheKeeper::At(const std::string& dir) {
  absl::MutexLock lock(&mu_);
  std::unique_ptr<ImageCache>& cache = caches_[dir];
  if (cache == nullptr) cache = std::make_unique<ImageCache>(dir);
  return *cache;
}

void CacheKeeper::Evict(const std::string& dir, int64_t max_bytes, const std::set<std::string>& in_use) {
  if (max_bytes <= 0) return;
  absl::StatusOr<std::vector<std::string>> removed = At(dir).Evict(max_bytes, in_use);
  if (!removed.ok()) {
    log::Warn("image cache eviction failed", {{"error", std::string(removed.status().message())}});
  } else if (!removed->empty()) {
    log::Info("evicted images from the cache", {{"images", *removed}});
  }
}

}  // namespace ndq
