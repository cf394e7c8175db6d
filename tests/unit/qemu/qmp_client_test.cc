// QmpClient against transcripts recorded from the real QEMU 7.2
// (tests/unit/qemu/qmp_transcripts, re-recorded by capture.py there), replayed
// by a scripted peer on a socketpair; Connect against sockets bound here.
#include "qemu/qmp_client.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "../../support/control_channel.h"
#include "../../support/eventually.h"
#include "../../support/scripted_clients.h"
#include "../../support/scripted_qmp.h"
#include "../../support/temp_dir.h"

namespace ndq {
namespace {

using nlohmann::json;
using ::ndq::testing::BindUnix;
using ::ndq::testing::Concat;
using ::ndq::testing::Eof;
using ::ndq::testing::Eventually;
using ::ndq::testing::FromClient;
using ::ndq::testing::Handshake;
using ::ndq::testing::kFast;
using ::ndq::testing::kGenerous;
using ::ndq::testing::LoadTranscript;
using ::ndq::testing::Nested;
using ::ndq::testing::ScriptedPeer;
using ::ndq::testing::Step;
using ::ndq::testing::TempDir;
using ::ndq::testing::ToClient;
using ::testing::HasSubstr;

std::unique_ptr<QmpClient> AdoptOrDie(ScriptedPeer& peer) { return ::ndq::testing::AdoptQmpOrDie(peer, "test peer"); }

// Events the handler saw, waitable.
class EventLog {
 public:
  void Add(const QmpEvent& e) {
    absl::MutexLock lock(&mu_);
    events_.push_back(e);
  }
  std::vector<std::string> Names() {
    absl::MutexLock lock(&mu_);
    std::vector<std::string> out;
    for (const QmpEvent& e : events_) out.push_back(e.name);
    return out;
  }
  bool WaitForCount(size_t n, absl::Duration timeout) {
    absl::MutexLock lock(&mu_);
    auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return events_.size() >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&ready), timeout);
  }

 private:
  absl::Mutex mu_;
  std::vector<QmpEvent> events_ ABSL_GUARDED_BY(mu_);
};

// ---------------------------------------------------------------------------
// QMP, real transcripts

TEST(qmp_client, ParsesTheGreeting) {
  ScriptedPeer peer(Handshake());
  auto client = AdoptOrDie(peer);
  ASSERT_NE(client, nullptr);
  EXPECT_EQ(client->version().ToString(), "7.2.22");
  EXPECT_EQ(client->version().major, 7);
  EXPECT_EQ(client->version().package, "Debian 1:7.2+dfsg-7+deb12u18+b3");
  EXPECT_EQ(client->offered_capabilities(), std::vector<std::string>{"oob"});
  EXPECT_TRUE(client->connected());
  EXPECT_TRUE(peer.WaitDone(kGenerous));
  EXPECT_THAT(peer.failures(), ::testing::IsEmpty());
}

