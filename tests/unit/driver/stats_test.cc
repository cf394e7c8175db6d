#include "driver/stats.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/deadlines.h"
#include "../../support/child_process.h"
#include "../../support/temp_dir.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"

namespace ndq {
namespace {

using ::ndq::testing::ChildProcess;
using ::ndq::testing::TempDir;
using ::testing::Contains;
using ::testing::Not;
using ::testing::UnorderedElementsAre;
namespace driverpb = hashicorp::nomad::plugins::drivers::proto;

using ::ndq::testing::kGenerous;

const double kTickNs = 1e9 / static_cast<double>(::sysconf(_SC_CLK_TCK));

ChildProcess Spinner() { return ChildProcess({"/bin/sh", "-c", "while :; do :; done"}); }
ChildProcess Sleeper() { return ChildProcess({"/bin/sleep", "30"}); }

// The kernel's exact CPU time of `pid` (user + system), in nanoseconds.
double CpuClockNs(pid_t pid) {
  clockid_t clock;
  if (::clock_getcpuclockid(pid, &clock) != 0) return -1;
  timespec ts{};
  if (::clock_gettime(clock, &ts) != 0) return -1;
  return static_cast<double>(ts.tv_sec) * 1e9 + static_cast<double>(ts.tv_nsec);
}

// Waits until `pid` has used at least `ns` more CPU than `from_ns`.
bool WaitForCpu(pid_t pid, double from_ns, double ns) {
  const absl::Time deadline = absl::Now() + kGenerous;
  while (CpuClockNs(pid) < from_ns + ns) {
    if (absl::Now() >= deadline) return false;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return true;
}

// VmRSS from /proc/PID/status, in bytes.
std::optional<uint64_t> VmRssBytes(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  for (std::string line; std::getline(in, line);) {
    absl::string_view rest = line;
    if (!absl::ConsumePrefix(&rest, "VmRSS:")) continue;
    absl::ConsumeSuffix(&rest, "kB");
    uint64_t kb = 0;
    if (absl::SimpleAtoi(absl::StripAsciiWhitespace(rest), &kb)) return kb * 1024;
  }
  return std::nullopt;
}

// The two files are read at different moments, and /proc/PID/stat adds up the
// kernel's per-CPU RSS counters without folding them in. Within 10% or 512 KiB
// is agreement; a unit mistake (pages for bytes) is 4096 times off.
// A process's RSS moves on its own (khugepaged folds touched pages into a huge
// page: +2 MiB with no code of ours running), so a reading is compared with the
// kernel's VmRSS read just before and just after it, with a little slack for
// the kernel's per-CPU counters, which /proc/PID/stat reads unsummed.
void ExpectRssBetween(uint64_t actual, uint64_t before, uint64_t after) {
  const uint64_t low = std::min(before, after), high = std::max(before, after);
  const uint64_t slack = std::max<uint64_t>(512 * 1024, high / 10);
  EXPECT_GE(actual + slack, low) << "VmRSS was " << before << " then " << after;
  EXPECT_LE(actual, high + slack) << "VmRSS was " << before << " then " << after;
}

TEST(ReadProcessSample, AgreesWithTheKernelsCpuClockForARealChild) {
  ChildProcess spinner = Spinner();
  ASSERT_GT(spinner.pid(), 0);
  ASSERT_TRUE(WaitForCpu(spinner.pid(), 0, 100e6)) << "the child never got 100 ms of CPU";
  const double before = CpuClockNs(spinner.pid());
  std::optional<ProcessSample> sample = ReadProcessSample(spinner.pid());
  const double after = CpuClockNs(spinner.pid());
  ASSERT_TRUE(sample.has_value());
  // /proc/PID/stat counts whole ticks of user and of system time, each rounded down.
  const double total = sample->user_ns + sample->system_ns;
  EXPECT_GE(total, before - 3 * kTickNs);
  EXPECT_LE(total, after + kTickNs);
  EXPECT_GT(sample->user_ns, sample->system_ns) << "a shell loop spins in user mode";
}

// A forked child that touches `bytes` of memory, says so on a pipe, and then
// waits to be killed; killed and reaped when the test ends.
class MemoryHolder {
 public:
  explicit MemoryHolder(size_t bytes) {
    int ready[2];
    if (::pipe2(ready, O_CLOEXEC) != 0) return;
    pid_ = ::fork();
    if (pid_ == 0) {
      // Only async-signal-safe calls from here on.
      void* block = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (block == MAP_FAILED) ::_exit(1);
      for (size_t i = 0; i < bytes; i += 4096) static_cast<volatile char*>(block)[i] = 1;
      (void)!::write(ready[1], "r", 1);
      for (;;) ::pause();
    }
    ::close(ready[1]);
    char byte;
    ready_ = pid_ > 0 && ::read(ready[0], &byte, 1) == 1;
    ::close(ready[0]);
  }
  ~MemoryHolder() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  MemoryHolder(const MemoryHolder&) = delete;
  MemoryHolder& operator=(const MemoryHolder&) = delete;

  pid_t pid() const { return pid_; }
  bool ready() const { return ready_; }

 private:
  pid_t pid_ = -1;
  bool ready_ = false;
};

TEST(ReadProcessSample, ReportsResidentMemoryInBytes) {
  MemoryHolder holder(32 << 20);
  ASSERT_TRUE(holder.ready());
  const std::optional<uint64_t> status_before = VmRssBytes(holder.pid());
  std::optional<ProcessSample> sample = ReadProcessSample(holder.pid());
  const std::optional<uint64_t> status_after = VmRssBytes(holder.pid());
  ASSERT_GE(status_before.value_or(0), 32u << 20);
  ASSERT_TRUE(sample.has_value());
  ExpectRssBetween(sample->rss_bytes, *status_before, status_after.value_or(0));
}

// The kernel's own VmRSS (/proc/self/status), in bytes.
uint64_t KernelRss() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
  }
  return 0;
}

// Touched memory shows up, and the figure is the kernel's: between VmRSS read
// just before and just after. (No fixed upper bound: under a sanitizer the
// shadow memory of the touched block counts too.)
TEST(ReadProcessSample, MemoryWeTouchShowsUpInOurRss) {
  constexpr size_t kBytes = 32 << 20;
  const std::optional<ProcessSample> before = ReadProcessSample(::getpid());
  ASSERT_TRUE(before.has_value());
  void* block = ::mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(block, MAP_FAILED);
  std::memset(block, 1, kBytes);
  const uint64_t kernel_before = KernelRss();
  const std::optional<ProcessSample> touched = ReadProcessSample(::getpid());
  const uint64_t kernel_after = KernelRss();
  ::munmap(block, kBytes);
  ASSERT_TRUE(touched.has_value());
  EXPECT_GE(touched->rss_bytes, before->rss_bytes + kBytes - (4 << 20));
  constexpr uint64_t kSlack = 1 << 20;  // pages touched by the reads themselves
  EXPECT_GE(touched->rss_bytes + kSlack, std::min(kernel_before, kernel_after));
  EXPECT_LE(touched->rss_bytes, std::max(kernel_before, kernel_after) + kSlack);
}

TEST(ReadProcessSample, AReapedProcessIsNullopt) {
  ChildProcess child({"/bin/true"});
  ASSERT_GT(child.pid(), 0);
  child.Wait();
  EXPECT_FALSE(ReadProcessSample(child.pid()).has_value());
}

TEST(CoreMhz, IsAPlausibleClockRate) {
  const double mhz = CoreMhz();
  EXPECT_GT(mhz, 100.0);
  EXPECT_LT(mhz, 10000.0);
}

const driverpb::TaskResourceUsage& ByPid(const driverpb::TaskStats& stats, pid_t pid) {
  static const driverpb::TaskResourceUsage kNone;
  const auto it = stats.resource_usage_by_pid().find(absl::StrCat(pid));
  EXPECT_NE(it, stats.resource_usage_by_pid().end()) << "no usage for pid " << pid;
  return it != stats.resource_usage_by_pid().end() ? it->second : kNone;
}

std::vector<int> Measured(const driverpb::MemoryUsage& memory) {
  return {memory.measured_fields().begin(), memory.measured_fields().end()};
}
std::vector<int> Measured(const driverpb::CPUUsage& cpu) {
  return {cpu.measured_fields().begin(), cpu.measured_fields().end()};
}

TEST(StatsSampler, TheFirstSampleHasMemoryPerProcessButNoCpuRateYet) {
  // Settled processes: a child just spawned is still mapping its libraries.
  MemoryHolder a(4 << 20), b(8 << 20);
  ASSERT_TRUE(a.ready());
  ASSERT_TRUE(b.ready());
  StatsSampler sampler;
  const std::map<pid_t, uint64_t> rss_before = {{a.pid(), VmRssBytes(a.pid()).value_or(0)},
                                                {b.pid(), VmRssBytes(b.pid()).value_or(0)}};
  const int64_t before_s = absl::ToUnixSeconds(absl::Now());
  const driverpb::TaskStats stats = sampler.Sample("task-1", {a.pid(), b.pid()});
  const int64_t after_s = absl::ToUnixSeconds(absl::Now());

  EXPECT_EQ(stats.id(), "task-1");
  EXPECT_GE(stats.timestamp().seconds(), before_s);
  EXPECT_LE(stats.timestamp().seconds(), after_s);
  ASSERT_EQ(stats.resource_usage_by_pid_size(), 2);
  uint64_t sum = 0;
  for (pid_t pid : {a.pid(), b.pid()}) {
    const driverpb::TaskResourceUsage& usage = ByPid(stats, pid);
    ExpectRssBetween(usage.memory().rss(), rss_before.at(pid), VmRssBytes(pid).value_or(0));
    EXPECT_THAT(Measured(usage.memory()), Contains(driverpb::MemoryUsage::RSS));
    EXPECT_EQ(usage.cpu().percent(), 0) << "one sample is no interval";
    EXPECT_THAT(Measured(usage.cpu()),
                UnorderedElementsAre(driverpb::CPUUsage::USER_MODE, driverpb::CPUUsage::SYSTEM_MODE,
                                     driverpb::CPUUsage::PERCENT, driverpb::CPUUsage::TOTAL_TICKS));
    sum += usage.memory().rss();
  }
  EXPECT_EQ(stats.agg_resource_usage().memory().rss(), sum);
}

// Brackets each Sample call with the kernel's clocks, so the rate the sampler
// reports can be checked against bounds computed independently.
struct Bracket {
  absl::Time wall_before, wall_after;
  double cpu_before, cpu_after;
};

TEST(StatsSampler, ASpinningProcessIsBusyAndASleepingOneIdle) {
  ChildProcess spinner = Spinner();
  ChildProcess sleeper = Sleeper();
  ASSERT_GT(spinner.pid(), 0);
  ASSERT_GT(sleeper.pid(), 0);
  StatsSampler sampler;
  auto sample = [&](Bracket* bracket) {
    bracket->cpu_before = CpuClockNs(spinner.pid());
    bracket->wall_before = absl::Now();
    driverpb::TaskStats stats = sampler.Sample("t", {spinner.pid(), sleeper.pid()});
    bracket->wall_after = absl::Now();
    bracket->cpu_after = CpuClockNs(spinner.pid());
    return stats;
  };
  Bracket first, second;
  sample(&first);
  ASSERT_TRUE(WaitForCpu(spinner.pid(), first.cpu_after, 200e6));
  const driverpb::TaskStats stats = sample(&second);

  const driverpb::CPUUsage& busy = ByPid(stats, spinner.pid()).cpu();
  const double min_pct = (second.cpu_before - first.cpu_after - 3 * kTickNs) /
                         absl::ToDoubleNanoseconds(second.wall_after - first.wall_before) * 100;
  const double max_pct = (second.cpu_after - first.cpu_before + 3 * kTickNs) /
                         absl::ToDoubleNanoseconds(second.wall_before - first.wall_after) * 100;
  EXPECT_GE(busy.percent(), min_pct);
  EXPECT_LE(busy.percent(), max_pct);
  EXPECT_GT(busy.percent(), 0);
  EXPECT_LE(busy.percent(), 100 * (1 + 3 * kTickNs / 200e6)) << "one thread uses at most one core";
  EXPECT_DOUBLE_EQ(busy.percent(), busy.user_mode() + busy.system_mode());
  EXPECT_GT(busy.user_mode(), busy.system_mode());
  // Nomad's ticks are MHz: the share of one core times that core's clock.
  EXPECT_NEAR(busy.total_ticks(), busy.percent() / 100 * CoreMhz(), 1e-6);

  const driverpb::CPUUsage& idle = ByPid(stats, sleeper.pid()).cpu();
  EXPECT_EQ(idle.percent(), 0) << "sleep uses no CPU while it sleeps";

  const driverpb::CPUUsage& agg = stats.agg_resource_usage().cpu();
  EXPECT_DOUBLE_EQ(agg.percent(), busy.percent() + idle.percent());
  EXPECT_DOUBLE_EQ(agg.user_mode(), busy.user_mode() + idle.user_mode());
}

TEST(StatsSampler, AProcessThatIsGoneIsLeftOut) {
  ChildProcess live = Sleeper();
  ChildProcess gone({"/bin/true"});
  ASSERT_GT(live.pid(), 0);
  ASSERT_GT(gone.pid(), 0);
  gone.Wait();
  StatsSampler sampler;
  const driverpb::TaskStats stats = sampler.Sample("t", {gone.pid(), live.pid()});
  ASSERT_EQ(stats.resource_usage_by_pid_size(), 1);
  EXPECT_EQ(stats.resource_usage_by_pid().begin()->first, absl::StrCat(live.pid()));
  EXPECT_EQ(stats.agg_resource_usage().memory().rss(), ByPid(stats, live.pid()).memory().rss());

  const driverpb::TaskStats none = sampler.Sample("t", {});
  EXPECT_EQ(none.resource_usage_by_pid_size(), 0);
  EXPECT_EQ(none.agg_resource_usage().memory().rss(), 0u);
  EXPECT_EQ(none.agg_resource_usage().cpu().percent(), 0);
}

// A cgroup v2 directory as the kernel lays it out, in a temporary directory
// so the test controls what it counts.
class CgroupV2Files {
 public:
  CgroupV2Files() {
    cgroup_.version = CgroupVersion::kV2;
    for (const char* controller : {"memory", "cpu", "pids"}) cgroup_.dirs[controller] = dir_.path();
  }
  void Put(const std::string& name, const std::string& contents) { std::ofstream(dir_ / name) << contents; }
  void PutCpu(uint64_t usage_usec, uint64_t user_usec, uint64_t system_usec) {
    Put("cpu.stat", absl::StrCat("usage_usec ", usage_usec, "\nuser_usec ", user_usec, "\nsystem_usec ", system_usec,
                                 "\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n"));
  }
  const TaskCgroup& cgroup() const { return cgroup_; }

