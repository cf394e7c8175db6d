// Undo steps: newest first, unless committed; an fd that closes itself.
#include "base/rollback.h"

#include <fcntl.h>
#include <unistd.h>

#include <vector>

#include <gtest/gtest.h>

#include "base/unique_fd.h"

namespace ndq {
namespace {

TEST(Rollback, UndoesNewestFirstWhenLeftUncommitted) {
  std::vector<int> order;
  {
    Rollback rollback;
    for (int i = 1; i <= 3; ++i) rollback.Push([&order, i] { order.push_back(i); });
  }
  EXPECT_EQ(order, (std::vector<int>{3, 2, 1}));
}

TEST(Rollback, ACommittedRollbackUndoesNothing) {
  int undone = 0;
  {
    Rollback rollback;
    rollback.Push([&] { ++undone; });
    rollback.Commit();
  }
  EXPECT_EQ(undone, 0);
}

TEST(Rollback, RunNowUndoesOnceAndStepsPushedLaterStillRun) {
  std::vector<int> order;
  {
    Rollback rollback;
    rollback.Push([&] { order.push_back(1); });
    rollback.RunNow();
    rollback.RunNow();
    rollback.Push([&] { order.push_back(2); });
  }
  EXPECT_EQ(order, (std::vector<int>{1, 2}));
}

bool IsOpen(int fd) { return ::fcntl(fd, F_GETFD) != -1; }

TEST(UniqueFd, ClosesOnDestructionAndResetButNotAfterRelease) {
  int raw;
  {
    UniqueFd fd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    ASSERT_TRUE(fd.valid());
    raw = fd.get();
  }
  EXPECT_FALSE(IsOpen(raw));
  UniqueFd fd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  raw = fd.get();
  fd.reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  EXPECT_FALSE(IsOpen(raw)) << "reset closes the old fd";
  const int kept = fd.release();
  EXPECT_FALSE(fd.valid());
  EXPECT_TRUE(IsOpen(kept));
  ::close(kept);
}

TEST(UniqueFd, MovingHandsOverTheOneOwner) {
  UniqueFd a(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  const int raw = a.get();
  UniqueFd b = std::move(a);
  EXPECT_FALSE(a.valid());
  EXPECT_EQ(b.get(), raw);
  UniqueFd c;
  c = std::move(b);
  EXPECT_EQ(c.get(), raw);
  EXPECT_TRUE(IsOpen(raw));
}

}  // namespace
}  // namespace ndq
