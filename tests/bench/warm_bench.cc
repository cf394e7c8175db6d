// bench: warm starts (issue 13), side by side in one run on the test guest
// (guest.qcow2, TCG):
//   - StartTask -> the guest's page answering through port_map: a cold boot
//     (the same job without warm_start, on its own overlay) vs a restore from
//     the template; 10 of each, alternating; median and p95 (of 10: the max)
//   - the same restore, each through a newly launched plugin (5 rounds)
//   - memory: the total PSS (Pss of /proc/<qemu>/smaps_rollup) of 10 VMs
//     running at once, restored vs cold-booted
//   - taking the template: the save event's annotations (total, paused, sizes)
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "../support/event_recorder.h"
#include "../support/guest_task.h"
#include "../support/plugin_harness.h"
#include "../support/test_guest.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace ndq {
namespace {
namespace driverpb = hashicorp::nomad::plugins::drivers::proto;
using json = nlohmann::json;

constexpr int kRounds = 10;
constexpr int kAtOnce = 10;
constexpr int kRelaunchRounds = 5;
constexpr char kPage[] = "hello from the nomad-driver-qemu test guest";

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())))];
}

void Row(const std::string& what, double a, double b, const char* unit) {
  std::printf("%-62s %10.2f %10.2f  %s\n", what.c_str(), a, b, unit);
  std::fflush(stdout);
}

