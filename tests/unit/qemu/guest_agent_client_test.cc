// GuestAgentClient against a transcript recorded from the real qemu-ga 7.2
// (tests/unit/qemu/qmp_transcripts/guest_agent.qga) and scripted conversations
// a real agent cannot be made to have, played by a peer on a socketpair.
#include "qemu/guest_agent_client.h"

#include <sys/socket.h>
#include <unistd.h>

#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "../../support/control_channel.h"
#include "../../support/scripted_clients.h"
#include "../../support/scripted_qmp.h"
#include "../../support/temp_dir.h"

namespace ndq {
namespace {

using nlohmann::json;
using ::ndq::testing::BindUnix;
using ::ndq::testing::Eof;
using ::ndq::testing::FromClient;
using ::ndq::testing::AdoptAgentOrDie;
using ::ndq::testing::kFast;
using ::ndq::testing::kGenerous;
using ::ndq::testing::LoadTranscript;
using ::ndq::testing::Nested;
using ::ndq::testing::ScriptedPeer;
using ::ndq::testing::Step;
using ::ndq::testing::TempDir;
using ::ndq::testing::ToClient;
using ::testing::HasSubstr;

// The opening sync as qemu-ga 7.2 answers it: a parse error for the 0xFF
// itself, then the delimited reply.
std::vector<Step> AgentSync(int recorded_id) {
  return {FromClient(absl::StrCat("\xff{\"execute\": \"guest-sync-delimited\", \"arguments\": {\"id\": ",
                                  recorded_id, "}}")),
          ToClient(R"({"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}})"),
          ToClient(absl::StrCat("\xff{\"return\": ", recorded_id, "}"))};
}

TEST(guest_agent_client, RealQemuGaTranscript) {
  ScriptedPeer peer(LoadTranscript("guest_agent.qga"));
  auto agent = AdoptAgentOrDie(peer);
  ASSERT_NE(agent, nullptr);
  EXPECT_TRUE(agent->Ping().ok());
  absl::StatusOr<json> info = agent->Info();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ((*info)["version"], "7.2.22");
  EXPECT_TRUE((*info)["supported_commands"].is_array());

  absl::Status unknown = agent->Execute("no-such-command").status();
  EXPECT_TRUE(absl::IsUnimplemented(unknown)) << unknown;
  EXPECT_EQ(QmpErrorClass(unknown), "CommandNotFound");

  // qemu-ga refuses (the recording blocked guest-shutdown); the refusal comes
  // back as an error, not as success.
  absl::Status shutdown = agent->Shutdown("powerdown");
  EXPECT_EQ(QmpErrorClass(shutdown), "CommandNotFound") << shutdown;
  EXPECT_THAT(std::string(shutdown.message()), HasSubstr("guest-shutdown has been disabled"));
  EXPECT_TRUE(peer.WaitDone(kGenerous));
  EXPECT_THAT(peer.failures(), ::testing::IsEmpty());
}

TEST(guest_agent_client, SyncDiscardsStaleData) {
  std::vector<Step> steps = {ToClient(R"({"return": {}})"), ToClient(R"({"return": {"version")")};
  steps.push_back(FromClient("\xff{\"execute\": \"guest-sync-delimited\", \"arguments\": {\"id\": 7}}"));
  steps.push_back(ToClient(R"({"error": {"class": "GenericError", "desc": "stale partial input"}})"));
  steps.push_back(ToClient("\xff{\"return\": 999}"));  // an older sync's answer
  steps.push_back(ToClient("\xff{\"return\": 7}"));
  steps.push_back(FromClient(R"({"execute": "guest-ping"})"));
  steps.push_back(ToClient(R"({"return": {}})"));
  ScriptedPeer peer(steps);
  auto agent = AdoptAgentOrDie(peer);
  ASSERT_NE(agent, nullptr);
  EXPECT_TRUE(agent->Ping().ok());
  EXPECT_THAT(peer.failures(), ::testing::IsEmpty());
}

