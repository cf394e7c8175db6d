#include "host/cgroups.h"

#include <unistd.h>

#include <filesystem>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "vm/vm_task.h"

namespace ndq {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// Lines as this (hybrid) host's /proc/self/mountinfo has them.
constexpr char kHybrid[] =
    "30 25 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755\n"
    "31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
    "32 30 0:28 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n"
    "33 30 0:29 / /sys/fs/cgroup/memory rw,relatime shared:7 - cgroup cgroup rw,memory\n"
    "34 30 0:30 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n"
    "35 30 0:31 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n"
    "36 30 0:32 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    "37 30 0:33 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset\n";

TEST(CgroupMounts, HybridHostIsV1PerController) {
  const CgroupMounts mounts = ParseCgroupMounts(kHybrid);
  EXPECT_EQ(mounts.version, CgroupVersion::kV1);
  EXPECT_EQ(mounts.v1.at("memory"), "/sys/fs/cgroup/memory");
  EXPECT_EQ(mounts.v1.at("cpuset"), "/sys/fs/cgroup/cpuset");
  EXPECT_EQ(mounts.v1.size(), 5u) << "name=systemd is not a controller we use";
  EXPECT_EQ(mounts.unified, "/sys/fs/cgroup/unified");
}

TEST(CgroupMounts, CoMountedControllersShareAHierarchy) {
  const CgroupMounts mounts =
      ParseCgroupMounts("40 30 0:40 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n");
  EXPECT_EQ(mounts.v1.at("cpu"), "/sys/fs/cgroup/cpu,cpuacct");
  EXPECT_EQ(mounts.v1.at("cpuacct"), "/sys/fs/cgroup/cpu,cpuacct");
  TaskCgroup cgroup;
  cgroup.dirs = {{"cpu", "/a/x"}, {"cpuacct", "/a/x"}, {"memory", "/m/x"}};
  EXPECT_THAT(cgroup.ProcsFiles(), ElementsAre("/a/x/cgroup.procs", "/m/x/cgroup.procs"));
}

TEST(CgroupMounts, UnifiedOnlyHostIsV2AndNoneIsNone) {
  const CgroupMounts v2 = ParseCgroupMounts(
      "25 20 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n");
  EXPECT_EQ(v2.version, CgroupVersion::kV2);
  EXPECT_EQ(v2.unified, "/sys/fs/cgroup");
  EXPECT_EQ(ParseCgroupMounts("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n").version, CgroupVersion::kNone);
  EXPECT_EQ(ParseCgroupMounts("garbage\n\n- -\n").version, CgroupVersion::kNone);
}

TEST(CgroupLimits, SharesBecomeWeightsAsRuncConvertsThem) {
  EXPECT_EQ(CpuSharesToWeight(2), 1);
  EXPECT_EQ(CpuSharesToWeight(1024), 39);
  EXPECT_EQ(CpuSharesToWeight(262144), 10000);
  EXPECT_EQ(CpuSharesToWeight(1), 1);
  EXPECT_EQ(CpuSharesToWeight(0), 0) << "no shares: leave the default";
}

TEST(CgroupRecord, SurvivesTheDriverStateRoundTrip) {
  DriverStateRecord record;
  record.state_dir = "/run/x";
  record.qmp_socket = "/run/x/qmp.sock";
  record.cgroup.version = CgroupVersion::kV1;
  record.cgroup.dirs = {{"memory", "/sys/fs/cgroup/memory/nomad/a.t"}};
  record.cgroup.created = {"/sys/fs/cgroup/memory/nomad/a.t"};
  record.memory_limit_bytes = 384ll << 20;
  absl::StatusOr<DriverStateRecord> decoded = DriverStateRecord::Decode(record.Encode());
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->cgroup.version, CgroupVersion::kV1);
  EXPECT_EQ(decoded->cgroup.dirs, record.cgroup.dirs);
  EXPECT_EQ(decoded->cgroup.created, record.cgroup.created);
  EXPECT_EQ(decoded->memory_limit_bytes, 384ll << 20);
}

// The real cgroup2 tree beside this host's v1 controllers offers no memory
// controller: the v2 path must say so rather than run VMs unlimited unawares.
TEST(CgroupManager, V2TreeWithoutTheMemoryControllerIsReported) {
  const CgroupMounts host = DetectCgroupMounts();
  if (host.unified.empty() || host.version == CgroupVersion::kV2) GTEST_SKIP() << "no hybrid cgroup2 tree here";
  CgroupMounts v2;
  v2.version = CgroupVersion::kV2;
  v2.unified = host.unified;
  CgroupManager manager(v2);
  const std::string parent = "ndq-unit-" + std::to_string(::getpid());
  const CgroupSupport support = manager.Support(parent);
  std::filesystem::remove(host.unified + "/" + parent);
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to create cgroups";
  EXPECT_FALSE(support.usable);
  EXPECT_THAT(support.problem, HasSubstr("memory controller is not available"));
  absl::StatusOr<std::optional<TaskCgroup>> none = manager.Create(parent, "t", "", CgroupLimits{});
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
}

TEST(CgroupManager, NoCgroupFilesystemMeansNoIsolation) {
  CgroupManager manager(CgroupMounts{});
  const CgroupSupport support = manager.Support("nomad");
  EXPECT_FALSE(support.usable);
  EXPECT_THAT(support.controllers, IsEmpty());
  EXPECT_THAT(support.problem, HasSubstr("no cgroup filesystem"));
}

}  // namespace
}  // namespace ndq
