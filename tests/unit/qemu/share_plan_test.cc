// Shares: planning (tags, paths, duplicates) through PlanVm and Nomad's mounts
// through the protobuf conversion. Opening them: tests/unit/vm/share_dirs_test.cc.
#include "qemu/share_plan.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>

#include "../../support/temp_dir.h"
#include "driver/task_proto.h"

namespace ndq {
namespace {

namespace driverpb = hashicorp::nomad::plugins::drivers::proto;
namespace fs = std::filesystem;
using ::ndq::testing::TempDir;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

// A task "web" in a real alloc dir laid out as Nomad makes it.
class Shares : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::canonical(tmp_.path()).string();
    alloc_ = root_ + "/a";
    for (const char* dir : {"/alloc/logs", "/web/local", "/web/secrets"}) fs::create_directories(alloc_ + dir);
    fs::create_directories(root_ + "/vol");
    task_.set_id("f00d/web/0123abcd");
    task_.set_name("web");
    task_.set_alloc_dir(alloc_);
    task_.mutable_resources()->mutable_allocated_resources()->mutable_memory()->set_memory_mb(256);
    config_.image_path = "local/linux.img";
  }
  void AddMount(const std::string& task_path, const std::string& host_path, bool readonly) {
    driverpb::Mount* mount = task_.add_mounts();
    mount->set_task_path(task_path);
    mount->set_host_path(host_path);
    mount->set_readonly(readonly);
  }
  absl::StatusOr<VmSpec> Plan() const {
    return ndq::PlanVm(config_, TaskRequestFromProto(task_), PluginConfig{}, host_);
  }
  std::string Problems() const {
    absl::StatusOr<VmSpec> spec = Plan();
    EXPECT_FALSE(spec.ok());
    return spec.ok() ? "" : std::string(spec.status().message());
  }
  TempDir tmp_;
  std::string root_, alloc_;
  driverpb::TaskConfig task_;
  TaskConfig config_;
  HostCapabilities host_ = {{{"x86_64", "/usr/bin/qemu-system-x86_64"}}};
};

TEST_F(Shares, NoneUnlessAskedOrMounted) {
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_THAT(spec->shares, IsEmpty());
}

TEST_F(Shares, AllocDirsThenVolumesSecretsReadOnly) {
  config_.share_alloc_dirs = true;
  AddMount("/srv/data", root_ + "/vol", true);
  AddMount("/srv/rw", root_ + "/vol", false);
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_THAT(spec->shares, ElementsAre(Share{"alloc", ShareOrigin::kAllocDir, "alloc", false},
                                        Share{"local", ShareOrigin::kAllocDir, "web/local", false},
                                        Share{"secrets", ShareOrigin::kAllocDir, "web/secrets", true},
                                        Share{"/srv/data", ShareOrigin::kVolume, root_ + "/vol", true},
                                        Share{"/srv/rw", ShareOrigin::kVolume, root_ + "/vol", false}));
}

TEST_F(Shares, TagsAreCheckedAndNamed) {
  config_.share_alloc_dirs = true;
  AddMount("/srv/a,b", root_ + "/vol", false);
  AddMount("/srv/a b", root_ + "/vol", false);
  AddMount("", root_ + "/vol", false);
  AddMount("/" + std::string(31, 'x'), root_ + "/vol", false);  // 32 bytes
  AddMount("local", root_ + "/vol", false);
  AddMount("/srv/twice", root_ + "/vol", false);
  AddMount("/srv/twice", root_ + "/vol", true);
  const std::string problems = Problems();
  EXPECT_THAT(problems, HasSubstr("volume mount \"/srv/a,b\": the destination is the guest's 9p mount tag"));
  EXPECT_THAT(problems, HasSubstr("volume mount \"/srv/a b\""));
  EXPECT_THAT(problems, HasSubstr("volume mount \"\": "));
  EXPECT_THAT(problems, HasSubstr("at most 31 bytes in QEMU; this one has 32"));
  EXPECT_THAT(problems, HasSubstr("volume mount \"local\": mount tag \"local\" is already used"));
  EXPECT_THAT(problems, HasSubstr("volume mount \"/srv/twice\": mount tag \"/srv/twice\" is already used"));
}

TEST_F(Shares, ThirtyOneByteTagsAndAllocTagsWithoutShareAllocDirsAreFine) {
  AddMount("/" + std::string(30, 'x'), root_ + "/vol", false);
  AddMount("local", root_ + "/vol", false);  // no share_alloc_dirs: the tag is free
  EXPECT_TRUE(Plan().ok()) << Plan().status();
}

TEST_F(Shares, VolumeHostPathMustBeAbsolute) {
  AddMount("/srv/rel", "vol", false);
  EXPECT_THAT(Problems(), HasSubstr("volume mount \"/srv/rel\": the host path Nomad gave is not absolute"));
}

TEST_F(Shares, AnOddTaskNameIsNotADirectoryName) {
  config_.share_alloc_dirs = true;
  task_.set_name("..");
  EXPECT_THAT(Problems(), HasSubstr("\"share_alloc_dirs\": the task name \"..\" is not a directory name"));
}

TEST(TaskConfigShares, ShareAllocDirsIsInTheSchemaAndNoOptionNamesAHostPath) {
  const nomadplugin::hclspec::Spec spec = TaskConfigSpec();
  const auto& attrs = spec.object().attributes();
  EXPECT_EQ(attrs.count("share_alloc_dirs"), 1u);
  for (const auto& [name, unused] : attrs) {
    EXPECT_THAT(name, Not(HasSubstr("share_path"))) << name;
    EXPECT_THAT(name, Not(HasSubstr("mount"))) << name;
  }
}

}  // namespace
}  // namespace ndq