TEST(guest_agent_client, SyncRepeatsALostRequestAndWaitsForTheNewestReply) {
  std::vector<Step> first = AgentSync(1), second = AgentSync(2);
  // The first request vanishes; the agent then answers both, in order.
  std::vector<Step> steps = {first[0], second[0], first[1], first[2], second[1], second[2]};
  steps.push_back(FromClient(R"({"execute": "guest-ping"})"));
  steps.push_back(ToClient(R"({"return": {}})"));
  ScriptedPeer peer(steps);
  const absl::Time start = absl::Now();
  auto agent = AdoptAgentOrDie(peer);
  ASSERT_NE(agent, nullptr);
  EXPECT_GE(absl::Now() - start, absl::Seconds(1));
  EXPECT_TRUE(agent->Ping().ok());  // nothing stale left over
  EXPECT_THAT(peer.failures(), ::testing::IsEmpty());
}

TEST(guest_agent_client, SilentShutdownIsConfirmedBySync) {
  std::vector<Step> steps = AgentSync(1);
  steps.push_back(FromClient(R"({"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}})"));
  steps.push_back(FromClient(R"({"execute": "guest-sync-delimited", "arguments": {"id": 2}})"));
  steps.push_back(ToClient("\xff{\"return\": 2}"));
  steps.push_back(FromClient(R"({"execute": "guest-ping"})"));
  steps.push_back(ToClient(R"({"return": {}})"));
  ScriptedPeer peer(steps);
  auto agent = AdoptAgentOrDie(peer);
  ASSERT_NE(agent, nullptr);
  EXPECT_TRUE(agent->Shutdown("powerdown").ok());
  EXPECT_TRUE(agent->Ping().ok());  // still in sync, no resync needed
  EXPECT_THAT(peer.failures(), ::testing::IsEmpty());
}

TEST(guest_agent_client, ShutdownThatTakesTheVmAwayIsSuccess) {
  std::vector<Step> steps = AgentSync(1);
  steps.push_back(FromClient(R"({"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}})"));
  steps.push_back(Eof());
  ScriptedPeer peer(steps);
  auto agent = AdoptAgentOrDie(peer);
  ASSERT_NE(agent, nullptr);
  const absl::Time start = absl::Now();
  absl::Status status = agent->Shutdown("powerdown", absl::Seconds(60));
  EXPECT_TRUE(status.ok()) << status;
  EXPECT_LT(absl::Now() - start, kFast);
  // Afterwards the channel is gone, and says so at once.
  EXPECT_TRUE(absl::IsUnavailable(agent->Ping(absl::Seconds(60))));
  EXPECT_LT(absl::Now() - start, kFast);
}

TEST(guest_agent_client, TimeoutThenResyncSkipsTheLateReply) {
  std::vector<Step> steps = AgentSync(1);
  steps.push_back(FromClient(R"({"execute": "guest-ping"})"));
  // No answer in time; it arrives after the client has moved on.
  for (const Step& s : AgentSync(2)) {
    steps.push_back(s);
    if (s.kind == Step::kFromClient) steps.push_back(ToClient(R"({"return": {}})"));
  }
  steps.push_back(FromClient(R"({"execute": "guest-info"})"));
  steps.push_back(ToClient(R"({"return": {"version": "test"}})"));
  ScriptedPeer peer(steps);
  auto agent = AdoptAgentOrDie(peer);
  ASSERT_NE(agent, nullptr);
  absl::Status ping = agent->Ping(absl::Milliseconds(200));
  EXPECT_TRUE(absl::IsDeadlineExceeded(ping)) << ping;
  EXPECT_THAT(std::string(ping.message()), HasSubstr("did not answer guest-ping within 200ms"));
  absl::StatusOr<json> info = agent->Info();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ((*info)["version"], "test");
  EXPECT_THAT(peer.failures(), ::testing::IsEmpty());
}

TEST(guest_agent_client, NoAgentInTheGuestTimesOutWithAHint) {
  ScriptedPeer peer({});
  const absl::Time start = absl::Now();
  auto agent = GuestAgentClient::Adopt(peer.client_fd(), "guest agent socket /x", absl::Milliseconds(300));
  const absl::Duration took = absl::Now() - start;
  ASSERT_FALSE(agent.ok());
  EXPECT_TRUE(absl::IsDeadlineExceeded(agent.status())) << agent.status();
  EXPECT_THAT(std::string(agent.status().message()), HasSubstr("qemu-guest-agent running in the guest"));
  EXPECT_GE(took, absl::Milliseconds(300));
  EXPECT_LT(took, kFast);
}

