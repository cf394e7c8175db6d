// ImageSources and PrepareTaskDisk with the network source policy and the
// opener for local sources, on real files, the real cache and qemu-img.
#include "image/task_disk.h"

#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "image/checksum.h"
#include "../../support/temp_dir.h"

namespace ndq {
namespace {

using ::ndq::testing::TempDir;
using ::testing::HasSubstr;

const std::string kSum = "sha256:" + std::string(64, 'a');

TEST(ImageSources, NetworkUrlsOutsideTheAllowlistAreRefusedNamingTheField) {
  PluginConfig plugin;
  plugin.image_source_allowlist = {"https://images.example.com/vm/"};
  TaskConfig config;
  config.image_source = "https://images.example.com/vm/a.img";
  config.checksum = kSum;
  EXPECT_TRUE(ImageSources(config, plugin).ok());

  config.image_sources = {"https://images.example.com/vm/b.img", "https://images.example.com.evil.org/vm/a.img"};
  absl::StatusOr<std::vector<std::string>> sources = ImageSources(config, plugin);
  ASSERT_FALSE(sources.ok());
  EXPECT_EQ(sources.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(sources.status().message()), HasSubstr("task config \"image_sources[1]\""));
  EXPECT_THAT(std::string(sources.status().message()), HasSubstr("image_source_allowlist"));

  config.image_sources.clear();
  config.image_source = "http://images.example.com/vm/a.img";  // http, not https
  sources = ImageSources(config, plugin);
  ASSERT_FALSE(sources.ok());
  EXPECT_THAT(std::string(sources.status().message()), HasSubstr("task config \"image_source\""));

  config.image_source = "https://images.example.com/vm/a.img";
  config.checksum.reset();
  config.checksum_url = "https://user@evil.example.net/vm/SHA256SUMS";
  sources = ImageSources(config, plugin);
  ASSERT_FALSE(sources.ok());
  EXPECT_THAT(std::string(sources.status().message()), HasSubstr("task config \"checksum_url\""));

  // Local sources are not network sources: the allowlist does not apply to them.
  config.image_source = "/srv/images/a.img";
  config.checksum_url = "file:///srv/images/SHA256SUMS";
  EXPECT_TRUE(ImageSources(config, plugin).ok());
}

TEST(ImageSources, LinkLocalLiteralsAreRefusedWithoutAnAllowlist) {
  TaskConfig config;
  config.image_source = "http://169.254.169.254/latest/user-data";
  config.checksum = kSum;
  absl::StatusOr<std::vector<std::string>> sources = ImageSources(config, PluginConfig{});
  ASSERT_FALSE(sources.ok());
  EXPECT_THAT(std::string(sources.status().message()),
              HasSubstr("task config \"image_source\": \"http://169.254.169.254/latest/user-data\": the address "
                        "169.254.169.254 is link-local and refused"));
}

class PrepareTaskDiskTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::filesystem::create_directory(dir_ / "task");
    std::string image(1 << 20, '\0');
    for (size_t i = 0; i < image.size(); ++i) image[i] = static_cast<char>(i * 7);
    std::ofstream(dir_ / "disk.raw", std::ios::binary) << image;
    absl::StatusOr<Hasher> h = Hasher::Create("sha256");
    h->Update(image.data(), image.size());
    std::ofstream(dir_ / "SHA256SUMS") << h->FinalHex() << "  disk.raw\n";
    config_.image_source = "file://" + (dir_ / "disk.raw");
    config_.checksum_url = dir_ / "SHA256SUMS";
    config_.image_format = "raw";
  }

  absl::StatusOr<TaskDisk> Prepare(const LocalOpener& opener) {
    return PrepareTaskDisk(config_, {*config_.image_source}, dir_ / "task", PluginConfig{}, cache_,
                           [](const std::string&, const std::map<std::string, std::string>&) {}, opener);
  }

  TempDir dir_;
  ImageCache cache_{dir_ / "cache"};
  TaskConfig config_;
};

TEST_F(PrepareTaskDiskTest, ImageAndChecksumFileGoThroughTheOpener) {
  std::vector<std::string> asked;
  absl::StatusOr<TaskDisk> disk = Prepare([&](const std::string& field, const std::string& path) -> absl::StatusOr<int> {
    asked.push_back(field + " " + path);
    return ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  });
  ASSERT_TRUE(disk.ok()) << disk.status();
  EXPECT_TRUE(std::filesystem::exists(disk->overlay));
  // Each is admitted up front, then opened again where it is read.
  const std::string image = "image_source " + (dir_ / "disk.raw"), sums = "checksum_url " + (dir_ / "SHA256SUMS");
  EXPECT_EQ(asked, (std::vector<std::string>{image, sums, sums, image}));
}

TEST_F(PrepareTaskDiskTest, AnOpenerRefusingTheChecksumFileStopsTheStartBeforeAnyRead) {
  int opened = 0;
  absl::StatusOr<TaskDisk> disk = Prepare([&](const std::string& field, const std::string& path) -> absl::StatusOr<int> {
    if (field == "checksum_url") return absl::PermissionDeniedError("task config \"checksum_url\": refused " + path);
    ++opened;
    return ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  });
  ASSERT_FALSE(disk.ok());
  EXPECT_EQ(disk.status().code(), absl::StatusCode::kPermissionDenied);
  // The opener's answer as it is: no second field prefix, no cache wording.
  EXPECT_EQ(disk.status().message(), "task config \"checksum_url\": refused " + (dir_ / "SHA256SUMS"));
  EXPECT_EQ(opened, 1) << "only the image's admission; nothing was read";
  EXPECT_FALSE(std::filesystem::exists(dir_ / "task/image-overlay.qcow2"));
  EXPECT_TRUE(!std::filesystem::exists(dir_ / "cache") || std::filesystem::is_empty(dir_ / "cache"));
}

}  // namespace
}  // namespace ndq
