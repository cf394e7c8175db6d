// bench: the driver's cost around QEMU, each number beside a baseline measured
// in the same run.
//   - starting a paused VM (-S): QEMU spawned directly vs StartTask (both end
//     when QEMU answers on QMP); 20 starts each
//   - stop latency: direct QMP powerdown -> QEMU exit vs StopTask on the same guest
//   - memory: supervisor RSS per VM vs QEMU's; plugin RSS with 20 VMs vs idle
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "../support/plugin_harness.h"
#include "../support/test_guest.h"
#include "host/process_watch.h"
#include "qemu/qmp_client.h"
#include "qemu_driver/supervisor_protocol.h"
#include "vm/vm_task.h"

extern char** environ;

namespace ndq {
namespace {
namespace driverpb = hashicorp::nomad::plugins::drivers::proto;

using testing::FakeAlloc;
using testing::PluginHarness;
using testing::TempDir;

constexpr int kStarts = 20;

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(p * (v.size() - 1))];
}

long StatusKiB(pid_t pid, const std::string& key) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/" + (key == "Pss:" ? "smaps_rollup" : "status"));
  std::string word;
  while (status >> word) {
    if (word == key) {
      long v;
      status >> v;
      return v;
    }
  }
  return -1;
}

void Row(const std::string& what, double ours, double baseline, const char* unit) {
  std::printf("%-58s %10.2f %10.2f  %s\n", what.c_str(), ours, baseline, unit);
  std::fflush(stdout);
}

std::vector<std::string> QemuArgs(const std::string& image, const std::string& qmp, bool paused) {
  std::vector<std::string> argv = {"/usr/bin/qemu-system-x86_64",
                                   "-machine", "type=pc,accel=tcg",
                                   "-name", "guest=bench",
                                   "-m", "256M",
                                   "-drive", "file=" + image + ",if=virtio,id=image0,format=qcow2",
                                   "-nographic",
                                   "-chardev", "socket,id=qmp0,path=" + qmp + ",server=on,wait=off",
                                   "-mon", "chardev=qmp0,mode=control"};
  if (paused) argv.push_back("-S");
  return argv;
}

pid_t Spawn(const std::vector<std::string>& argv) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  std::vector<std::string> storage = argv;
  std::vector<char*> args;
  for (auto& a : storage) args.push_back(a.data());
  args.push_back(nullptr);
  pid_t pid = -1;
  posix_spawn(&pid, argv[0].c_str(), &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  return pid;
}

// Direct QEMU: spawn, wait for the QMP socket the same way the driver does, connect.
double DirectStartMs(const std::string& image, const std::string& dir) {
  const std::string qmp = dir + "/q.sock";
  const absl::Time start = absl::Now();
  const pid_t pid = Spawn(QemuArgs(image, qmp, true));
  auto pidfd = OpenVerifiedPidfd(pid, 0);
  WaitForPathOrExit(dir, "q.sock", *pidfd, absl::Now() + absl::Seconds(30)).IgnoreError();
  auto client = QmpClient::Connect(qmp, absl::Seconds(30));
  const double ms = absl::ToDoubleMilliseconds(absl::Now() - start);
  ::close(*pidfd);
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  std::filesystem::remove(qmp);
  return client.ok() ? ms : -1;
}

