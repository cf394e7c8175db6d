// vm/pool_handover: MoveSlotInto on real directories; AttachTaskParts and the
// HMP forwards through a scripted QMP peer playing QEMU 7.2's replies, the
// conversation failed at each step (error reply or hang-up) and what follows it checked not done.
#include "vm/pool_handover.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/deadlines.h"
#include "../../support/files.h"
#include "../../support/child_process.h"
#include "../../support/scripted_clients.h"
#include "../../support/scripted_qmp.h"
#include "../../support/temp_dir.h"
#include "qemu_driver/supervisor_protocol.h"

namespace ndq {
namespace {

using ::ndq::testing::ReadFile;

namespace fs = std::filesystem;
using ::ndq::testing::ChildProcess;
using ::ndq::testing::Concat;
using ::ndq::testing::Eof;
using ::ndq::testing::FromClient;
using ::ndq::testing::Handshake;
using ::ndq::testing::ScriptedPeer;
using ::ndq::testing::Step;
using ::ndq::testing::TempDir;
using ::ndq::testing::ToClient;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

using ::ndq::testing::kGenerous;


const PortForward kHttp{"http", "tcp", "127.0.0.1", 25123, 80};

// ---------------------------------------------------------------------------
// MoveSlotInto

class MoveSlot : public ::testing::Test {
 protected:
  void SetUp() override {
    vm_.dir = root_ / "pool/slot-1";
    fs::create_directories(vm_.dir + "/run");
    std::ofstream(vm_.dir + "/overlay.qcow2") << "slot overlay";
    state_dir_ = root_ / "task-state";
  }
  TempDir root_;
  PooledVm vm_;
  std::string state_dir_;
};

TEST_F(MoveSlot, TheSlotReplacesTheEmptyStateDirPreparedForTheTask) {
  fs::create_directories(state_dir_ + "/run");  // as prepare host left it
  const std::string slot = vm_.dir;
  ASSERT_TRUE(MoveSlotInto(vm_, state_dir_).ok());
  EXPECT_EQ(vm_.dir, state_dir_);
  EXPECT_FALSE(fs::exists(slot));
  EXPECT_EQ(ReadFile(state_dir_ + "/overlay.qcow2"), "slot overlay");
  EXPECT_TRUE(fs::is_directory(state_dir_ + "/run"));
}

TEST_F(MoveSlot, NoStateDirYetIsFine) {
  ASSERT_TRUE(MoveSlotInto(vm_, state_dir_).ok());
  EXPECT_EQ(ReadFile(state_dir_ + "/overlay.qcow2"), "slot overlay");
}

// A state dir holding anything is never removed to make room.
TEST_F(MoveSlot, AStateDirInUseIsLeftAlone) {
  fs::create_directories(state_dir_ + "/run");
  std::ofstream(state_dir_ + "/run/qmp.sock") << "";
  const std::string slot = vm_.dir;
  absl::Status moved = MoveSlotInto(vm_, state_dir_);
  EXPECT_THAT(std::string(moved.message()), HasSubstr("cannot move the pooled VM to " + state_dir_));
  EXPECT_EQ(vm_.dir, slot);
  EXPECT_TRUE(fs::exists(state_dir_ + "/run/qmp.sock"));
  EXPECT_EQ(ReadFile(slot + "/overlay.qcow2"), "slot overlay");
}

// The task's state dir stays for the rollback, which removes what the task owns.
TEST_F(MoveSlot, AVanishedSlotIsAnErrorAndKeepsItsPathAndTheStateDir) {
  fs::create_directories(state_dir_ + "/run");
  fs::remove_all(vm_.dir);
  const std::string slot = vm_.dir;
  absl::Status moved = MoveSlotInto(vm_, state_dir_);
  EXPECT_THAT(std::string(moved.message()), HasSubstr("cannot move the pooled VM to " + state_dir_));
  EXPECT_EQ(vm_.dir, slot);
  EXPECT_TRUE(fs::is_directory(state_dir_));
}

// ---------------------------------------------------------------------------
// The HMP forwards

TEST(AddHostForward, AddsTheRuleOnTheUserNetwork) {
  ScriptedPeer peer(Concat(
      Handshake(),
      {FromClient(R"({"execute": "human-monitor-command", "arguments": {"command-line": "hostfwd_add user.0 tcp:127.0.0.1:25123-:80"}, "id": 2})"),
       ToClient(R"({"return": "", "id": 2})")}));
  auto qmp = ::ndq::testing::AdoptQmpOrDie(peer, "pooled QEMU");
  ASSERT_NE(qmp, nullptr);
  EXPECT_TRUE(AddHostForward(*qmp, kHttp).ok());
  EXPECT_TRUE(peer.WaitDone(kGenerous));
  EXPECT_THAT(peer.failures(), IsEmpty());
}

// HMP answers a failed hostfwd_add with its error text, not a QMP error.
TEST(AddHostForward, HmpsErrorTextIsAnErrorNamingThePort) {
  ScriptedPeer peer(Concat(
      Handshake(),
      {FromClient(R"({"execute": "human-monitor-command", "arguments": {"command-line": "hostfwd_add user.0 udp::5353-:53"}, "id": 2})"),
       ToClient(R"({"return": "Could not set up host forwarding rule 'udp::5353-:53'\r\n", "id": 2})")}));
  auto qmp = ::ndq::testing::AdoptQmpOrDie(peer, "pooled QEMU");
  ASSERT_NE(qmp, nullptr);
  absl::Status added = AddHostForward(*qmp, PortForward{"dns", "udp", "", 5353, 53});
  EXPECT_TRUE(absl::IsUnavailable(added)) << added;
  EXPECT_THAT(std::string(added.message()), HasSubstr("port_map \"dns\": QEMU could not forward *:5353: Could not set up host "
                                         "forwarding rule 'udp::5353-:53'"));
  EXPECT_THAT(peer.failures(), IsEmpty());
}

// A refused forward sends nothing: the next command QEMU sees is the test's own.
TEST(AddHostForward, ARefusedForwardNeverReachesQemu) {
  ScriptedPeer peer(Concat(Handshake(), {FromClient(R"({"execute": "query-status", "id": 2})"),
                                         ToClient(R"({"return": {"status": "paused", "singlestep": false, "running": false}, "id": 2})")}));
  auto qmp = ::ndq::testing::AdoptQmpOrDie(peer, "pooled QEMU");
  ASSERT_NE(qmp, nullptr);
  const PortForward hostile{"http", "tcp", "127.0.0.1 quit", 25123, 80};
  EXPECT_TRUE(absl::IsInvalidArgument(AddHostForward(*qmp, hostile)));
  EXPECT_TRUE(absl::IsInvalidArgument(RemoveHostForward(*qmp, hostile)));
  EXPECT_EQ(qmp->QueryStatus().value_or("error"), "paused");
  EXPECT_THAT(peer.failures(), IsEmpty());
}

TEST(AddHostForward, QemuGoneIsAnError) {
  ScriptedPeer peer(Concat(
      Handshake(),
      {FromClient(R"({"execute": "human-monitor-command", "arguments": {"command-line": "hostfwd_add user.0 tcp:127.0.0.1:25123-:80"}, "id": 2})"),
       Eof()}));
  auto qmp = ::ndq::testing::AdoptQmpOrDie(peer, "pooled QEMU");
  ASSERT_NE(qmp, nullptr);
  absl::Status added = AddHostForward(*qmp, kHttp);
  EXPECT_TRUE(absl::IsUnavailable(added)) << added;
  EXPECT_THAT(std::string(added.message()), HasSubstr("QEMU closed the connection"));
}

// hostfwd_remove takes only the host side; HMP reports either outcome as text.
TEST(RemoveHostForward, RemovesByTheHostSide) {
  ScriptedPeer peer(Concat(
      Handshake(),
      {FromClient(R"({"execute": "human-monitor-command", "arguments": {"command-line": "hostfwd_remove user.0 tcp:127.0.0.1:25123"}, "id": 2})"),
       ToClient(R"({"return": "host forwarding rule for tcp:127.0.0.1:25123 removed\r\n", "id": 2})"),
       FromClient(R"({"execute": "human-monitor-command", "arguments": {"command-line": "hostfwd_remove user.0 tcp:127.0.0.1:25123"}, "id": 3})"),
       ToClient(R"({"return": "host forwarding rule for tcp:127.0.0.1:25123 not found\r\n", "id": 3})"),
       FromClient(R"({"execute": "human-monitor-command", "arguments": {"command-line": "hostfwd_remove user.0 udp::5353"}, "id": 4})"),
       Eof()}));
  auto qmp = ::ndq::testing::AdoptQmpOrDie(peer, "pooled QEMU");
  ASSERT_NE(qmp, nullptr);
  EXPECT_TRUE(RemoveHostForward(*qmp, kHttp).ok());
  // A rule QEMU does not have: the forward the caller meant to remove may still be there.
  absl::Status missing = RemoveHostForward(*qmp, kHttp);
  EXPECT_TRUE(absl::IsUnavailable(missing)) << missing;
  EXPECT_THAT(std::string(missing.message()), HasSubstr("could not remove its forward of 127.0.0.1:25123: host forwarding rule"));
  absl::Status removed = RemoveHostForward(*qmp, PortForward{"dns", "udp", "", 5353, 53});
  EXPECT_TRUE(absl::IsUnavailable(removed)) << removed;
  EXPECT_THAT(std::string(removed.message()), HasSubstr("QEMU closed the connection"));
  EXPECT_THAT(peer.failures(), IsEmpty());
}

// ---------------------------------------------------------------------------
// AttachTaskParts

// The conversation of a handover with one forward, QMP ids from 2.
std::vector<Step> HandoverSteps() {
  return {
      FromClient(R"({"execute": "add-fd", "arguments": {}, "id": 2})"),
      ToClient(R"({"return": {"fdset-id": 3, "fd": 27}, "id": 2})"),
      FromClient(R"({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "task-overlay", )"
                 R"("file": {"driver": "file", "filename": "/dev/fdset/3"}, "backing": null}, "id": 3})"),
      ToClient(R"({"return": {}, "id": 3})"),
      FromClient(R"({"execute": "blockdev-snapshot", "arguments": {"node": "image0", "overlay": "task-overlay"}, "id": 4})"),
      ToClient(R"({"return": {}, "id": 4})"),
      FromClient(R"({"execute": "human-monitor-command", "arguments": {"command-line": "hostfwd_add user.0 tcp:127.0.0.1:25123-:80"}, "id": 5})"),
      ToClient(R"({"return": "", "id": 5})"),
      FromClient(R"({"execute": "cont", "id": 6})"),
      ToClient(R"({"timestamp": {"seconds": 1795315693, "microseconds": 333322}, "event": "RESUME"})"),
      ToClient(R"({"return": {}, "id": 6})"),
  };
}

// The steps up to the command at `request` (an index in HandoverSteps),
// which is answered with `reply` instead.
std::vector<Step> FailingAt(size_t request, const std::string& reply) {
  std::vector<Step> steps = HandoverSteps();
  steps.resize(request + 1);
  steps.push_back(reply.empty() ? Eof() : ToClient(reply));
  return Concat(Handshake(), steps);
}

class Handover : public ::testing::Test {
 protected:
  void SetUp() override {
    std::ofstream(dir_ / "warm-disk.qcow2") << "QFI\xfb";
    overlay_ = UniqueFd(::open((dir_ / "warm-disk.qcow2").c_str(), O_RDWR | O_CLOEXEC));
    ASSERT_TRUE(overlay_.valid());
    state_dir_ = dir_ / "state";
    fs::create_directories(state_dir_);
    std::ofstream(dir_ / "cgroup.procs") << "";
    ASSERT_GT(supervisor_.pid(), 0);
    vm_.dir = state_dir_;
    vm_.supervisor_pid = supervisor_.pid();
    vm_.qemu_pid = 4242;  // only written to the cgroup file
    parts_.overlay_fd = overlay_.get();
    parts_.forwards = {kHttp};
    parts_.cgroup_procs = {dir_ / "cgroup.procs"};
    parts_.stdout_path = dir_ / "web.stdout.0";
    parts_.stderr_path = dir_ / "web.stderr.0";
  }

