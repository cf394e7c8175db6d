// bench: the plugin's CPU time spent serving TaskStats. Target from the issue:
// at a 1 s collection interval for 20 running VMs, under 1 % of one core.
//   - 20 paused VMs (-S, TCG, 128 MiB) are started through StartTask
//   - A (baseline): the plugin's utime+stime over a window with no stats subscribers
//   - B: the same VMs and plugin over an equally long window with one TaskStats
//     stream per VM (collection_interval 1 s), every response read
// The difference B - A is the cost of serving the stats. A paused VM is
// sampled exactly like a running one (its QEMU and supervisor in /proc, the
// task's cgroup). CPU time comes from /proc/<plugin>/stat in clock ticks
// (10 ms), so a 60 s window resolves 0.02 % of a core.
// NDQ_STATS_BENCH_SECONDS (default 60) and NDQ_STATS_BENCH_VMS (default 20)
// shorten it for trying things out.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "../support/plugin_harness.h"
#include "../support/test_guest.h"

namespace ndq {
namespace {

using testing::FakeAlloc;
using testing::PluginHarness;
using testing::TempDir;
namespace driverpb = hashicorp::nomad::plugins::drivers::proto;

int EnvInt(const char* name, int fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  const int parsed = std::atoi(value);
  return parsed > 0 ? parsed : fallback;
}

void Row(const std::string& what, double ours, double baseline, const char* unit) {
  std::printf("%-66s %10.2f %10.2f  %s\n", what.c_str(), ours, baseline, unit);
  std::fflush(stdout);
}

// utime + stime of the whole process (all its threads, live and exited), in seconds.
double CpuSeconds(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(in, line);
  // comm (field 2) may hold spaces; the fields after it start past the last ')'.
  const size_t paren = line.rfind(')');
  if (paren == std::string::npos) return -1;
  std::istringstream rest(line.substr(paren + 2));
  std::string field;
  double utime = -1, stime = -1;
  for (int n = 3; rest >> field && n <= 15; ++n) {
    if (n == 14) utime = std::stod(field);
    if (n == 15) stime = std::stod(field);
  }
  if (utime < 0 || stime < 0) return -1;
  return (utime + stime) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

// The plugin's CPU seconds used during `window`.
double CpuOver(pid_t pid, absl::Duration window) {
  const double before = CpuSeconds(pid);
  absl::SleepFor(window);
  return CpuSeconds(pid) - before;
}

// One TaskStats stream read to its end on its own thread.
class StatsStream {
 public:
  StatsStream(PluginHarness& harness, const std::string& task_id, absl::Duration deadline)
      : context_(harness.client().NewContext(deadline)) {
    driverpb::TaskStatsRequest request;
    request.set_task_id(task_id);
    request.mutable_collection_interval()->set_seconds(1);
    reader_ = harness.driver().TaskStats(context_.get(), request);
    thread_ = std::thread([this] {
      driverpb::TaskStatsResponse response;
      while (reader_->Read(&response)) responses_.fetch_add(1);
      status_ = reader_->Finish();
    });
  }
  ~StatsStream() { Cancel(); }

  long responses() const { return responses_.load(); }
  // Cancels the stream and waits for its reader; returns how it ended.
  grpc::Status Cancel() {
    if (thread_.joinable()) {
      context_->TryCancel();
      thread_.join();
    }
    return status_;
  }

 private:
  std::unique_ptr<grpc::ClientContext> context_;
  std::unique_ptr<grpc::ClientReader<driverpb::TaskStatsResponse>> reader_;
  std::atomic<long> responses_{0};
  grpc::Status status_;
  std::thread thread_;
};

// Destroys the VMs and kills whatever is left under the state dir, however Main ends.
struct VmCleanup {
  PluginHarness* harness = nullptr;
  std::string state_dir;
  std::vector<std::string> ids;
  ~VmCleanup() {
    if (harness != nullptr) {
      for (const std::string& id : ids) harness->Destroy(id, true);
    }
    testing::KillVmsUnder(state_dir);
  }
};

int Main() {
  const int seconds = EnvInt("NDQ_STATS_BENCH_SECONDS", 60);
  const int vms = EnvInt("NDQ_STATS_BENCH_VMS", 20);
  const absl::Duration window = absl::Seconds(seconds);

  absl::StatusOr<std::string> guests = testing::TestGuestDir();
  if (!guests.ok()) {
    std::fprintf(stderr, "bench: %s\n", std::string(guests.status().message()).c_str());
    return 1;
  }
  const std::string base = *guests + "/guest.qcow2";
  TempDir work;
  const std::string state_dir = work / "s";
  PluginHarness harness(state_dir, {{"image_paths", {*guests}}});
  const pid_t plugin = harness.process().pid();

  std::vector<std::unique_ptr<FakeAlloc>> allocs;  // outlives the VMs on its disks
  VmCleanup cleanup;
  cleanup.harness = &harness;
  cleanup.state_dir = state_dir;
  for (int i = 0; i < vms; ++i) {
    allocs.push_back(std::make_unique<FakeAlloc>("vm" + std::to_string(i)));
    allocs.back()->AddOverlay(base);
    const auto task = allocs.back()->Task(
        {{"image_path", "local/disk.qcow2"}, {"drive_interface", "virtio"}, {"args", {"-S"}}}, 128);
    driverpb::TaskHandle handle;
    const grpc::Status status = harness.Start(task, &handle);
    if (!status.ok()) {
      std::fprintf(stderr, "bench: StartTask failed: %s\n", status.error_message().c_str());
      return 1;
    }
    cleanup.ids.push_back(task.id());
  }
  // Let the start-up work (supervisors, QMP handshakes, logging) settle.
  absl::SleepFor(absl::Seconds(3));

  std::printf("%d paused VMs, %d s windows, CLK_TCK %ld\n", vms, seconds, ::sysconf(_SC_CLK_TCK));
  std::printf("%-66s %10s %10s\n", "measure", "streams", "baseline");
  std::fflush(stdout);

  // A: no subscribers.
  const double cpu_a = CpuOver(plugin, window);

  // B: one stream per VM. The window starts once every stream has answered,
  // so the streams' set-up is not counted and each sampler is past its first sample.
  std::vector<std::unique_ptr<StatsStream>> streams;
  for (const std::string& id : cleanup.ids) {
    streams.push_back(std::make_unique<StatsStream>(harness, id, window + absl::Seconds(120)));
  }
  const absl::Time ready_deadline = absl::Now() + absl::Seconds(30);
  auto all_answered = [&] {
    for (const auto& s : streams) {
      if (s->responses() == 0) return false;
    }
    return true;
  };
  while (!all_answered() && absl::Now() < ready_deadline) absl::SleepFor(absl::Milliseconds(10));
  if (!all_answered()) {
    std::fprintf(stderr, "bench: not every TaskStats stream answered within 30 s\n");
    return 1;
  }
  // Half an interval on, so the window's edges fall between responses (the
  // streams opened together and answer in step).
  absl::SleepFor(absl::Milliseconds(500));
  long before = 0;
  for (const auto& s : streams) before += s->responses();
  const double cpu_b = CpuOver(plugin, window);
  long responses = -before;
  for (const auto& s : streams) responses += s->responses();
  int failed = 0;
  for (auto& s : streams) {
    const grpc::Status status = s->Cancel();
    if (!status.ok() && status.error_code() != grpc::StatusCode::CANCELLED) {
      std::fprintf(stderr, "bench: a TaskStats stream failed: %s\n", status.error_message().c_str());
      ++failed;
    }
  }

  const double pct_a = cpu_a / seconds * 100.0;
  const double pct_b = cpu_b / seconds * 100.0;
  const std::string n = std::to_string(vms);
  Row("plugin CPU, " + n + " VMs, " + n + " TaskStats streams at 1 s (base: none)", pct_b, pct_a, "% of a core");
  Row("plugin CPU time over the window (base: no streams)", cpu_b * 1000.0, cpu_a * 1000.0, "ms");
  Row("stats serving cost, B - A (target: under 1)", pct_b - pct_a, 0, "% of a core");
  Row("TaskStats responses in the window (base: VMs x seconds)", static_cast<double>(responses),
      static_cast<double>(vms) * seconds, "");
  Row("plugin CPU per TaskStats response, (B - A) / responses", responses > 0 ? (cpu_b - cpu_a) * 1000.0 / responses : -1,
      0, "ms");
  return failed == 0 ? 0 : 1;
}

}  // namespace
}  // namespace ndq

int main() { return ndq::Main(); }
