// bench: what cloud images and VM hardware add to StartTask, side by side in
// one run (paused VMs, -S, so only the driver's and QEMU's own start count):
//   - StartTask plain vs with a cloud-init seed of 64 KiB of user-data
//   - StartTask plain vs with two extra disks (blank, raw: the default), and
//     with one blank qcow2 disk (qemu-img makes it)
//   - building a 64 KiB seed (WriteSeedIso) vs writing the same bytes to a file
// Each start is a fresh alloc, so blank disks are created every time.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "../support/plugin_harness.h"
#include "../support/test_guest.h"
#include "image/seed_iso.h"

namespace ndq {
namespace {
namespace driverpb = hashicorp::nomad::plugins::drivers::proto;

using testing::FakeAlloc;
using testing::PluginHarness;
using testing::TempDir;

constexpr int kStarts = 10;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

void Row(const std::string& what, double ours, double baseline, const char* unit) {
  std::printf("%-62s %10.2f %10.2f  %s\n", what.c_str(), ours, baseline, unit);
}

std::string UserData() {
  std::string text = "#cloud-config\nwrite_files:\n  - path: /etc/bench\n    content: |\n";
  while (text.size() < 64 * 1024) text += "      0123456789abcdef0123456789abcdef0123456789abcdef0123456789\n";
  return text;
}

// Milliseconds StartTask took for each of kStarts fresh allocs with `extra`
// added to the config; every VM is destroyed right after.
std::vector<double> StartTimes(PluginHarness& harness, const std::string& base, const nlohmann::json& extra) {
  std::vector<double> times;
  for (int i = 0; i < kStarts; ++i) {
    FakeAlloc alloc("vm");
    alloc.AddOverlay(base);
    nlohmann::json config = {{"image_path", "local/disk.qcow2"}, {"drive_interface", "virtio"}, {"args", {"-S"}}};
    for (const auto& [key, value] : extra.items()) config[key] = value;
    const auto task = alloc.Task(config);
    driverpb::TaskHandle handle;
    const absl::Time start = absl::Now();
    const grpc::Status status = harness.Start(task, &handle);
    times.push_back(absl::ToDoubleMilliseconds(absl::Now() - start));
    if (!status.ok()) {
      std::fprintf(stderr, "bench: StartTask failed: %s\n", status.error_message().c_str());
      return {};
    }
    harness.Destroy(task.id(), true).IgnoreError();
  }
  return times;
}

// A seed vs the same bytes written plainly (open, write, fsync, rename).
void SeedBuild(const std::string& dir) {
  SeedFiles files;
  files.user_data = UserData();
  files.meta_data = DefaultMetaData("0f5e8a2c-6a4b-4c1e-9d7a-000000000001", "bench", {});
  std::vector<double> seed, plain;
  for (int i = 0; i < 50; ++i) {
    absl::Time start = absl::Now();
    if (!WriteSeedIso(files, dir + "/cidata.iso").ok()) return;
    seed.push_back(absl::ToDoubleMilliseconds(absl::Now() - start));
    start = absl::Now();
    const int fd = ::open((dir + "/plain.tmp").c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (::write(fd, files.user_data.data(), files.user_data.size()) < 0 || ::fsync(fd) != 0) return;
    ::close(fd);
    ::rename((dir + "/plain.tmp").c_str(), (dir + "/plain").c_str());
    plain.push_back(absl::ToDoubleMilliseconds(absl::Now() - start));
  }
  Row("build a seed with 64 KiB of user-data, median (base: plain file)", Median(seed), Median(plain), "ms");
}

int Main() {
  absl::StatusOr<std::string> guests = testing::TestGuestDir();
  if (!guests.ok()) {
    std::fprintf(stderr, "bench: %s\n", std::string(guests.status().message()).c_str());
    return 1;
  }
  const std::string base = *guests + "/guest.qcow2";
  TempDir work;
  std::printf("%-62s %10s %10s\n", "measure", "with", "without");
  PluginHarness harness(work / "s", {{"image_paths", {*guests}}});
  // Interleaved, so a change in the machine's load hits both sides alike.
  std::vector<double> plain, seeded, disks, qcow2;
  for (int round = 0; round < 2; ++round) {
    for (double t : StartTimes(harness, base, nlohmann::json::object())) plain.push_back(t);
    for (double t : StartTimes(harness, base, {{"cloud_init", {{"user_data", UserData()}}}})) seeded.push_back(t);
    for (double t : StartTimes(harness, base, {{"disk", {{{"size", "1GiB"}}, {{"size", "1GiB"}}}}})) disks.push_back(t);
    for (double t : StartTimes(harness, base, {{"disk", {{{"size", "1GiB"}, {"format", "qcow2"}}}}})) qcow2.push_back(t);
  }
  Row("StartTask, paused VM: cloud-init seed (64 KiB user-data)", Median(seeded), Median(plain), "ms");
  Row("StartTask, paused VM: two blank extra disks (raw)", Median(disks), Median(plain), "ms");
  Row("StartTask, paused VM: one blank qcow2 disk", Median(qcow2), Median(plain), "ms");
  Row("  added by the seed, median", Median(seeded) - Median(plain), 0, "ms");
  Row("  added by the two disks, median", Median(disks) - Median(plain), 0, "ms");
  Row("  added by the qcow2 disk, median", Median(qcow2) - Median(plain), 0, "ms");
  SeedBuild(work.path());
  return 0;
}

}  // namespace
}  // namespace ndq

int main() { return ndq::Main(); }
