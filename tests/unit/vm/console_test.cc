// vm/console's host side, on real files in a temp dir: its directory and
// the serial tail a failed boot reports.
#include "vm/console.h"

#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/temp_dir.h"
#include "base/error_kind.h"

namespace ndq {
namespace {

namespace fs = std::filesystem;
using ::ndq::testing::TempDir;
using ::testing::HasSubstr;

ConsolePlan PlanIn(const std::string& task_dir) {
  return ConsolePlan{true, task_dir + "/console", task_dir + "/console/serial.sock", task_dir + "/console/vnc.sock"};
}

TEST(ConsoleDir, MadePrivateClearedOfOldSocketsAndRemovedByTheUndo) {
  TempDir tmp;
  const ConsolePlan plan = PlanIn(tmp.path());
  fs::create_directories(plan.dir);
  std::ofstream(plan.vnc_socket) << "left by a previous run";
  {
    Rollback rollback;
    ASSERT_TRUE(MakeConsoleDir(plan, std::nullopt, rollback).ok());
    struct stat st;
    ASSERT_EQ(::stat(plan.dir.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0700u);
    EXPECT_FALSE(fs::exists(plan.vnc_socket));
  }  // not committed: the undo runs
  EXPECT_FALSE(fs::exists(plan.dir));
}

TEST(ConsoleDir, ALinkInItsPlaceIsRefused) {
  TempDir tmp, elsewhere;
  const ConsolePlan plan = PlanIn(tmp.path());
  ASSERT_EQ(::symlink(elsewhere.path().c_str(), plan.dir.c_str()), 0);
  Rollback rollback;
  const absl::Status status = MakeConsoleDir(plan, std::nullopt, rollback);
  EXPECT_THAT(std::string(status.message()), HasSubstr("is not a directory the driver made"));
  EXPECT_EQ(KindOf(status), ErrorKind::kRefused) << "the same on every retry";
  rollback.Commit();
  EXPECT_TRUE(fs::is_symlink(plan.dir));
}

TEST(ConsoleDir, RemoveLeavesOtherFiles) {
  TempDir tmp;
  const ConsolePlan plan = PlanIn(tmp.path());
  fs::create_directories(plan.dir);
  std::ofstream(plan.serial_socket) << "";
  std::ofstream(plan.dir + "/operator-notes") << "keep";
  RemoveConsoleDir(plan.dir);
  EXPECT_FALSE(fs::exists(plan.serial_socket));
  EXPECT_TRUE(fs::exists(plan.dir + "/operator-notes"));
  RemoveConsoleDir("");  // no console: nothing to do
}

TEST(LastLines, KeepsTheLastLinesWithoutTerminalControl) {
  const std::string serial =
      "\x1b" "c\x1b[?7l\x1b[2J\x1b[0mSeaBIOS\r\n\r\nBooting from Hard Disk...\r\n\x1b" "c\x1b[2JGUEST-HANG\r\n";
  EXPECT_EQ(LastLines(serial, 20), "SeaBIOS\n\nBooting from Hard Disk...\nGUEST-HANG");
  EXPECT_EQ(LastLines(serial, 2), "Booting from Hard Disk...\nGUEST-HANG");
  EXPECT_EQ(LastLines(serial, 1), "GUEST-HANG");
  EXPECT_EQ(LastLines("", 20), "");
  EXPECT_EQ(LastLines("no newline", 3), "no newline");
  EXPECT_EQ(LastLines("a\tb\x07\x01\n", 3), "a\tb");
}

}  // namespace
}  // namespace ndq
