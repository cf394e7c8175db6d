// One record of what a VM holds, and one Release for a failed start,
// DestroyTask and recovery: everything in it goes, whatever is already gone.
#include "vm/vm_resources.h"

#include <sys/stat.h>

#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../fakes/fake_vm_host.h"
#include "../../support/temp_dir.h"

namespace ndq {
namespace {

namespace fs = std::filesystem;
using ::ndq::testing::FakeVmHost;
using ::ndq::testing::TempDir;
using ::testing::IsEmpty;

// A record holding one of each, made for real where they are files.
struct Made {
  TempDir state_root, task_dir, cache_dir;
  FakeVmHost host;
  ImageCache cache{cache_dir.path()};
  VmResources resources;

  Made() {
    resources.state_dir = state_root.path() + "/0123456789abcdef";
    fs::create_directories(resources.state_dir + "/run");
    std::ofstream(resources.state_dir + "/run/qmp.sock") << "";
    absl::StatusOr<std::optional<TaskCgroup>> cgroup = host.CreateCgroup("parent", "task", "", CgroupLimits{});
    resources.cgroup = **cgroup;
    resources.console_dir = task_dir.path() + "/console";
    fs::create_directory(resources.console_dir);
    const std::string image = cache_dir.path() + "/sha256-aa";
    std::ofstream(image) << "image";
    EXPECT_TRUE(cache.Lease("sha256-aa", "task-key").ok());
    resources.leases = {image};
  }
};

TEST(VmResources, ReleaseTakesEverythingTheRecordHolds) {
  Made made;
  ASSERT_TRUE(fs::exists(made.resources.state_dir));
  ASSERT_THAT(made.host.live_cgroups(), ::testing::SizeIs(1));
  ASSERT_TRUE(made.cache.Evict(0, {}).ok());
  ASSERT_TRUE(fs::exists(made.resources.leases[0])) << "leased, so eviction spares it";
  Release(made.resources, made.host, made.cache, "task-key");
  EXPECT_FALSE(fs::exists(made.resources.state_dir)) << "the state dir goes whole";
  EXPECT_THAT(made.host.live_cgroups(), IsEmpty());
  EXPECT_FALSE(fs::exists(made.resources.console_dir));
  EXPECT_TRUE(fs::exists(made.resources.leases[0])) << "a lease ends; the shared image stays";
  ASSERT_TRUE(made.cache.Evict(0, {}).ok());
  EXPECT_FALSE(fs::exists(made.resources.leases[0])) << "unleased, eviction may take it now";
}

TEST(VmResources, ReleasingTwiceOrWhatIsGoneIsHarmless) {
  Made made;
  Release(made.resources, made.host, made.cache, "task-key");
  Release(made.resources, made.host, made.cache, "task-key");
  Release(VmResources{}, made.host, made.cache, "task-key");
  EXPECT_THAT(made.host.live_cgroups(), IsEmpty());
}

TEST(VmResources, AConsoleDirHoldingSomethingElseIsLeftAlone) {
  Made made;
  std::ofstream(made.resources.console_dir + "/job-file") << "not ours";
  Release(made.resources, made.host, made.cache, "task-key");
  EXPECT_TRUE(fs::exists(made.resources.console_dir + "/job-file"));
}

TEST(VmResources, TheDriverStateKeepsTheRecord) {
  Made made;
  made.resources.tap = "ndq0123456789ab";
  DriverStateRecord record;
  KeepResourcesIn(made.resources, record);
  absl::StatusOr<DriverStateRecord> decoded = DriverStateRecord::Decode(record.Encode());
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  const VmResources back = ResourcesOf(*decoded);
  EXPECT_EQ(back.state_dir, made.resources.state_dir);
  EXPECT_EQ(back.cgroup.created, made.resources.cgroup.created);
  EXPECT_EQ(back.tap, "ndq0123456789ab");
  EXPECT_EQ(back.console_dir, made.resources.console_dir);
  EXPECT_EQ(back.leases, made.resources.leases);
  Release(back, made.host, made.cache, "task-key");  // a relaunched plugin's DestroyTask
  EXPECT_FALSE(fs::exists(made.resources.state_dir));
}

}  // namespace
}  // namespace ndq