TEST(qmp_client, StatusCycleWithEventsAroundReplies) {
  ScriptedPeer peer(LoadTranscript("status_cycle.qmp"));
  auto client = AdoptOrDie(peer);
  ASSERT_NE(client, nullptr);
  EventLog log;
  client->SetEventHandler([&](const QmpEvent& e) { log.Add(e); });

  EXPECT_EQ(client->QueryStatus().value_or("error"), "prelaunch");
  ASSERT_TRUE(client->Cont().ok());
  // QEMU sends RESUME before cont's reply; the reader hands it out first.
  EXPECT_EQ(log.Names(), std::vector<std::string>{"RESUME"});
  EXPECT_EQ(client->QueryStatus().value_or("error"), "running");
  ASSERT_TRUE(client->Stop().ok());
  EXPECT_EQ(client->QueryStatus().value_or("error"), "paused");

  // Events that came before the wait are still found, each once.
  absl::StatusOr<QmpEvent> stop = client->WaitForEvent("STOP", absl::ZeroDuration());
  ASSERT_TRUE(stop.ok()) << stop.status();
  EXPECT_GT(stop->timestamp, absl::FromUnixSeconds(1600000000));
  EXPECT_TRUE(stop->data.is_object() && stop->data.empty());
  EXPECT_TRUE(absl::IsDeadlineExceeded(client->WaitForEvent("STOP", absl::Milliseconds(50)).status()));
  EXPECT_TRUE(client->WaitForEvent("RESUME", absl::ZeroDuration()).ok());

  ASSERT_TRUE(client->Quit().ok());
  absl::StatusOr<QmpEvent> shutdown = client->WaitForEvent("SHUTDOWN", kGenerous);
  ASSERT_TRUE(shutdown.ok()) << shutdown.status();
  EXPECT_EQ(shutdown->data, json({{"guest", false}, {"reason", "host-qmp-quit"}}));
  EXPECT_TRUE(client->WaitForDisconnect(kGenerous).ok());
  EXPECT_FALSE(client->connected());
  EXPECT_EQ(log.Names(), (std::vector<std::string>{"RESUME", "STOP", "SHUTDOWN"}));

  // After EOF, everything fails at once with the reason.
  const absl::Time start = absl::Now();
  absl::Status late = client->QueryStatus(absl::Seconds(30)).status();
  EXPECT_TRUE(absl::IsUnavailable(late)) << late;
  EXPECT_THAT(std::string(late.message()), HasSubstr("QEMU closed the connection"));
  absl::Status no_event = client->WaitForEvent("RESET", absl::Seconds(30)).status();
  EXPECT_TRUE(absl::IsUnavailable(no_event)) << no_event;
  EXPECT_LT(absl::Now() - start, kFast);
  EXPECT_THAT(peer.failures(), ::testing::IsEmpty());
}

TEST(qmp_client, ErrorRepliesCarryQemusClassAndDescription) {
  ScriptedPeer peer(LoadTranscript("errors.qmp"));
  auto client = AdoptOrDie(peer);
  ASSERT_NE(client, nullptr);

  absl::StatusOr<json> unknown = client->Execute("no-such-command");
  EXPECT_TRUE(absl::IsUnimplemented(unknown.status())) << unknown.status();
  EXPECT_EQ(QmpErrorClass(unknown.status()), "CommandNotFound");
  EXPECT_THAT(std::string(unknown.status().message()),
              HasSubstr("The command no-such-command has not been found"));

  absl::StatusOr<json> bad = client->Execute("system_reset", {{"bogus", 1}});
  EXPECT_EQ(QmpErrorClass(bad.status()), "GenericError");
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("Parameter 'bogus' is unexpected"));

  // The session is still fine afterwards.
  EXPECT_EQ(client->QueryStatus().value_or("error"), "prelaunch");
  EXPECT_EQ(QmpErrorClass(absl::InternalError("x")), "");
  EXPECT_THAT(peer.failures(), ::testing::IsEmpty());
}

TEST(qmp_client, PowerdownThenGuestShutdownThenEof) {
  ScriptedPeer peer(LoadTranscript("powerdown.qmp"));
  auto client = AdoptOrDie(peer);
  ASSERT_NE(client, nullptr);
  EXPECT_EQ(client->QueryStatus().value_or("error"), "running");
  ASSERT_TRUE(client->SystemPowerdown().ok());
  ASSERT_TRUE(client->WaitForEvent("POWERDOWN", kGenerous).ok());
  absl::StatusOr<QmpEvent> shutdown = client->WaitForEvent("SHUTDOWN", kGenerous);
  ASSERT_TRUE(shutdown.ok()) << shutdown.status();
  EXPECT_EQ(shutdown->data["guest"], true);
  EXPECT_EQ(shutdown->data["reason"], "guest-shutdown");
  EXPECT_TRUE(client->WaitForDisconnect(kGenerous).ok());
  EXPECT_TRUE(absl::IsUnavailable(client->disconnect_reason()));
  EXPECT_THAT(peer.failures(), ::testing::IsEmpty());
}

TEST(qmp_client, EventFieldsAreParsed) {
  ScriptedPeer peer(Concat(Handshake(), {ToClient(R"({"timestamp": {"seconds": 1700000000, "microseconds": 123456}, )"
                                                  R"("event": "RESET", )"
                                                  R"("data": {"guest": true, "reason": "guest-reset"}})")}));
  auto client = AdoptOrDie(peer);
  ASSERT_NE(client, nullptr);
  absl::StatusOr<QmpEvent> reset = client->WaitForEvent("RESET", kGenerous);
  ASSERT_TRUE(reset.ok()) << reset.status();
  EXPECT_EQ(reset->timestamp, absl::FromUnixMicros(int64_t{1700000000123456}));
  EXPECT_EQ(reset->data, json({{"guest", true}, {"reason", "guest-reset"}}));
}

