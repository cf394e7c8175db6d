// vm/cache_keeper: one ImageCache per directory, shared by every caller, and
// eviction to a bound, on real files in a temp dir; what eviction did is read
// from the hclog lines it writes (captured from spdlog's default logger).
#include "vm/cache_keeper.h"

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include "../../support/eventually.h"
#include "../../support/temp_dir.h"
#include "absl/synchronization/notification.h"
#include "nomadplugin/hclog.h"

namespace ndq {
namespace {

namespace fs = std::filesystem;
using ::ndq::testing::Eventually;
using ::ndq::testing::TempDir;
using ::testing::IsEmpty;
using json = nlohmann::json;

// Captures the hclog lines written while it lives.
class LogCapture {
 public:
  LogCapture() : previous_(spdlog::default_logger()) {
    auto logger = std::make_shared<spdlog::logger>("test", std::make_shared<spdlog::sinks::ostream_sink_mt>(out_));
    logger->set_formatter(nomadplugin::hclog::MakeFormatter());
    logger->set_level(spdlog::level::info);
    spdlog::set_default_logger(logger);
  }
  ~LogCapture() { spdlog::set_default_logger(previous_); }

  std::vector<json> Lines() const {
    std::vector<json> lines;
    std::istringstream in(out_.str());
    for (std::string line; std::getline(in, line);) lines.push_back(json::parse(line));
    return lines;
  }

 private:
  std::ostringstream out_;
  std::shared_ptr<spdlog::logger> previous_;
};

// A cached image of `bytes` bytes, last used `age` ago.
std::string CacheFile(const std::string& dir, const std::string& key, size_t bytes, absl::Duration age) {
  const std::string path = dir + "/" + key;
  std::ofstream(path) << std::string(bytes, 'x');
  fs::last_write_time(path, fs::file_time_type::clock::now() - std::chrono::seconds(absl::ToInt64Seconds(age)));
  return path;
}

TEST(CacheKeeper, OneCachePerDirectory) {
  TempDir a, b;
  CacheKeeper keeper;
  ImageCache& first = keeper.At(a.path());
  EXPECT_EQ(&keeper.At(a.path()), &first);
  EXPECT_EQ(first.dir(), a.path());
  ImageCache& other = keeper.At(b.path());
  EXPECT_NE(&other, &first);
  EXPECT_EQ(other.dir(), b.path());
}

TEST(CacheKeeper, CallersArrivingTogetherGetTheSameCache) {
  TempDir dir;
  CacheKeeper keeper;
  std::vector<ImageCache*> seen(8, nullptr);
  std::vector<std::thread> callers;
  for (ImageCache*& slot : seen) callers.emplace_back([&keeper, &dir, &slot] { slot = &keeper.At(dir.path()); });
  for (std::thread& caller : callers) caller.join();
  for (ImageCache* cache : seen) EXPECT_EQ(cache, seen[0]);
}

TEST(CacheKeeper, ADownloadInFlightIsSharedByEveryTaskThatNeedsIt) {
  TempDir dir;
  CacheKeeper keeper;
  std::atomic<int> downloads{0};
  absl::Notification release;
  ImageCache::Downloader download = [&](const std::string&, const std::string& dest) -> absl::StatusOr<int64_t> {
    ++downloads;
    release.WaitForNotification();
    std::ofstream(dest) << "image";
    return 5;
  };
  absl::StatusOr<CachedImage> first, second;
  std::thread leader([&] { first = keeper.At(dir.path()).Acquire("sha256-ab", {"http://x/img"}, download); });
  ASSERT_TRUE(Eventually([&] { return downloads == 1; }, absl::Seconds(5)));
  std::thread follower([&] { second = keeper.At(dir.path()).Acquire("sha256-ab", {"http://x/img"}, download); });
  ASSERT_TRUE(Eventually([&] { return keeper.At(dir.path()).WaitersFor("sha256-ab") == 1; }, absl::Seconds(5)));
  release.Notify();
  leader.join();
  follower.join();
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(downloads, 1);
  EXPECT_FALSE(first->hit);
  EXPECT_TRUE(second->hit) << "the second task caused no download";
  EXPECT_EQ(second->path, dir.path() + "/sha256-ab");
}

TEST(CacheKeeper, WithoutABoundNothingIsEvicted) {
  TempDir dir;
  CacheKeeper keeper;
  const std::string old = CacheFile(dir.path(), "sha256-old", 4096, absl::Hours(48));
  LogCapture log;
  keeper.Evict(dir.path(), 0, {});
  keeper.Evict(dir.path(), -1, {});
  EXPECT_TRUE(fs::exists(old));
  EXPECT_THAT(log.Lines(), IsEmpty());
}

TEST(CacheKeeper, EvictsTheLeastRecentlyUsedAndSparesImagesInUse) {
  TempDir dir;
  CacheKeeper keeper;
  const std::string oldest = CacheFile(dir.path(), "sha256-oldest", 1000, absl::Hours(3));
  const std::string older = CacheFile(dir.path(), "sha256-older", 1000, absl::Hours(2));
  const std::string newest = CacheFile(dir.path(), "sha256-newest", 1000, absl::Hours(1));
  LogCapture log;
  keeper.Evict(dir.path(), 2000, {oldest});
  EXPECT_TRUE(fs::exists(oldest)) << "in use by a task";
  EXPECT_FALSE(fs::exists(older));
  EXPECT_TRUE(fs::exists(newest)) << "the cache was within its bound without removing it";
  const std::vector<json> lines = log.Lines();
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0]["@message"], "evicted images from the cache");
  EXPECT_EQ(lines[0]["images"], json({older}));
}

TEST(CacheKeeper, ALeasedImageOutlivesEviction) {
  TempDir dir;
  CacheKeeper keeper;
  const std::string leased = CacheFile(dir.path(), "sha256-leased", 1000, absl::Hours(2));
  const std::string unleased = CacheFile(dir.path(), "sha256-free", 1000, absl::Hours(1));
  ASSERT_TRUE(keeper.At(dir.path()).Lease("sha256-leased", "task-1").ok());
  keeper.Evict(dir.path(), 1, {});
  EXPECT_TRUE(fs::exists(leased));
  EXPECT_FALSE(fs::exists(unleased));
  keeper.At(dir.path()).Release(leased, "task-1");
  keeper.Evict(dir.path(), 1, {});
  EXPECT_FALSE(fs::exists(leased)) << "released, it is evicted like any other";
}

TEST(CacheKeeper, ACacheWithinItsBoundLogsNothing) {
  TempDir dir;
  CacheKeeper keeper;
  const std::string image = CacheFile(dir.path(), "sha256-small", 1000, absl::Hours(1));
  LogCapture log;
  keeper.Evict(dir.path(), 1000, {});
  EXPECT_TRUE(fs::exists(image));
  EXPECT_THAT(log.Lines(), IsEmpty());
}

TEST(CacheKeeper, ACacheItCannotReadIsLoggedAsAFailure) {
  TempDir tmp;
  CacheKeeper keeper;
  const std::string missing = tmp.path() + "/no-cache-here";
  LogCapture log;
  keeper.Evict(missing, 1000, {});
  const std::vector<json> lines = log.Lines();
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0]["@message"], "image cache eviction failed");
  EXPECT_EQ(lines[0]["@level"], "warn");
  EXPECT_THAT(lines[0]["error"].get<std::string>(), ::testing::HasSubstr("cannot list image cache " + missing));
  EXPECT_FALSE(fs::exists(missing)) << "eviction creates no cache";
}

}  // namespace
}  // namespace ndq
