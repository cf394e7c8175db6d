// vm/vm_watches: the watches that follow a started VM (boot_timeout, a cold
// warm_start VM's readiness, a restored VM's clock), with a fake guest agent
// on a real unix socket, a scripted QMP peer and a `sleep` standing in for QEMU.
#include "vm/vm_watches.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include <atomic>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "../../support/child_process.h"
#include "../../support/eventually.h"
#include "../../support/fake_agent_socket.h"
#include "../../support/scripted_clients.h"
#include "../../support/scripted_qmp.h"
#include "../../support/temp_dir.h"
#include "absl/time/clock.h"
#include "host/process_watch.h"
#include "qemu_driver/supervisor_protocol.h"

namespace ndq {
namespace {

using ::ndq::testing::Eventually;
using ::ndq::testing::FakeAgentSocket;
using ::ndq::testing::FromClient;
using ::ndq::testing::Handshake;
using ::ndq::testing::ScriptedPeer;
using ::ndq::testing::TempDir;
using ::ndq::testing::ToClient;
using ::testing::HasSubstr;
using ::testing::MatchesRegex;
using json = nlohmann::json;

const TaskIdentity kTask{"a/web/1", "web", "a"};

struct WatchEvent {
  std::string task_id;
  std::string message;
  std::map<std::string, std::string> annotations;
};

// What the watches emitted, waitable.
class Events {
 public:
  VmWatches::Emit Sink() {
    return [this](const TaskIdentity& task, const std::string& message, const std::map<std::string, std::string>& a) {
      absl::MutexLock lock(&mu_);
      events_.push_back({task.id, message, a});
    };
  }
  // The first event, once there is one (an empty one after `timeout`).
  WatchEvent First(absl::Duration timeout) {
    absl::MutexLock lock(&mu_);
    auto any = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !events_.empty(); };
    if (!mu_.AwaitWithTimeout(absl::Condition(&any), timeout)) return {};
    return events_.front();
  }
  size_t count() {
    absl::MutexLock lock(&mu_);
    return events_.size();
  }

 private:
  absl::Mutex mu_;
  std::vector<WatchEvent> events_ ABSL_GUARDED_BY(mu_);
};

class VmWatchesTest : public ::testing::Test {
 protected:
  VmWatchesTest() {
    record_.state_dir = tmp_.path() + "/state";
    record_.alloc_dir = tmp_.path() + "/alloc";
    record_.guest_agent = true;
    record_.guest_agent_socket = tmp_.path() + "/qga.sock";
    record_.started_at = absl::Now();
    std::filesystem::create_directories(record_.state_dir + "/" + supervisor::kRunDir);
  }

  // The task's VmTask (with `qmp` as its session) and the LaunchedVm Begin reads.
  std::shared_ptr<VmTask> Launch(std::unique_ptr<QmpClient> qmp = nullptr, UniqueFd qemu_pidfd = UniqueFd()) {
    launched_.record = record_;
    return std::make_shared<VmTask>(kTask, record_, UniqueFd(), std::move(qemu_pidfd), std::move(qmp));
  }

  static std::unique_ptr<QmpClient> AdoptOrDie(ScriptedPeer& peer) { return ::ndq::testing::AdoptQmpOrDie(peer, "test QMP"); }

  static BootWatchPlan AgentPlan(absl::Duration timeout) {
    BootWatchPlan plan;
    plan.timeout = timeout;
    plan.guest_agent = true;
    return plan;
  }