// A connection to 127.0.0.1:port with the GET for / sent; -1 when nothing
// listens yet.
int SendGet(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const std::string request = "GET / HTTP/1.0\r\nHost: x\r\n\r\n";
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::send(fd, request.data(), request.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(request.size())) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// Waits until the page answers on `port`; false at the deadline. slirp
// accepts at once and forwards to the guest on its own schedule (a SYN the
// guest missed is sent again only after a second), so a probe is never
// given up early: a new one starts every 20 ms beside those still waiting
// (each kept up to 3 s), and the first page to come back ends the wait.
bool WaitForPage(int port, absl::Duration timeout) {
  struct Probe {
    int fd;
    absl::Time started;
    std::string got;
  };
  std::vector<Probe> probes;
  const absl::Time deadline = absl::Now() + timeout;
  absl::Time next = absl::Now();
  bool answered = false;
  while (!answered && absl::Now() < deadline) {
    if (absl::Now() >= next) {
      if (const int fd = SendGet(port); fd >= 0) probes.push_back({fd, absl::Now(), ""});
      next = absl::Now() + absl::Milliseconds(20);
    }
    std::vector<pollfd> fds;
    for (const Probe& p : probes) fds.push_back({p.fd, POLLIN, 0});
    if (fds.empty()) {
      absl::SleepFor(absl::Milliseconds(5));
      continue;
    }
    ::poll(fds.data(), fds.size(), 5);
    std::vector<Probe> open;
    for (size_t i = 0; i < probes.size(); ++i) {
      Probe& p = probes[i];
      bool done = absl::Now() - p.started > absl::Seconds(3);
      if (fds[i].revents != 0) {
        char buf[4096];
        const ssize_t n = ::recv(p.fd, buf, sizeof buf, MSG_DONTWAIT);
        if (n > 0) p.got.append(buf, static_cast<size_t>(n));
        if (n == 0 || (n < 0 && errno != EAGAIN)) done = true;
      }
      if (p.got.find(kPage) != std::string::npos) answered = true;
      if (done || answered) {
        ::close(p.fd);
      } else {
        open.push_back(std::move(p));
      }
    }
    probes = std::move(open);
  }
  for (const Probe& p : probes) ::close(p.fd);
  return answered;
}

long PssKiB(pid_t pid) {
  std::ifstream rollup("/proc/" + std::to_string(pid) + "/smaps_rollup");
  std::string word;
  while (rollup >> word) {
    if (word == "Pss:") {
      long v = -1;
      rollup >> v;
      return v;
    }
  }
  return -1;
}

std::string AttributeOf(testing::PluginHarness& harness, const std::string& id, const std::string& key) {
  driverpb::InspectTaskResponse inspect;
  if (!harness.Inspect(id, &inspect).ok()) return "";
  const auto& attrs = inspect.driver().attributes();
  auto it = attrs.find(key);
  return it == attrs.end() ? "" : it->second;
}

// How a start of the warm config runs: a cold boot of the plain job, a
// restore with no pool (warm_pool = 0), or a restore that takes a pooled QEMU.
enum class Kind { kCold, kRestored, kPooled };

struct Bench {
  std::string image;  // our copy of guest.qcow2
  std::string state_dir;
  testing::PluginHarness* harness;

  // The warm pool's ready slots: their QEMUs' pids.
  std::vector<int> ReadyPooledQemus() const {
    std::vector<int> pids;
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(state_dir + "/pool", ec)) {
      std::ifstream in(e.path() / "slot.json");
      const json m = json::parse(in, nullptr, false);
      if (m.is_object() && m.value("ready", false)) pids.push_back(m.value("qemu_pid", -1));
    }
    return pids;
  }
  // Waits for a ready pooled QEMU; its pid, or -1.
  int AwaitPooledQemu() const {
    const absl::Time deadline = absl::Now() + absl::Seconds(120);
    while (absl::Now() < deadline) {
      const std::vector<int> pids = ReadyPooledQemus();
      if (!pids.empty()) return pids.front();
      absl::SleepFor(absl::Milliseconds(20));
    }
    std::fprintf(stderr, "warm_bench: no pooled QEMU got ready within 120 s\n");
    return -1;
  }

  json ColdConfig() const {
    return {{"image_path", "local/disk.qcow2"},
            {"accelerator", "tcg"},
            {"drive_interface", "virtio"},
            {"port_map", {{{"http", 80}}}}};
  }
  json WarmConfig(bool pool = false) const {
    return {{"image_path", image},
            {"accelerator", "tcg"},
            {"drive_interface", "virtio"},
            {"port_map", {{{"http", 80}}}},
            {"warm_start", {{"ready_port", "http"}, {"warm_pool", pool ? 1 : 0}}}};
  }

  // Starts one VM (cold: the job without warm_start, on an overlay made
  // beforehand; warm: the warm config, whose InspectTask must say
  // `expect_warm`); its task id, or "" after printing why.
  std::string Start(testing::FakeAlloc& alloc, bool warm, int port, const std::string& expect_warm = "restored",
                    bool pool = false) {
    if (!warm) alloc.AddOverlay(image);
    driverpb::TaskConfig task = alloc.Task(warm ? WarmConfig(pool) : ColdConfig());
    testing::AddTaskPort(&task, "http", port);
    driverpb::TaskHandle handle;
    const grpc::Status status = harness->Start(task, &handle);
    if (!status.ok()) {
      std::fprintf(stderr, "warm_bench: StartTask failed: %s\n", status.error_message().c_str());
      return "";
    }
    const std::string kind = AttributeOf(*harness, task.id(), "warm_start");
    if (warm && kind != expect_warm) {
      std::fprintf(stderr, "warm_bench: InspectTask says warm_start = \"%s\", not \"%s\"\n", kind.c_str(),
                   expect_warm.c_str());
      harness->Destroy(task.id(), true);
      return "";
    }
    return task.id();
  }

  // StartTask -> page, in ms; -1 on failure. `call_ms`: StartTask alone.
  // kPooled waits for a ready pooled QEMU before the clock starts, and
  // checks that the start took it.
  double TimeToPage(Kind how, double* call_ms) {
    const bool warm = how != Kind::kCold;
    testing::FakeAlloc alloc("web");
    const int port = testing::FreePort();
    if (!warm) alloc.AddOverlay(image);  // before the clock starts
    const int pooled = how == Kind::kPooled ? AwaitPooledQemu() : 0;
    if (pooled < 0) return -1;
    driverpb::TaskConfig task = alloc.Task(warm ? WarmConfig(how == Kind::kPooled) : ColdConfig());
    testing::AddTaskPort(&task, "http", port);
    driverpb::TaskHandle handle;
    const absl::Time start = absl::Now();
    const grpc::Status status = harness->Start(task, &handle);
    if (!status.ok()) {
      std::fprintf(stderr, "warm_bench: StartTask failed: %s\n", status.error_message().c_str());
      return -1;
    }
    *call_ms = absl::ToDoubleMilliseconds(absl::Now() - start);
    const bool answered = WaitForPage(port, absl::Seconds(180));
    const double ms = absl::ToDoubleMilliseconds(absl::Now() - start);
    const std::string kind = AttributeOf(*harness, task.id(), "warm_start");
    const std::string qemu = AttributeOf(*harness, task.id(), "qemu_pid");
    harness->Destroy(task.id(), true);
    if (how == Kind::kPooled && qemu != std::to_string(pooled)) {
      std::fprintf(stderr, "warm_bench: the restore did not take the pooled QEMU %d (its QEMU: %s)\n", pooled,
                   qemu.c_str());
      return -1;
    }
    if (!answered) {
      std::fprintf(stderr, "warm_bench: no page within 180 s (%s)\n", warm ? "restore" : "cold");
      return -1;
    }
    if (warm && kind != "restored") {
      std::fprintf(stderr, "warm_bench: the start was not restored (warm_start = \"%s\")\n", kind.c_str());
      return -1;
    }
    return ms;
  }

  // Total PSS of `n` QEMUs running at once (and of the pool's QEMUs left
  // waiting, with `pool`), in MiB; -1 on failure.
  double PssOfMany(bool warm, int n, bool pool = false) {
    std::vector<std::unique_ptr<testing::FakeAlloc>> allocs;
    std::vector<std::string> ids;
    const double total = [&] {
      std::vector<int> ports;
      for (int i = 0; i < n; ++i) {
        allocs.push_back(std::make_unique<testing::FakeAlloc>("web"));
        ports.push_back(testing::FreePort());
        ids.push_back(Start(*allocs.back(), warm, ports.back(), "restored", pool));
        if (ids.back().empty()) return -1.0;
      }
      for (size_t i = 0; i < ports.size(); ++i) {
        if (!WaitForPage(ports[i], absl::Seconds(300))) {
          std::fprintf(stderr, "warm_bench: a page never answered (%s, port %d); its serial console:\n%s\n",
                       warm ? "restored" : "cold", ports[i],
                       testing::ReadFile(allocs[i]->stdout_path()).c_str());
          return -1.0;
        }
      }
      absl::SleepFor(absl::Seconds(2));  // let the guests settle after answering
      double sum = 0;
      if (pool) {
        if (AwaitPooledQemu() < 0) return -1.0;  // refilled after the restores took it
        absl::SleepFor(absl::Seconds(2));
        for (int pid : ReadyPooledQemus()) sum += static_cast<double>(PssKiB(pid)) / 1024.0;
      }
      for (const std::string& id : ids) {
        int pid = 0;
        if (!absl::SimpleAtoi(AttributeOf(*harness, id, "qemu_pid"), &pid)) return -1.0;
        sum += static_cast<double>(PssKiB(pid)) / 1024.0;
      }
      return sum;
    }();
    for (const std::string& id : ids) {
      if (!id.empty()) harness->Destroy(id, true);
    }
    return total;
  }
};

