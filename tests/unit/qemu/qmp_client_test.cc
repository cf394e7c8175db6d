// QmpClient and GuestAgentClient against transcripts recorded from the real
// QEMU 7.2 and qemu-ga 7.2 (tests/unit/qemu/qmp_transcripts, re-recorded by
// capture.py there), replayed by a scripted peer on a socketpair.
#include "qemu/guest_agent_client.h"
#include "qemu/qmp_client.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/synchronization/mutex.h"
#include "nomadplugin/bounded_json.h"
#include "../../support/eventually.h"
#include "../../support/scripted_qmp.h"

namespace ndq {
namespace {

using nlohmann::json;
using ::ndq::testing::Eventually;
using ::ndq::testing::Concat;
using ::ndq::testing::Eof;
using ::ndq::testing::FromClient;
using ::ndq::testing::Handshake;
using ::ndq::testing::LoadTranscript;
using ::ndq::testing::ScriptedPeer;
using ::ndq::testing::Step;
using ::ndq::testing::ToClient;
using ::testing::HasSubstr;

constexpr absl::Duration kGenerous = absl::Seconds(10);  // for what must not time out
constexpr absl::Duration kFast = absl::Seconds(2);       // bound on "fails at once"

std::unique_ptr<QmpClient> AdoptOrDie(ScriptedPeer& peer) {
  auto client = QmpClient::Adopt(peer.client_fd(), "test peer", kGenerous);
  EXPECT_TRUE(client.ok()) << client.status();
  return client.ok() ? std::move(*client) : nullptr;
}

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

std::string Nested(size_t depth) { return std::string(depth, '[') + std::string(depth, ']'); }

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

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/qmp-test.XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Whether thread `tid` of this process is asleep in nanosleep or clock_nanosleep
// (proc(5): /proc/<pid>/task/<tid>/syscall starts with the syscall's number).
bool InSleep(pid_t tid) {
  std::ifstream in(absl::StrCat("/proc/self/task/", tid, "/syscall"));
  long number = -1;
  in >> number;
  return number == SYS_nanosleep || number == SYS_clock_nanosleep;
}

int BindUnix(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  path.copy(addr.sun_path, sizeof addr.sun_path - 1);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) std::abort();
  return fd;
}

// The socket lives in a directory QEMU's user writes, so with the VM's QEMU
// pid given, any other server, or a link in the socket's place, is refused.
TEST(qmp_client_connect, OnlyTheExpectedServerIsTalkedTo) {
  TempDir dir;
  const std::string path = dir.path() + "/qmp.sock";
  const int listener = BindUnix(path);
  ASSERT_EQ(::listen(listener, 8), 0);
  const pid_t qemu = ::getpid() + 100000;  // not this process, which serves the socket
  for (auto* connect : {+[](const std::string& p, pid_t pid) { return QmpClient::Connect(p, kFast, pid).status(); },
                        +[](const std::string& p, pid_t pid) { return GuestAgentClient::Connect(p, kFast, pid).status(); }}) {
    const absl::Status foreign = connect(path, qemu);
    EXPECT_TRUE(absl::IsPermissionDenied(foreign)) << foreign;
    EXPECT_THAT(std::string(foreign.message()), HasSubstr("not by the VM's QEMU"));
  }
  std::filesystem::create_symlink(path, dir.path() + "/link.sock");
  const absl::Status linked = QmpClient::Connect(dir.path() + "/link.sock", kFast, ::getpid()).status();
  EXPECT_TRUE(absl::IsPermissionDenied(linked)) << linked;
  EXPECT_THAT(std::string(linked.message()), HasSubstr("is not a socket"));
  // Two refused after connecting (the server's pid is only known then), none through the link.
  int connections = 0;
  ::fcntl(listener, F_SETFL, O_NONBLOCK);
  for (int conn; (conn = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC)) >= 0; ++connections) {
    char byte;
    EXPECT_EQ(::recv(conn, &byte, 1, 0), 0) << "nothing is sent to a foreign server";
    ::close(conn);
  }
  EXPECT_EQ(connections, 2);
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

TEST(qmp_client_connect, MissingSocketGivesUpAfterTheTimeout) {
  TempDir dir;
  const absl::Time start = absl::Now();
  auto client = QmpClient::Connect(dir.path() + "/never.sock", absl::Milliseconds(200));
  const absl::Duration took = absl::Now() - start;
  ASSERT_FALSE(client.ok());
  EXPECT_TRUE(absl::IsUnavailable(client.status())) << client.status();
  EXPECT_THAT(std::string(client.status().message()), HasSubstr("still does not exist after 200ms"));
  EXPECT_GE(took, absl::Milliseconds(200));
  EXPECT_LT(took, kFast);
}

TEST(qmp_client_connect, StaleSocketOfAnExitedQemuIsRefused) {
  TempDir dir;
  const std::string path = dir.path() + "/stale.sock";
  ::close(BindUnix(path));  // the file stays, nobody listens
  auto client = QmpClient::Connect(path, absl::Milliseconds(200));
  ASSERT_FALSE(client.ok());
  EXPECT_THAT(std::string(client.status().message()), HasSubstr("refused connections"));
}

TEST(qmp_client_connect, OverlongPathIsRejectedAtOnce) {
  auto client = QmpClient::Connect("/tmp/" + std::string(200, 'x'), absl::Seconds(30));
  ASSERT_FALSE(client.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(client.status())) << client.status();
  EXPECT_THAT(std::string(client.status().message()), HasSubstr("use a shorter directory"));
}

TEST(qmp_client_connect, NotASocketFailsAtOnce) {
  TempDir dir;
  std::ofstream(dir.path() + "/file") << "x";
  const absl::Time start = absl::Now();
  auto client = QmpClient::Connect(dir.path() + "/file", absl::Seconds(30));
  ASSERT_FALSE(client.ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(client.status())) << client.status();
  EXPECT_LT(absl::Now() - start, kFast);
}

// ---------------------------------------------------------------------------
// Guest agent

std::unique_ptr<GuestAgentClient> AdoptAgentOrDie(ScriptedPeer& peer) {
  auto client = GuestAgentClient::Adopt(peer.client_fd(), "test agent", kGenerous);
  EXPECT_TRUE(client.ok()) << client.status();
  return client.ok() ? std::move(*client) : nullptr;
}

// The opening sync as qemu-ga 7.2 answers it: a parse error for the 0xFF
// itself, then the delimited reply.
std::vector<Step> AgentSync(int recorded_id) {
  return {FromClient(absl::StrCat("\xff{\"execute\": \"guest-sync-delimited\", \"arguments\": {\"id\": ",
                                  recorded_id, "}}")),
          ToClient(R"({"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}})"),
          ToClient(absl::StrCat("\xff{\"return\": ", recorded_id, "}"))};
}

TEST(qmp_guest_agent, RealQemuGaTranscript) {
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

TEST(qmp_guest_agent, SyncDiscardsStaleData) {
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

TEST(qmp_guest_agent, SyncRepeatsALostRequestAndWaitsForTheNewestReply) {
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

TEST(qmp_guest_agent, SilentShutdownIsConfirmedBySync) {
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

TEST(qmp_guest_agent, ShutdownThatTakesTheVmAwayIsSuccess) {
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

TEST(qmp_guest_agent, TimeoutThenResyncSkipsTheLateReply) {
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

TEST(qmp_guest_agent, NoAgentInTheGuestTimesOutWithAHint) {
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

TEST(qmp_guest_agent, GarbageReplyIsAClearError) {
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
TEST(qmp_guest_agent, DeeplyNestedReplyIsAnErrorNotAStackOverflow) {
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

TEST(qmp_guest_agent, CloseWakesABlockedCall) {
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

}  // namespace
}  // namespace ndq