const char kResetEvent[] = R"({"timestamp": {"seconds": 1700000000, "microseconds": 1}, "event": "RESET"})";

TEST(qmp_client, EventsBeforeTheHandlerIsInstalledAreHandedToItFirst) {
  ScriptedPeer peer(Concat(Handshake(), {ToClient(kResetEvent), ToClient(R"({"event": "STOP"})")}));
  auto client = AdoptOrDie(peer);
  ASSERT_NE(client, nullptr);
  // Both events have been read (WaitForEvent sees them) before any handler exists.
  ASSERT_TRUE(client->WaitForEvent("STOP", kGenerous).ok());
  EventLog log;
  client->SetEventHandler([&](const QmpEvent& e) { log.Add(e); });
  EXPECT_EQ(log.Names(), (std::vector<std::string>{"RESET", "STOP"}));
  // Handed over once: the next handler gets only what comes after it.
  EventLog later;
  client->SetEventHandler([&](const QmpEvent& e) { later.Add(e); });
  EXPECT_THAT(later.Names(), ::testing::IsEmpty());
}

// What descriptor `fd` refers to ("socket:[inode]"), read through /proc
// rather than with a call on the descriptor, which the client's thread may be
// closing meanwhile; a number reused after the close reads differently.
std::string DescriptorTarget(int fd) {
  std::error_code error;
  const std::filesystem::path target = std::filesystem::read_symlink("/proc/self/fd/" + std::to_string(fd), error);
  return error ? std::string() : target.string();
}

TEST(qmp_client, DestroyedOnItsReaderThreadItStillClosesTheSocket) {
  ScriptedPeer peer(Concat(Handshake(), {FromClient(R"({"execute": "query-status", "id": 2})"), ToClient(kResetEvent)}));
  const int fd = peer.client_fd();
  const std::string target = DescriptorTarget(fd);
  ASSERT_THAT(target, HasSubstr("socket:"));
  absl::Mutex mu;
  std::unique_ptr<QmpClient> client = AdoptOrDie(peer);
  ASSERT_NE(client, nullptr);
  QmpClient* raw = client.get();
  bool destroyed = false;  // guarded by mu
  raw->SetEventHandler([&](const QmpEvent&) {
    absl::MutexLock lock(&mu);
    client.reset();  // ~QmpClient on the reader thread, inside the handler
    destroyed = true;
  });
  // QEMU answers with an event instead of the reply; the handler destroys the
  // client, which ends the call that is still waiting.
  EXPECT_FALSE(raw->QueryStatus(kGenerous).ok());
  absl::MutexLock lock(&mu);
  ASSERT_TRUE(mu.AwaitWithTimeout(absl::Condition(&destroyed), kGenerous));
  // The detached reader lets go of the session last, which closes the socket.
  EXPECT_TRUE(Eventually([&] { return DescriptorTarget(fd) != target; }, kGenerous));
}

TEST(qmp_client, DestroyedFromAHandlerReplayingEarlierEventsDoesNotHang) {
  ScriptedPeer peer(Concat(Handshake(), {ToClient(kResetEvent)}));
  const int fd = peer.client_fd();
  const std::string target = DescriptorTarget(fd);
  ASSERT_THAT(target, HasSubstr("socket:"));
  std::unique_ptr<QmpClient> client = AdoptOrDie(peer);
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(client->WaitForEvent("RESET", kGenerous).ok());
  QmpClient* raw = client.get();
  const absl::Time start = absl::Now();
  raw->SetEventHandler([&](const QmpEvent&) { client.reset(); });  // replayed on this thread
  EXPECT_EQ(client, nullptr);
  EXPECT_LT(absl::Now() - start, kFast);
  EXPECT_TRUE(Eventually([&] { return DescriptorTarget(fd) != target; }, kGenerous));
}

// ---------------------------------------------------------------------------
// QMP, failure modes