TEST(guest_agent_client, GarbageReplyIsAClearError) {
  std::vector<Step> steps = AgentSync(1);
  steps.push_back(FromClient(R"({"execute": "guest-ping"})"));
  steps.push_back(ToClient("login: "));
  ScriptedPeer peer(steps);
  auto agent = AdoptAgentOrDie(peer);
  ASSERT_NE(agent, nullptr);
  absl::Status ping = agent->Ping();
  EXPECT_TRUE(absl::IsDataLoss(ping)) << ping;
  EXPECT_THAT(std::string(ping.message()), HasSubstr("login: "));
}

// The guest controls the agent's replies; Execute copied a reply nested
// 500000 levels deep and overflowed the stack. Reproduced through fuzz_guest_agent.
TEST(guest_agent_client, DeeplyNestedReplyIsAnErrorNotAStackOverflow) {
  std::vector<Step> steps = AgentSync(1);
  steps.push_back(FromClient(R"({"execute": "guest-info"})"));
  steps.push_back(ToClient(absl::StrCat(R"({"return": )", Nested(500000), "}")));
  ScriptedPeer peer(steps);
  auto agent = AdoptAgentOrDie(peer);
  ASSERT_NE(agent, nullptr);
  absl::StatusOr<json> info = agent->Info();
  EXPECT_TRUE(absl::IsDataLoss(info.status())) << info.status();
  EXPECT_THAT(std::string(info.status().message()), HasSubstr("not a reply"));
}

TEST(guest_agent_client, CloseWakesABlockedCall) {
  std::vector<Step> steps = AgentSync(1);
  steps.push_back(FromClient(R"({"execute": "guest-ping"})"));
  ScriptedPeer peer(steps);
  auto agent = AdoptAgentOrDie(peer);
  ASSERT_NE(agent, nullptr);
  absl::Status blocked;
  std::thread caller([&] { blocked = agent->Ping(absl::Seconds(60)); });
  ASSERT_TRUE(peer.WaitDone(kGenerous));
  const absl::Time start = absl::Now();
  agent->Close();
  caller.join();
  EXPECT_FALSE(blocked.ok());
  EXPECT_LT(absl::Now() - start, kFast);
}

// ---------------------------------------------------------------------------
// Replies a real agent does not send

// Two calls in one script: a helper for the steps of one call after the sync.
std::vector<Step> Then(std::vector<Step> steps, const std::vector<Step>& more) {
  steps.insert(steps.end(), more.begin(), more.end());
  return steps;
}

TEST(guest_agent_client, ArgumentsThatAreNotAnObjectAreRefusedBeforeSending) {
  ScriptedPeer peer(AgentSync(1));
  auto agent = AdoptAgentOrDie(peer);
  ASSERT_NE(agent, nullptr);
  const absl::Status status = agent->Execute("guest-exec", json::array({"/bin/true"})).status();
  EXPECT_TRUE(absl::IsInvalidArgument(status)) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("guest-exec: arguments must be a JSON object, got array"));
  EXPECT_FALSE(peer.WaitReceived(2, absl::Milliseconds(100))) << "nothing went to the agent";
}

// A reply far over kMaxReplyBytes is refused without reading it all; the
// rest of it is skipped by the next call's sync.
TEST(guest_agent_client, AnOversizedReplyIsRefusedAndTheNextCallResyncs) {
  const std::string huge = absl::StrCat(R"({"return": ")", std::string(2 * GuestAgentClient::kMaxReplyBytes, 'x'),
                                        R"("})");
  std::vector<Step> steps = Then(AgentSync(1), {FromClient(R"({"execute": "guest-info"})"), ToClient(huge)});
  steps = Then(steps, AgentSync(2));
  steps = Then(steps, {FromClient(R"({"execute": "guest-ping"})"), ToClient(R"({"return": {}})")});
  ScriptedPeer peer(steps);
  auto agent = AdoptAgentOrDie(peer);
  ASSERT_NE(agent, nullptr);
  absl::StatusOr<json> info = agent->Info();
  EXPECT_TRUE(absl::IsDataLoss(info.status())) << info.status();
  EXPECT_THAT(std::string(info.status().message()),
              HasSubstr(absl::StrCat("sent over ", GuestAgentClient::kMaxReplyBytes, " bytes without a line break")));
  const absl::Status ping = agent->Ping();
  EXPECT_TRUE(ping.ok()) << ping;
  EXPECT_TRUE(peer.WaitDone(kGenerous));
  EXPECT_THAT(peer.failures(), ::testing::IsEmpty());
}