int Run() {
  absl::StatusOr<std::string> guests = testing::TestGuestDir();
  if (!guests.ok()) {
    std::fprintf(stderr, "warm_bench: %s\n", std::string(guests.status().message()).c_str());
    return 1;
  }
  testing::TempDir work;
  std::filesystem::create_directories(work / "images");
  std::filesystem::create_directories(work / "cache");
  Bench bench;
  bench.image = work / "images/guest.qcow2";
  bench.state_dir = work / "s";
  std::filesystem::copy_file(*guests + "/guest.qcow2", bench.image);
  testing::PluginHarness harness(work / "s",
                                 {{"image_paths", {work / "images"}}, {"image_cache_dir", work / "cache"}});
  bench.harness = &harness;

  // The template: the first start of the warm config boots cold and saves it.
  std::map<std::string, std::string> saved;
  {
    testing::EventRecorder events(harness.client());
    testing::FakeAlloc alloc("web");
    const absl::Time start = absl::Now();
    const std::string cold_id = bench.Start(alloc, /*warm=*/true, testing::FreePort(), "cold");
    if (cold_id.empty()) return 1;
    if (!events.WaitFor(cold_id, "Warm start: template ", absl::Seconds(240))) {
      std::fprintf(stderr, "warm_bench: no template saved within 240 s; events:\n%s\n", events.All().c_str());
      harness.Destroy(cold_id, true);
      return 1;
    }
    std::fprintf(stderr, "warm_bench: template saved %.1f s after StartTask\n",
                 absl::ToDoubleSeconds(absl::Now() - start));
    for (const testing::RecordedEvent& e : events.Events()) {
      if (e.task_id == cold_id && e.message.find("Warm start: template ") != std::string::npos) saved = e.annotations;
    }
    harness.Destroy(cold_id, true);
  }

  // NDQ_WARM_BENCH_MEMORY_ONLY=1: only the memory rows (a quicker rerun).
  const char* memory_only_env = std::getenv("NDQ_WARM_BENCH_MEMORY_ONLY");
  const bool memory_only = memory_only_env != nullptr && std::string(memory_only_env) == "1";
  // One restore with warm_pool = 1 starts the template's pool.
  {
    double unused = 0;
    if (bench.TimeToPage(Kind::kRestored, &unused) < 0) return 1;
    testing::FakeAlloc alloc("web");
    const std::string id = bench.Start(alloc, true, testing::FreePort(), "restored", /*pool=*/true);
    if (id.empty()) return 1;
    harness.Destroy(id, true);
  }
  std::vector<double> cold, restored, pooled, cold_call, restored_call, pooled_call;
  for (int i = 0; i < (memory_only ? 0 : kRounds); ++i) {
    double cc = 0, rc = 0, pc = 0;
    const double c = bench.TimeToPage(Kind::kCold, &cc);
    const double r = bench.TimeToPage(Kind::kRestored, &rc);
    const double p = bench.TimeToPage(Kind::kPooled, &pc);
    if (c < 0 || r < 0 || p < 0) return 1;
    cold.push_back(c);
    restored.push_back(r);
    pooled.push_back(p);
    cold_call.push_back(cc);
    restored_call.push_back(rc);
    pooled_call.push_back(pc);
    std::fprintf(stderr,
                 "warm_bench: round %d: cold %.0f ms (StartTask %.0f), restored %.0f ms (StartTask %.0f), "
                 "pooled %.0f ms (StartTask %.0f)\n",
                 i + 1, c, cc, r, rc, p, pc);
  }
  // Each restore through a plugin launched just before it, as after a
  // client restart or an upgrade: host facts and digests come from what the
  // earlier launch kept, nothing is probed or hashed again.
  // With the pool, the plugin is relaunched once its pooled QEMU is ready:
  // the new plugin adopts it, and its first restore takes it.
  std::vector<double> relaunched, relaunched_call, relaunched_pooled, relaunched_pooled_call;
  for (int i = 0; i < (memory_only ? 0 : kRelaunchRounds); ++i) {
    if (bench.AwaitPooledQemu() < 0) return 1;  // the last pooled restore's refill, before the plugin goes
    harness.Restart();
    double rc = 0;
    const double r = bench.TimeToPage(Kind::kRestored, &rc);  // warm_pool = 0: the pool stays as adopted
    harness.Restart();
    double pc = 0;
    const double p = bench.TimeToPage(Kind::kPooled, &pc);
    if (r < 0 || p < 0) return 1;
    relaunched.push_back(r);
    relaunched_call.push_back(rc);
    relaunched_pooled.push_back(p);
    relaunched_pooled_call.push_back(pc);
    std::fprintf(stderr, "warm_bench: relaunched plugin %d: restored %.0f ms (StartTask %.0f), pooled %.0f ms (StartTask %.0f)\n",
                 i + 1, r, rc, p, pc);
  }
  const double pss_pooled = bench.PssOfMany(true, kAtOnce, /*pool=*/true);
  const double pss_restored = bench.PssOfMany(true, kAtOnce);
  const double pss_cold = bench.PssOfMany(false, kAtOnce);
  if (pss_restored < 0 || pss_cold < 0 || pss_pooled < 0) return 1;

  auto annotation = [&](const char* key) {
    double v = -1;
    auto it = saved.find(key);
    if (it != saved.end() && !absl::SimpleAtod(it->second, &v)) v = -1;
    return v;
  };
  std::printf("\n%-62s %10s %10s\n", "warm_bench (guest.qcow2, TCG, 10 rounds each, alternating)", "median", "p95 (max)");
  Row("StartTask -> page through port_map, cold boot", Percentile(cold, 0.5), Percentile(cold, 0.95), "ms");
  Row("StartTask -> page through port_map, restored (warm_pool = 0)", Percentile(restored, 0.5),
      Percentile(restored, 0.95), "ms");
  Row("StartTask -> page through port_map, restored from the pool", Percentile(pooled, 0.5), Percentile(pooled, 0.95),
      "ms");
  Row("cold / restored, no pool", Percentile(cold, 0.5) / Percentile(restored, 0.5),
      Percentile(cold, 0.95) / Percentile(restored, 0.95), "x");
  Row("cold / restored from the pool (target: at least 20)", Percentile(cold, 0.5) / Percentile(pooled, 0.5),
      Percentile(cold, 0.95) / Percentile(pooled, 0.95), "x");
  Row("StartTask -> page, restored by a newly launched plugin, no pool", Percentile(relaunched, 0.5),
      Percentile(relaunched, 0.95), "ms");
  Row("StartTask -> page, newly launched plugin, adopted pool", Percentile(relaunched_pooled, 0.5),
      Percentile(relaunched_pooled, 0.95), "ms");
  Row("cold / restored by a newly launched plugin, no pool", Percentile(cold, 0.5) / Percentile(relaunched, 0.5),
      Percentile(cold, 0.95) / Percentile(relaunched, 0.95), "x");
  Row("cold / newly launched plugin, adopted pool (target: at least 20)",
      Percentile(cold, 0.5) / Percentile(relaunched_pooled, 0.5),
      Percentile(cold, 0.95) / Percentile(relaunched_pooled, 0.95), "x");
  std::printf("%-62s %10s %10s\n", "StartTask call alone, median", "restored", "cold");
  Row("StartTask returned (QEMU started; restored: state loaded)", Percentile(restored_call, 0.5),
      Percentile(cold_call, 0.5), "ms");
  Row("StartTask returned, restored from the pool", Percentile(pooled_call, 0.5), 0, "ms");
  Row("StartTask returned, restored by a newly launched plugin", Percentile(relaunched_call, 0.5), 0, "ms");
  Row("StartTask returned, newly launched plugin, adopted pool", Percentile(relaunched_pooled_call, 0.5), 0, "ms");
  std::printf("%-62s %10s %10s\n", "memory, 10 VMs at once", "restored", "cold");
  Row("total PSS of the QEMUs (smaps_rollup)", pss_restored, pss_cold, "MiB");
  Row("per VM", pss_restored / kAtOnce, pss_cold / kAtOnce, "MiB");
  Row("total PSS, 10 restored with warm_pool = 1 (+ the pooled QEMU)", pss_pooled, pss_restored, "MiB");
  std::printf("%-62s %10s %10s\n", "taking the template (save event)", "total", "paused");
  Row("time", annotation("warm_template_ms"), annotation("warm_pause_ms"), "ms");
  Row("ram file, state file", annotation("warm_ram_bytes") / 1048576.0, annotation("warm_state_bytes") / 1048576.0,
      "MiB");
  Row("frozen disk layer", annotation("warm_disk_bytes") / 1048576.0, 0, "MiB");
  return 0;
}

}  // namespace
}  // namespace ndq

int main() { return ndq::Run(); }
