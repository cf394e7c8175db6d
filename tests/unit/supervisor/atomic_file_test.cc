// WriteFileAtomically on a real directory: the state files (qemu.pid,
// exit.json) the plugin reads while the supervisor may be writing them.
#include "../../../src/supervisor/atomic_file.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/temp_dir.h"
#include "supervisor_test_util.h"

namespace ndq::supervisor {
namespace {

using ::ndq::testing::TempDir;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using namespace ::ndq::supervisor::test_util;

class AtomicFile : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(dir_.path().empty());
    dir_fd_ = ::open(dir_.path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    ASSERT_GE(dir_fd_, 0);
  }
  void TearDown() override {
    if (dir_fd_ >= 0) ::close(dir_fd_);
  }

  bool Write(const std::string& name, const std::string& data, ErrorText* error) {
    return WriteFileAtomically(dir_fd_, name.c_str(), data.data(), data.size(), error);
  }

  ScopedUmask umask_{0};  // the modes asserted are the code's, not the environment's
  TempDir dir_;
  TempDir elsewhere_;  // outside the state directory: where planted links point
  int dir_fd_ = -1;
};

TEST_F(AtomicFile, WritesExactlyTheBytesWithMode0640AndNoTempFileLeft) {
  const std::string data("4242\n\0after a NUL", 17);  // the length counts, not a terminator
  ErrorText error;
  ASSERT_TRUE(Write("qemu.pid", data, &error)) << error.text;
  EXPECT_TRUE(error.empty());
  EXPECT_EQ(ReadFileText(dir_ / "qemu.pid"), data);
  struct stat st {};
  ASSERT_EQ(::lstat((dir_ / "qemu.pid").c_str(), &st), 0);
  EXPECT_TRUE(S_ISREG(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0640u);
  EXPECT_THAT(ListDir(dir_.path()), ElementsAre("qemu.pid"));
}

// A reader that opened the old file keeps reading the old, whole file: the new
// one is a different inode renamed over it, never the old one rewritten.
TEST_F(AtomicFile, ReplacesTheFileInsteadOfRewritingItInPlace) {
  const std::string old_data = "{\"exit_code\":1,\"old\":true}\n";
  ASSERT_TRUE(WriteFileText(dir_ / "exit.json", old_data));
  const int reader = ::open((dir_ / "exit.json").c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(reader, 0);
  struct stat before {};
  ASSERT_EQ(::fstat(reader, &before), 0);

  ErrorText error;
  ASSERT_TRUE(Write("exit.json", "{}\n", &error)) << error.text;

  char buf[256];
  const ssize_t n = ::pread(reader, buf, sizeof buf, 0);
  ::close(reader);
  EXPECT_EQ(std::string(buf, static_cast<size_t>(std::max<ssize_t>(n, 0))), old_data);
  EXPECT_EQ(ReadFileText(dir_ / "exit.json"), "{}\n");
  struct stat after {};
  ASSERT_EQ(::stat((dir_ / "exit.json").c_str(), &after), 0);
  EXPECT_NE(after.st_ino, before.st_ino);
  EXPECT_THAT(ListDir(dir_.path()), ElementsAre("exit.json"));
}

TEST_F(AtomicFile, ReplacesAPlantedLinkWithoutFollowingIt) {
  const std::string victim = elsewhere_ / "host-file";
  ASSERT_TRUE(WriteFileText(victim, "host data\n"));
  ASSERT_EQ(::symlink(victim.c_str(), (dir_ / "exit.json").c_str()), 0);

  ErrorText error;
  ASSERT_TRUE(Write("exit.json", "record\n", &error)) << error.text;
  struct stat st {};
  ASSERT_EQ(::lstat((dir_ / "exit.json").c_str(), &st), 0);
  EXPECT_TRUE(S_ISREG(st.st_mode)) << "the link is still there";
  EXPECT_EQ(ReadFileText(dir_ / "exit.json"), "record\n");
  EXPECT_EQ(ReadFileText(victim), "host data\n");
}

// The temp name is opened with O_NOFOLLOW: a link planted there, to an
// existing file or to none, is neither written through nor created through.
TEST_F(AtomicFile, RefusesALinkPlantedAtTheTempNameAndNamesIt) {
  const std::string existing = elsewhere_ / "host-file";
  const std::string missing = elsewhere_ / "would-be-created";
  ASSERT_TRUE(WriteFileText(existing, "host data\n"));
  for (const std::string& target : {existing, missing}) {
    SCOPED_TRACE(target);
    ::unlink((dir_ / "exit.json.tmp").c_str());
    ASSERT_EQ(::symlink(target.c_str(), (dir_ / "exit.json.tmp").c_str()), 0);
    ErrorText error;
    EXPECT_FALSE(Write("exit.json", "record\n", &error));
    EXPECT_EQ(std::string(error.text), std::string("create exit.json.tmp: ") + std::strerror(ELOOP));
    EXPECT_EQ(::access((dir_ / "exit.json").c_str(), F_OK), -1) << "no record from a failed write";
  }
  EXPECT_EQ(ReadFileText(existing), "host data\n");
  EXPECT_EQ(::access(missing.c_str(), F_OK), -1);
}

// A crash between creating the temp file and renaming it leaves one behind;
// the next write must not keep any of its bytes.
TEST_F(AtomicFile, TruncatesATempFileLeftByACrash) {
  ASSERT_TRUE(WriteFileText(dir_ / "qemu.pid.tmp", "99999999999999999999\n"));
  ErrorText error;
  ASSERT_TRUE(Write("qemu.pid", "7\n", &error)) << error.text;
  EXPECT_EQ(ReadFileText(dir_ / "qemu.pid"), "7\n");
  EXPECT_THAT(ListDir(dir_.path()), ElementsAre("qemu.pid"));
}

TEST_F(AtomicFile, AFailedRenameNamesBothFilesAndRemovesTheTempFile) {
  // A directory in the way (with an entry, so it cannot just be replaced).
  ASSERT_EQ(::mkdir((dir_ / "exit.json").c_str(), 0700), 0);
  ASSERT_TRUE(WriteFileText(dir_ / "exit.json/inside", "x"));
  ErrorText error;
  EXPECT_FALSE(Write("exit.json", "record\n", &error));
  EXPECT_EQ(std::string(error.text), std::string("rename exit.json.tmp to exit.json: ") + std::strerror(EISDIR));
  EXPECT_THAT(ListDir(dir_.path()), ElementsAre("exit.json"));
  EXPECT_EQ(ReadFileText(dir_ / "exit.json/inside"), "x");
}

// A write that fails half-way (here: the file size limit) leaves the previous
// file as it was and no partial temp file. Run in a child: the limit and the
// ignored SIGXFSZ must not touch the test binary itself.
TEST_F(AtomicFile, AFailedWriteKeepsTheOldFileAndLeavesNoTempFile) {
  ASSERT_TRUE(WriteFileText(dir_ / "exit.json", "old record\n"));
  Pipe report;
  ASSERT_GE(report.read_end(), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::signal(SIGXFSZ, SIG_IGN);  // write(2) then fails with EFBIG instead of killing us
    const rlimit limit = {8, 8};
    if (::setrlimit(RLIMIT_FSIZE, &limit) != 0) ::_exit(2);
    const std::string data(4096, 'r');
    ErrorText error;
    const bool ok = WriteFileAtomically(dir_fd_, "exit.json", data.data(), data.size(), &error);
    const ssize_t ignored = ::write(report.write_end(), error.text, std::strlen(error.text));
    ::_exit(ok || ignored < 0 ? 1 : 0);
  }
  report.CloseWrite();
  const std::string error = ReadToEof(report.read_end());
  const int status = WaitChild(child);
  ASSERT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 0) << "the write did not report its failure";
  EXPECT_EQ(error, std::string("write exit.json.tmp: ") + std::strerror(EFBIG));
  EXPECT_EQ(ReadFileText(dir_ / "exit.json"), "old record\n");
  EXPECT_THAT(ListDir(dir_.path()), ElementsAre("exit.json"));
}

// Without the directory's fsync a crash may lose the rename, so its failure
// is a failure of the write (an O_PATH descriptor resolves names but cannot be
// synced).
TEST_F(AtomicFile, AStateDirectoryThatCannotBeSyncedIsAnError) {
  const int path_fd = ::open(dir_.path().c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  ASSERT_GE(path_fd, 0);
  ErrorText error;
  const std::string data = "1\n";
  EXPECT_FALSE(WriteFileAtomically(path_fd, "qemu.pid", data.data(), data.size(), &error));
  ::close(path_fd);
  EXPECT_EQ(std::string(error.text),
            std::string("fsync state directory after renaming qemu.pid: ") + std::strerror(EBADF));
}

// A name whose temp name is exactly NAME_MAX long still works; one byte more
// is refused with the name in the error, never cut to something else.
TEST_F(AtomicFile, ANameTooLongForItsTempNameIsRefusedByName) {
  const size_t fits = NAME_MAX - (sizeof ".tmp" - 1);
  ErrorText error;
  EXPECT_TRUE(Write(std::string(fits, 'n'), "x", &error)) << error.text;
  EXPECT_EQ(ReadFileText(dir_ / std::string(fits, 'n')), "x");

  const std::string too_long(fits + 1, 'l');
  ErrorText refused;
  EXPECT_FALSE(Write(too_long, "x", &refused));
  EXPECT_THAT(std::string(refused.text), HasSubstr(too_long));
  EXPECT_THAT(ListDir(dir_.path()), ElementsAre(std::string(fits, 'n')));
}

}  // namespace
}  // namespace ndq::supervisor
