// vm/qemu_process: finding the QEMU a supervisor started from its pid file,
// with real processes (`sleep` stands in for the supervisor and for QEMU).
#include "vm/qemu_process.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/child_process.h"
#include "../../support/temp_dir.h"
#include "absl/time/clock.h"
#include "host/process_watch.h"
#include "qemu_driver/supervisor_protocol.h"

namespace ndq {
namespace {

using ::ndq::testing::ChildProcess;
using ::ndq::testing::TempDir;
using ::testing::HasSubstr;

UniqueFd PidfdOf(pid_t pid) { return UniqueFd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0))); }

// Written as the supervisor writes it: complete under a temporary name, then
// renamed, so a reader never sees part of it.
void WritePidFile(const std::string& dir, const std::string& content) {
  const std::string path = dir + "/" + supervisor::kPidFile;
  std::ofstream(path + supervisor::kTempSuffix) << content;
  std::filesystem::rename(path + supervisor::kTempSuffix, path);
}

TEST(FindSupervisedQemu, ReadsThePidAndHoldsTheProcess) {
  TempDir dir;
  ChildProcess supervisor({"/bin/sleep", "30"});
  ChildProcess qemu({"/bin/sleep", "30"});
  WritePidFile(dir.path(), std::to_string(qemu.pid()) + "\n");
  UniqueFd supervisor_fd = PidfdOf(supervisor.pid());
  absl::StatusOr<QemuProcess> found =
      FindSupervisedQemu(dir.path(), supervisor_fd.get(), absl::Now() + absl::Seconds(5));
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ(found->pid, qemu.pid());
  EXPECT_EQ(found->start_ticks, ProcessStartTicks(qemu.pid()).value_or(1));
  ASSERT_TRUE(found->pidfd.valid());
  EXPECT_FALSE(PidfdExited(found->pidfd.get()));
  ::kill(qemu.pid(), SIGKILL);
  qemu.WaitExited();
  EXPECT_TRUE(PidfdExited(found->pidfd.get())) << "the pidfd is QEMU's";
}

TEST(FindSupervisedQemu, WaitsForThePidFileTheSupervisorWritesLater) {
  TempDir dir;
  ChildProcess supervisor({"/bin/sleep", "30"});
  ChildProcess qemu({"/bin/sleep", "30"});
  UniqueFd supervisor_fd = PidfdOf(supervisor.pid());
  std::thread writer([&] { WritePidFile(dir.path(), std::to_string(qemu.pid()) + "\n"); });
  absl::StatusOr<QemuProcess> found =
      FindSupervisedQemu(dir.path(), supervisor_fd.get(), absl::Now() + absl::Seconds(10));
  writer.join();
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ(found->pid, qemu.pid());
}

TEST(FindSupervisedQemu, ASupervisorThatExitsFirstEndsTheWaitAtOnce) {
  TempDir dir;
  ChildProcess supervisor({"/bin/true"});
  supervisor.WaitExited();
  UniqueFd supervisor_fd = PidfdOf(supervisor.pid());
  const absl::Time start = absl::Now();
  absl::StatusOr<QemuProcess> found =
      FindSupervisedQemu(dir.path(), supervisor_fd.get(), absl::Now() + absl::Seconds(30));
  EXPECT_TRUE(absl::IsFailedPrecondition(found.status())) << found.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

TEST(FindSupervisedQemu, AnUnreadableOrGonePidIsAnError) {
  TempDir dir;
  ChildProcess supervisor({"/bin/sleep", "30"});
  UniqueFd supervisor_fd = PidfdOf(supervisor.pid());
  WritePidFile(dir.path(), "not a pid\n");
  absl::StatusOr<QemuProcess> garbage =
      FindSupervisedQemu(dir.path(), supervisor_fd.get(), absl::Now() + absl::Seconds(5));
  EXPECT_TRUE(absl::IsInternal(garbage.status())) << garbage.status();

  ChildProcess gone({"/bin/true"});
  gone.Wait();  // reaped: its pid names no process now
  WritePidFile(dir.path(), std::to_string(gone.pid()) + "\n");
  absl::StatusOr<QemuProcess> exited =
      FindSupervisedQemu(dir.path(), supervisor_fd.get(), absl::Now() + absl::Seconds(5));
  EXPECT_FALSE(exited.ok());
}

}  // namespace
}  // namespace ndq
