// host/disk_lock: reservations against each other, on real files. Each open
// is its own open file description, so its OFD locks meet the others' as two
// processes' would. tests/integration/disk_lock_qemu_test.cc checks the same
// against a real QEMU.
#include "host/disk_lock.h"

#include <fcntl.h>
#include <unistd.h>

#include <fstream>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "base/error_kind.h"
#include "base/unique_fd.h"
#include "../../support/temp_dir.h"

namespace ndq {
namespace {

using ::ndq::testing::TempDir;
using ::testing::HasSubstr;

class DiskLockTest : public ::testing::Test {
 protected:
  DiskLockTest() : path_(tmp_.path() + "/data.raw") { std::ofstream(path_) << std::string(4096, '\0'); }
  UniqueFd Open() const { return UniqueFd(::open(path_.c_str(), O_RDWR | O_CLOEXEC)); }

  TempDir tmp_;
  std::string path_;
};

TEST_F(DiskLockTest, ASecondWriterIsRefusedNamingTheDisk) {
  UniqueFd first = Open(), second = Open();
  ASSERT_TRUE(ReserveDisk(first.get(), true, "disk 1").ok());
  const absl::Status refused = ReserveDisk(second.get(), true, "disk \"data\" (volume \"/srv\" file \"data.raw\")");
  EXPECT_EQ(KindOf(refused), ErrorKind::kConflict) << refused;
  EXPECT_THAT(std::string(refused.message()),
              HasSubstr("disk \"data\" (volume \"/srv\" file \"data.raw\") is in use by another VM"));
}

TEST_F(DiskLockTest, AReaderIsRefusedWhileAWriterHoldsTheDiskAndTheReverse) {
  UniqueFd writer = Open(), reader = Open();
  ASSERT_TRUE(ReserveDisk(writer.get(), true, "w").ok());
  EXPECT_EQ(KindOf(ReserveDisk(reader.get(), false, "r")), ErrorKind::kConflict);
  writer.reset();
  UniqueFd reader2 = Open(), writer2 = Open();
  ASSERT_TRUE(ReserveDisk(reader2.get(), false, "r").ok());
  EXPECT_THAT(std::string(ReserveDisk(writer2.get(), true, "w").message()), HasSubstr("w is in use by another VM"));
}

TEST_F(DiskLockTest, ReadersShareADisk) {
  UniqueFd a = Open(), b = Open();
  EXPECT_TRUE(ReserveDisk(a.get(), false, "a").ok());
  EXPECT_TRUE(ReserveDisk(b.get(), false, "b").ok());
}

// The reservation lives as long as its open file (QEMU's copy of the fd keeps it).
TEST_F(DiskLockTest, ClosingTheHoldersFileFreesTheDisk) {
  UniqueFd first = Open();
  ASSERT_TRUE(ReserveDisk(first.get(), true, "d").ok());
  UniqueFd copy(::dup(first.get()));
  first.reset();
  UniqueFd second = Open();
  EXPECT_FALSE(ReserveDisk(second.get(), true, "d").ok()) << "a dup of the fd still holds it";
  copy.reset();
  EXPECT_TRUE(ReserveDisk(second.get(), true, "d").ok());
}

// A refused reservation takes nothing: once the holder is gone, a third
// writer gets the disk although the refused one still has its file open.
TEST_F(DiskLockTest, ARefusedReservationTakesNothing) {
  UniqueFd holder = Open(), refused = Open(), third = Open();
  ASSERT_TRUE(ReserveDisk(holder.get(), true, "d").ok());
  ASSERT_FALSE(ReserveDisk(refused.get(), false, "d").ok());
  holder.reset();
  EXPECT_TRUE(ReserveDisk(third.get(), true, "d").ok());
}

TEST_F(DiskLockTest, ABadFdIsAnErrorNotAConflict) {
  const absl::Status status = ReserveDisk(-1, true, "d");
  EXPECT_FALSE(status.ok());
  EXPECT_NE(KindOf(status), ErrorKind::kConflict);
  EXPECT_THAT(std::string(status.message()), HasSubstr("cannot check whether d is in use"));
}

}  // namespace
}  // namespace ndq