  absl::Status Attach(std::vector<Step> script) {
    ScriptedPeer peer(std::move(script));
    auto qmp = ::ndq::testing::AdoptQmpOrDie(peer, "pooled QEMU");
    if (qmp == nullptr) return absl::InternalError("no QMP session");
    absl::Status status = AttachTaskParts(*qmp, vm_, state_dir_, parts_);
    EXPECT_TRUE(peer.WaitDone(kGenerous));
    EXPECT_THAT(peer.failures(), IsEmpty()) << "QEMU saw a command it should not have";
    return status;
  }

  std::string HandoverFile() const { return state_dir_ + "/" + supervisor::kHandoverFile; }

  // The signal the supervisor stand-in died of: SIGUSR1 if the handover signalled it.
  int SupervisorSignal() {
    ::kill(supervisor_.pid(), SIGTERM);  // SIGUSR1, if sent, is pending already and delivered first
    const int status = supervisor_.Wait();
    return WIFSIGNALED(status) ? WTERMSIG(status) : 0;
  }

  TempDir dir_;
  UniqueFd overlay_;
  std::string state_dir_;
  ChildProcess supervisor_{std::vector<std::string>{"/bin/sleep", "30"}};
  PooledVm vm_;
  TaskParts parts_;
};

TEST_F(Handover, AttachesEverythingThenResumes) {
  ASSERT_TRUE(Attach(Concat(Handshake(), HandoverSteps())).ok());
  EXPECT_EQ(ReadFile(dir_ / "cgroup.procs"), "4242");
  EXPECT_EQ(ReadFile(HandoverFile()), dir_ / "web.stdout.0\n" + dir_ / "web.stderr.0\n");
  EXPECT_EQ(SupervisorSignal(), SIGUSR1);
}

TEST_F(Handover, NoLogPathsHandsOutputToDevNull) {
  parts_.stdout_path.clear();
  parts_.stderr_path.clear();
  parts_.forwards.clear();
  parts_.cgroup_procs.clear();
  std::vector<Step> steps = HandoverSteps();
  steps.erase(steps.begin() + 6, steps.begin() + 8);  // no hostfwd_add
  steps[6] = FromClient(R"({"execute": "cont", "id": 5})");
  steps[8] = ToClient(R"({"return": {}, "id": 5})");
  ASSERT_TRUE(Attach(Concat(Handshake(), steps)).ok());
  EXPECT_EQ(ReadFile(HandoverFile()), "/dev/null\n/dev/null\n");
  EXPECT_EQ(ReadFile(dir_ / "cgroup.procs"), "");
}

// Each QMP step fails in turn: the error names the step, and nothing after
// it happens (the peer checks no further command comes; no output handover).
TEST_F(Handover, AFailedOverlayStepStopsTheHandover) {
  const struct {
    size_t request;
    std::string reply, want;
  } cases[] = {
      {0, R"({"id": 2, "error": {"class": "GenericError", "desc": "No file descriptor supplied via SCM_RIGHTS"}})",
       "add-fd: QEMU rejected add-fd: No file descriptor supplied via SCM_RIGHTS"},
      {2, R"({"id": 3, "error": {"class": "GenericError", "desc": "Image is not in qcow2 format"}})",
       "blockdev-add: QEMU rejected blockdev-add: Image is not in qcow2 format"},
      {4, R"({"id": 4, "error": {"class": "GenericError", "desc": "The overlay already has a backing image"}})",
       "blockdev-snapshot: QEMU rejected blockdev-snapshot: The overlay already has a backing image"},
      {2, "", "blockdev-add: QMP command blockdev-add got no reply: pooled QEMU: QEMU closed the connection"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.want);
    absl::Status status = Attach(FailingAt(c.request, c.reply));
    EXPECT_THAT(std::string(status.message()), HasSubstr(c.want));
    EXPECT_FALSE(fs::exists(HandoverFile()));
    EXPECT_EQ(ReadFile(dir_ / "cgroup.procs"), "");
  }
  EXPECT_EQ(SupervisorSignal(), SIGTERM);
}

TEST_F(Handover, AFailedForwardStopsTheHandover) {
  const struct {
    std::string reply, want;
  } cases[] = {
      {R"({"return": "Could not set up host forwarding rule 'tcp:127.0.0.1:25123-:80'\r\n", "id": 5})",
       "port_map \"http\": QEMU could not forward 127.0.0.1:25123: Could not set up host forwarding rule"},
      {"", "human-monitor-command got no reply: pooled QEMU: QEMU closed the connection"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.want);
    absl::Status status = Attach(FailingAt(6, c.reply));
    EXPECT_THAT(std::string(status.message()), HasSubstr(c.want));
    EXPECT_FALSE(fs::exists(HandoverFile()));
    EXPECT_EQ(ReadFile(dir_ / "cgroup.procs"), "");
  }
  EXPECT_EQ(SupervisorSignal(), SIGTERM);
}

TEST_F(Handover, ACgroupItCannotJoinStopsTheHandover) {
  parts_.cgroup_procs = {dir_ / "no-such-cgroup/cgroup.procs"};
  std::vector<Step> script = Concat(Handshake(), HandoverSteps());
  script.resize(script.size() - 3);  // no cont
  absl::Status status = Attach(script);
  EXPECT_THAT(std::string(status.message()), HasSubstr("cannot move the pooled QEMU into " + dir_ / "no-such-cgroup/cgroup.procs"));
  EXPECT_FALSE(fs::exists(HandoverFile()));
  EXPECT_EQ(SupervisorSignal(), SIGTERM);
}

TEST_F(Handover, ALogPathWithANewlineIsRefused) {
  parts_.stdout_path = dir_ / "web.stdout.0\n/etc/passwd";
  std::vector<Step> script = Concat(Handshake(), HandoverSteps());
  script.resize(script.size() - 3);  // no cont
  absl::Status status = Attach(script);
  EXPECT_TRUE(absl::IsInvalidArgument(status)) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("log paths hold a newline"));
  EXPECT_FALSE(fs::exists(HandoverFile()));
  EXPECT_EQ(SupervisorSignal(), SIGTERM);
}

// The guest does not resume: the handover is done, but the start must fail.
TEST_F(Handover, AFailedResumeIsAnError) {
  absl::Status status =
      Attach(FailingAt(8, R"({"id": 6, "error": {"class": "GenericError", "desc": "Resetting the Virtual Machine is required"}})"));
  EXPECT_THAT(std::string(status.message()), HasSubstr("cont: QEMU rejected cont: Resetting the Virtual Machine is required"));
  EXPECT_TRUE(fs::exists(HandoverFile()));
  EXPECT_EQ(SupervisorSignal(), SIGUSR1);
}

}  // namespace
}  // namespace ndq
