// Opening planned shares on a real file system: Nomad's own dirs without
// following links, volumes through theirs, and QEMU's user checked against
// each root's mode. Planning them: tests/unit/qemu/share_plan_test.cc.
#include "vm/share_dirs.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>

#include "../../support/temp_dir.h"

namespace ndq {
namespace {

namespace fs = std::filesystem;
using ::ndq::testing::TempDir;
using ::testing::HasSubstr;
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

// The shares planning gives task "web" with share_alloc_dirs, in a real alloc
// dir laid out as Nomad makes it, and a volume dir beside it.
class ShareDirs : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::canonical(tmp_.path()).string();
    alloc_ = root_ + "/a";
    for (const char* dir : {"/alloc/logs", "/web/local", "/web/secrets"}) fs::create_directories(alloc_ + dir);
    fs::create_directories(root_ + "/vol");
  }
  static std::vector<Share> AllocDirs() {
    return {Share{"alloc", ShareOrigin::kAllocDir, "alloc", false},
            Share{"local", ShareOrigin::kAllocDir, "web/local", false},
            Share{"secrets", ShareOrigin::kAllocDir, "web/secrets", true}};
  }
  static Share Volume(const std::string& tag, const std::string& host_path, bool read_only = false) {
    return Share{tag, ShareOrigin::kVolume, host_path, read_only};
  }
  // "" or the error.
  std::string OpenError(const std::vector<Share>& shares) const {
    absl::StatusOr<std::vector<UniqueFd>> dirs = OpenShareDirs(shares, alloc_);
    return dirs.ok() ? "" : std::string(dirs.status().message());
  }

  TempDir tmp_;
  std::string root_, alloc_;
};

TEST_F(ShareDirs, EachShareIsOpenedInOrder) {
  std::vector<Share> shares = AllocDirs();
  shares.push_back(Volume("/srv/data", root_ + "/vol", true));
  absl::StatusOr<std::vector<UniqueFd>> dirs = OpenShareDirs(shares, alloc_);
  ASSERT_TRUE(dirs.ok()) << dirs.status();
  ASSERT_EQ(dirs->size(), 4u);
  EXPECT_EQ(InodeOf((*dirs)[0].get()), InodeOf(alloc_ + "/alloc"));
  EXPECT_EQ(InodeOf((*dirs)[1].get()), InodeOf(alloc_ + "/web/local"));
  EXPECT_EQ(InodeOf((*dirs)[2].get()), InodeOf(alloc_ + "/web/secrets"));
  EXPECT_EQ(InodeOf((*dirs)[3].get()), InodeOf(root_ + "/vol"));
  absl::StatusOr<std::vector<UniqueFd>> none = OpenShareDirs({}, alloc_);
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
}

TEST_F(ShareDirs, VolumeHostPathMustBeADirectory) {
  EXPECT_THAT(OpenError({Volume("/srv/missing", root_ + "/nope")}),
              HasSubstr("volume mount \"/srv/missing\": host path \"" + root_ + "/nope\" does not exist"));
  std::ofstream(root_ + "/file") << "x";
  EXPECT_THAT(OpenError({Volume("/srv/file", root_ + "/file")}),
              HasSubstr("volume mount \"/srv/file\": host path \"" + root_ + "/file\" is not a directory"));
}

TEST_F(ShareDirs, VolumeLinksAreResolvedToTheirDirectory) {
  fs::create_directory_symlink(root_ + "/vol", root_ + "/vol-link");
  absl::StatusOr<std::vector<UniqueFd>> dirs = OpenShareDirs({Volume("/srv/data", root_ + "/vol-link")}, alloc_);
  ASSERT_TRUE(dirs.ok()) << dirs.status();
  EXPECT_EQ(InodeOf((*dirs)[0].get()), InodeOf(root_ + "/vol"));
}

TEST_F(ShareDirs, AllocDirsReplacedByLinksAreRefusedWithoutNamingTheTarget) {
  fs::remove_all(alloc_ + "/web/local");
  fs::create_directory_symlink("/etc", alloc_ + "/web/local");
  std::string error = OpenError(AllocDirs());
  EXPECT_THAT(error, HasSubstr("\"share_alloc_dirs\": the task's local/ is a symbolic link"));
  EXPECT_THAT(error, Not(HasSubstr("/etc")));

  fs::remove(alloc_ + "/web/local");
  fs::create_directory(alloc_ + "/web/local");
  fs::remove_all(alloc_ + "/alloc");
  fs::create_directory_symlink(root_ + "/vol", alloc_ + "/alloc");
  EXPECT_THAT(OpenError(AllocDirs()), HasSubstr("the alloc's alloc/ is a symbolic link"));

  fs::remove(alloc_ + "/alloc");
  fs::create_directory(alloc_ + "/alloc");
  fs::remove_all(alloc_ + "/web/secrets");
  EXPECT_THAT(OpenError(AllocDirs()), HasSubstr("the task's secrets/ does not exist"));
  std::ofstream(alloc_ + "/web/secrets") << "x";
  EXPECT_THAT(OpenError(AllocDirs()), HasSubstr("the task's secrets/ is not a directory"));
}

// QEMU reopens each root as its user; one it cannot read is named up front.
TEST_F(ShareDirs, QemuUserMustBeAbleToReadEveryRoot) {
  std::vector<Share> shares = AllocDirs();
  shares.push_back(Volume("/srv/data", root_ + "/vol", true));
  for (const char* dir : {"/a/alloc", "/a/web/local", "/a/web/secrets", "/vol"}) {
    fs::permissions(root_ + dir, fs::perms(0777));
  }
  fs::permissions(alloc_ + "/alloc", fs::perms(0755));  // as Nomad makes it: readable, not writable
  absl::StatusOr<std::vector<UniqueFd>> dirs = OpenShareDirs(shares, alloc_);
  ASSERT_TRUE(dirs.ok());
  std::vector<int> fds;
  for (const UniqueFd& dir : *dirs) fds.push_back(dir.get());
  EXPECT_TRUE(CheckSharesReadable(shares, fds, "nobody").ok());
  EXPECT_TRUE(CheckSharesReadable(shares, fds, "").ok()) << "root";

  fs::permissions(root_ + "/vol", fs::perms(0700));
  absl::Status status = CheckSharesReadable(shares, fds, "nobody");
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("volume mount \"/srv/data\": QEMU's user \"nobody\" cannot read host path"));
  EXPECT_THAT(status.message(), HasSubstr("(mode 0700, owner uid 0)"));

  fs::permissions(root_ + "/vol", fs::perms(0755));
  fs::permissions(alloc_ + "/web/secrets", fs::perms(0770));
  EXPECT_THAT(CheckSharesReadable(shares, fds, "nobody").message(),
              HasSubstr("\"share_alloc_dirs\": QEMU's user \"nobody\" cannot read the task's secrets/"));
  EXPECT_THAT(CheckSharesReadable(shares, fds, "no-such-user-ndq").message(),
              HasSubstr("QEMU's user \"no-such-user-ndq\" does not exist"));
}

}  // namespace
}  // namespace ndq
