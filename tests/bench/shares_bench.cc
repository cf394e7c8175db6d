// bench: 9p read throughput in the guest against a virtio disk, same run,
// same bytes: one 256 MiB random file in the task's local/, shared over
// virtio-9p (share_alloc_dirs) and attached as a read-only raw virtio disk.
// The guest (guest-generic.qcow2: it has 9p) reads each with busybox dd from
// its ttyS1 shell (a second serial port the job adds through args), guest
// page cache dropped before every read, timed inside the guest.
// The file is fresh on the host, so both sides read from the host's page cache.
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <regex>
#include <string>
#include <vector>

#include "../support/plugin_harness.h"
#include "../support/test_guest.h"
#include "absl/strings/str_cat.h"

namespace ndq {
namespace {
namespace driverpb = hashicorp::nomad::plugins::drivers::proto;

using testing::FakeAlloc;
using testing::PluginHarness;
using testing::TempDir;

constexpr int kReads = 5;
constexpr int64_t kFileBytes = 256 << 20;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// The guest's ttyS1 shell on a unix socket.
class Shell {
 public:
  bool Connect(const std::string& path, absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    while (absl::Now() < deadline) {
      fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_un addr{};
      addr.sun_family = AF_UNIX;
      std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
      if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) return true;
      ::close(fd_);
      fd_ = -1;
      ::poll(nullptr, 0, 100);  // the socket appears as QEMU starts
    }
    return false;
  }
  ~Shell() {
    if (fd_ >= 0) ::close(fd_);
  }
  // Runs `command`, then an echo of a computed marker (the terminal echoes
  // input, so the marker's text only appears once the command is done).
  // Returns everything read, or "" on timeout.
  std::string Run(const std::string& command, absl::Duration timeout) {
    ++serial_;
    const std::string line = absl::StrCat(command, "; echo ndq-done-$((", serial_, "+1000))\n");
    if (::write(fd_, line.data(), line.size()) != static_cast<ssize_t>(line.size())) return "";
    const std::string marker = absl::StrCat("ndq-done-", serial_ + 1000);
    std::string out;
    const absl::Time deadline = absl::Now() + timeout;
    while (out.find(marker) == std::string::npos) {
      const int left = static_cast<int>(absl::ToInt64Milliseconds(deadline - absl::Now()));
      pollfd p{fd_, POLLIN, 0};
      if (left <= 0 || ::poll(&p, 1, left) <= 0) return "";
      char buf[4096];
      const ssize_t n = ::read(fd_, buf, sizeof buf);
      if (n <= 0) return "";
      out.append(buf, static_cast<size_t>(n));
    }
    return out;
  }

 private:
  int fd_ = -1;
  int serial_ = 0;
};

// MiB/s of one dd read, timed in the guest (busybox dd prints no timing;
// /proc/uptime has 10 ms resolution, against reads of 0.2 s and more).
double ReadMibPerSecond(Shell& shell, const std::string& source) {
  const std::string out = shell.Run(
      absl::StrCat("echo 3 >/proc/sys/vm/drop_caches; a=$(cut -d' ' -f1 /proc/uptime); dd if=", source,
                   " of=/dev/null bs=1M 2>/dev/null; b=$(cut -d' ' -f1 /proc/uptime); echo ndq-took $a $b"),
      absl::Minutes(5));
  std::smatch m;
  static const std::regex kTook(R"(\nndq-took ([0-9.]+) ([0-9.]+))");
  if (!std::regex_search(out, m, kTook)) {
    std::fprintf(stderr, "bench: no timing in: %s\n", out.c_str());
    return 0;
  }
  const double seconds = std::stod(m[2]) - std::stod(m[1]);
  return seconds > 0 ? static_cast<double>(kFileBytes) / (1 << 20) / seconds : 0;
}

bool WriteRandomFile(const std::string& path) {
  std::ifstream random("/dev/urandom", std::ios::binary);
  std::ofstream out(path, std::ios::binary);
  std::vector<char> buf(1 << 20);
  for (int64_t done = 0; done < kFileBytes; done += static_cast<int64_t>(buf.size())) {
    random.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    out.write(buf.data(), static_cast<std::streamsize>(buf.size()));
  }
  return static_cast<bool>(out.flush());
}

int Main() {
  absl::StatusOr<std::string> guests = testing::TestGuestDir();
  if (!guests.ok()) {
    std::fprintf(stderr, "bench: %s\n", std::string(guests.status().message()).c_str());
    return 1;
  }
  TempDir work;
  const std::string console = absl::StrCat("/tmp/ndq-shares-bench-", ::getpid(), ".sock");
  PluginHarness harness(work / "s", {{"image_paths", {*guests}}, {"args_allowlist", {"-serial"}}});
  FakeAlloc alloc("vm");
  alloc.AddOverlay(*guests + "/guest-generic.qcow2");
  std::filesystem::create_directories(alloc.task_dir() + "/secrets");
  if (!WriteRandomFile(alloc.task_dir() + "/local/big.raw")) return 1;
  const nlohmann::json config = {
      {"image_path", "local/disk.qcow2"},
      {"drive_interface", "virtio"},
      {"share_alloc_dirs", true},
      {"disk", {{{"image_path", "local/big.raw"}, {"format", "raw"}, {"readonly", true}, {"serial", "bench"}}}},
      {"args", {"-serial", "mon:stdio", "-serial", absl::StrCat("unix:", console, ",server=on,wait=off")}}};
  const driverpb::TaskConfig task = alloc.Task(config, 512);
  driverpb::TaskHandle handle;
  if (const grpc::Status status = harness.Start(task, &handle); !status.ok()) {
    std::fprintf(stderr, "bench: StartTask failed: %s\n", status.error_message().c_str());
    return 1;
  }
  Shell shell;
  const bool ready = testing::WaitForFileToContain(alloc.stdout_path(), "GUEST-READY", testing::kGuestBootTimeout) &&
                     shell.Connect(console, absl::Seconds(10)) && !shell.Run("true", absl::Seconds(30)).empty();
  std::vector<double> p9, blk;
  if (ready) {
    const std::string disk = "/dev/$(grep -lx bench /sys/block/vd*/serial | cut -d/ -f4)";
    // Interleaved, so a change in the machine's load hits both alike.
    for (int i = 0; i < kReads; ++i) {
      p9.push_back(ReadMibPerSecond(shell, "/mnt/local/big.raw"));
      blk.push_back(ReadMibPerSecond(shell, disk));
    }
  } else {
    std::fprintf(stderr, "bench: the guest's shell did not answer\n");
  }
  harness.Stop(task.id(), absl::Seconds(20)).IgnoreError();
  harness.Destroy(task.id(), true).IgnoreError();
  ::unlink(console.c_str());
  if (!ready) return 1;
  std::printf("%-62s %10s %10s\n", "measure (256 MiB, dd bs=1M, guest cache dropped)", "9p", "virtio-blk");
  std::printf("%-62s %10.0f %10.0f  MiB/s\n", "read throughput in the guest, median", Median(p9), Median(blk));
  std::printf("%-62s %10.0f %10.0f  MiB/s\n", "  slowest", *std::min_element(p9.begin(), p9.end()),
              *std::min_element(blk.begin(), blk.end()));
  std::printf("%-62s %10.0f %10.0f  MiB/s\n", "  fastest", *std::max_element(p9.begin(), p9.end()),
              *std::max_element(blk.begin(), blk.end()));
  return 0;
}

}  // namespace
}  // namespace ndq

int main() { return ndq::Main(); }
