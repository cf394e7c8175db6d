#include "base/small_file.h"

#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/temp_dir.h"
#include "absl/strings/str_cat.h"

namespace ndq {
namespace {

using ::ndq::testing::TempDir;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::StartsWith;
namespace fs = std::filesystem;

std::string Write(const TempDir& dir, const std::string& name, const std::string& contents) {
  std::ofstream(dir / name, std::ios::binary) << contents;
  return dir / name;
}

std::string RandomBytes(size_t n) {
  std::mt19937 gen(42);
  std::string bytes(n, '\0');
  for (char& c : bytes) c = static_cast<char>(gen() & 0xff);
  return bytes;
}

TEST(ReadSmallFile, ReturnsTheWholeFileByteForByte) {
  TempDir dir;
  // NULs, no trailing newline, bytes that are not UTF-8.
  const std::string contents("a\0b\xff\n\r\nlast", 11);
  std::string error = "stale";
  std::optional<std::string> read = ReadSmallFile(Write(dir, "f", contents), &error);
  ASSERT_TRUE(read.has_value()) << error;
  EXPECT_EQ(*read, contents);
  EXPECT_THAT(error, IsEmpty()) << "a success clears an earlier error";
}

TEST(ReadSmallFile, AFileLargerThanOneReadComesBackIntact) {
  TempDir dir;
  const std::string contents = RandomBytes(100 * 1000 + 7);
  std::optional<std::string> read = ReadSmallFile(Write(dir, "big", contents));
  ASSERT_TRUE(read.has_value());
  EXPECT_EQ(read->size(), contents.size());
  EXPECT_TRUE(*read == contents);
}

TEST(ReadSmallFile, AnEmptyFileIsAnEmptyStringNotAFailure) {
  TempDir dir;
  std::string error;
  std::optional<std::string> read = ReadSmallFile(Write(dir, "empty", ""), &error);
  ASSERT_TRUE(read.has_value()) << error;
  EXPECT_THAT(*read, IsEmpty());
}

TEST(ReadSmallFile, AMissingFileIsNulloptWithoutAnError) {
  TempDir dir;
  std::string error = "stale";
  EXPECT_FALSE(ReadSmallFile(dir / "absent", &error).has_value());
  EXPECT_THAT(error, IsEmpty());
  EXPECT_FALSE(ReadSmallFile(dir / "no-such-dir/absent", &error).has_value());
  EXPECT_THAT(error, IsEmpty());
  EXPECT_FALSE(ReadSmallFile(dir / "absent").has_value()) << "the error is optional";
}

TEST(ReadSmallFile, MaxBytesIsTheLargestSizeAccepted) {
  TempDir dir;
  std::string error;
  std::optional<std::string> exact = ReadSmallFile(Write(dir, "ten", "0123456789"), &error, 10);
  ASSERT_TRUE(exact.has_value()) << error;
  EXPECT_EQ(*exact, "0123456789");

  const std::string eleven = Write(dir, "eleven", "0123456789A");
  EXPECT_FALSE(ReadSmallFile(eleven, &error, 10).has_value());
  EXPECT_THAT(error, HasSubstr(eleven));
  EXPECT_THAT(error, HasSubstr("larger than 10 bytes"));
}

TEST(ReadSmallFile, TheDefaultLimitIsOneMebibyte) {
  TempDir dir;
  std::string error;
  EXPECT_TRUE(ReadSmallFile(Write(dir, "1m", std::string(1 << 20, 'x')), &error).has_value()) << error;
  EXPECT_FALSE(ReadSmallFile(Write(dir, "1m+1", std::string((1 << 20) + 1, 'x')), &error).has_value());
  EXPECT_THAT(error, HasSubstr("larger than"));
}

TEST(ReadSmallFile, ASymlinkIsReadThroughAndADanglingOneIsMissing) {
  TempDir dir;
  const std::string target = Write(dir, "target", "through the link");
  fs::create_symlink(target, dir / "link");
  EXPECT_EQ(ReadSmallFile(dir / "link").value_or("<none>"), "through the link");

  fs::create_symlink(dir / "nowhere", dir / "dangling");
  std::string error = "stale";
  EXPECT_FALSE(ReadSmallFile(dir / "dangling", &error).has_value());
  EXPECT_THAT(error, IsEmpty());
}

TEST(ReadSmallFile, ASymlinkLoopIsAnError) {
  TempDir dir;
  fs::create_symlink(dir / "b", dir / "a");
  fs::create_symlink(dir / "a", dir / "b");
  std::string error;
  EXPECT_FALSE(ReadSmallFile(dir / "a", &error).has_value());
  EXPECT_THAT(error, StartsWith("open " + (dir / "a")));
}

// A symlink cannot sneak a big file past the limit.
TEST(ReadSmallFile, TheLimitAppliesToTheSymlinkTarget) {
  TempDir dir;
  fs::create_symlink(Write(dir, "big", std::string(4096, 'x')), dir / "small-looking");
  std::string error;
  EXPECT_FALSE(ReadSmallFile(dir / "small-looking", &error, 100).has_value());
  EXPECT_THAT(error, HasSubstr("larger than 100 bytes"));
}

TEST(ReadSmallFile, ADirectoryIsAnErrorNotAnEmptyFile) {
  TempDir dir;
  std::string error;
  EXPECT_FALSE(ReadSmallFile(dir.path(), &error).has_value());
  EXPECT_THAT(error, HasSubstr(dir.path()));
  EXPECT_THAT(error, HasSubstr("directory"));
}

// Only ENOENT means "no file yet"; a path that cannot exist is a real error.
TEST(ReadSmallFile, APathThroughARegularFileIsAnErrorNotMissing) {
  TempDir dir;
  const std::string file = Write(dir, "file", "x");
  std::string error;
  EXPECT_FALSE(ReadSmallFile(file + "/child", &error).has_value());
  EXPECT_THAT(error, HasSubstr("Not a directory"));
}

// /proc files claim a size of 0: only reading to the end finds their contents.
TEST(ReadSmallFile, ReadsProcFilesThatReportNoSize) {
  struct stat st;
  ASSERT_EQ(::stat("/proc/self/status", &st), 0);
  ASSERT_EQ(st.st_size, 0);
  std::optional<std::string> status = ReadSmallFile("/proc/self/status");
  ASSERT_TRUE(status.has_value());
  EXPECT_THAT(*status, HasSubstr(absl::StrCat("\nPid:\t", ::getpid(), "\n")));

  std::string error;
  EXPECT_FALSE(ReadSmallFile("/proc/self/status", &error, 16).has_value());
  EXPECT_THAT(error, HasSubstr("larger than 16 bytes"));
}

TEST(WriteSmallFileAtomically, ReplacesTheFileWholeWithMode0600AndLeavesNoTemporary) {
  TempDir dir;
  const std::string path = dir / "facts.json";
  ASSERT_TRUE(WriteSmallFileAtomically(path, "first").ok());
  ASSERT_TRUE(WriteSmallFileAtomically(path, "second, longer").ok());
  EXPECT_EQ(ReadSmallFile(path), "second, longer");
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()), 1);
}

TEST(WriteSmallFileAtomically, ALinkInThePlaceIsReplacedNotFollowed) {
  TempDir dir;
  const std::string victim = Write(dir, "victim", "untouched");
  const std::string path = dir / "facts.json";
  fs::create_symlink(victim, path);
  ASSERT_TRUE(WriteSmallFileAtomically(path, "new").ok());
  EXPECT_EQ(ReadSmallFile(victim), "untouched");
  EXPECT_FALSE(fs::is_symlink(path));
  EXPECT_EQ(ReadSmallFile(path), "new");
}

TEST(WriteSmallFileAtomically, AnUnwritableDirectoryIsAnErrorNamingThePath) {
  const absl::Status status = WriteSmallFileAtomically("/nonexistent-dir/facts.json", "x");
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(std::string(status.message()), ::testing::HasSubstr("/nonexistent-dir/facts.json"));
}

}  // namespace
}  // namespace ndq