  TempDir tmp_;
  DriverStateRecord record_;
  LaunchedVm launched_;
  Events events_;
  std::atomic<int> templates_saved_{0};
};

TEST_F(VmWatchesTest, AGuestThatAnswersIsReportedReadyWithTheTimeSinceQemuStarted) {
  FakeAgentSocket agent(record_.guest_agent_socket);
  agent.ready = true;
  record_.started_at = absl::Now() - absl::Seconds(2);  // QEMU started before StartTask returned
  std::shared_ptr<VmTask> vm = Launch();
  launched_.spec.boot_watch = AgentPlan(absl::Seconds(30));
  VmWatches watches(events_.Sink(), nullptr);
  watches.Begin(kTask, vm, launched_);
  const WatchEvent ready = events_.First(absl::Seconds(5));
  EXPECT_EQ(ready.task_id, "a/web/1");
  EXPECT_THAT(ready.message, MatchesRegex("Guest ready: the guest agent answered 2(\\.[0-9])?s after QEMU started"));
  EXPECT_THAT(ready.annotations, ::testing::ElementsAre(::testing::Pair("boot_ready", "the guest agent")));
  EXPECT_EQ(watches.TakeBootFailure(kTask.id), "");
}

// Reaps nothing, but marks `vm` exited once `qemu` has died, as the driver's
// process watch does (so VmTask::Stop returns).
std::thread MarkExitedWhenGone(pid_t qemu, std::shared_ptr<VmTask> vm) {
  return std::thread([qemu, vm] {
    siginfo_t info{};
    auto gone = [&] { return ::waitid(P_PID, qemu, &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid == qemu; };
    if (!Eventually(gone, absl::Seconds(15))) return;
    ExitResult result;
    result.exit_code = 128 + info.si_status;
    result.signal = info.si_status;
    vm->MarkExited(result);
  });
}

std::string ScreendumpRequest(const std::string& run_dir) {
  return json{{"execute", "screendump"}, {"arguments", {{"filename", run_dir + "/screendump.png"}, {"format", "png"}}}, {"id", 2}}
      .dump();
}

TEST_F(VmWatchesTest, ABootTimeoutStopsTheVmAndKeepsTheReasonForItsExit) {
  FakeAgentSocket agent(record_.guest_agent_socket);  // never answers
  testing::ChildProcess qemu({"/bin/sleep", "60"});
  record_.qemu_pid = qemu.pid();
  ScriptedPeer qmp(testing::Concat(Handshake(), {
      FromClient(ScreendumpRequest(record_.state_dir + "/run")),
      ToClient(R"({"error": {"class": "GenericError", "desc": "no surface to dump"}, "id": 2})")}));
  std::shared_ptr<VmTask> vm = Launch(AdoptOrDie(qmp), UniqueFd(*OpenVerifiedPidfd(qemu.pid(), 0)));
  launched_.spec.boot_watch = AgentPlan(absl::Milliseconds(500));
  std::thread reaper = MarkExitedWhenGone(qemu.pid(), vm);
  VmWatches watches(events_.Sink(), nullptr);
  watches.Begin(kTask, vm, launched_);
  const WatchEvent timeout = events_.First(absl::Seconds(5));
  reaper.join();  // QEMU was stopped
  const int status = qemu.Wait();
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM) << "the guest is stuck: SIGTERM, no power button";
  EXPECT_THAT(timeout.message, HasSubstr("Boot timeout: the VM did not become ready within boot_timeout 500ms: "
                                         "the guest agent (guest-ping) did not answer; no screenshot (QMP screendump: "));
  EXPECT_THAT(timeout.message, HasSubstr("no surface to dump"));
  EXPECT_EQ(timeout.annotations.at("boot_timeout"), "500ms");
  EXPECT_EQ(timeout.annotations.count("screenshot"), 0u);
  EXPECT_EQ("Boot timeout: " + watches.TakeBootFailure(kTask.id), timeout.message);
  EXPECT_EQ(watches.TakeBootFailure(kTask.id), "") << "taken once";
  EXPECT_THAT(qmp.failures(), ::testing::IsEmpty());
}

// A port on 127.0.0.1 that is taken but refuses connections (bound, not listening).
int RefusingPort(const UniqueFd& fd) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), len) != 0 ||
      ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    return 0;
  }
  return ntohs(addr.sin_port);
}

