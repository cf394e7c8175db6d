// bench: image downloads and task disks, each beside a baseline in the same run.
//   - a 1 GiB file on loopback: `curl -o f && sha256sum f` vs FetchVerified
//     (download and verify in one pass)
//   - StartTask from image_source: cold (download + verify + overlay) vs warm
//     (cache hit, overlay only) for a 1 GiB and a 4 GiB (sparse) image; the
//     task's disk preparation is timed from its events
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>

#include "../support/http_test_server.h"
#include "../support/plugin_harness.h"
#include "../support/temp_dir.h"
#include "image/checksum.h"
#include "image/fetcher.h"
#include "image/task_disk.h"

namespace ndq {
namespace {
namespace driverpb = hashicorp::nomad::plugins::drivers::proto;

using testing::FakeAlloc;
using testing::HttpTestServer;
using testing::PluginHarness;
using testing::TempDir;

void Row(const std::string& what, double ours, double baseline, const char* unit) {
  std::printf("%-62s %10.2f %10.2f  %s\n", what.c_str(), ours, baseline, unit);
  std::fflush(stdout);
}

// A file of `bytes` pseudo-random bytes (incompressible, like a real image).
void MakeRandomFile(const std::string& path, int64_t bytes) {
  std::mt19937_64 rng(7);
  std::vector<uint64_t> block(1 << 17);
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  for (int64_t done = 0; done < bytes;) {
    for (auto& v : block) v = rng();
    const size_t n = static_cast<size_t>(std::min<int64_t>(bytes - done, block.size() * 8));
    if (::write(fd, block.data(), n) != static_cast<ssize_t>(n)) break;
    done += static_cast<int64_t>(n);
  }
  ::close(fd);
}

std::string Sha256File(const std::string& path) {
  auto out = RunCommand({"/usr/bin/sha256sum", path}, absl::Minutes(5));
  return out.ok() ? out->output.substr(0, 64) : "";
}

double Seconds(absl::Time start) { return absl::ToDoubleSeconds(absl::Now() - start); }

int Main() {
  TempDir served, work;
  const int64_t kGiB = 1ll << 30;
  MakeRandomFile(served / "1g.raw", kGiB);
  const std::string digest = Sha256File(served / "1g.raw");
  HttpTestServer server;
  if (!server.Start({"--root", served.path()})) return 1;
  const std::string base = absl::StrCat("http://127.0.0.1:", server.port());

  std::printf("%-62s %10s %10s\n", "measure", "driver", "baseline");
  absl::Time start = absl::Now();
  auto curl = RunCommand({"/usr/bin/curl", "-s", "-o", work / "curl.raw", base + "/1g.raw"}, absl::Minutes(5));
  const std::string curl_digest = Sha256File(work / "curl.raw");
  const double curl_s = Seconds(start);
  std::filesystem::remove(work / "curl.raw");
  start = absl::Now();
  auto fetched = FetchVerified(base + "/1g.raw", Checksum{"sha256", digest}, work / "ours.raw", FetchOptions{});
  const double ours_s = Seconds(start);
  if (!fetched.ok() || !curl.ok() || curl_digest != digest) {
    std::fprintf(stderr, "bench: download failed\n");
    return 1;
  }
  std::filesystem::remove(work / "ours.raw");
  Row("1 GiB download + sha256, wall time (base: curl -o && sha256sum)", ours_s, curl_s, "s");
  Row("1 GiB download + sha256, throughput", 1024 / ours_s, 1024 / curl_s, "MiB/s");

  // A 4 GiB sparse raw image: big on paper, cheap to serve from page cache.
  {
    const int fd = ::open((served / "4g.raw").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    (void)!::ftruncate(fd, 4 * kGiB);
    ::close(fd);
  }
  const std::string digest4 = Sha256File(served / "4g.raw");

  PluginHarness harness(work / "s", {{"image_cache_dir", work / "cache"}});
  for (const auto& [name, sum] : {std::pair<std::string, std::string>{"1g.raw", digest}, {"4g.raw", digest4}}) {
    double times[2];
    for (int run = 0; run < 2; ++run) {
      FakeAlloc alloc("vm");
      // -S: the guest never runs; we time the driver's side of the start.
      const auto task = alloc.Task({{"image_source", base + "/" + name},
                                    {"checksum", "sha256:" + sum},
                                    {"image_format", "raw"},
                                    {"args", {"-S"}}});
      start = absl::Now();
      const grpc::Status status = harness.Start(task, nullptr);
      times[run] = Seconds(start) * 1000;
      if (!status.ok()) {
        std::fprintf(stderr, "bench: StartTask failed: %s\n", status.error_message().c_str());
        return 1;
      }
      harness.Destroy(task.id(), true);
    }
    Row("StartTask from image_source " + name + ": warm (base: cold)", times[1], times[0], "ms");
    // The disk preparation alone on a warm cache: checksum, cache hit, overlay.
    TaskConfig config;
    config.image_source = base + "/" + name;
    config.checksum = "sha256:" + sum;
    config.image_format = "raw";
    ImageCache cache(work / "cache");
    FakeAlloc alloc("prep");
    start = absl::Now();
    auto disk = PrepareTaskDisk(config, {*config.image_source}, alloc.task_dir(), PluginConfig{}, cache,
                                [](const std::string&, const std::map<std::string, std::string>&) {});
    const double prep_ms = Seconds(start) * 1000;
    if (!disk.ok() || !disk->cache_hit) {
      std::fprintf(stderr, "bench: warm disk preparation failed\n");
      return 1;
    }
    Row("task disk preparation, warm cache, " + name, prep_ms, 0, "ms");
  }
  return 0;
}

}  // namespace
}  // namespace ndq

int main() { return ndq::Main(); }
