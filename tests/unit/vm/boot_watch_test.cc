// vm/boot_watch: the thread that waits for a booting guest to answer, against
// a fake guest agent on a real unix socket, a real TCP listener standing in
// for QEMU's port forward and a scripted QMP peer for `info usernet`.
#include "vm/boot_watch.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "../../support/eventually.h"
#include "../../support/fake_agent_socket.h"
#include "../../support/scripted_clients.h"
#include "../../support/scripted_qmp.h"
#include "../../support/temp_dir.h"
#include "absl/strings/str_cat.h"
#include "base/unique_fd.h"

namespace ndq {
namespace {

using ::ndq::testing::Eventually;
using ::ndq::testing::FakeAgentSocket;
using ::ndq::testing::FromClient;
using ::ndq::testing::Handshake;
using ::ndq::testing::ScriptedPeer;
using ::ndq::testing::TempDir;
using ::ndq::testing::ToClient;

TEST(UsernetHasEstablished, FindsTheGuestsAcceptedConnection) {
  // Captured from QEMU 7.2.22 (libslirp 4.7.0) with hostfwd=tcp:127.0.0.1:18080-:80.
  const std::string booting =
      "Hub -1 (n0):\r\n"
      "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
      "  TCP[SYN_SENT]      17       127.0.0.1 18080       10.0.2.15    80     0     0\r\n"
      "  TCP[HOST_FORWARD]  11       127.0.0.1 18080       10.0.2.15    80     0     0\r\n";
  const std::string ready =
      "Hub -1 (n0):\r\n"
      "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
      "  TCP[ESTABLISHED]   21       127.0.0.1 18080       10.0.2.15    80     0     0\r\n"
      "  TCP[HOST_FORWARD]  11       127.0.0.1 18080       10.0.2.15    80     0     0\r\n";
  EXPECT_FALSE(UsernetHasEstablished(booting, 18080, 80));
  EXPECT_TRUE(UsernetHasEstablished(ready, 18080, 80));
  EXPECT_FALSE(UsernetHasEstablished(ready, 18081, 80)) << "another forward";
  EXPECT_FALSE(UsernetHasEstablished(ready, 18080, 22)) << "another guest port";
  EXPECT_FALSE(UsernetHasEstablished("", 18080, 80));
  EXPECT_FALSE(UsernetHasEstablished("  TCP[ESTABLISHED]   21  127.0.0.1 18080\r\n", 18080, 80)) << "a cut line";
  EXPECT_FALSE(UsernetHasEstablished("  TCP[ESTABLISHED]   21  127.0.0.1 http  10.0.2.15  80\r\n", 18080, 80));
}

// What the watch called back, waitable.
struct WatchOutcome {
  absl::Mutex mu;
  std::string ready_what ABSL_GUARDED_BY(mu);
  int timeouts ABSL_GUARDED_BY(mu) = 0;
  absl::Time ended ABSL_GUARDED_BY(mu);
};

std::shared_ptr<VmTask> MakeVm(const std::string& agent_socket, std::unique_ptr<QmpClient> qmp = nullptr) {
  DriverStateRecord record;
  record.guest_agent_socket = agent_socket;
  record.guest_agent = !agent_socket.empty();
  return std::make_shared<VmTask>(TaskIdentity{"a/web/1", "web", "a"}, record, UniqueFd(), UniqueFd(), std::move(qmp));
}

BootWatchContext Watch(std::shared_ptr<VmTask> vm, const BootWatchPlan& plan, WatchOutcome& outcome) {
  BootWatchContext context;
  context.vm = std::move(vm);
  context.plan = plan;
  context.started = absl::Now();
  context.on_ready = [&outcome](const std::string& what, absl::Duration) {
    absl::MutexLock lock(&outcome.mu);
    outcome.ready_what = what;
    outcome.ended = absl::Now();
  };
  context.on_timeout = [&outcome] {
    absl::MutexLock lock(&outcome.mu);
    ++outcome.timeouts;
    outcome.ended = absl::Now();
  };
  return context;
}

BootWatchPlan AgentPlan(absl::Duration timeout) {
  BootWatchPlan plan;
  plan.timeout = timeout;
  plan.guest_agent = true;
  return plan;
}

BootWatchContext AgentWatch(const std::string& socket, absl::Duration timeout, WatchOutcome& outcome) {
  return Watch(MakeVm(socket), AgentPlan(timeout), outcome);
}

bool Ended(WatchOutcome& outcome, absl::Duration timeout) {
  absl::MutexLock lock(&outcome.mu);
  auto ended = [&outcome]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(outcome.mu) {
    return !outcome.ready_what.empty() || outcome.timeouts > 0;
  };
  return outcome.mu.AwaitWithTimeout(absl::Condition(&ended), timeout);
}

TEST(BootWatch, ReadyWhenTheGuestAgentAnswers) {
  TempDir tmp;
  FakeAgentSocket agent(tmp.path() + "/qga.sock");
  WatchOutcome outcome;
  const absl::Time start = absl::Now();
  BootWatch watch(AgentWatch(tmp.path() + "/qga.sock", absl::Seconds(30), outcome));
  // The guest "boots": the watch's probes get no answer until it has probed twice.
  ASSERT_TRUE(Eventually([&agent] { return agent.unanswered >= 2; }, absl::Seconds(10)));
  agent.ready = true;
  ASSERT_TRUE(Ended(outcome, absl::Seconds(10)));
  absl::MutexLock lock(&outcome.mu);
  EXPECT_EQ(outcome.ready_what, "the guest agent");
  EXPECT_EQ(outcome.timeouts, 0);
  EXPECT_LT(outcome.ended - start, absl::Seconds(5));
}

TEST(BootWatch, TimesOutWhenNothingAnswers) {
  TempDir tmp;
  FakeAgentSocket agent(tmp.path() + "/qga.sock");
  WatchOutcome outcome;
  const absl::Time start = absl::Now();
  BootWatch watch(AgentWatch(tmp.path() + "/qga.sock", absl::Seconds(1), outcome));
  ASSERT_TRUE(Ended(outcome, absl::Seconds(10)));
  absl::MutexLock lock(&outcome.mu);
  EXPECT_EQ(outcome.timeouts, 1);
  EXPECT_TRUE(outcome.ready_what.empty());
  EXPECT_GE(outcome.ended - start, absl::Seconds(1));
  EXPECT_LT(outcome.ended - start, absl::Seconds(3));
}

TEST(BootWatch, EndingTheWatchCallsNothingBack) {
  TempDir tmp;
  FakeAgentSocket agent(tmp.path() + "/qga.sock");
  WatchOutcome outcome;
  const absl::Time start = absl::Now();
  {
    BootWatch watch(AgentWatch(tmp.path() + "/qga.sock", absl::Seconds(1), outcome));
  }
  EXPECT_LT(absl::Now() - start, BootWatch::kProbeTimeout + absl::Seconds(1)) << "a probe in flight ends first";
  // The thread is joined: nothing can call back any more.
  absl::MutexLock lock(&outcome.mu);
  EXPECT_EQ(outcome.timeouts, 0);
  EXPECT_TRUE(outcome.ready_what.empty());
}

TEST(BootWatch, AVmThatExitsWhileBootingIsNotTimedOut) {
  TempDir tmp;
  FakeAgentSocket agent(tmp.path() + "/qga.sock");
  WatchOutcome outcome;
  std::shared_ptr<VmTask> vm = MakeVm(tmp.path() + "/qga.sock");
  BootWatch watch(Watch(vm, AgentPlan(absl::Milliseconds(400)), outcome));
  ASSERT_TRUE(Eventually([&agent] { return agent.unanswered >= 1; }, absl::Seconds(10)));
  vm->MarkExited(ExitResult{});  // the VM ends during a probe
  // Its exit is reported as such; a boot timeout on top would be wrong.
  EXPECT_FALSE(Ended(outcome, absl::Milliseconds(1200)));
}

TEST(BootWatch, ASessionThatFailsItsPingIsDroppedAndTheNextProbeConnectsAnew) {
  TempDir tmp;
  std::atomic<int> pings{0};
  FakeAgentSocket agent(tmp.path() + "/qga.sock", [&pings](const nlohmann::json&) {
    // The first session breaks at its ping (the guest end reopened), the second answers.
    return ++pings == 1 ? FakeAgentSocket::HangUp() : nlohmann::json{{"return", nlohmann::json::object()}};
  });
  agent.ready = true;
  WatchOutcome outcome;
  BootWatch watch(AgentWatch(tmp.path() + "/qga.sock", absl::Seconds(10), outcome));
  ASSERT_TRUE(Ended(outcome, absl::Seconds(5)));
  absl::MutexLock lock(&outcome.mu);
  EXPECT_EQ(outcome.ready_what, "the guest agent");
  EXPECT_EQ(agent.connections, 2);
  EXPECT_EQ(pings, 2);
}

// A TCP listener on 127.0.0.1 standing in for QEMU's forward of a guest port:
// connections complete in its backlog and stay open, as QEMU keeps them while
// it tries the guest. Without Listen() the port is taken but refuses.
class ForwardPort {
 public:
  ForwardPort() : fd_(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) {
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (::bind(fd_.get(), reinterpret_cast<sockaddr*>(&addr), len) != 0 ||
        ::getsockname(fd_.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      std::abort();
    }
    port_ = ntohs(addr.sin_port);
  }
  void Listen() {
    if (::listen(fd_.get(), 16) != 0) std::abort();
  }
  int port() const { return port_; }

 private:
  UniqueFd fd_;
  int port_ = 0;
};

BootWatchPlan PortPlan(const ForwardPort& forward, absl::Duration timeout) {
  BootWatchPlan plan;
  plan.timeout = timeout;
  plan.port_label = "http";
  plan.host_ip = "127.0.0.1";
  plan.host_port = forward.port();
  plan.guest_port = 80;
  return plan;
}

// `info usernet` as QEMU answers it, with the forward's connection in `state`.
std::string UsernetReply(int id, const std::string& state, int host_port) {
  const std::string text = absl::StrCat(
      "Hub -1 (n0):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n  TCP[",
      state, "]   21       127.0.0.1 ", host_port, "       10.0.2.15    80     0     0\r\n");
  return nlohmann::json{{"return", text}, {"id", id}}.dump();
}

std::string UsernetRequest(int id) {
  return nlohmann::json{{"execute", "human-monitor-command"}, {"arguments", {{"command-line", "info usernet"}}}, {"id", id}}
      .dump();
}

std::unique_ptr<QmpClient> AdoptOrDie(ScriptedPeer& peer) { return ::ndq::testing::AdoptQmpOrDie(peer, "test QMP"); }

TEST(BootWatch, ReadyWhenTheGuestAcceptsTheForwardedPort) {
  ForwardPort forward;
  forward.Listen();
  // QEMU shows the connection half-open while the guest boots, then established.
  ScriptedPeer qmp(testing::Concat(Handshake(), {FromClient(UsernetRequest(2)),
                                                 ToClient(UsernetReply(2, "SYN_SENT", forward.port())),
                                                 FromClient(UsernetRequest(3)),
                                                 ToClient(UsernetReply(3, "ESTABLISHED", forward.port()))}));
  WatchOutcome outcome;
  BootWatch watch(Watch(MakeVm("", AdoptOrDie(qmp)), PortPlan(forward, absl::Seconds(10)), outcome));
  ASSERT_TRUE(Ended(outcome, absl::Seconds(5)));
  EXPECT_TRUE(qmp.WaitDone(absl::Seconds(1)));
  EXPECT_THAT(qmp.failures(), ::testing::IsEmpty());
  absl::MutexLock lock(&outcome.mu);
  EXPECT_EQ(outcome.ready_what, "port \"http\"");
  EXPECT_EQ(outcome.timeouts, 0);
}

TEST(BootWatch, APortNothingForwardsTimesOutWithoutAskingQemu) {
  ForwardPort forward;  // bound, not listening: connections are refused
  ScriptedPeer qmp(Handshake());
  WatchOutcome outcome;
  const absl::Time start = absl::Now();
  BootWatch watch(Watch(MakeVm("", AdoptOrDie(qmp)), PortPlan(forward, absl::Milliseconds(600)), outcome));
  ASSERT_TRUE(Ended(outcome, absl::Seconds(5)));
  {
    absl::MutexLock lock(&outcome.mu);
    EXPECT_EQ(outcome.timeouts, 1);
    EXPECT_GE(outcome.ended - start, absl::Milliseconds(600));
  }
  EXPECT_FALSE(qmp.WaitReceived(2, absl::ZeroDuration())) << "no connection, so no `info usernet`";
}

TEST(BootWatch, ANamespaceItCannotEnterStillLetsTheAgentProbeRun) {
  TempDir tmp;
  FakeAgentSocket agent(tmp.path() + "/qga.sock");
  agent.ready = true;
  WatchOutcome outcome;
  BootWatchContext context = AgentWatch(tmp.path() + "/qga.sock", absl::Seconds(10), outcome);
  context.netns = tmp.path() + "/no-such-netns";
  BootWatch watch(std::move(context));
  ASSERT_TRUE(Ended(outcome, absl::Seconds(5)));
  absl::MutexLock lock(&outcome.mu);
  EXPECT_EQ(outcome.ready_what, "the guest agent");
}

}  // namespace
}  // namespace ndq