// A line just over the bound whose tail is a reply of its own: the client must
// not act on bytes that are not the line the guest sent.
TEST(guest_agent_client, ALineJustOverTheBoundIsNotReadFromItsTail) {
  for (size_t over : {10u, 1000u}) {
    const std::string forged = R"({"return": {"version": "forged"}})";
    const std::string line =
        absl::StrCat("junk", std::string(GuestAgentClient::kMaxReplyBytes + over - 4 - forged.size(), ' '), forged);
    ScriptedPeer peer(Then(AgentSync(1), {FromClient(R"({"execute": "guest-info"})"), ToClient(line)}));
    auto agent = AdoptAgentOrDie(peer);
    ASSERT_NE(agent, nullptr);
    absl::StatusOr<json> info = agent->Info();
    EXPECT_TRUE(absl::IsDataLoss(info.status())) << over << " bytes over: " << info.status();
  }
}

// guest-exec-status carries a command's output: its call raises the bound,
// for that one reply only.
TEST(guest_agent_client, ARaisedReplyBoundHoldsForOneCall) {
  const std::string output(GuestAgentClient::kMaxReplyBytes + (512 << 10), 'A');
  const std::string reply = absl::StrCat(R"({"return": {"exited": true, "out-data": ")", output, R"("}})");
  std::vector<Step> steps = Then(AgentSync(1), {FromClient(R"({"execute": "guest-exec-status", "arguments": {"pid": 7}})"),
                                                ToClient(reply)});
  steps = Then(steps, {FromClient(R"({"execute": "guest-exec-status", "arguments": {"pid": 7}})"), ToClient(reply)});
  ScriptedPeer peer(steps);
  auto agent = AdoptAgentOrDie(peer);
  ASSERT_NE(agent, nullptr);
  absl::StatusOr<json> raised =
      agent->Execute("guest-exec-status", {{"pid", 7}}, kGenerous, 2 * GuestAgentClient::kMaxReplyBytes);
  ASSERT_TRUE(raised.ok()) << raised.status();
  EXPECT_EQ((*raised)["out-data"].get<std::string>().size(), output.size());
  absl::StatusOr<json> normal = agent->Execute("guest-exec-status", {{"pid", 7}}, kGenerous);
  EXPECT_TRUE(absl::IsDataLoss(normal.status())) << normal.status();
  EXPECT_THAT(peer.failures(), ::testing::IsEmpty());
}

TEST(guest_agent_client, RepliesEndingInCrLfAreRead) {
  ScriptedPeer peer(Then(AgentSync(1), {FromClient(R"({"execute": "guest-info"})"),
                                        ToClient("{\"return\": {\"version\": \"crlf\"}}\r")}));
  auto agent = AdoptAgentOrDie(peer);
  ASSERT_NE(agent, nullptr);
  absl::StatusOr<json> info = agent->Info();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ((*info)["version"], "crlf");
}

// A delimited line never answers a command: it is what is left of a sync.
TEST(guest_agent_client, DelimitedLinesBeforeAReplyAreSkipped) {
  ScriptedPeer peer(Then(AgentSync(1), {FromClient(R"({"execute": "guest-info"})"), ToClient("\xff{\"return\": 12345}"),
                                        ToClient(R"({"return": {"version": "after"}})")}));
  auto agent = AdoptAgentOrDie(peer);
  ASSERT_NE(agent, nullptr);
  absl::StatusOr<json> info = agent->Info();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ((*info)["version"], "after");
}

TEST(guest_agent_client, TheChannelClosingFailsTheCallAndEveryOneAfterAtOnce) {
  ScriptedPeer peer(Then(AgentSync(1), {FromClient(R"({"execute": "guest-ping"})"), Eof()}));
  auto agent = AdoptAgentOrDie(peer);
  ASSERT_NE(agent, nullptr);
  const absl::Time start = absl::Now();
  const absl::Status first = agent->Ping(absl::Seconds(60));
  EXPECT_TRUE(absl::IsUnavailable(first)) << first;
  EXPECT_THAT(std::string(first.message()), HasSubstr("closed the connection while waiting for reply"));
  const absl::Status second = agent->Info(absl::Seconds(60)).status();
  EXPECT_TRUE(absl::IsUnavailable(second)) << second;
  EXPECT_LT(absl::Now() - start, kFast);
}

