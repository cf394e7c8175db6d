// TryOpenOutput on real files, links, FIFOs and sockets: where QEMU's stdout
// and stderr go (the paths lie in the allocation, which jobs can write).
#include "../../../src/supervisor/output_files.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include <gtest/gtest.h>

#include "../../support/temp_dir.h"
#include "supervisor_test_util.h"

namespace ndq::supervisor {
namespace {

using ::ndq::testing::TempDir;
using namespace ::ndq::supervisor::test_util;

class OutputFiles : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_FALSE(dir_.path().empty()); }
  void TearDown() override {
    if (fd_ >= 0) ::close(fd_);
  }

  OutputOpen Open(const char* what, const std::string& path) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    return TryOpenOutput(what, path.c_str(), &fd_, &error_);
  }

  ScopedUmask umask_{0};  // the modes asserted are the code's, not the environment's
  TempDir dir_;
  TempDir elsewhere_;  // outside the allocation: where planted links point
  int fd_ = -1;
  ErrorText error_;
};

// QEMU's copies write with plain blocking writes, and no later child (swtpm)
// may inherit the job's output.
TEST_F(OutputFiles, CreatesAMissingFileWithMode0640BlockingAndCloseOnExec) {
  ASSERT_EQ(Open("stdout", dir_ / "stdout"), OutputOpen::kOpened) << error_.text;
  ASSERT_GE(fd_, 0);
  EXPECT_TRUE(error_.empty());
  struct stat st {};
  ASSERT_EQ(::fstat(fd_, &st), 0);
  EXPECT_TRUE(S_ISREG(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0640u);
  const int flags = ::fcntl(fd_, F_GETFL);
  EXPECT_EQ(flags & O_NONBLOCK, 0);
  EXPECT_EQ(flags & O_ACCMODE, O_WRONLY);
  EXPECT_NE(::fcntl(fd_, F_GETFD) & FD_CLOEXEC, 0);
}

// A restarted task's earlier output stays; new output goes after it even when
// another writer appended meanwhile.
TEST_F(OutputFiles, AppendsToAnExistingFile) {
  ASSERT_TRUE(WriteFileText(dir_ / "stderr", "first run\n"));
  ASSERT_EQ(Open("stderr", dir_ / "stderr"), OutputOpen::kOpened) << error_.text;
  const int other = ::open((dir_ / "stderr").c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
  ASSERT_GE(other, 0);
  ASSERT_EQ(::write(other, "other\n", 6), 6);
  ::close(other);
  ASSERT_EQ(::write(fd_, "second run\n", 11), 11);
  EXPECT_EQ(ReadFileText(dir_ / "stderr"), "first run\nother\nsecond run\n");
}

TEST_F(OutputFiles, DevNullIsOpened) {
  ASSERT_EQ(Open("stdout", "/dev/null"), OutputOpen::kOpened) << error_.text;
  struct stat st {};
  ASSERT_EQ(::fstat(fd_, &st), 0);
  EXPECT_TRUE(S_ISCHR(st.st_mode));
  EXPECT_EQ(::write(fd_, "x", 1), 1);
}

// Root must not append QEMU's output to a host file through a link a job
// planted, nor create a file where a dangling link points.
TEST_F(OutputFiles, DoesNotFollowAPlantedLink) {
  const std::string victim = elsewhere_ / "host-file";
  const std::string missing = elsewhere_ / "would-be-created";
  ASSERT_TRUE(WriteFileText(victim, "host data\n"));
  ASSERT_EQ(::symlink(victim.c_str(), (dir_ / "stdout").c_str()), 0);
  ASSERT_EQ(::symlink(missing.c_str(), (dir_ / "stderr").c_str()), 0);

  EXPECT_EQ(Open("stdout", dir_ / "stdout"), OutputOpen::kFailed);
  EXPECT_EQ(fd_, -1);
  EXPECT_EQ(std::string(error_.text), "open stdout " + (dir_ / "stdout") + ": " + std::strerror(ELOOP));
  EXPECT_EQ(Open("stderr", dir_ / "stderr"), OutputOpen::kFailed);
  EXPECT_EQ(std::string(error_.text), "open stderr " + (dir_ / "stderr") + ": " + std::strerror(ELOOP));

  EXPECT_EQ(ReadFileText(victim), "host data\n");
  EXPECT_EQ(::access(missing.c_str(), F_OK), -1);
}

// Nomad's log reader may come after QEMU starts: no reader yet is a state to
// wait in, not an error, and the supervisor must not block on it.
TEST_F(OutputFiles, AFifoWithoutAReaderIsNotYetOpenAndNotAnError) {
  ASSERT_EQ(::mkfifo((dir_ / "stdout").c_str(), 0600), 0);
  fd_ = -1;
  EXPECT_EQ(TryOpenOutput("stdout", (dir_ / "stdout").c_str(), &fd_, &error_), OutputOpen::kNoReaderYet);
  EXPECT_EQ(fd_, -1);
  EXPECT_TRUE(error_.empty()) << error_.text;
}

TEST_F(OutputFiles, AFifoReaderThatArrivesLateGetsTheOutput) {
  const std::string fifo = dir_ / "stdout";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  ASSERT_EQ(Open("stdout", fifo), OutputOpen::kNoReaderYet);

  const int reader = ::open(fifo.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  ASSERT_GE(reader, 0);
  ASSERT_EQ(Open("stdout", fifo), OutputOpen::kOpened) << error_.text;
  EXPECT_EQ(::fcntl(fd_, F_GETFL) & O_NONBLOCK, 0) << "the copy expects blocking writes";
  EXPECT_NE(::fcntl(fd_, F_GETFD) & FD_CLOEXEC, 0);
  const std::string console = "Booting from Hard Disk...\nlogin: ";
  ASSERT_EQ(::write(fd_, console.data(), console.size()), static_cast<ssize_t>(console.size()));
  ::close(fd_);
  fd_ = -1;
  EXPECT_EQ(ReadToEof(reader), console);
  ::close(reader);
}

// open(2) fails with ENXIO for a socket too; that is no FIFO whose reader
// might still come, so it must fail rather than be waited on forever.
TEST_F(OutputFiles, ASocketIsAFailureNotAMissingReader) {
  const std::string path = dir_ / "stdout";
  const int sock = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(sock, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  ASSERT_LT(path.size(), sizeof addr.sun_path);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  ASSERT_EQ(::bind(sock, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0) << std::strerror(errno);
  ::close(sock);  // the socket file stays

  EXPECT_EQ(Open("stdout", path), OutputOpen::kFailed);
  EXPECT_EQ(std::string(error_.text), "open stdout " + path + ": " + std::strerror(ENXIO));
}

TEST_F(OutputFiles, AMissingDirectoryIsAFailureNamingTheStreamAndPath) {
  const std::string path = dir_ / "no-such-dir/stderr";
  EXPECT_EQ(Open("stderr", path), OutputOpen::kFailed);
  EXPECT_EQ(fd_, -1);
  EXPECT_EQ(std::string(error_.text), "open stderr " + path + ": " + std::strerror(ENOENT));
}

}  // namespace
}  // namespace ndq::supervisor
