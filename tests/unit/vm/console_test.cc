// The console's host side: its directory, the serial tail a failed boot
// reports, and how the boot watch reads QEMU's `info usernet`.
#include "vm/console.h"
#include "base/error_kind.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <thread>

#include <cstring>
#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/eventually.h"
#include "../../support/temp_dir.h"
#include "vm/boot_watch.h"

namespace ndq {
namespace {

namespace fs = std::filesystem;
using ::ndq::testing::Eventually;
using ::ndq::testing::TempDir;
using ::testing::HasSubstr;

ConsolePlan PlanIn(const std::string& task_dir) {
  return ConsolePlan{true, task_dir + "/console", task_dir + "/console/serial.sock", task_dir + "/console/vnc.sock"};
}

TEST(ConsoleDir, MadePrivateClearedOfOldSocketsAndRemovedByTheUndo) {
  TempDir tmp;
  const ConsolePlan plan = PlanIn(tmp.path());
  fs::create_directories(plan.dir);
  std::ofstream(plan.vnc_socket) << "left by a previous run";
  {
    Rollback rollback;
    ASSERT_TRUE(MakeConsoleDir(plan, std::nullopt, rollback).ok());
    struct stat st;
    ASSERT_EQ(::stat(plan.dir.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0700u);
    EXPECT_FALSE(fs::exists(plan.vnc_socket));
  }  // not committed: the undo runs
  EXPECT_FALSE(fs::exists(plan.dir));
}

TEST(ConsoleDir, ALinkInItsPlaceIsRefused) {
  TempDir tmp, elsewhere;
  const ConsolePlan plan = PlanIn(tmp.path());
  ASSERT_EQ(::symlink(elsewhere.path().c_str(), plan.dir.c_str()), 0);
  Rollback rollback;
  const absl::Status status = MakeConsoleDir(plan, std::nullopt, rollback);
  EXPECT_THAT(std::string(status.message()), HasSubstr("is not a directory the driver made"));
  EXPECT_EQ(KindOf(status), ErrorKind::kRefused) << "the same on every retry";
  rollback.Commit();
  EXPECT_TRUE(fs::is_symlink(plan.dir));
}

TEST(ConsoleDir, RemoveLeavesOtherFiles) {
  TempDir tmp;
  const ConsolePlan plan = PlanIn(tmp.path());
  fs::create_directories(plan.dir);
  std::ofstream(plan.serial_socket) << "";
  std::ofstream(plan.dir + "/operator-notes") << "keep";
  RemoveConsoleDir(plan.dir);
  EXPECT_FALSE(fs::exists(plan.serial_socket));
  EXPECT_TRUE(fs::exists(plan.dir + "/operator-notes"));
  RemoveConsoleDir("");  // no console: nothing to do
}

TEST(LastLines, KeepsTheLastLinesWithoutTerminalControl) {
  const std::string serial =
      "\x1b" "c\x1b[?7l\x1b[2J\x1b[0mSeaBIOS\r\n\r\nBooting from Hard Disk...\r\n\x1b" "c\x1b[2JGUEST-HANG\r\n";
  EXPECT_EQ(LastLines(serial, 20), "SeaBIOS\n\nBooting from Hard Disk...\nGUEST-HANG");
  EXPECT_EQ(LastLines(serial, 2), "Booting from Hard Disk...\nGUEST-HANG");
  EXPECT_EQ(LastLines(serial, 1), "GUEST-HANG");
  EXPECT_EQ(LastLines("", 20), "");
  EXPECT_EQ(LastLines("no newline", 3), "no newline");
  EXPECT_EQ(LastLines("a\tb\x07\x01\n", 3), "a\tb");
}

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
}

// A guest agent on a unix socket (as QEMU serves it) that ignores every
// command until `ready`, then answers guest-sync-delimited and guest-ping.
class FakeAgentSocket {
 public:
  explicit FakeAgentSocket(const std::string& path) {
    listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(listen_fd_, 4) != 0) {
      std::abort();
    }
    if (::pipe2(stop_, O_CLOEXEC) != 0) std::abort();
    thread_ = std::thread([this] { Serve(); });
  }
  ~FakeAgentSocket() {
    ::close(stop_[1]);
    thread_.join();
    ::close(stop_[0]);
    ::close(listen_fd_);
  }
  std::atomic<bool> ready{false};
  std::atomic<int> unanswered{0};  // requests that came while not ready

 private:
  // One connection at a time, like QEMU's chardev.
  void Serve() {
    for (;;) {
      pollfd p[2] = {{listen_fd_, POLLIN, 0}, {stop_[0], POLLIN, 0}};
      if (::poll(p, 2, -1) < 0 || p[1].revents != 0) return;
      const int conn = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (conn < 0) continue;
      const bool stopped = Talk(conn);
      ::close(conn);
      if (stopped) return;
    }
  }
  bool Talk(int conn) {
    std::string input;
    for (;;) {
      pollfd p[2] = {{conn, POLLIN, 0}, {stop_[0], POLLIN, 0}};
      if (::poll(p, 2, -1) < 0 || p[1].revents != 0) return true;
      char buf[4096];
      const ssize_t n = ::read(conn, buf, sizeof buf);
      if (n <= 0) return false;
      input.append(buf, static_cast<size_t>(n));
      for (size_t nl; (nl = input.find('\n')) != std::string::npos;) {
        std::string line = input.substr(0, nl);
        input.erase(0, nl + 1);
        line.erase(0, line.find_first_not_of('\xff'));
        if (!ready) {
          ++unanswered;
          continue;
        }
        const nlohmann::json request = nlohmann::json::parse(line, nullptr, false);
        if (request.is_discarded()) continue;
        std::string reply = request.value("execute", "") == "guest-sync-delimited"
                                ? "\xff" + nlohmann::json{{"return", request["arguments"]["id"]}}.dump() + "\n"
                                : nlohmann::json{{"return", nlohmann::json::object()}}.dump() + "\n";
        if (::write(conn, reply.data(), reply.size()) < 0) return false;
      }
    }
  }
  int listen_fd_ = -1;
  int stop_[2] = {-1, -1};
  std::thread thread_;
};

struct WatchOutcome {
  absl::Mutex mu;
  std::string ready_what ABSL_GUARDED_BY(mu);
  int timeouts ABSL_GUARDED_BY(mu) = 0;
  absl::Time ended ABSL_GUARDED_BY(mu);
};

BootWatchContext AgentWatch(const std::string& socket, absl::Duration timeout, WatchOutcome& outcome) {
  DriverStateRecord record;
  record.guest_agent_socket = socket;
  record.guest_agent = true;
  BootWatchContext context;
  context.vm = std::make_shared<VmTask>(TaskIdentity{"a/web/1", "web", "a"}, record, UniqueFd(), UniqueFd(), nullptr);
  context.plan.timeout = timeout;
  context.plan.guest_agent = true;
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
  BootWatch watch(AgentWatch(tmp.path() + "/qga.sock", absl::Seconds(2), outcome));
  ASSERT_TRUE(Ended(outcome, absl::Seconds(10)));
  absl::MutexLock lock(&outcome.mu);
  EXPECT_EQ(outcome.timeouts, 1);
  EXPECT_TRUE(outcome.ready_what.empty());
  EXPECT_GE(outcome.ended - start, absl::Seconds(2));
  EXPECT_LT(outcome.ended - start, absl::Seconds(4));
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

}  // namespace
}  // namespace ndq