TEST(qmp_client, EofWhileCommandsArePendingFailsThemAtOnce) {
  const std::string status = R"({"execute": "query-status", "id": 2})";
  const std::string cont = R"({"execute": "cont", "id": 3})";
  ScriptedPeer peer(Concat(Handshake(), {FromClient(status), FromClient(cont), Eof()}));
  auto client = AdoptOrDie(peer);
  ASSERT_NE(client, nullptr);

  const absl::Time start = absl::Now();
  absl::Status first;
  std::thread other([&] { first = client->QueryStatus(absl::Seconds(60)).status(); });
  ASSERT_TRUE(peer.WaitReceived(2, kGenerous));  // query-status is on the wire first
  absl::Status second = client->Cont(absl::Seconds(60));
  other.join();
  EXPECT_LT(absl::Now() - start, kFast);
  for (const absl::Status& s : {first, second}) {
    EXPECT_TRUE(absl::IsUnavailable(s)) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("QEMU closed the connection"));
  }
  EXPECT_THAT(std::string(first.message()), HasSubstr("query-status"));
  EXPECT_THAT(std::string(second.message()), HasSubstr("cont"));
  EXPECT_THAT(peer.failures(), ::testing::IsEmpty());
}

TEST(qmp_client, MissingReplyTimesOutAndALateReplyIsDropped) {
  ScriptedPeer peer(Concat(Handshake(), {
                                            FromClient(R"({"execute": "query-status", "id": 2})"),
                                            FromClient(R"({"execute": "query-status", "id": 3})"),
                                            ToClient(R"({"return": {"status": "running"}, "id": 2})"),
                                            ToClient(R"({"return": {"status": "paused"}, "id": 3})"),
                                        }));
  auto client = AdoptOrDie(peer);
  ASSERT_NE(client, nullptr);
  const absl::Time start = absl::Now();
  absl::Status timed_out = client->QueryStatus(absl::Milliseconds(200)).status();
  const absl::Duration took = absl::Now() - start;
  EXPECT_TRUE(absl::IsDeadlineExceeded(timed_out)) << timed_out;
  EXPECT_THAT(std::string(timed_out.message()), HasSubstr("did not answer query-status within 200ms"));
  EXPECT_GE(took, absl::Milliseconds(200));
  EXPECT_LT(took, kFast);
  // The reply to the abandoned command arrives first and must not be taken for this one's.
  EXPECT_EQ(client->QueryStatus().value_or("error"), "paused");
  EXPECT_TRUE(client->connected());
  EXPECT_THAT(peer.failures(), ::testing::IsEmpty());
}

TEST(qmp_client, MalformedLineEndsTheSessionWithAClearError) {
  ScriptedPeer peer(Concat(Handshake(), {
                                            FromClient(R"({"execute": "query-status", "id": 2})"),
                                            ToClient(R"({"return": {"status": "runn)"),
                                        }));
  auto client = AdoptOrDie(peer);
  ASSERT_NE(client, nullptr);
  const absl::Time start = absl::Now();
  absl::Status status = client->QueryStatus(absl::Seconds(60)).status();
  EXPECT_TRUE(absl::IsDataLoss(status)) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("not a JSON object"));
  EXPECT_THAT(std::string(status.message()), HasSubstr(R"({"return": {"status": "runn)"));
  EXPECT_TRUE(absl::IsDataLoss(client->Cont(absl::Seconds(60))));
  EXPECT_LT(absl::Now() - start, kFast);
  EXPECT_FALSE(client->connected());
}

TEST(qmp_client, ReplyThatIsNotAnObjectIsMalformedToo) {
  ScriptedPeer peer(Concat(Handshake(), {FromClient(R"({"execute": "cont", "id": 2})"), ToClient("[1, 2]")}));
  auto client = AdoptOrDie(peer);
  ASSERT_NE(client, nullptr);
  EXPECT_TRUE(absl::IsDataLoss(client->Cont(absl::Seconds(60))));
}


