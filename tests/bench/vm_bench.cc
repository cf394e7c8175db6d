// bench: the driver's cost around QEMU, each number beside a baseline measured
// in the same run.
//   - starting a paused VM (-S): the same QEMU (the driver's argv and files)
//     spawned directly vs StartTask (both end when QEMU answers on QMP); 20
//     starts each; the first start after a first launch and after a relaunch
//   - stop latency: direct QMP powerdown -> QEMU exit vs StopTask on the same guest
//   - memory: supervisor RSS per VM vs QEMU's; plugin RSS with 20 VMs vs idle
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "../support/plugin_harness.h"
#include "../support/test_guest.h"
#include "absl/strings/match.h"
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
constexpr int kFifoStarts = 10;
constexpr int kRelaunches = 5;
// How late Nomad's log reader is in the FIFO rows.
constexpr absl::Duration kLateReader = absl::Milliseconds(20);

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

// The argv and passed files of a QEMU the driver started, to start the same
// VM directly: the floor StartTask is measured against.
struct SameVm {
  std::vector<std::string> argv;
  std::vector<std::pair<int, std::string>> files;  // fd number in QEMU -> path
  std::vector<int> flags;
};

std::string ReadProcFile(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// `pid`'s command line with the QMP socket moved to `qmp`, and the files
// it was given (-add-fd; QEMU closes the numbers it got, so they are told
// by the drive that uses each fd set): this bench's VM is an overlay on
// guest.qcow2, so the read-only set is `base` and the writable one is
// `own_overlay` (QEMU's image lock keeps two QEMUs off one overlay).
SameVm SameVmAs(pid_t pid, const std::string& qmp, const std::string& base, const std::string& own_overlay) {
  SameVm vm;
  const std::string cmdline = ReadProcFile("/proc/" + std::to_string(pid) + "/cmdline");
  for (size_t at = 0; at < cmdline.size();) {
    const size_t end = cmdline.find('\0', at);
    vm.argv.push_back(cmdline.substr(at, end - at));
    at = end == std::string::npos ? cmdline.size() : end + 1;
  }
  auto read_only_set = [&vm](const std::string& set) {
    for (const std::string& arg : vm.argv) {
      if (arg.find("filename=/dev/fdset/" + set + ",") != std::string::npos ||
          absl::EndsWith(arg, "filename=/dev/fdset/" + set)) {
        return arg.find("read-only=on") != std::string::npos;
      }
    }
    return false;
  };
  for (size_t i = 0; i + 1 < vm.argv.size(); ++i) {
    std::string& value = vm.argv[i + 1];
    if (vm.argv[i] == "-chardev" && value.find("id=qmp0,") != std::string::npos) {
      const size_t path = value.find("path=") + 5;
      value.replace(path, value.find(',', path) - path, qmp);
    }
    if (vm.argv[i] == "-add-fd") {
      const int fd = std::stoi(value.substr(value.find("fd=") + 3));
      const std::string set = value.substr(value.find("set=") + 4);
      const bool read_only = read_only_set(set);
      vm.files.emplace_back(fd, read_only ? base : own_overlay);
      vm.flags.push_back(read_only ? O_RDONLY : O_RDWR);
    }
  }
  return vm;
}

// The same VM as the driver's, started directly until QMP answers; ms.
double SameVmStartMs(const SameVm& vm, const std::string& dir) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, (dir + "/same.err").c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0600);
  for (size_t i = 0; i < vm.files.size(); ++i) {
    posix_spawn_file_actions_addopen(&actions, vm.files[i].first, vm.files[i].second.c_str(), vm.flags[i], 0);
  }
  std::vector<std::string> storage = vm.argv;
  std::vector<char*> args;
  for (auto& a : storage) args.push_back(a.data());
  args.push_back(nullptr);
  const absl::Time start = absl::Now();
  pid_t pid = -1;
  const int spawned = posix_spawn(&pid, storage[0].c_str(), &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (spawned != 0) {
    std::fprintf(stderr, "bench: posix_spawn %s: %s\n", storage[0].c_str(), std::strerror(spawned));
    for (const auto& [fd, path] : vm.files) std::fprintf(stderr, "  fd %d: %s\n", fd, path.c_str());
    return -1;
  }
  auto pidfd = OpenVerifiedPidfd(pid, 0);
  WaitForPathOrExit(dir, "same.sock", *pidfd, absl::Now() + absl::Seconds(30)).IgnoreError();
  auto client = QmpClient::Connect(dir + "/same.sock", absl::Seconds(30));
  const double ms = absl::ToDoubleMilliseconds(absl::Now() - start);
  ::close(*pidfd);
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  std::filesystem::remove(dir + "/same.sock");
  if (!client.ok()) {
    std::fprintf(stderr, "bench: the driver's VM started directly did not answer (%s): %s\n",
                 std::string(client.status().message()).c_str(), ReadProcFile(dir + "/same.err").c_str());
    for (const auto& [fd, path] : vm.files) std::fprintf(stderr, "  fd %d: %s\n", fd, path.c_str());
    return -1;
  }
  return ms;
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
  // The floor: the very VM the driver starts (its argv: fds, -sandbox,
  // blockdev chain), spawned directly.
  driverpb::InspectTaskResponse first_inspect;
  harness.Inspect(ids.front(), &first_inspect);
  const SameVm same = SameVmAs(std::stoi(first_inspect.driver().attributes().at("qemu_pid")),
                               work / "same.sock", base, Overlay(base, work / "same.qcow2"));
  std::vector<double> same_direct;
  for (int i = 0; i < kStarts; ++i) {
    direct.push_back(DirectStartMs(direct_image, work.path()));
    same_direct.push_back(SameVmStartMs(same, work.path()));
    const double ms = start_one();
    if (ms < 0) return 1;
    driver.push_back(ms);
  }
  harness.Destroy(ids.front(), true);  // the 20 of the loop stay for the memory rows
  ids.erase(ids.begin());
  if (*std::min_element(same_direct.begin(), same_direct.end()) < 0) {
    std::fprintf(stderr, "bench: the driver's VM did not start directly\n");
    return 1;
  }
  const double floor = Percentile(same_direct, 0.5);
  Row("start paused VM until QMP answers, median (base: same VM direct)", Percentile(driver, 0.5), floor, "ms");
  Row("start paused VM until QMP answers, p95", Percentile(driver, 0.95), Percentile(same_direct, 0.95), "ms");
  // Paired: each StartTask against the direct start of the same round, so
  // the load of the VMs already running weighs on both sides alike.
  std::vector<double> paired;
  for (size_t i = 0; i < driver.size(); ++i) paired.push_back(driver[i] - same_direct[i]);
  const std::vector<double> paired_ten(paired.begin(), paired.begin() + 10);
  Row("driver overhead on StartTask, median (target: 10)", Percentile(paired, 0.5), 0, "ms");
  Row("driver overhead, median of the 10 starts after the first", Percentile(paired_ten, 0.5), 0, "ms");
  Row("QEMU of the bench's own argv direct (-drive file=), median", Percentile(direct, 0.5), floor, "ms");
  Row("first StartTask after the first launch, over the floor", first_ever - floor, 0, "ms");

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
  std::vector<double> relaunched;
  for (int i = 0; i < kRelaunches; ++i) {
    harness.Restart();
    const double same_ms = SameVmStartMs(same, work.path());
    const double ms = start_one();
    if (ms < 0 || same_ms < 0) return 1;
    relaunched.push_back(ms - same_ms);
    harness.Destroy(ids.back(), true);
  }
  ids.clear();
  Row("first StartTask after a relaunch, over the floor, median of 5 (target: 30)", Percentile(relaunched, 0.5), 0,
      "ms");
  // Outputs that are FIFOs, as Nomad gives them, whose reader (Nomad's log
  // collector) opens them 20 ms after StartTask was sent: QEMU's start
  // must not wait for it.
  std::vector<double> fifo_paired;
  for (int i = 0; i < kFifoStarts; ++i) {
    allocs.push_back(std::make_unique<FakeAlloc>("fifo" + std::to_string(i)));
    FakeAlloc& alloc = *allocs.back();
    alloc.AddOverlay(base);
    ::mkfifo(alloc.stdout_path().c_str(), 0600);
    ::mkfifo(alloc.stderr_path().c_str(), 0600);
    const auto task = alloc.Task({{"image_path", "local/disk.qcow2"}, {"drive_interface", "virtio"}, {"args", {"-S"}}});
    const double same_ms = SameVmStartMs(same, work.path());
    std::vector<std::thread> readers;
    const absl::Time start = absl::Now();
    for (const std::string& path : {alloc.stdout_path(), alloc.stderr_path()}) {
      readers.emplace_back([path, start] {
        absl::SleepFor(start + kLateReader - absl::Now());
        const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);  // blocks until the writer opens
        char buf[4096];
        while (fd >= 0 && ::read(fd, buf, sizeof buf) > 0) {
        }
        if (fd >= 0) ::close(fd);
      });
    }
    driverpb::TaskHandle handle;
    const grpc::Status status = harness.Start(task, &handle);
    const double ms = absl::ToDoubleMilliseconds(absl::Now() - start);
    harness.Destroy(task.id(), true);
    for (std::thread& reader : readers) reader.join();
    if (!status.ok() || same_ms < 0) {
      std::fprintf(stderr, "bench: StartTask with FIFO outputs failed: %s\n", status.error_message().c_str());
      return 1;
    }
    fifo_paired.push_back(ms - same_ms);
  }
  Row("overhead with FIFO outputs read from 20 ms after the call, median", Percentile(fifo_paired, 0.5), 0, "ms");
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