 private:
  TempDir dir_;
  TaskCgroup cgroup_;
};

TEST(StatsSampler, WithACgroupTheAggregateIsTheCgroupsView) {
  MemoryHolder holder(4 << 20);
  ASSERT_TRUE(holder.ready());
  CgroupV2Files files;
  files.Put("memory.current", "536870912\n");
  files.Put("memory.peak", "603979776\n");
  files.Put("memory.stat", "anon 402653184\nfile 100663296\nkernel 8388608\nshmem 0\n");
  files.PutCpu(1000000, 700000, 300000);
  StatsSampler sampler;
  Bracket first, second;
  first.wall_before = absl::Now();
  sampler.Sample("t", {holder.pid()}, &files.cgroup());
  first.wall_after = absl::Now();
  // 50 ms more CPU: 40 ms user, 10 ms system.
  files.PutCpu(1050000, 740000, 310000);
  absl::SleepFor(absl::Milliseconds(20));  // an interval to divide by, not a wait for anything
  second.wall_before = absl::Now();
  const uint64_t rss_before = VmRssBytes(holder.pid()).value_or(0);
  const driverpb::TaskStats stats = sampler.Sample("t", {holder.pid()}, &files.cgroup());
  const uint64_t rss_after = VmRssBytes(holder.pid()).value_or(0);
  second.wall_after = absl::Now();

  const driverpb::MemoryUsage& memory = stats.agg_resource_usage().memory();
  EXPECT_EQ(memory.usage(), 536870912u);
  EXPECT_EQ(memory.max_usage(), 603979776u);
  EXPECT_EQ(memory.rss(), 402653184u);
  EXPECT_EQ(memory.cache(), 100663296u);
  EXPECT_THAT(Measured(memory), UnorderedElementsAre(driverpb::MemoryUsage::RSS, driverpb::MemoryUsage::CACHE,
                                                     driverpb::MemoryUsage::USAGE, driverpb::MemoryUsage::MAX_USAGE));
  EXPECT_THAT(Measured(memory), Not(Contains(driverpb::MemoryUsage::SWAP))) << "no memory.swap.current here";

  const double longest = absl::ToDoubleNanoseconds(second.wall_after - first.wall_before);
  const double shortest = absl::ToDoubleNanoseconds(second.wall_before - first.wall_after);
  const driverpb::CPUUsage& cpu = stats.agg_resource_usage().cpu();
  EXPECT_GE(cpu.percent(), 50e6 / longest * 100);
  EXPECT_LE(cpu.percent(), 50e6 / shortest * 100);
  EXPECT_GE(cpu.user_mode(), 40e6 / longest * 100);
  EXPECT_LE(cpu.user_mode(), 40e6 / shortest * 100);
  EXPECT_GE(cpu.system_mode(), 10e6 / longest * 100);
  EXPECT_LE(cpu.system_mode(), 10e6 / shortest * 100);
  // The per-process view is still there beside it.
  ExpectRssBetween(ByPid(stats, holder.pid()).memory().rss(), rss_before, rss_after);
}

TEST(StatsSampler, ACgroupCounterThatWentBackwardsIsNoNegativeRate) {
  CgroupV2Files files;
  files.PutCpu(5000000, 3000000, 2000000);
  StatsSampler sampler;
  sampler.Sample("t", {}, &files.cgroup());
  files.PutCpu(1000, 600, 400);  // e.g. the cgroup was recreated
  const driverpb::TaskStats stats = sampler.Sample("t", {}, &files.cgroup());
  EXPECT_EQ(stats.agg_resource_usage().cpu().percent(), 0);
  EXPECT_EQ(stats.agg_resource_usage().cpu().user_mode(), 0);
  EXPECT_EQ(stats.agg_resource_usage().cpu().system_mode(), 0);
}

// Without CPU counters in the cgroup the processes' CPU stands; memory lists
// only what the cgroup gave.
TEST(StatsSampler, ACgroupWithoutCpuCountersKeepsTheProcessesCpu) {
  ChildProcess spinner = Spinner();
  ASSERT_GT(spinner.pid(), 0);
  CgroupV2Files files;
  files.Put("memory.current", "1048576\n");
  StatsSampler sampler;
  const double start = CpuClockNs(spinner.pid());
  sampler.Sample("t", {spinner.pid()}, &files.cgroup());
  ASSERT_TRUE(WaitForCpu(spinner.pid(), start, 100e6));
  const driverpb::TaskStats stats = sampler.Sample("t", {spinner.pid()}, &files.cgroup());
  EXPECT_GT(stats.agg_resource_usage().cpu().percent(), 0);
  EXPECT_DOUBLE_EQ(stats.agg_resource_usage().cpu().percent(), ByPid(stats, spinner.pid()).cpu().percent());
  EXPECT_EQ(stats.agg_resource_usage().memory().usage(), 1048576u);
  EXPECT_THAT(Measured(stats.agg_resource_usage().memory()), UnorderedElementsAre(driverpb::MemoryUsage::USAGE));
}

TEST(StatsSampler, ACgroupOfVersionNoneIsIgnored) {
  ChildProcess sleeper = Sleeper();
  ASSERT_GT(sleeper.pid(), 0);
  TaskCgroup none;
  none.version = CgroupVersion::kNone;
  none.dirs["memory"] = "/nonexistent";
  StatsSampler sampler;
  const driverpb::TaskStats stats = sampler.Sample("t", {sleeper.pid()}, &none);
  EXPECT_EQ(stats.agg_resource_usage().memory().rss(), ByPid(stats, sleeper.pid()).memory().rss());
  EXPECT_THAT(Measured(stats.agg_resource_usage().memory()), UnorderedElementsAre(driverpb::MemoryUsage::RSS));
}

}  // namespace
}  // namespace ndq
