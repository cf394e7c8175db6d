// The real host side of the start: the supervisor's spawn (output file,
// passed image fds, failures with their kind) and its kill.
#include "host/vm_host.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/temp_dir.h"
#include "base/error_kind.h"
#include "base/unique_fd.h"
#include "qemu_driver/supervisor_protocol.h"

namespace ndq {
namespace {

using ::ndq::testing::TempDir;
using ::testing::HasSubstr;

std::string Read(const std::string& path) {
  std::ifstream in(path);
  std::stringstream out;
  out << in.rdbuf();
  return out.str();
}

class VmHostTest : public ::testing::Test {
 protected:
  VmHostTest() : state_fd_(::open(state_.path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)) {}
  TempDir state_, files_;
  UniqueFd state_fd_;
  CgroupManager cgroups_{DetectCgroupMounts()};
  SystemVmHost host_{&cgroups_};
};

TEST_F(VmHostTest, ImageFdsArriveAsThreeFourAndOutputGoesToTheLog) {
  std::ofstream(files_ / "a.img") << "a";
  std::ofstream(files_ / "b.img") << "b";
  UniqueFd a(::open((files_ / "a.img").c_str(), O_RDONLY | O_CLOEXEC));
  UniqueFd b(::open((files_ / "b.img").c_str(), O_RDONLY | O_CLOEXEC));
  absl::StatusOr<pid_t> pid = host_.SpawnSupervisor(
      {"/bin/sh", "-c", "readlink /proc/self/fd/3 /proc/self/fd/4; ls /proc/self/fd/5 2>/dev/null || echo no-fd-5"},
      state_fd_.get(), {a.get(), b.get()});
  ASSERT_TRUE(pid.ok()) << pid.status();
  int status = 0;
  ASSERT_EQ(::waitpid(*pid, &status, 0), *pid);
  EXPECT_TRUE(WIFEXITED(status));
  EXPECT_EQ(Read(state_ / supervisor::kLogFile), files_ / "a.img\n" + files_ / "b.img\nno-fd-5\n");
}

// The state directory is ours, but the log is still opened without
// following a link, so a planted one changes nothing elsewhere.
TEST_F(VmHostTest, APlantedLogLinkIsRefusedAndItsTargetUntouched) {
  std::ofstream(files_ / "outside") << "keep";
  std::filesystem::create_symlink(files_ / "outside", state_ / supervisor::kLogFile);
  absl::StatusOr<pid_t> pid = host_.SpawnSupervisor({"/bin/echo", "overwritten"}, state_fd_.get(), {});
  ASSERT_FALSE(pid.ok());
  EXPECT_EQ(KindOf(pid.status()), ErrorKind::kRefused);
  EXPECT_EQ(Read(files_ / "outside"), "keep");
}

TEST_F(VmHostTest, AMissingSupervisorIsNotRetried) {
  absl::StatusOr<pid_t> pid = host_.SpawnSupervisor({files_ / "nomad-qemu-supervisor"}, state_fd_.get(), {});
  ASSERT_FALSE(pid.ok());
  EXPECT_THAT(pid.status().message(), HasSubstr("cannot start the VM supervisor"));
  EXPECT_EQ(KindOf(pid.status()), ErrorKind::kGone);
}

TEST_F(VmHostTest, KillSupervisorKillsAndReaps) {
  absl::StatusOr<pid_t> pid = host_.SpawnSupervisor({"/bin/sleep", "60"}, state_fd_.get(), {});
  ASSERT_TRUE(pid.ok()) << pid.status();
  host_.KillSupervisor(*pid);
  errno = 0;
  EXPECT_EQ(::waitpid(*pid, nullptr, WNOHANG), -1);
  EXPECT_EQ(errno, ECHILD) << "already reaped";
}

}  // namespace
}  // namespace ndq
