// bench: numbers for the plugin process itself, each printed beside a baseline
// measured in the same run on the same machine.
//   - time from exec to the handshake line: the plugin vs a trivial process
//     (/bin/echo printing a handshake-shaped line) through the same launcher path
//   - resident memory of the idle plugin, configured with its Fingerprint and
//     TaskEvents streams open as Nomad holds them, vs right after the handshake
#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "nomadplugin/driver_client.h"
#include "nomadplugin/launcher.h"

extern char** environ;

namespace {

constexpr int kRuns = 20;

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(p * (v.size() - 1))];
}

// Milliseconds from posix_spawn to the first newline on the child's stdout.
double TimeToFirstLine(const std::vector<std::string>& argv) {
  int out[2];
  if (pipe2(out, O_CLOEXEC) != 0) return -1;
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  std::vector<std::string> storage = argv;
  std::vector<char*> args;
  for (auto& a : storage) args.push_back(a.data());
  args.push_back(nullptr);
  setenv("NOMAD_PLUGIN_MAGIC_COOKIE", nomadplugin::NomadHandshake().cookie_value.c_str(), 1);
  setenv("PLUGIN_PROTOCOL_VERSIONS", "2", 1);
  const absl::Time start = absl::Now();
  pid_t pid;
  if (posix_spawn(&pid, argv[0].c_str(), &actions, nullptr, args.data(), environ) != 0) return -1;
  posix_spawn_file_actions_destroy(&actions);
  close(out[1]);
  char c;
  while (read(out[0], &c, 1) == 1 && c != '\n') {
  }
  const double ms = absl::ToDoubleMilliseconds(absl::Now() - start);
  close(out[0]);
  kill(pid, SIGTERM);
  int status;
  waitpid(pid, &status, 0);
  return ms;
}

long RssKiB(pid_t pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string key;
  long value = -1;
  while (status >> key) {
    if (key == "VmRSS:") {
      status >> value;
      return value;
    }
    status.ignore(1 << 20, '\n');
  }
  return -1;
}

// CPU time of all the process's threads, in ns (schedstat has ns resolution).
double CpuNs(pid_t pid) {
  double total = 0;
  const std::string dir = "/proc/" + std::to_string(pid) + "/task";
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    std::ifstream in(entry.path() / "schedstat");
    double ns = 0;
    if (in >> ns) total += ns;
  }
  return total;
}

// Percent of one core used over `window`.
double CpuPercent(pid_t pid, absl::Duration window) {
  const double before = CpuNs(pid);
  absl::SleepFor(window);
  return (CpuNs(pid) - before) / absl::ToDoubleNanoseconds(window) * 100.0;
}

void Row(const char* what, double ours, double baseline, const char* unit) {
  std::printf("%-52s %10.2f %10.2f  %s\n", what, ours, baseline, unit);
}

}  // namespace

int main() {
  const std::string plugin = NDQ_PLUGIN_BINARY;
  std::vector<double> plugin_ms, echo_ms;
  for (int i = 0; i < kRuns; ++i) {
    plugin_ms.push_back(TimeToFirstLine({plugin}));
    echo_ms.push_back(TimeToFirstLine({"/bin/echo", "1|2|unix|/tmp/x|grpc|"}));
  }
  std::printf("%-52s %10s %10s\n", "measure", "plugin", "baseline");
  Row("exec to handshake line, median (baseline: echo)", Percentile(plugin_ms, 0.5), Percentile(echo_ms, 0.5), "ms");
  Row("exec to handshake line, p95", Percentile(plugin_ms, 0.95), Percentile(echo_ms, 0.95), "ms");

  nomadplugin::LaunchOptions options;
  options.binary = plugin;
  auto proc = nomadplugin::PluginProcess::Launch(options);
  if (!proc.ok()) {
    std::fprintf(stderr, "bench: %s\n", std::string(proc.status().message()).c_str());
    return 1;
  }
  const long rss_fresh = RssKiB((*proc)->pid());
  const double cpu_unconfigured = CpuPercent((*proc)->pid(), absl::Seconds(5));
  nomadplugin::DriverClient client((*proc)->channel());
  (void)client.SetConfig(nlohmann::json::object());
  auto fp_context = client.NewContext(absl::InfiniteDuration());
  auto fingerprints = client.driver().Fingerprint(fp_context.get(), {});
  auto ev_context = client.NewContext(absl::InfiniteDuration());
  auto events = client.driver().TaskEvents(ev_context.get(), {});
  nomadplugin::driverpb::FingerprintResponse fp;
  fingerprints->Read(&fp);
  // Over 5 s the fingerprint stream checks the host for changes 5 times.
  const double cpu_streams = CpuPercent((*proc)->pid(), absl::Seconds(5));
  const long rss_idle = RssKiB((*proc)->pid());
  Row("RSS idle, configured, streams open (baseline: fresh)", rss_idle / 1024.0, rss_fresh / 1024.0, "MiB");
  Row("CPU idle, streams open (baseline: no streams)", cpu_streams, cpu_unconfigured, "% of a core");
  fp_context->TryCancel();
  ev_context->TryCancel();
  (void)(*proc)->Shutdown(absl::Seconds(2));
  return 0;
}