std::string Overlay(const std::string& base, const std::string& path) {
  RunCommand({"/usr/bin/qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, path}, absl::Seconds(30))
      .IgnoreError();
  return path;
}

int Main() {
  absl::StatusOr<std::string> guests = testing::TestGuestDir();
  if (!guests.ok()) {
    std::fprintf(stderr, "bench: %s\n", std::string(guests.status().message()).c_str());
    return 1;
  }
  const std::string base = *guests + "/guest.qcow2";
  TempDir work;
  const std::string direct_image = Overlay(base, work / "direct.qcow2");

  std::printf("%-58s %10s %10s\n", "measure", "driver", "baseline");

  // 1. Start overhead on a paused VM.
  PluginHarness harness(work / "s", {{"image_paths", {*guests}}});
  std::vector<double> direct, driver;
  std::vector<std::unique_ptr<FakeAlloc>> allocs;
  std::vector<std::string> ids;
  // StartTask of one paused VM, in ms; -1 on failure.
  auto start_one = [&]() -> double {
    allocs.push_back(std::make_unique<FakeAlloc>("vm" + std::to_string(allocs.size())));
    allocs.back()->AddOverlay(base);
    const auto task = allocs.back()->Task(
        {{"image_path", "local/disk.qcow2"}, {"drive_interface", "virtio"}, {"args", {"-S"}}});
    const absl::Time start = absl::Now();
    driverpb::TaskHandle handle;
    const grpc::Status status = harness.Start(task, &handle);
    if (!status.ok()) {
      std::fprintf(stderr, "bench: StartTask failed: %s\n", status.error_message().c_str());
      return -1;
    }
    ids.push_back(task.id());
    return absl::ToDoubleMilliseconds(absl::Now() - start);
  };
  // The first start right after the plugin's first launch on this host (no
  // facts kept yet: the background probe of its emulator may still run).
  const double first_ever = start_one();
  if (first_ever < 0) return 1;
  for (int i = 0; i < kStarts; ++i) {
    direct.push_back(DirectStartMs(direct_image, work.path()));
    const double ms = start_one();
    if (ms < 0) return 1;
    driver.push_back(ms);
  }
  harness.Destroy(ids.front(), true);  // the 20 of the loop stay for the memory rows
  ids.erase(ids.begin());
  const double floor = Percentile(direct, 0.5);
  Row("start paused VM until QMP answers, median (base: direct)", Percentile(driver, 0.5), floor, "ms");
  Row("start paused VM until QMP answers, p95", Percentile(driver, 0.95), Percentile(direct, 0.95), "ms");
  Row("driver overhead on StartTask, median (target: 10)", Percentile(driver, 0.5) - floor, 0, "ms");
  Row("first StartTask after the first launch, over direct median", first_ever - floor, 0, "ms");

  // 3./4. Memory with the 20 paused VMs still running.
  driverpb::InspectTaskResponse inspect;
  harness.Inspect(ids[0], &inspect);
  const pid_t supervisor = std::stoi(inspect.driver().attributes().at("supervisor_pid"));
  const pid_t qemu = std::stoi(inspect.driver().attributes().at("qemu_pid"));
  Row("supervisor RSS per VM (base: its QEMU)", StatusKiB(supervisor, "VmRSS:") / 1024.0,
      StatusKiB(qemu, "VmRSS:") / 1024.0, "MiB");
  Row("supervisor PSS per VM (base: its QEMU)", StatusKiB(supervisor, "Pss:") / 1024.0, StatusKiB(qemu, "Pss:") / 1024.0,
      "MiB");
  const long plugin_busy = StatusKiB(harness.process().pid(), "VmRSS:");
  for (const std::string& id : ids) harness.Destroy(id, true);
  ids.clear();
  // The first start through a relaunched plugin (a client restart, an
  // upgrade): what the earlier launch probed is kept in the state dir.
  harness.Restart();
  const double first_relaunched = start_one();
  if (first_relaunched < 0) return 1;
  Row("first StartTask after a relaunch, over direct median (target: 30)", first_relaunched - floor, 0, "ms");
  harness.Destroy(ids.back(), true);
  PluginHarness idle(work / "i");
  Row("plugin RSS with 20 VMs (base: fresh plugin, no VMs)", plugin_busy / 1024.0,
      StatusKiB(idle.process().pid(), "VmRSS:") / 1024.0, "MiB");

  // 2. Stop latency on a booted guest that powers off on ACPI.
  std::vector<double> direct_stop, driver_stop, after_exit;
  for (int i = 0; i < 5; ++i) {
    {
      const std::string qmp = work / "stop.sock";
      const std::string serial = work / "serial.log";
      std::vector<std::string> argv = QemuArgs(direct_image, qmp, false);
      argv.insert(argv.end(), {"-serial", "file:" + serial, "-monitor", "none"});
      argv.erase(std::find(argv.begin(), argv.end(), "-nographic"));
      argv.insert(argv.end(), {"-display", "none"});
      std::filesystem::remove(serial);
      const pid_t pid = Spawn(argv);
      testing::WaitForFileToContain(serial, "GUEST-READY", testing::kGuestBootTimeout);
      auto client = QmpClient::Connect(qmp, absl::Seconds(10));
      const absl::Time start = absl::Now();
      if (client.ok()) (*client)->SystemPowerdown().IgnoreError();
      ::waitpid(pid, nullptr, 0);
      direct_stop.push_back(absl::ToDoubleMilliseconds(absl::Now() - start));
    }
    FakeAlloc alloc("stop" + std::to_string(i));
    alloc.AddOverlay(base);
    const auto task = alloc.Task({{"image_path", "local/disk.qcow2"}, {"drive_interface", "virtio"},
                                  {"graceful_shutdown", true}});
    driverpb::TaskHandle handle;
    harness.Start(task, &handle);
    testing::WaitForFileToContain(alloc.stdout_path(), "GUEST-READY", testing::kGuestBootTimeout);
    const absl::Time start = absl::Now();
    harness.Stop(task.id(), absl::Seconds(30));
    const absl::Time returned = absl::Now();
    driver_stop.push_back(absl::ToDoubleMilliseconds(returned - start));
    auto record = DriverStateRecord::Decode(handle.driver_state());
    std::string problem;
    auto exit = supervisor::ReadExitRecord(record->state_dir, &problem);
    if (exit) after_exit.push_back(absl::ToDoubleMilliseconds(returned - absl::FromUnixMillis(exit->exited_at_ms)));
    harness.Destroy(task.id(), true);
  }
  Row("graceful stop until QEMU gone, median of 5 (base: direct)", Percentile(driver_stop, 0.5),
      Percentile(direct_stop, 0.5), "ms");
  Row("StopTask returns after QEMU exited, median (max)", Percentile(after_exit, 0.5), Percentile(after_exit, 1.0),
      "ms");
  return 0;
}

}  // namespace
}  // namespace ndq

int main() { return ndq::Main(); }
