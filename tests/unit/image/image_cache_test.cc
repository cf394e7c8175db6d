#include "image/image_cache.h"

#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/temp_dir.h"
#include "../../support/eventually.h"
#include "absl/strings/match.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"

namespace ndq {
namespace {

using ::ndq::testing::Eventually;
using ::ndq::testing::TempDir;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

// A real transfer: copies a local file to a temporary name, then renames it
// into place, counting how often it ran.
struct CopyDownloader {
  std::atomic<int> calls{0};
  absl::Notification* hold = nullptr;  // when set, each copy waits for it
  ImageCache::Downloader Get() {
    return [this](const std::string& source, const std::string& dest) -> absl::StatusOr<int64_t> {
      ++calls;
      if (hold != nullptr) hold->WaitForNotificationWithTimeout(absl::Seconds(10));
      std::error_code error;
      std::filesystem::copy_file(source, dest + ".part", std::filesystem::copy_options::overwrite_existing, error);
      if (error) return absl::NotFoundError(error.message());
      std::filesystem::rename(dest + ".part", dest);
      return static_cast<int64_t>(std::filesystem::file_size(dest));
    };
  }
};

// How many of this process's descriptors are open on `path`.
int OpenDescriptorsOf(const std::string& path) {
  int n = 0;
  std::error_code error;
  for (const auto& fd : fs::directory_iterator("/proc/self/fd", error)) {
    std::error_code gone;
    if (fs::read_symlink(fd.path(), gone) == path) ++n;
  }
  return n;
}

std::string MakeFile(const TempDir& dir, const std::string& name, size_t bytes) {
  std::ofstream(dir / name) << std::string(bytes, 'x');
  return dir / name;
}

TEST(ImageCache, MissThenHitAndReadOnly) {
  TempDir src, cache_dir;
  const std::string image = MakeFile(src, "a.img", 1000);
  ImageCache cache(cache_dir / "c");
  CopyDownloader downloader;
  auto first = cache.Acquire("sha256-aa", {image}, downloader.Get());
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_FALSE(first->hit);
  EXPECT_EQ(first->bytes, 1000);
  auto second = cache.Acquire("sha256-aa", {image}, downloader.Get());
  ASSERT_TRUE(second.ok());
  EXPECT_TRUE(second->hit);
  EXPECT_EQ(second->path, first->path);
  EXPECT_EQ(downloader.calls, 1);
  struct stat st;
  ASSERT_EQ(::stat(first->path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0444u);
}

TEST(ImageCache, ConcurrentCallersShareOneDownload) {
  TempDir src, cache_dir;
  const std::string image = MakeFile(src, "a.img", 1 << 20);
  ImageCache cache(cache_dir.path());
  CopyDownloader downloader;
  absl::Notification release;
  downloader.hold = &release;
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int i = 0; i < 5; ++i) {
    threads.emplace_back([&] {
      if (cache.Acquire("sha256-bb", {image}, downloader.Get()).ok()) ++ok;
    });
  }
  // Every other caller is seen waiting on the one download, held open.
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (cache.WaitersFor("sha256-bb") < 4 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_EQ(cache.WaitersFor("sha256-bb"), 4);
  release.Notify();
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok, 5);
  EXPECT_EQ(downloader.calls, 1);
}

TEST(ImageCache, TwoCachesOnOneDirectoryAreSerializedByTheFileLock) {
  TempDir src, cache_dir;
  const std::string image = MakeFile(src, "a.img", 1 << 20);
  // Two instances stand for two plugin processes: separate in-process state,
  // one directory; flock excludes across open files, as across processes.
  ImageCache a(cache_dir.path()), b(cache_dir.path());
  CopyDownloader downloader;
  absl::Notification release;
  downloader.hold = &release;
  std::thread ta([&] { EXPECT_TRUE(a.Acquire("sha256-cc", {image}, downloader.Get()).ok()); });
  std::thread tb([&] { EXPECT_TRUE(b.Acquire("sha256-cc", {image}, downloader.Get()).ok()); });
  // One is inside its download, the other waits for the key's file lock,
  // which it holds open meanwhile: two of our descriptors name that file.
  const std::string lock = cache_dir.path() + "/.sha256-cc.lock";
  ASSERT_TRUE(Eventually([&] { return downloader.calls >= 1 && OpenDescriptorsOf(lock) >= 2; }, absl::Seconds(30)));
  release.Notify();
  ta.join();
  tb.join();
  EXPECT_EQ(downloader.calls, 1);
}

TEST(ImageCache, LeasedImagesSurviveEvictionFromAnotherInstance) {
  TempDir src, cache_dir;
  const std::string image = MakeFile(src, "a.img", 1 << 20);
  CopyDownloader downloader;
  ImageCache::AcquireOptions leased;
  leased.lease = "task1";
  absl::StatusOr<CachedImage> held;
  {
    // The plugin that started the task, then went away.
    ImageCache before_restart(cache_dir.path());
    held = before_restart.Acquire("sha256-dd", {image}, downloader.Get(), leased);
    ASSERT_TRUE(held.ok()) << held.status();
  }
  // A restarted plugin knows no task yet: nothing is "in use" to it.
  ImageCache after_restart(cache_dir.path());
  ASSERT_TRUE(after_restart.Evict(0, {}).ok());
  EXPECT_TRUE(fs::exists(held->path)) << "the lease kept it";
  after_restart.Release(held->path, "task1");
  absl::StatusOr<std::vector<std::string>> removed = after_restart.Evict(0, {});
  ASSERT_TRUE(removed.ok());
  EXPECT_THAT(*removed, ::testing::ElementsAre(held->path));
}

TEST(ImageCache, AnEvictionRacingAStartNeverRemovesTheImageItIsGiving) {
  TempDir src, cache_dir;
  const std::string image = MakeFile(src, "a.img", 1 << 20);
  ImageCache starting(cache_dir.path()), other_plugin(cache_dir.path());
  std::thread evictor;
  // The moment the download lands, another plugin process evicts everything it
  // can, racing the start for the image's lock. The lease, taken before the
  // download, decides the race whoever wins the lock.
  ImageCache::Downloader download = [&](const std::string& source, const std::string& dest) {
    absl::StatusOr<int64_t> bytes = CopyDownloader().Get()(source, dest);
    evictor = std::thread([&] { EXPECT_TRUE(other_plugin.Evict(0, {}).ok()); });
    return bytes;
  };
  ImageCache::AcquireOptions leased;
  leased.lease = "task1";
  absl::StatusOr<CachedImage> got = starting.Acquire("sha256-ff", {image}, download, leased);
  evictor.join();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(fs::exists(got->path)) << "evicted between its download and its lease";
}

TEST(ImageCache, AFailedAcquireLeavesNoLease) {
  TempDir src, cache_dir;
  ImageCache cache(cache_dir.path());
  ImageCache::AcquireOptions leased;
  leased.lease = "task1";
  ASSERT_FALSE(cache.Acquire("sha256-fe", {src / "missing"}, CopyDownloader().Get(), leased).ok());
  EXPECT_TRUE(fs::is_empty(cache_dir.path()) ||
              std::none_of(fs::directory_iterator(cache_dir.path()), fs::directory_iterator(),
                           [](const fs::directory_entry& e) {
                             return absl::StartsWith(e.path().filename().string(), ".lease-");
                           }));
}

// The lease is taken before anything else: on a host where the cache
// directory does not exist yet, the first leased Acquire makes it.
TEST(ImageCache, TheFirstLeasedAcquireMakesTheCacheDirectory) {
  TempDir src, parent;
  const std::string image = MakeFile(src, "a.img", 4096);
  ImageCache cache(parent / "not/yet/there");
  ImageCache::AcquireOptions leased;
  leased.lease = "task1";
  absl::StatusOr<CachedImage> cached = cache.Acquire("sha256-fd", {image}, CopyDownloader().Get(), leased);
  ASSERT_TRUE(cached.ok()) << cached.status();
  EXPECT_TRUE(fs::exists(cached->path));
}

TEST(ImageCache, AWaitingCallerCanGiveUp) {
  TempDir src, cache_dir;
  const std::string image = MakeFile(src, "a.img", 1 << 20);
  ImageCache cache(cache_dir.path());
  CopyDownloader downloader;
  absl::Notification release;
  downloader.hold = &release;
  std::thread leader([&] { EXPECT_TRUE(cache.Acquire("sha256-ee", {image}, downloader.Get()).ok()); });
  // The leader is inside its download before the follower arrives.
  for (const absl::Time until = absl::Now() + absl::Seconds(30); downloader.calls < 1 && absl::Now() < until;) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  ASSERT_EQ(downloader.calls, 1);
  std::atomic<bool> give_up{false};
  ImageCache::AcquireOptions options;
  options.cancelled = [&] { return give_up.load(); };
  absl::StatusOr<CachedImage> waiter = absl::UnknownError("not run");
  std::thread follower([&] { waiter = cache.Acquire("sha256-ee", {image}, downloader.Get(), options); });
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (cache.WaitersFor("sha256-ee") < 1 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(5));
  give_up = true;
  follower.join();
  EXPECT_EQ(waiter.status().code(), absl::StatusCode::kCancelled);
  release.Notify();
  leader.join();
}

TEST(ImageCache, MirrorsAreTriedInOrder) {
  TempDir src, cache_dir;
  const std::string image = MakeFile(src, "a.img", 10);
  ImageCache cache(cache_dir.path());
  CopyDownloader downloader;
  auto got = cache.Acquire("sha256-dd", {src / "missing.img", image}, downloader.Get());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(downloader.calls, 2);
}

TEST(ImageCache, AllSourcesFailingLeavesNothing) {
  TempDir src, cache_dir;
  ImageCache cache(cache_dir.path());
  CopyDownloader downloader;
  auto got = cache.Acquire("sha256-ee", {src / "x", src / "y"}, downloader.Get());
  ASSERT_FALSE(got.ok());
  EXPECT_THAT(std::string(got.status().message()), HasSubstr(src / "x"));
  EXPECT_THAT(std::string(got.status().message()), HasSubstr(src / "y"));
  EXPECT_FALSE(std::filesystem::exists(cache.PathFor("sha256-ee")));
}

TEST(ImageCache, RejectsKeysThatAreNotPlainNames) {
  TempDir cache_dir;
  ImageCache cache(cache_dir.path());
  CopyDownloader downloader;
  EXPECT_FALSE(cache.Acquire("../etc", {"x"}, downloader.Get()).ok());
  EXPECT_FALSE(cache.Acquire(".hidden", {"x"}, downloader.Get()).ok());
}

TEST(ImageCache, EvictionRemovesLeastRecentlyUsedButNeverImagesInUse) {
  TempDir src, cache_dir;
  ImageCache cache(cache_dir.path());
  CopyDownloader downloader;
  std::vector<std::string> paths;
  for (const char* key : {"sha256-01", "sha256-02", "sha256-03"}) {
    auto got = cache.Acquire(key, {MakeFile(src, key, 1000)}, downloader.Get());
    ASSERT_TRUE(got.ok());
    paths.push_back(got->path);
  }
  // Oldest use first: 01, then 02, then 03.
  const auto now = std::filesystem::file_time_type::clock::now();
  for (size_t i = 0; i < paths.size(); ++i) {
    std::filesystem::last_write_time(paths[i], now - std::chrono::hours(10 - static_cast<int>(i)));
  }
  auto removed = cache.Evict(/*max_bytes=*/1000, /*in_use=*/{paths[0]});
  ASSERT_TRUE(removed.ok()) << removed.status();
  EXPECT_EQ(*removed, (std::vector<std::string>{paths[1], paths[2]}));
  EXPECT_TRUE(std::filesystem::exists(paths[0])) << "in use: kept although least recently used";
  // A cache hit refreshes the use time.
  auto hit = cache.Acquire("sha256-01", {}, downloader.Get());
  ASSERT_TRUE(hit.ok());
  EXPECT_TRUE(hit->hit);
}

}  // namespace
}  // namespace ndq
