// host/disk_lock against a real QEMU 7.2: a disk QEMU has open is seen as in
// use, and a disk the driver has reserved is one QEMU refuses to open, so the
// driver's reservation and QEMU's own locks are the same locks.
#include <fcntl.h>

#include <fstream>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "base/error_kind.h"
#include "base/unique_fd.h"
#include "host/disk_lock.h"
#include "host/run_command.h"
#include "../support/child_process.h"
#include "../support/eventually.h"
#include "../support/temp_dir.h"

namespace ndq {
namespace {

using ::ndq::testing::ChildProcess;
using ::ndq::testing::Eventually;
using ::ndq::testing::TempDir;
using ::testing::HasSubstr;

// A paused QEMU with `disk` as a raw virtio disk, read-only if asked.
std::vector<std::string> QemuWithDisk(const std::string& disk, bool readonly) {
  return {"/usr/bin/qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-machine", "pc,accel=tcg",
          "-drive", "file=" + disk + ",format=raw,if=none,id=d" + (readonly ? ",readonly=on" : ""),
          "-device", "virtio-blk-pci,drive=d"};
}

class DiskLockQemuTest : public ::testing::Test {
 protected:
  DiskLockQemuTest() : disk_(tmp_.path() + "/data.raw") { std::ofstream(disk_) << std::string(1 << 20, '\0'); }
  UniqueFd Open() const { return UniqueFd(::open(disk_.c_str(), O_RDWR | O_CLOEXEC)); }
  // Whether a fresh reservation is refused as a conflict (and then took nothing).
  bool InUse(bool writable) const {
    UniqueFd fd = Open();
    return KindOf(ReserveDisk(fd.get(), writable, "the disk")) == ErrorKind::kConflict;
  }

  TempDir tmp_;
  std::string disk_;
};

TEST_F(DiskLockQemuTest, ADiskAQemuWritesIsInUseForWritersAndReaders) {
  ASSERT_FALSE(InUse(true));
  ChildProcess qemu(QemuWithDisk(disk_, false));
  ASSERT_GT(qemu.pid(), 0);
  EXPECT_TRUE(Eventually([this] { return InUse(true); }, absl::Seconds(30))) << "QEMU's write lock never seen";
  EXPECT_TRUE(InUse(false));
}

TEST_F(DiskLockQemuTest, ADiskAQemuReadsMayBeReadButNotWritten) {
  ChildProcess qemu(QemuWithDisk(disk_, true));
  ASSERT_GT(qemu.pid(), 0);
  EXPECT_TRUE(Eventually([this] { return InUse(true); }, absl::Seconds(30))) << "QEMU's read lock never seen";
  EXPECT_FALSE(InUse(false));
}

TEST_F(DiskLockQemuTest, QemuRefusesADiskTheDriverReservedForAnotherVm) {
  UniqueFd reserved = Open();
  ASSERT_TRUE(ReserveDisk(reserved.get(), true, "the disk").ok());
  absl::StatusOr<CommandResult> run = RunCommand(QemuWithDisk(disk_, false), absl::Seconds(60));
  ASSERT_TRUE(run.ok()) << run.status();
  EXPECT_NE(run->exit_code, 0);
  EXPECT_THAT(run->output, HasSubstr("Failed to get \"write\" lock"));
  reserved.reset();
  EXPECT_FALSE(InUse(true));
}

}  // namespace
}  // namespace ndq