TEST_F(VmWatchesTest, ABootTimeoutNamesEveryProbeItWaitedFor) {
  FakeAgentSocket agent(record_.guest_agent_socket);  // never answers
  const UniqueFd port(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  record_.alloc_dir.clear();  // no screenshot either
  std::shared_ptr<VmTask> vm = Launch();
  launched_.spec.boot_watch = AgentPlan(absl::Milliseconds(300));
  launched_.spec.boot_watch.port_label = "http";
  launched_.spec.boot_watch.host_port = RefusingPort(port);
  launched_.spec.boot_watch.guest_port = 80;
  ASSERT_NE(launched_.spec.boot_watch.host_port, 0);
  VmWatches watches(events_.Sink(), nullptr);
  watches.Begin(kTask, vm, launched_);
  const WatchEvent timeout = events_.First(absl::Seconds(5));
  vm->MarkExited(ExitResult{});  // as QEMU's exit would be once stopped
  EXPECT_THAT(timeout.message, HasSubstr("the guest agent (guest-ping) or port \"http\" (TCP, guest port 80) did not "
                                         "answer; no screenshot (the task's alloc dir is not known)"));
  EXPECT_FALSE(watches.TakeBootFailure(kTask.id).empty());
}

TEST_F(VmWatchesTest, EndingTheWatchesBeforeTheGuestAnswersReportsNothing) {
  FakeAgentSocket agent(record_.guest_agent_socket);  // never answers
  std::shared_ptr<VmTask> vm = Launch();
  // Short, so the probe in flight (which End lets finish) ends soon; End comes first.
  launched_.spec.boot_watch = AgentPlan(absl::Seconds(1));
  VmWatches watches(events_.Sink(), nullptr);
  watches.End("not/watched/0");  // no watch: nothing to do
  watches.Begin(kTask, vm, launched_);
  ASSERT_TRUE(Eventually([&agent] { return agent.unanswered >= 1; }, absl::Seconds(5)));
  const absl::Time start = absl::Now();
  watches.End(kTask.id);
  EXPECT_LT(absl::Now() - start, absl::Seconds(1) + absl::Milliseconds(500));
  EXPECT_EQ(events_.count(), 0u) << "neither ready nor a boot timeout";
  EXPECT_EQ(watches.TakeBootFailure(kTask.id), "");
}

TEST_F(VmWatchesTest, AColdWarmStartGuestNotReadyInTimeSavesNoTemplate) {
  FakeAgentSocket agent(record_.guest_agent_socket);  // never answers
  std::shared_ptr<VmTask> vm = Launch();
  launched_.warm_capture = std::make_shared<WarmCapture>();
  launched_.spec.warm.ready = AgentPlan(absl::Milliseconds(300));
  VmWatches watches(events_.Sink(), [this] { ++templates_saved_; });
  watches.Begin(kTask, vm, launched_);
  EXPECT_EQ(launched_.warm_capture, nullptr) << "the watch took the capture";
  const WatchEvent event = events_.First(absl::Seconds(5));
  EXPECT_EQ(event.message, "Warm start: no template saved: the guest was not ready within 300ms");
  EXPECT_THAT(event.annotations, ::testing::ElementsAre(::testing::Pair("warm_start", "cold")));
  EXPECT_EQ(templates_saved_, 0);
  EXPECT_EQ(watches.TakeBootFailure(kTask.id), "") << "no boot_timeout: the VM keeps running";
}

TEST_F(VmWatchesTest, AColdWarmStartSaveThatFailsIsReportedAndCountsNothing) {
  FakeAgentSocket agent(record_.guest_agent_socket);
  agent.ready = true;
  // QEMU refuses the state fd: the save fails before the guest is paused.
  ScriptedPeer qmp(testing::Concat(Handshake(), {
      FromClient(R"({"execute": "getfd", "arguments": {"fdname": "warm-state"}, "id": 2})"),
      ToClient(R"({"error": {"class": "GenericError", "desc": "No file descriptor supplied via SCM_RIGHTS"}, "id": 2})")}));
  std::shared_ptr<VmTask> vm = Launch(AdoptOrDie(qmp));
  launched_.warm_capture = std::make_shared<WarmCapture>();
  launched_.warm_capture->state.reset(::memfd_create("warm-state", MFD_CLOEXEC));
  launched_.spec.warm.ready = AgentPlan(absl::Seconds(10));
  VmWatches watches(events_.Sink(), [this] { ++templates_saved_; });
  watches.Begin(kTask, vm, launched_);
  const WatchEvent event = events_.First(absl::Seconds(5));
  EXPECT_THAT(event.message, HasSubstr("Warm start: no template saved: "));
  EXPECT_THAT(event.message, HasSubstr("No file descriptor supplied via SCM_RIGHTS"));
  EXPECT_EQ(event.annotations.at("warm_start"), "cold");
  EXPECT_TRUE(qmp.WaitDone(absl::Seconds(5)));
  EXPECT_THAT(qmp.failures(), ::testing::IsEmpty()) << "nothing after the refused getfd (no stop, no migrate)";
  watches.End(kTask.id);
  EXPECT_EQ(templates_saved_, 0);
}

TEST_F(VmWatchesTest, ARestoredGuestsClockIsSetToTheHostsOnceItsAgentAnswers) {
  FakeAgentSocket agent(record_.guest_agent_socket);
  agent.ready = true;
  record_.warm_start = "restored";
  std::shared_ptr<VmTask> vm = Launch();
  launched_.spec.guest_agent = true;
  VmWatches watches(events_.Sink(), nullptr);
  const int64_t before = absl::ToUnixNanos(absl::Now());
  watches.Begin(kTask, vm, launched_);
  const WatchEvent event = events_.First(absl::Seconds(5));
  const int64_t after = absl::ToUnixNanos(absl::Now());
  EXPECT_EQ(event.message, "Warm start: the guest's clock was set to the host's time");
  EXPECT_THAT(event.annotations, ::testing::ElementsAre(::testing::Pair("warm_clock", "set")));
  const std::vector<json> requests = agent.requests();
  ASSERT_FALSE(requests.empty());
  EXPECT_EQ(requests.back()["execute"], "guest-set-time");
  const int64_t set = requests.back()["arguments"]["time"].get<int64_t>();
  EXPECT_GE(set, before);
  EXPECT_LE(set, after);
}

TEST_F(VmWatchesTest, ARestoredGuestThatRefusesTheClockIsReported) {
  FakeAgentSocket agent(record_.guest_agent_socket, [](const json& request) {
    if (request["execute"] != "guest-set-time") return json{{"return", json::object()}};
    return json{{"error", {{"class", "GenericError"}, {"desc", "hwclock failed to set hardware clock"}}}};
  });
  agent.ready = true;
  record_.warm_start = "restored";
  std::shared_ptr<VmTask> vm = Launch();
  launched_.spec.guest_agent = true;
  VmWatches watches(events_.Sink(), nullptr);
  watches.Begin(kTask, vm, launched_);
  const WatchEvent event = events_.First(absl::Seconds(5));
  EXPECT_THAT(event.message, HasSubstr("Warm start: the guest's clock could not be set: "));
  EXPECT_THAT(event.message, HasSubstr("hwclock failed to set hardware clock"));
  EXPECT_THAT(event.annotations, ::testing::ElementsAre(::testing::Pair("warm_clock", "failed")));
}

}  // namespace
}  // namespace ndq
