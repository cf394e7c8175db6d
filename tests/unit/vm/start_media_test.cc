// vm/start_media: what the "prepare media" stage makes in a real task dir
// (blank disks, a grown job file's overlay, the cloud-init seed, the UEFI
// variable store), what it keeps across starts, its refusals, and its rollback.
#include "vm/start_media.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/files.h"
#include "../../support/temp_dir.h"
#include "image/image_probe.h"

namespace ndq {
namespace {

using ::ndq::testing::ReadFile;

namespace fs = std::filesystem;
using ::ndq::testing::TempDir;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

int64_t VirtualSize(const std::string& path, const std::string& format) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  return ImageVirtualSize(fd.get(), format).value_or(-1);
}

Drive Blank(const std::string& id, const std::string& format, int64_t bytes) {
  Drive drive;
  drive.id = id;
  drive.source.origin = DriveOrigin::kBlank;
  drive.source.field = "disk[0]";
  drive.source.format = format;
  drive.source.size_bytes = bytes;
  return drive;
}

class Media : public ::testing::Test {
 protected:
  void SetUp() override {
    task_.identity.name = "Web_Task";
    task_.identity.alloc_id = "8d2f0c1e-alloc";
    task_.alloc_dir = root_ / "alloc";
    task_dir_ = task_.task_dir();
    fs::create_directories(task_dir_);
    scope_ = AdmissionScope{task_dir_, task_.alloc_dir, {}};
  }

  absl::StatusOr<MediaFiles> Prepare(Rollback& rollback) {
    MediaContext context{task_, config_, plugin_, scope_, nullptr,
                         [this](const std::string& m, const std::map<std::string, std::string>&) { events_.push_back(m); },
                         cancelled_, "task-key", &owned_};
    return PrepareMedia(spec_, context, rollback);
  }

  std::vector<std::string> TaskDirFiles() const {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(task_dir_)) names.push_back(entry.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }

  TempDir root_;
  TaskRequest task_;
  std::string task_dir_;
  AdmissionScope scope_;
  TaskConfig config_;
  PluginConfig plugin_;
  VmSpec spec_;
  VmResources owned_;
  std::function<bool()> cancelled_;
  std::vector<std::string> events_;
};

TEST_F(Media, BlankDisksAreMadeSparseAtTheirSize) {
  spec_.drives = {Blank("disk1", "raw", 8 << 20), Blank("disk2", "qcow2", 64 << 20)};
  Rollback rollback;
  absl::StatusOr<MediaFiles> media = Prepare(rollback);
  ASSERT_TRUE(media.ok()) << media.status();
  ASSERT_EQ(media->drives.size(), 2u);
  EXPECT_EQ(media->drives[0].path, task_dir_ + "/disk1.raw");
  EXPECT_EQ(media->drives[0].format, "raw");
  EXPECT_EQ(media->drives[1].path, task_dir_ + "/disk2.qcow2");
  EXPECT_EQ(media->drives[1].format, "qcow2");
  struct stat st;
  ASSERT_EQ(::stat(media->drives[0].path.c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 8 << 20);
  EXPECT_LT(st.st_blocks * 512, 8 << 20) << "sparse";
  EXPECT_EQ(VirtualSize(media->drives[1].path, "qcow2"), 64 << 20);
  EXPECT_TRUE(media->uefi_vars.empty());
  rollback.RunNow();
  EXPECT_THAT(TaskDirFiles(), IsEmpty()) << "a failed start removes what it made";
}

// A restarted task finds its data: an existing blank disk is kept as it is,
// and a failed start does not remove it.
TEST_F(Media, AnExistingBlankDiskIsKept) {
  std::ofstream(task_dir_ + "/disk1.raw") << "the guest's data";
  spec_.drives = {Blank("disk1", "raw", 8 << 20)};
  Rollback rollback;
  ASSERT_TRUE(Prepare(rollback).ok());
  rollback.RunNow();
  EXPECT_EQ(ReadFile(task_dir_ + "/disk1.raw"), "the guest's data");
}

TEST_F(Media, ABlankDiskNeedsTheTaskDir) {
  fs::remove_all(task_dir_);
  spec_.drives = {Blank("disk1", "raw", 8 << 20)};
  Rollback rollback;
  EXPECT_THAT(std::string(Prepare(rollback).status().message()), HasSubstr("cannot open task dir " + task_dir_));
}

Drive JobFile(const std::string& path, int64_t grow_to) {
  Drive drive;
  drive.id = "disk1";
  drive.source.origin = DriveOrigin::kJobFile;
  drive.source.field = "disk[0].image_path";
  drive.source.path = path;
  drive.source.format = "raw";
  drive.source.size_bytes = grow_to;
  return drive;
}

// A job file is used as it is, or under an overlay when `size` grows it; never shrunk.
TEST_F(Media, AJobFileIsGrownByAnOverlayNeverShrunk) {
  const std::string data = task_dir_ + "/data.img";
  std::ofstream(data) << "job data";
  fs::resize_file(data, 1 << 20);
  spec_.drives = {JobFile(data, 0)};
  Rollback rollback;
  absl::StatusOr<MediaFiles> media = Prepare(rollback);
  ASSERT_TRUE(media.ok()) << media.status();
  EXPECT_EQ(media->drives[0].path, data);
  EXPECT_EQ(TaskDirFiles(), std::vector<std::string>{"data.img"});

  spec_.drives = {JobFile(data, 4 << 20)};
  media = Prepare(rollback);
  ASSERT_TRUE(media.ok()) << media.status();
  EXPECT_EQ(media->drives[0].path, task_dir_ + "/disk1-overlay.qcow2");
  EXPECT_EQ(media->drives[0].format, "qcow2");
  EXPECT_EQ(VirtualSize(media->drives[0].path, "qcow2"), 4 << 20);
  EXPECT_EQ(fs::file_size(data), 1u << 20) << "the job's file is untouched";
  rollback.RunNow();
  EXPECT_EQ(TaskDirFiles(), std::vector<std::string>{"data.img"});

  spec_.drives = {JobFile(data, 512 << 10)};
  absl::Status shrunk = Prepare(rollback).status();
  EXPECT_TRUE(absl::IsInvalidArgument(shrunk)) << shrunk;
  EXPECT_THAT(std::string(shrunk.message()), HasSubstr("disk[0].size"));
  EXPECT_THAT(std::string(shrunk.message()), HasSubstr("is below the image's own size"));
}

TEST_F(Media, AJobFileOutsideTheAllocIsRefused) {
  std::ofstream(root_ / "elsewhere.img") << "not the job's";
  spec_.drives = {JobFile(root_ / "elsewhere.img", 4 << 20)};
  Rollback rollback;
  absl::Status refused = Prepare(rollback).status();
  EXPECT_FALSE(refused.ok());
  EXPECT_THAT(std::string(refused.message()), HasSubstr("disk[0].image_path"));
  EXPECT_THAT(TaskDirFiles(), IsEmpty());
}

Drive Seed() {
  Drive drive;
  drive.id = "seed0";
  drive.media = DriveMedia::kCdrom;
  drive.source.origin = DriveOrigin::kSeed;
  drive.source.field = "cloud_init";
  return drive;
}

// The seed holds the job's documents (inline or from a file in the task dir)
// and, without meta_data, the alloc's instance-id and the task's hostname.
TEST_F(Media, TheSeedHoldsTheJobsDocuments) {
  std::ofstream(task_dir_ + "/network.yaml") << "version: 2\nethernets: {}\n";
  config_.cloud_init = CloudInitConfig{};
  config_.cloud_init->user_data = "#cloud-config\nruncmd: [echo, from-the-job]\n";
  config_.cloud_init->network_config_file = task_dir_ + "/network.yaml";
  spec_.drives = {Seed()};
  Rollback rollback;
  absl::StatusOr<MediaFiles> media = Prepare(rollback);
  ASSERT_TRUE(media.ok()) << media.status();
  EXPECT_EQ(media->drives[0].path, task_dir_ + "/cidata.iso");
  EXPECT_EQ(media->drives[0].format, "raw");
  const std::string iso = ReadFile(media->drives[0].path);
  EXPECT_THAT(iso, HasSubstr("runcmd: [echo, from-the-job]"));
  EXPECT_THAT(iso, HasSubstr("ethernets: {}"));
  EXPECT_THAT(iso, HasSubstr("8d2f0c1e-alloc"));
  EXPECT_THAT(iso, HasSubstr("web-task"));
  EXPECT_THAT(events_, ::testing::Contains("cloud-init seed built"));
  rollback.RunNow();
  EXPECT_EQ(TaskDirFiles(), std::vector<std::string>{"network.yaml"});
}

TEST_F(Media, ASeedItCannotBuildLeavesNothing) {
  config_.cloud_init = CloudInitConfig{};
  config_.cloud_init->user_data_file = root_ / "outside.yaml";
  std::ofstream(root_ / "outside.yaml") << "#cloud-config\n";
  spec_.drives = {Seed()};
  Rollback rollback;
  absl::Status refused = Prepare(rollback).status();
  EXPECT_THAT(std::string(refused.message()), HasSubstr("cloud_init.user_data_file"));
  config_.cloud_init->user_data_file.reset();
  config_.cloud_init->ssh_authorized_keys = {"ssh-rsa AAAA\nruncmd: [reboot]"};
  refused = Prepare(rollback).status();
  EXPECT_FALSE(refused.ok());
  EXPECT_THAT(TaskDirFiles(), IsEmpty());
}

// The task's copy of the UEFI variables is made once: the guest's boot
// entries survive a restart.
TEST_F(Media, TheUefiVariablesAreCopiedOnce) {
  std::ofstream(root_ / "OVMF_VARS.fd") << "empty variable store";
  spec_.firmware.uefi = true;
  spec_.firmware.files.vars = root_ / "OVMF_VARS.fd";
  Rollback rollback;
  absl::StatusOr<MediaFiles> media = Prepare(rollback);
  ASSERT_TRUE(media.ok()) << media.status();
  EXPECT_EQ(media->uefi_vars, task_dir_ + "/uefi-vars.fd");
  EXPECT_EQ(ReadFile(media->uefi_vars), "empty variable store");
  rollback.Commit();
  std::ofstream(media->uefi_vars) << "boot entries the guest wrote";
  Rollback again;
  ASSERT_TRUE(Prepare(again).ok());
  again.RunNow();
  EXPECT_EQ(ReadFile(task_dir_ + "/uefi-vars.fd"), "boot entries the guest wrote");
}

TEST_F(Media, AMissingUefiTemplateIsAnErrorAndLeavesNothing) {
  spec_.firmware.uefi = true;
  spec_.firmware.files.vars = root_ / "no-such-OVMF_VARS.fd";
  Rollback rollback;
  absl::Status status = Prepare(rollback).status();
  EXPECT_THAT(std::string(status.message()), HasSubstr("cannot read the UEFI variable template " + root_ / "no-such-OVMF_VARS.fd"));
  rollback.RunNow();
  EXPECT_THAT(TaskDirFiles(), IsEmpty());
}

TEST_F(Media, ACancelledStartMakesNothing) {
  spec_.drives = {Blank("disk1", "raw", 8 << 20)};
  cancelled_ = [] { return true; };
  Rollback rollback;
  EXPECT_TRUE(absl::IsCancelled(Prepare(rollback).status()));
  EXPECT_THAT(TaskDirFiles(), IsEmpty());
}

}  // namespace
}  // namespace ndq
