#include "qemu_driver/image_probe.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../support/temp_dir.h"
#include "qemu_driver/run_command.h"

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
}  // namespace ndq