// ---------------------------------------------------------------------------
// Shutdown's answers

std::vector<Step> ShutdownAsked(const std::string& mode) {
  return Then(AgentSync(1),
              {FromClient(absl::StrCat(R"({"execute": "guest-shutdown", "arguments": {"mode": ")", mode, R"("}})")),
               FromClient(R"({"execute": "guest-sync-delimited", "arguments": {"id": 2}})")});
}

TEST(guest_agent_client, ShutdownRefusedWithAnErrorIsAnError) {
  ScriptedPeer peer(
      Then(ShutdownAsked("halt"), {ToClient(R"({"error": {"class": "GenericError", "desc": "not now"}})")}));
  auto agent = AdoptAgentOrDie(peer);
  ASSERT_NE(agent, nullptr);
  const absl::Status status = agent->Shutdown("halt");
  EXPECT_EQ(status.code(), absl::StatusCode::kUnknown) << status;
  EXPECT_EQ(status.message(), "the guest agent rejected guest-shutdown: not now [GenericError]");
  EXPECT_THAT(peer.failures(), ::testing::IsEmpty());
}

TEST(guest_agent_client, ShutdownAnsweredWithAReturnIsAccepted) {
  ScriptedPeer peer(Then(ShutdownAsked("reboot"), {ToClient(R"({"return": {}})")}));
  auto agent = AdoptAgentOrDie(peer);
  ASSERT_NE(agent, nullptr);
  const absl::Status status = agent->Shutdown("reboot");
  EXPECT_TRUE(status.ok()) << status;
  EXPECT_THAT(peer.failures(), ::testing::IsEmpty());
}

TEST(guest_agent_client, ShutdownNeitherConfirmedNorRefusedTimesOut) {
  ScriptedPeer peer(ShutdownAsked("powerdown"));
  auto agent = AdoptAgentOrDie(peer);
  ASSERT_NE(agent, nullptr);
  const absl::Time start = absl::Now();
  const absl::Status status = agent->Shutdown("powerdown", absl::Milliseconds(300));
  const absl::Duration took = absl::Now() - start;
  EXPECT_TRUE(absl::IsDeadlineExceeded(status)) << status;
  EXPECT_THAT(std::string(status.message()),
              HasSubstr("neither confirmed nor refused guest-shutdown within 300ms; the guest may still be shutting down"));
  EXPECT_GE(took, absl::Milliseconds(300));
  EXPECT_LT(took, kFast);
}

// ---------------------------------------------------------------------------
// Connecting by path

TEST(guest_agent_client_connect, ConnectsToTheSocketAndSyncs) {
  TempDir dir;
  const std::string path = dir / "qga.sock";
  const int listener = BindUnix(path);
  ASSERT_GE(listener, 0);
  ASSERT_EQ(::listen(listener, 1), 0);
  std::thread server([&] {
    ScriptedPeer peer(::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC),
                      Then(AgentSync(1), {FromClient(R"({"execute": "guest-ping"})"), ToClient(R"({"return": {}})")}));
    EXPECT_TRUE(peer.WaitDone(kGenerous));
    EXPECT_THAT(peer.failures(), ::testing::IsEmpty());
  });
  auto agent = GuestAgentClient::Connect(path, kGenerous, ::getpid());  // this process serves it
  EXPECT_TRUE(agent.ok()) << agent.status();
  if (agent.ok()) {
    EXPECT_TRUE((*agent)->Ping().ok());
  }
  server.join();
  ::close(listener);
}

// The VM's QEMU pid reaches the socket check (control_socket_test.cc has the
// check itself): a socket this process serves is not QEMU's.
TEST(guest_agent_client_connect, RefusesAServerThatIsNotTheVmsQemu) {
  TempDir dir;
  const std::string path = dir / "qga.sock";
  const int listener = BindUnix(path);
  ASSERT_GE(listener, 0);
  ASSERT_EQ(::listen(listener, 8), 0);
  const absl::Status foreign = GuestAgentClient::Connect(path, kFast, ::getpid() + 100000).status();
  EXPECT_TRUE(absl::IsPermissionDenied(foreign)) << foreign;
  EXPECT_THAT(std::string(foreign.message()), HasSubstr("not by the VM's QEMU"));
  ::close(listener);
}

}  // namespace
}  // namespace ndq
