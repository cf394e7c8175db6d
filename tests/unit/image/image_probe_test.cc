#include "image/image_probe.h"

#include <sys/stat.h>

#include <filesystem>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/temp_dir.h"
#include "host/run_command.h"

namespace ndq {
namespace {

using ::ndq::testing::TempDir;
using ::testing::HasSubstr;

void QemuImg(std::vector<std::string> args) {
  args.insert(args.begin(), "/usr/bin/qemu-img");
  auto out = RunCommand(args, absl::Seconds(30));
  ASSERT_TRUE(out.ok() && out->exit_code == 0) << (out.ok() ? out->output : std::string(out.status().message()));
}

TEST(ImageProbe, PlainQcow2) {
  TempDir dir;
  QemuImg({"create", "-q", "-f", "qcow2", dir / "a.qcow2", "1M"});
  const auto info = ProbeImage(dir / "a.qcow2");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->format, "qcow2");
  EXPECT_TRUE(info->backing.empty());
}

TEST(ImageProbe, RawGoesThroughQemuImg) {
  TempDir dir;
  QemuImg({"create", "-q", "-f", "raw", dir / "a.img", "1M"});
  const auto info = ProbeImage(dir / "a.img");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->format, "raw");
}

TEST(ImageProbe, FollowsTheWholeBackingChainIncludingRelativeNames) {
  TempDir dir;
  QemuImg({"create", "-q", "-f", "raw", dir / "base.img", "1M"});
  QemuImg({"create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.img", dir / "mid.qcow2"});
  QemuImg({"create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", dir / "mid.qcow2", dir / "top.qcow2"});
  const auto info = ProbeImage(dir / "top.qcow2");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->format, "qcow2");
  EXPECT_EQ(info->backing, (std::vector<std::string>{dir / "mid.qcow2", dir / "base.img"}));
}

TEST(ImageProbe, ProtocolBackingFilesAreRefused) {
  TempDir dir;
  QemuImg({"create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "nbd://127.0.0.1:1/x", dir / "a.qcow2", "1M"});
  const auto info = ProbeImage(dir / "a.qcow2");
  ASSERT_FALSE(info.ok());
  EXPECT_THAT(std::string(info.status().message()), HasSubstr("as a protocol"));
}

TEST(ImageProbe, ExternalDataFilesAreRefused) {
  TempDir dir;
  QemuImg({"create", "-q", "-f", "qcow2", "-o", "data_file=" + (dir / "data.raw"), dir / "a.qcow2", "1M"});
  const auto info = ProbeImage(dir / "a.qcow2");
  ASSERT_FALSE(info.ok());
  EXPECT_THAT(std::string(info.status().message()), HasSubstr("external file"));
}

TEST(ImageProbe, MissingImage) {
  const auto info = ProbeImage("/nonexistent/a.qcow2");
  ASSERT_FALSE(info.ok());
  EXPECT_THAT(std::string(info.status().message()), HasSubstr("cannot open image"));
}

}  // namespace
TEST(ImageProbe, DownloadedImagesMustStandAlone) {
  ndq::testing::TempDir tmp;
  const std::filesystem::path dir = tmp.path();
  // A FIFO as the named backing file: following it would block the probe.
  ASSERT_EQ(::mkfifo((dir / "fifo").c_str(), 0600), 0);
  auto made = RunCommand({"/usr/bin/qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b",
                          (dir / "fifo").string(), (dir / "a.qcow2").string(), "1M"},
                         absl::Seconds(30));
  ASSERT_TRUE(made.ok() && made->exit_code == 0);
  absl::StatusOr<std::string> format = ProbeStandaloneFormat(dir / "a.qcow2");
  ASSERT_FALSE(format.ok());
  EXPECT_THAT(std::string(format.status().message()), ::testing::HasSubstr("must stand alone"));
  auto plain = RunCommand({"/usr/bin/qemu-img", "create", "-q", "-f", "qcow2", (dir / "b.qcow2").string(), "1M"},
                          absl::Seconds(30));
  ASSERT_TRUE(plain.ok() && plain->exit_code == 0);
  EXPECT_EQ(ProbeStandaloneFormat(dir / "b.qcow2").value(), "qcow2");
}

// Not qcow2: qemu-img reads the file alone and prints one object, not a list
// (a raw image_source, or a raw image_path without image_format).
TEST(ImageProbe, ARawImageIsProbedAloneToo) {
  TempDir dir;
  QemuImg({"create", "-q", "-f", "raw", dir / "a.img", "1M"});
  absl::StatusOr<std::string> format = ProbeStandaloneFormat(dir / "a.img");
  ASSERT_TRUE(format.ok()) << format.status();
  EXPECT_EQ(*format, "raw");
  AdmissionScope scope{dir.path(), dir.path(), {}};
  absl::StatusOr<AdmittedFile> top = AdmitFile("image_path", dir / "a.img", scope, FileAccess::kReadOnly);
  ASSERT_TRUE(top.ok()) << top.status();
  absl::StatusOr<std::vector<DiskLayer>> chain = OpenImageChain(*std::move(top), "", "image_path", scope);
  ASSERT_TRUE(chain.ok()) << chain.status();
  ASSERT_EQ(chain->size(), 1u);
  EXPECT_EQ((*chain)[0].format, "raw");
}

}  // namespace ndq
