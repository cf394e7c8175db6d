// qemu/control_socket: connecting to unix sockets bound here (missing, stale,
// busy, foreign, not a socket), SendAll against real socketpairs whose far end
// reads, stalls or closes, and the message helpers on their own.
#include "qemu/control_socket.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "base/unique_fd.h"
#include "../../support/control_channel.h"
#include "../../support/temp_dir.h"

namespace ndq::control_socket {
namespace {

using nlohmann::json;
using ::ndq::testing::BindUnix;
using ::ndq::testing::kFast;
using ::ndq::testing::TempDir;
using ::testing::HasSubstr;

// ---------------------------------------------------------------------------
// ConnectUnix

// The socket lives in a directory QEMU's user writes, so with the VM's QEMU
// pid given, any other server, or a link in the socket's place, is refused.
TEST(control_socket_connect, OnlyTheExpectedServerIsTalkedTo) {
  TempDir dir;
  const std::string path = dir / "qmp.sock";
  const UniqueFd listener(BindUnix(path));
  ASSERT_TRUE(listener.valid());
  ASSERT_EQ(::listen(listener.get(), 8), 0);
  const pid_t qemu = ::getpid() + 100000;  // not this process, which serves the socket
  const absl::StatusOr<int> foreign = ConnectUnix(path, "QMP", kFast, qemu);
  EXPECT_TRUE(absl::IsPermissionDenied(foreign.status())) << foreign.status();
  EXPECT_THAT(std::string(foreign.status().message()), HasSubstr("not by the VM's QEMU"));
  std::filesystem::create_symlink(path, dir / "link.sock");
  const absl::StatusOr<int> linked = ConnectUnix(dir / "link.sock", "QMP", kFast, ::getpid());
  EXPECT_TRUE(absl::IsPermissionDenied(linked.status())) << linked.status();
  EXPECT_THAT(std::string(linked.status().message()), HasSubstr("is not a socket"));
  // One refused after connecting (the server's pid is only known then), none through the link.
  int connections = 0;
  ::fcntl(listener.get(), F_SETFL, O_NONBLOCK);
  for (int conn; (conn = ::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC)) >= 0; ++connections) {
    char byte;
    EXPECT_EQ(::recv(conn, &byte, 1, 0), 0) << "nothing is sent to a foreign server";
    ::close(conn);
  }
  EXPECT_EQ(connections, 1);
}

TEST(control_socket_connect, MissingSocketGivesUpAfterTheTimeout) {
  TempDir dir;
  const absl::Time start = absl::Now();
  const absl::StatusOr<int> fd = ConnectUnix(dir / "never.sock", "QMP", absl::Milliseconds(200), 0);
  const absl::Duration took = absl::Now() - start;
  ASSERT_FALSE(fd.ok());
  EXPECT_TRUE(absl::IsUnavailable(fd.status())) << fd.status();
  EXPECT_THAT(std::string(fd.status().message()), HasSubstr("still does not exist after 200ms"));
  EXPECT_GE(took, absl::Milliseconds(200));
  EXPECT_LT(took, kFast);
}

TEST(control_socket_connect, StaleSocketOfAnExitedQemuIsRefused) {
  TempDir dir;
  const std::string path = dir / "stale.sock";
  ::close(BindUnix(path));  // the file stays, nobody listens
  const absl::StatusOr<int> fd = ConnectUnix(path, "QMP", absl::Milliseconds(200), 0);
  ASSERT_FALSE(fd.ok());
  EXPECT_TRUE(absl::IsUnavailable(fd.status())) << fd.status();
  EXPECT_THAT(std::string(fd.status().message()), HasSubstr("refused connections for 200ms"));
}

TEST(control_socket_connect, OverlongPathIsRejectedAtOnce) {
  const absl::Time start = absl::Now();
  const absl::StatusOr<int> fd = ConnectUnix("/tmp/" + std::string(200, 'x'), "QMP", absl::Seconds(30), 0);
  ASSERT_FALSE(fd.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(fd.status())) << fd.status();
  EXPECT_THAT(std::string(fd.status().message()), HasSubstr("use a shorter directory"));
  EXPECT_THAT(std::string(fd.status().message()), HasSubstr("205 bytes"));
  EXPECT_LT(absl::Now() - start, kFast);
  EXPECT_TRUE(absl::IsInvalidArgument(ConnectUnix("", "QMP", absl::Seconds(30), 0).status()));
}

TEST(control_socket_connect, NotASocketFailsAtOnce) {
  TempDir dir;
  std::ofstream(dir / "file") << "x";
  const absl::Time start = absl::Now();
  const absl::StatusOr<int> fd = ConnectUnix(dir / "file", "QMP", absl::Seconds(30), 0);
  ASSERT_FALSE(fd.ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(fd.status())) << fd.status();
  EXPECT_THAT(std::string(fd.status().message()), HasSubstr("exists but is not a socket"));
  EXPECT_LT(absl::Now() - start, kFast);
}

// With the server checked, anything but a socket in its place is refused
// before connecting: it was put there, QEMU did not make it.
TEST(control_socket_connect, AFileInTheSocketsPlaceIsRefusedWhenTheServerIsChecked) {
  TempDir dir;
  std::ofstream(dir / "qga.sock") << "x";
  const absl::StatusOr<int> fd = ConnectUnix(dir / "qga.sock", "guest agent", absl::Seconds(30), ::getpid());
  ASSERT_FALSE(fd.ok());
  EXPECT_TRUE(absl::IsPermissionDenied(fd.status())) << fd.status();
  EXPECT_THAT(std::string(fd.status().message()), HasSubstr("guest agent socket " + (dir / "qga.sock")));
  EXPECT_THAT(std::string(fd.status().message()), HasSubstr("something was put in its place"));
}

// The socket handed back blocks (reads wait in poll or a thread of their
// own), is not inherited by QEMU or the supervisor, and reaches the server.
TEST(control_socket_connect, TheSocketReturnedIsConnectedBlockingAndCloseOnExec) {
  TempDir dir;
  const std::string path = dir / "qmp.sock";
  const UniqueFd listener(BindUnix(path));
  ASSERT_TRUE(listener.valid());
  ASSERT_EQ(::listen(listener.get(), 1), 0);
  const absl::StatusOr<int> connected = ConnectUnix(path, "QMP", kFast, ::getpid());  // this process serves it
  ASSERT_TRUE(connected.ok()) << connected.status();
  const UniqueFd fd(*connected);
  EXPECT_EQ(::fcntl(fd.get(), F_GETFL) & O_NONBLOCK, 0);
  EXPECT_NE(::fcntl(fd.get(), F_GETFD) & FD_CLOEXEC, 0);
  const UniqueFd conn(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
  ASSERT_TRUE(conn.valid());
  ASSERT_EQ(::send(fd.get(), "hi", 2, MSG_NOSIGNAL), 2);
  char got[2];
  EXPECT_EQ(::recv(conn.get(), got, sizeof got, MSG_WAITALL), 2);
  EXPECT_EQ(std::string(got, 2), "hi");
}

// A QEMU busy with another client leaves connections in its backlog; the
// connect neither hangs nor calls that a missing socket.
TEST(control_socket_connect, AFullBacklogIsReportedAsBusy) {
  TempDir dir;
  const std::string path = dir / "qmp.sock";
  const UniqueFd listener(BindUnix(path));
  ASSERT_TRUE(listener.valid());
  ASSERT_EQ(::listen(listener.get(), 0), 0);
  std::vector<UniqueFd> waiting;  // connections nobody accepts, until one is refused
  for (int i = 0; i < 64; ++i) {
    UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    path.copy(addr.sun_path, sizeof addr.sun_path - 1);
    const bool queued = ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
    const int err = errno;
    waiting.push_back(std::move(fd));
    if (!queued) {
      ASSERT_EQ(err, EAGAIN) << std::strerror(err);
      break;
    }
  }
  ASSERT_LT(waiting.size(), 64u) << "the backlog never filled";
  const absl::Time start = absl::Now();
  const absl::StatusOr<int> fd = ConnectUnix(path, "QMP", absl::Milliseconds(200), 0);
  const absl::Duration took = absl::Now() - start;
  ASSERT_FALSE(fd.ok());
  EXPECT_TRUE(absl::IsUnavailable(fd.status())) << fd.status();
  EXPECT_THAT(std::string(fd.status().message()), HasSubstr("stayed busy for 200ms (connection backlog full)"));
  EXPECT_GE(took, absl::Milliseconds(200));
  EXPECT_LT(took, kFast);
}

// ---------------------------------------------------------------------------
// SendAll

// Both ends of a stream socketpair, closed with the test.
struct SocketPair {
  SocketPair() {
    int fds[2] = {-1, -1};
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
    ours.reset(fds[0]);
    theirs.reset(fds[1]);
  }
  UniqueFd ours, theirs;
};

// More than any socket buffer holds, so the far end must read for it to go.
std::string Payload(size_t size) {
  std::string data(size, '\0');
  for (size_t i = 0; i < size; ++i) data[i] = static_cast<char>('a' + i % 23);
  return data;
}

TEST(control_socket_send, AReaderThatTakesSmallPiecesGetsEverythingInOrder) {
  SocketPair pair;
  const std::string data = Payload(8 << 20);
  std::string received;
  std::thread reader([&] {
    char piece[4096];
    for (ssize_t n; (n = ::recv(pair.theirs.get(), piece, sizeof piece, 0)) > 0;) received.append(piece, static_cast<size_t>(n));
  });
  bool partial = false;
  const absl::Status sent = SendAll(pair.ours.get(), data, absl::Now() + absl::Seconds(30), "test peer",
                                    absl::Seconds(30), &partial);
  ::shutdown(pair.ours.get(), SHUT_WR);
  reader.join();
  EXPECT_TRUE(sent.ok()) << sent;
  EXPECT_FALSE(partial);
  EXPECT_EQ(received.size(), data.size());
  EXPECT_TRUE(received == data) << "the bytes arrived changed or out of order";
}

TEST(control_socket_send, APeerThatDoesNotReadHitsTheDeadlineWithAPartialSend) {
  SocketPair pair;
  bool partial = false;
  const absl::Time start = absl::Now();
  const absl::Status sent = SendAll(pair.ours.get(), Payload(8 << 20), absl::Now() + absl::Milliseconds(200),
                                    "QMP socket /x", absl::Milliseconds(200), &partial);
  const absl::Duration took = absl::Now() - start;
  EXPECT_TRUE(absl::IsDeadlineExceeded(sent)) << sent;
  EXPECT_THAT(std::string(sent.message()),
              HasSubstr("QMP socket /x: could not send within 200ms: the peer is not reading"));
  EXPECT_TRUE(partial) << "the socket buffer took the first bytes";
  EXPECT_GE(took, absl::Milliseconds(200));
  EXPECT_LT(took, kFast);
}

TEST(control_socket_send, NothingSentBeforeTheDeadlineIsNotPartial) {
  SocketPair pair;
  const std::string block(64 << 10, 'x');
  while (::send(pair.ours.get(), block.data(), block.size(), MSG_DONTWAIT | MSG_NOSIGNAL) > 0) {
  }
  ASSERT_EQ(errno, EAGAIN) << "the buffer is full now";
  bool partial = true;
  const absl::Status sent = SendAll(pair.ours.get(), "{}\n", absl::Now() + absl::Milliseconds(100), "peer",
                                    absl::Milliseconds(100), &partial);
  EXPECT_TRUE(absl::IsDeadlineExceeded(sent)) << sent;
  EXPECT_FALSE(partial);
}

TEST(control_socket_send, AClosedPeerIsUnavailableWithoutSigpipe) {
  SocketPair pair;
  pair.theirs.reset();
  bool partial = true;
  const absl::Status sent = SendAll(pair.ours.get(), "{}\n", absl::Now() + absl::Seconds(30), "QMP socket /x",
                                    absl::Seconds(30), &partial);
  EXPECT_TRUE(absl::IsUnavailable(sent)) << sent;
  EXPECT_THAT(std::string(sent.message()), HasSubstr("QMP socket /x: connection closed (QEMU exited?)"));
  EXPECT_FALSE(partial);
}

// QEMU exits while a long command is on its way: the send fails at once,
// and says part of it went (the next session starts clean).
TEST(control_socket_send, APeerClosingMidwayEndsTheSendAtOnceAsPartial) {
  SocketPair pair;
  std::thread peer([&] {
    pollfd pfd{pair.theirs.get(), POLLIN, 0};
    ::poll(&pfd, 1, 10000);  // the first bytes have come
    pair.theirs.reset();
  });
  bool partial = false;
  const absl::Time start = absl::Now();
  const absl::Status sent = SendAll(pair.ours.get(), Payload(8 << 20), absl::Now() + absl::Seconds(30), "peer",
                                    absl::Seconds(30), &partial);
  peer.join();
  EXPECT_TRUE(absl::IsUnavailable(sent)) << sent;
  EXPECT_TRUE(partial);
  EXPECT_LT(absl::Now() - start, kFast);
}

TEST(control_socket_send, ADescriptorThatIsNoSocketIsAWriteFailure) {
  const UniqueFd null(::open("/dev/null", O_WRONLY | O_CLOEXEC));
  ASSERT_TRUE(null.valid());
  bool partial = true;
  const absl::Status sent = SendAll(null.get(), "x", absl::Now() + absl::Seconds(1), "peer", absl::Seconds(1),
                                    &partial);
  EXPECT_TRUE(absl::IsUnavailable(sent)) << sent;
  EXPECT_THAT(std::string(sent.message()), HasSubstr("peer: write failed: " + Errno(ENOTSOCK)));
  EXPECT_FALSE(partial);
}

// ---------------------------------------------------------------------------
// Helpers

TEST(control_socket, PollMsIsZeroOncePastRoundsUpAndStopsAtAnHour) {
  EXPECT_EQ(PollMs(absl::Now() - absl::Seconds(1)), 0);
  EXPECT_EQ(PollMs(absl::InfinitePast()), 0);
  const int ms = PollMs(absl::Now() + absl::Milliseconds(1500));
  EXPECT_GT(ms, 1400);
  EXPECT_LE(ms, 1501);
  EXPECT_EQ(PollMs(absl::Now() + absl::Hours(5)), 60 * 60 * 1000);
  EXPECT_EQ(PollMs(absl::InfiniteFuture()), 60 * 60 * 1000) << "no overflow, no busy loop";
}

TEST(control_socket, PreviewKeepsPrintableTextAndEscapesTheRest) {
  EXPECT_EQ(Preview(R"({"return": {}})"), R"({"return": {}})");
  EXPECT_EQ(Preview(std::string("a\nb\xff\x01", 5)), "a\\x0ab\\xff\\x01");
  EXPECT_EQ(Preview(std::string(200, 'x')), std::string(200, 'x'));
  EXPECT_EQ(Preview(std::string(300, 'x')), std::string(200, 'x') + "... (300 bytes)");
  EXPECT_EQ(Preview(""), "");
}

TEST(control_socket, DumpIsCompactAndReplacesInvalidUtf8) {
  EXPECT_EQ(Dump(json{{"execute", "cont"}, {"arguments", {{"a", 1}}}}),
            R"({"arguments":{"a":1},"execute":"cont"})");
  EXPECT_EQ(Dump(json("x\xffy")), "\"x\xef\xbf\xbdy\"");  // U+FFFD
  EXPECT_EQ(Dump(json("caf\xc3\xa9")), "\"caf\xc3\xa9\"");  // valid UTF-8 stays as it is
}

TEST(control_socket, ErrorRepliesMapQemusClassesToCodes) {
  const std::vector<std::pair<std::string, absl::StatusCode>> classes = {
      {"CommandNotFound", absl::StatusCode::kUnimplemented},
      {"DeviceNotFound", absl::StatusCode::kNotFound},
      {"DeviceNotActive", absl::StatusCode::kFailedPrecondition},
      {"KVMMissingCap", absl::StatusCode::kFailedPrecondition},
      {"GenericError", absl::StatusCode::kUnknown},
      {"SomethingNew", absl::StatusCode::kUnknown}};
  for (const auto& [cls, code] : classes) {
    const absl::Status status = ErrorReplyStatus("QEMU", "device_del", {{"class", cls}, {"desc", "no luck"}});
    EXPECT_EQ(status.code(), code) << cls;
    EXPECT_EQ(status.message(), absl::StrCat("QEMU rejected device_del: no luck [", cls, "]"));
    EXPECT_EQ(QmpErrorClass(status), cls);
  }
}

TEST(control_socket, AnErrorReplyWithoutClassOrDescriptionStillSaysWhoAndWhat) {
  for (const json& error : {json::array({1, 2}), json{{"class", 5}, {"desc", nullptr}}, json::object()}) {
    const absl::Status status = ErrorReplyStatus("the guest agent", "guest-ping", error);
    EXPECT_EQ(status.code(), absl::StatusCode::kUnknown) << error;
    EXPECT_EQ(status.message(), "the guest agent rejected guest-ping: (no description) [GenericError]") << error;
    EXPECT_EQ(QmpErrorClass(status), "GenericError");
  }
  EXPECT_EQ(QmpErrorClass(absl::UnknownError("the guest agent rejected x: y [GenericError]")), "")
      << "only a Status made from an error reply carries a class";
}

// The server of a socketpair is this process (SO_PEERCRED).
TEST(control_socket, CheckServedByComparesTheServersPid) {
  SocketPair pair;
  EXPECT_TRUE(CheckServedBy(pair.ours.get(), "QMP socket /x", 0).ok()) << "no pid given: nothing to check";
  EXPECT_TRUE(CheckServedBy(pair.ours.get(), "QMP socket /x", ::getpid()).ok());
  const pid_t qemu = ::getpid() + 100000;
  const absl::Status foreign = CheckServedBy(pair.ours.get(), "QMP socket /x", qemu);
  EXPECT_TRUE(absl::IsPermissionDenied(foreign)) << foreign;
  EXPECT_EQ(foreign.message(), absl::StrCat("QMP socket /x is served by process ", ::getpid(),
                                            ", not by the VM's QEMU (pid ", qemu, "); refusing to talk to it"));
}

TEST(control_socket, ErrnoIsTheSystemsText) {
  EXPECT_EQ(Errno(EPIPE), std::strerror(EPIPE));
  EXPECT_EQ(Errno(ENOENT), "No such file or directory");
}

}  // namespace
}  // namespace ndq::control_socket
