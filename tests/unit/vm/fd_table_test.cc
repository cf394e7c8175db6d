// The files one start hands to QEMU: numbered from kFirstPassedFd in the order
// added, looked up by that number, bounded by what the supervisor passes on.
#include "vm/fd_table.h"

#include <fcntl.h>
#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace ndq {
namespace {

using ::testing::ElementsAre;

UniqueFd DevNull() { return UniqueFd(::open("/dev/null", O_RDONLY | O_CLOEXEC)); }

bool IsOpen(int fd) { return ::fcntl(fd, F_GETFD) != -1; }

TEST(FdTable, NumbersFollowTheOrderFilesWereAdded) {
  FdTable table;
  EXPECT_EQ(table.Add(DevNull()), supervisor::kFirstPassedFd);
  EXPECT_EQ(table.Add(DevNull()), supervisor::kFirstPassedFd + 1);
  EXPECT_EQ(table.size(), 2u);
}

TEST(FdTable, ANumberLeadsBackToTheDriversOwnDescriptor) {
  FdTable table;
  UniqueFd first = DevNull();
  const int local = first.get();
  const int in_qemu = table.Add(std::move(first));
  EXPECT_EQ(table.Local(in_qemu), local);
  EXPECT_THAT(table.Locals(), ElementsAre(local));
  EXPECT_EQ(table.Local(in_qemu + 1), -1) << "a number it never handed out";
  EXPECT_EQ(table.Local(0), -1);
}

TEST(FdTable, FitsWhatTheSupervisorCanPassOn) {
  FdTable table;
  EXPECT_TRUE(table.Fits(supervisor::kMaxPassedFds));
  EXPECT_FALSE(table.Fits(supervisor::kMaxPassedFds + 1));
  for (int i = 0; i < supervisor::kMaxPassedFds; ++i) table.Add(DevNull());
  EXPECT_TRUE(table.Fits(0));
  EXPECT_FALSE(table.Fits(1));
}

TEST(FdTable, CloseAndDestructionCloseEveryFile) {
  int local = -1;
  {
    FdTable table;
    UniqueFd fd = DevNull();
    local = fd.get();
    table.Add(std::move(fd));
    ASSERT_TRUE(IsOpen(local));
  }
  EXPECT_FALSE(IsOpen(local)) << "a failed start leaves no file open";
  FdTable table;
  UniqueFd fd = DevNull();
  local = fd.get();
  table.Add(std::move(fd));
  table.Close();
  EXPECT_FALSE(IsOpen(local));
  EXPECT_EQ(table.size(), 0u);
}

}  // namespace
}  // namespace ndq