// Copying an event's data and dumping a value recurse once per level of
// nesting: a deep message used to overflow the reader thread's stack (event
// data copied) or the caller's (query-status's reply dumped into the error).
// Reproduced through fuzz_qmp.
TEST(qmp_client, DeeplyNestedMessagesEndTheSessionInsteadOfOverflowingTheStack) {
  for (const std::string& message :
       {absl::StrCat(R"({"event": "RESET", "data": )", Nested(200000), "}"),
        absl::StrCat(R"({"event": )", Nested(200000), "}"),
        absl::StrCat(R"({"return": )", Nested(200000), R"(, "id": 2})")}) {
    ScriptedPeer peer(Concat(Handshake(), {FromClient(R"({"execute": "query-status", "id": 2})"), ToClient(message)}));
    auto client = AdoptOrDie(peer);
    ASSERT_NE(client, nullptr);
    EventLog log;
    client->SetEventHandler([&](const QmpEvent& e) { log.Add(e); });
    absl::Status status = client->QueryStatus(absl::Seconds(60)).status();
    EXPECT_TRUE(absl::IsDataLoss(status)) << status;
    EXPECT_THAT(std::string(status.message()), HasSubstr("nested more than 128 levels deep"));
    EXPECT_FALSE(client->connected());
    EXPECT_THAT(log.Names(), ::testing::IsEmpty());
  }
}

TEST(qmp_client, NestingUpToTheBoundIsAccepted) {
  ScriptedPeer peer(Concat(Handshake(), {FromClient(R"({"execute": "query-status", "id": 2})"),
                                         ToClient(absl::StrCat(R"({"event": "RESET", "data": {"x": )", Nested(126),
                                                               "}}")),
                                         ToClient(R"({"return": {"status": "running"}, "id": 2})")}));
  auto client = AdoptOrDie(peer);
  ASSERT_NE(client, nullptr);
  EXPECT_EQ(client->QueryStatus().value_or("error"), "running");
  absl::StatusOr<QmpEvent> reset = client->WaitForEvent("RESET", absl::ZeroDuration());
  ASSERT_TRUE(reset.ok()) << reset.status();
  EXPECT_TRUE(reset->data["x"].is_array());
}

TEST(qmp_client, RejectsAPeerThatIsNotQmp) {
  // What a serial console socket might say first.
  ScriptedPeer peer({ToClient("SeaBIOS (version 1.16.2-debian-1.16.2-1)")});
  const absl::Time start = absl::Now();
  auto client = QmpClient::Adopt(peer.client_fd(), "QMP socket /x", absl::Seconds(60));
  EXPECT_LT(absl::Now() - start, kFast);
  ASSERT_FALSE(client.ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(client.status())) << client.status();
  EXPECT_THAT(std::string(client.status().message()), HasSubstr("does not speak QMP"));

  ScriptedPeer json_peer({ToClient(R"({"return": {}})")});
  auto client2 = QmpClient::Adopt(json_peer.client_fd(), "QMP socket /y", absl::Seconds(60));
  ASSERT_FALSE(client2.ok());
  EXPECT_THAT(std::string(client2.status().message()), HasSubstr("instead of a QMP greeting"));
}

TEST(qmp_client, SilentPeerTimesOutWaitingForTheGreeting) {
  ScriptedPeer peer({});
  auto client = QmpClient::Adopt(peer.client_fd(), "QMP socket /x", absl::Milliseconds(200));
  ASSERT_FALSE(client.ok());
  EXPECT_TRUE(absl::IsDeadlineExceeded(client.status())) << client.status();
  EXPECT_THAT(std::string(client.status().message()), HasSubstr("another client"));
}

TEST(qmp_client, CloseWakesABlockedCallAndDestructionDoesNotHang) {
  ScriptedPeer peer(Concat(Handshake(), {FromClient(R"({"execute": "query-status", "id": 2})")}));
  auto client = AdoptOrDie(peer);
  ASSERT_NE(client, nullptr);
  absl::Status blocked;
  std::thread caller([&] { blocked = client->QueryStatus(absl::Seconds(60)).status(); });
  ASSERT_TRUE(peer.WaitReceived(2, kGenerous));
  const absl::Time start = absl::Now();
  client->Close();
  caller.join();
  EXPECT_TRUE(absl::IsCancelled(blocked)) << blocked;
  EXPECT_THAT(std::string(blocked.message()), HasSubstr("closed by the driver"));
  client.reset();
  EXPECT_LT(absl::Now() - start, kFast);
}

TEST(qmp_client, DestroyingAnIdleClientDoesNotHang) {
  ScriptedPeer peer(Handshake());
  auto client = AdoptOrDie(peer);
  ASSERT_NE(client, nullptr);
  const absl::Time start = absl::Now();
  client.reset();
  EXPECT_LT(absl::Now() - start, kFast);
}

