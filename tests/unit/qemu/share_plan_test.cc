// Shares: planning (tags, paths, duplicates) through PlanVm, Nomad's mounts
// through the protobuf conversion, and opening the directories on a real
// file system (links refused where Nomad's own dirs are expected).
#include "qemu/share_plan.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

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

// Inode of an open fd and of a path, to show which directory was opened.
ino_t InodeOf(int fd) {
  struct stat st {};
  EXPECT_EQ(::fstat(fd, &st), 0);
  return st.st_ino;
}
ino_t InodeOf(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
  return st.st_ino;
}

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
  // Opens what the plan planned; "" or the error.
  std::string OpenError() const {
    absl::StatusOr<VmSpec> spec = Plan();
    EXPECT_TRUE(spec.ok()) << spec.status();
    if (!spec.ok()) return "plan failed";
    absl::StatusOr<std::vector<UniqueFd>> dirs = OpenShareDirs(spec->shares, alloc_);
    return dirs.ok() ? "" : std::string(dirs.status().message());
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
  absl::StatusOr<std::vector<UniqueFd>> dirs = OpenShareDirs(spec->shares, alloc_);
  ASSERT_TRUE(dirs.ok()) << dirs.status();
  ASSERT_EQ(dirs->size(), 5u);
  EXPECT_EQ(InodeOf((*dirs)[0].get()), InodeOf(alloc_ + "/alloc"));
  EXPECT_EQ(InodeOf((*dirs)[1].get()), InodeOf(alloc_ + "/web/local"));
  EXPECT_EQ(InodeOf((*dirs)[2].get()), InodeOf(alloc_ + "/web/secrets"));
  EXPECT_EQ(InodeOf((*dirs)[3].get()), InodeOf(root_ + "/vol"));
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

TEST_F(Shares, VolumeHostPathMustBeAnAbsoluteDirectory) {
  AddMount("/srv/rel", "vol", false);
  EXPECT_THAT(Problems(), HasSubstr("volume mount \"/srv/rel\": the host path Nomad gave is not absolute"));

  task_.clear_mounts();
  AddMount("/srv/missing", root_ + "/nope", false);
  EXPECT_THAT(OpenError(), HasSubstr("volume mount \"/srv/missing\": host path \"" + root_ + "/nope\" does not exist"));

  task_.clear_mounts();
  std::ofstream(root_ + "/file") << "x";
  AddMount("/srv/file", root_ + "/file", false);
  EXPECT_THAT(OpenError(), HasSubstr("volume mount \"/srv/file\": host path \"" + root_ + "/file\" is not a directory"));
}

TEST_F(Shares, VolumeLinksAreResolvedToTheirDirectory) {
  fs::create_directory_symlink(root_ + "/vol", root_ + "/vol-link");
  AddMount("/srv/data", root_ + "/vol-link", false);
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok());
  absl::StatusOr<std::vector<UniqueFd>> dirs = OpenShareDirs(spec->shares, alloc_);
  ASSERT_TRUE(dirs.ok()) << dirs.status();
  EXPECT_EQ(InodeOf((*dirs)[0].get()), InodeOf(root_ + "/vol"));
}

TEST_F(Shares, AllocDirsReplacedByLinksAreRefusedWithoutNamingTheTarget) {
  config_.share_alloc_dirs = true;
  fs::remove_all(alloc_ + "/web/local");
  fs::create_directory_symlink("/etc", alloc_ + "/web/local");
  std::string error = OpenError();
  EXPECT_THAT(error, HasSubstr("\"share_alloc_dirs\": the task's local/ is a symbolic link"));
  EXPECT_THAT(error, Not(HasSubstr("/etc")));

  fs::remove(alloc_ + "/web/local");
  fs::create_directory(alloc_ + "/web/local");
  fs::remove_all(alloc_ + "/alloc");
  fs::create_directory_symlink(root_ + "/vol", alloc_ + "/alloc");
  EXPECT_THAT(OpenError(), HasSubstr("the alloc's alloc/ is a symbolic link"));

  fs::remove(alloc_ + "/alloc");
  fs::create_directory(alloc_ + "/alloc");
  fs::remove_all(alloc_ + "/web/secrets");
  EXPECT_THAT(OpenError(), HasSubstr("the task's secrets/ does not exist"));
  std::ofstream(alloc_ + "/web/secrets") << "x";
  EXPECT_THAT(OpenError(), HasSubstr("the task's secrets/ is not a directory"));
}

TEST_F(Shares, AnOddTaskNameIsNotADirectoryName) {
  config_.share_alloc_dirs = true;
  task_.set_name("..");
  EXPECT_THAT(Problems(), HasSubstr("\"share_alloc_dirs\": the task name \"..\" is not a directory name"));
}

// QEMU reopens each root as its user; one it cannot read is named up front.
TEST_F(Shares, QemuUserMustBeAbleToReadEveryRoot) {
  config_.share_alloc_dirs = true;
  AddMount("/srv/data", root_ + "/vol", true);
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok());
  for (const char* dir : {"/a/alloc", "/a/web/local", "/a/web/secrets", "/vol"}) {
    fs::permissions(root_ + dir, fs::perms(0777));
  }
  fs::permissions(alloc_ + "/alloc", fs::perms(0755));  // as Nomad makes it: readable, not writable
  absl::StatusOr<std::vector<UniqueFd>> dirs = OpenShareDirs(spec->shares, alloc_);
  ASSERT_TRUE(dirs.ok());
  std::vector<int> fds;
  for (const UniqueFd& dir : *dirs) fds.push_back(dir.get());
  EXPECT_TRUE(CheckSharesReadable(spec->shares, fds, "nobody").ok());
  EXPECT_TRUE(CheckSharesReadable(spec->shares, fds, "").ok()) << "root";

  fs::permissions(root_ + "/vol", fs::perms(0700));
  absl::Status status = CheckSharesReadable(spec->shares, fds, "nobody");
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("volume mount \"/srv/data\": QEMU's user \"nobody\" cannot read host path"));
  EXPECT_THAT(status.message(), HasSubstr("(mode 0700, owner uid 0)"));

  fs::permissions(root_ + "/vol", fs::perms(0755));
  fs::permissions(alloc_ + "/web/secrets", fs::perms(0770));
  EXPECT_THAT(CheckSharesReadable(spec->shares, fds, "nobody").message(),
              HasSubstr("\"share_alloc_dirs\": QEMU's user \"nobody\" cannot read the task's secrets/"));
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