TEST(qmp_client, CommandsFromTheEventHandlerAreRefusedNotDeadlocked) {
  ScriptedPeer peer(LoadTranscript("status_cycle.qmp"));
  auto client = AdoptOrDie(peer);
  ASSERT_NE(client, nullptr);
  absl::Status from_handler;
  absl::Status wait_from_handler;
  client->SetEventHandler([&](const QmpEvent&) {
    from_handler = client->QueryStatus(absl::Seconds(60)).status();
    wait_from_handler = client->WaitForEvent("STOP", absl::Seconds(60)).status();
  });
  ASSERT_TRUE(client->QueryStatus().ok());
  const absl::Time start = absl::Now();
  ASSERT_TRUE(client->Cont().ok());  // RESUME runs the handler before cont's reply is handed out
  EXPECT_LT(absl::Now() - start, kFast);
  EXPECT_TRUE(absl::IsFailedPrecondition(from_handler)) << from_handler;
  EXPECT_THAT(std::string(from_handler.message()), HasSubstr("event handler"));
  EXPECT_TRUE(absl::IsFailedPrecondition(wait_from_handler)) << wait_from_handler;
  client->SetEventHandler(nullptr);
}

TEST(qmp_client, RejectsArgumentsThatAreNotAnObject) {
  ScriptedPeer peer(Handshake());
  auto client = AdoptOrDie(peer);
  ASSERT_NE(client, nullptr);
  EXPECT_TRUE(absl::IsInvalidArgument(client->Execute("cont", json::array({1})).status()));
}

// ---------------------------------------------------------------------------
// Connecting by path

// Whether thread `tid` of this process is asleep in nanosleep or clock_nanosleep
// (proc(5): /proc/<pid>/task/<tid>/syscall starts with the syscall's number).
bool InSleep(pid_t tid) {
  std::ifstream in(absl::StrCat("/proc/self/task/", tid, "/syscall"));
  long number = -1;
  in >> number;
  return number == SYS_nanosleep || number == SYS_clock_nanosleep;
}

// The VM's QEMU pid reaches the socket check (control_socket_test.cc has the
// check itself): a socket this process serves is not QEMU's.
TEST(qmp_client_connect, RefusesAServerThatIsNotTheVmsQemu) {
  TempDir dir;
  const std::string path = dir / "qmp.sock";
  const int listener = BindUnix(path);
  ASSERT_GE(listener, 0);
  ASSERT_EQ(::listen(listener, 8), 0);
  const absl::Status foreign = QmpClient::Connect(path, kFast, ::getpid() + 100000).status();
  EXPECT_TRUE(absl::IsPermissionDenied(foreign)) << foreign;
  EXPECT_THAT(std::string(foreign.message()), HasSubstr("not by the VM's QEMU"));
  ::close(listener);
}

TEST(qmp_client_connect, RetriesUntilTheSocketAppears) {
  TempDir dir;
  const std::string path = dir.path() + "/qmp.sock";
  const std::vector<Step> script =
      Concat(Handshake(), {FromClient(R"({"execute": "query-status", "id": 2})"),
                           ToClient(R"({"return": {"status": "prelaunch", "running": false}, "id": 2})")});
  // Stands in for QEMU, which creates its socket a little after it starts: here,
  // once the client has found no socket and sleeps before its next try.
  const pid_t client_thread = ::gettid();
  std::thread server([&] {
    EXPECT_TRUE(Eventually([client_thread] { return InSleep(client_thread); }, kGenerous));
    const int listener = BindUnix(path);
    ::listen(listener, 1);
    pollfd pfd{listener, POLLIN, 0};
    if (::poll(&pfd, 1, 10000) != 1) {
      ::close(listener);
      return;
    }
    ScriptedPeer peer(::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC), script);
    ::close(listener);
    EXPECT_TRUE(peer.WaitDone(kGenerous));
    EXPECT_THAT(peer.failures(), ::testing::IsEmpty());
  });
  const absl::Time start = absl::Now();
  auto client = QmpClient::Connect(path, kGenerous);
  const absl::Duration took = absl::Now() - start;
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_LT(took, kFast);
  EXPECT_EQ((*client)->QueryStatus().value_or("error"), "prelaunch");
  server.join();
}

}  // namespace
}  // namespace ndq
