// QmpClient and GuestAgentClient against a real qemu-system-x86_64 (TCG): a
// bare QEMU held at -S, and the test guest from tests/fixtures (built or
// reused from its cache by build-test-guest.sh). Prints the measured latencies.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "../support/test_guest.h"
#include "qemu/guest_agent_client.h"
#include "qemu/qmp_client.h"
#include "host/run_command.h"

namespace ndq {
namespace {

using ::testing::HasSubstr;

constexpr char kQemu[] = "/usr/bin/qemu-system-x86_64";
// Boot takes ~4 s under TCG, more on a loaded machine.
constexpr absl::Duration kBootTimeout = absl::Seconds(90);

void Measure(const std::string& what, absl::Duration d) {
  std::cout << "[ MEASURE  ] " << what << ": " << absl::FormatDuration(d) << std::endl;
  ::testing::Test::RecordProperty(what, absl::StrCat(absl::ToDoubleMilliseconds(d), "ms"));
}

using ::ndq::testing::TestGuestDir;

class ShortTempDir {
 public:
  ShortTempDir() {
    // Short: unix socket paths are limited to 107 bytes.
    char tmpl[] = "/tmp/qmp-live.XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~ShortTempDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// A QEMU process that is always killed when the test ends, pass or fail, and
// also if the test binary itself dies (PR_SET_PDEATHSIG).
class QemuProcess {
 public:
  QemuProcess(const std::vector<std::string>& args, const std::string& log_path) : log_path_(log_path) {
    std::vector<std::string> argv = {kQemu};
    argv.insert(argv.end(), args.begin(), args.end());
    command_line_ = absl::StrJoin(argv, " ");
    std::vector<char*> cargv;
    for (std::string& a : argv) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    const int log = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    const int null = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    const pid_t parent = ::getpid();
    pid_ = ::fork();
    if (pid_ == 0) {
      // Only async-signal-safe calls between fork and exec.
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(127);
      ::dup2(null, STDIN_FILENO);
      ::dup2(log, STDOUT_FILENO);
      ::dup2(log, STDERR_FILENO);
      ::execv(kQemu, cargv.data());
      ::_exit(127);
    }
    ::close(log);
    ::close(null);
    started_ = absl::Now();
  }

  ~QemuProcess() {
    if (!exit_status_.has_value() && pid_ > 0) {
      ::kill(pid_, SIGKILL);
      int status;
      while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
      }
    }
  }

  pid_t pid() const { return pid_; }
  absl::Time started() const { return started_; }
  const std::string& command_line() const { return command_line_; }
  std::string Log() const {
    std::ifstream in(log_path_);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }

  // The wait status once QEMU has exited, nullopt if it still runs at the deadline.
  std::optional<int> WaitExit(absl::Duration timeout) {
    if (exit_status_.has_value()) return exit_status_;
    const absl::Time deadline = absl::Now() + timeout;
    const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid_, 0));
    while (true) {
      int status;
      const pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        exit_status_ = status;
        exited_ = absl::Now();
        break;
      }
      const absl::Duration left = deadline - absl::Now();
      if (left <= absl::ZeroDuration()) break;
      if (pidfd >= 0) {
        pollfd pfd{pidfd, POLLIN, 0};
        ::poll(&pfd, 1, static_cast<int>(absl::ToInt64Milliseconds(left)) + 1);
      } else {
        absl::SleepFor(std::min(left, absl::Milliseconds(10)));  // no pidfd: short polls
      }
    }
    if (pidfd >= 0) ::close(pidfd);
    return exit_status_;
  }
  absl::Time exited() const { return exited_; }

 private:
  std::string log_path_;
  std::string command_line_;
  pid_t pid_ = -1;
  absl::Time started_;
  absl::Time exited_;
  std::optional<int> exit_status_;
};

std::string Describe(QemuProcess& qemu) {
  return absl::StrCat("\nQEMU: ", qemu.command_line(), "\noutput:\n", qemu.Log());
}

// ---------------------------------------------------------------------------
// A bare QEMU, held before the guest starts

std::vector<std::string> BareArgs(const ShortTempDir& dir) {
  return {"-machine", "accel=tcg", "-S", "-nodefaults", "-display", "none",
          "-qmp", absl::StrCat("unix:", dir / "qmp.sock", ",server=on,wait=off")};
}

TEST(qmp_live, PrelaunchContStopQuit) {
  ShortTempDir dir;
  QemuProcess qemu(BareArgs(dir), dir / "qemu.log");
  // Connecting right away exercises the wait for the socket to appear.
  auto client = QmpClient::Connect(dir / "qmp.sock", absl::Seconds(30));
  ASSERT_TRUE(client.ok()) << client.status() << Describe(qemu);
  Measure("QEMU start to QMP session ready", absl::Now() - qemu.started());
  QmpClient& qmp = **client;
  EXPECT_GE(qmp.version().major, 7);

  EXPECT_EQ(qmp.QueryStatus().value_or("error"), "prelaunch");
  absl::StatusOr<nlohmann::json> unknown = qmp.Execute("no-such-command");
  EXPECT_EQ(QmpErrorClass(unknown.status()), "CommandNotFound") << unknown.status();

  ASSERT_TRUE(qmp.Cont().ok());
  EXPECT_TRUE(qmp.WaitForEvent("RESUME", absl::Seconds(10)).ok());
  EXPECT_EQ(qmp.QueryStatus().value_or("error"), "running");
  ASSERT_TRUE(qmp.Stop().ok());
  absl::StatusOr<QmpEvent> stop = qmp.WaitForEvent("STOP", absl::Seconds(10));
  EXPECT_TRUE(stop.ok()) << stop.status();
  EXPECT_EQ(qmp.QueryStatus().value_or("error"), "paused");

  const absl::Time quit = absl::Now();
  ASSERT_TRUE(qmp.Quit().ok());
  EXPECT_TRUE(qmp.WaitForDisconnect(absl::Seconds(10)).ok());
  EXPECT_TRUE(absl::IsUnavailable(qmp.disconnect_reason())) << qmp.disconnect_reason();
  std::optional<int> status = qemu.WaitExit(absl::Seconds(10));
  ASSERT_TRUE(status.has_value()) << "QEMU still running after quit" << Describe(qemu);
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << "wait status " << *status << Describe(qemu);
  Measure("quit to QEMU exit", qemu.exited() - quit);
}

TEST(qmp_live, KilledQemuFailsPendingWaitsAtOnce) {
  ShortTempDir dir;
  QemuProcess qemu(BareArgs(dir), dir / "qemu.log");
  auto client = QmpClient::Connect(dir / "qmp.sock", absl::Seconds(30));
  ASSERT_TRUE(client.ok()) << client.status() << Describe(qemu);
  absl::Status waited;
  absl::Time woke;
  std::thread waiter([&] {
    waited = (*client)->WaitForEvent("SHUTDOWN", absl::Seconds(60)).status();
    woke = absl::Now();
  });
  const absl::Time killed = absl::Now();
  ::kill(qemu.pid(), SIGKILL);
  waiter.join();
  EXPECT_TRUE(absl::IsUnavailable(waited)) << waited;
  EXPECT_THAT(std::string(waited.message()), HasSubstr("QEMU closed the connection"));
  EXPECT_LT(woke - killed, absl::Seconds(2));
  Measure("QEMU killed to pending wait failing", woke - killed);
  EXPECT_FALSE((*client)->connected());
}

TEST(qmp_live, ConnectToMissingSocketTimesOut) {
  ShortTempDir dir;
  const absl::Time start = absl::Now();
  auto client = QmpClient::Connect(dir / "none.sock", absl::Milliseconds(300));
  EXPECT_TRUE(absl::IsUnavailable(client.status())) << client.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
}

// ---------------------------------------------------------------------------
// The test guest

class qmp_live_guest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::string> images = TestGuestDir();
    ASSERT_TRUE(images.ok()) << images.status();
    image_ = *images + "/guest.qcow2";
  }

  std::vector<std::string> GuestArgs(bool with_agent) const {
    std::vector<std::string> args = {
        "-machine", "accel=tcg", "-m", "256", "-nodefaults", "-display", "none",
        "-serial", absl::StrCat("file:", dir_ / "console.log"),
        "-drive", absl::StrCat("file=", image_, ",if=virtio,snapshot=on"),
        "-qmp", absl::StrCat("unix:", dir_ / "qmp.sock", ",server=on,wait=off")};
    if (with_agent) {
      for (const std::string& a :
           {std::string("-chardev"), absl::StrCat("socket,path=", dir_ / "qga.sock", ",server=on,wait=off,id=qga0"),
            std::string("-device"), std::string("virtio-serial"), std::string("-device"),
            std::string("virtserialport,chardev=qga0,name=org.qemu.guest_agent.0")}) {
        args.push_back(a);
      }
    }
    return args;
  }

  // The console is a file QEMU writes; the process log only has QEMU's own messages.
  std::string Console() const {
    std::ifstream in(dir_ / "console.log");
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }

  bool WaitReady(QemuProcess& qemu) {
    const absl::Time deadline = absl::Now() + kBootTimeout;
    while (absl::Now() < deadline) {
      if (absl::StrContains(Console(), "GUEST-READY")) return true;
      if (qemu.WaitExit(absl::Milliseconds(20)).has_value()) break;
    }
    return absl::StrContains(Console(), "GUEST-READY");
  }

  ShortTempDir dir_;
  std::string image_;
};

TEST_F(qmp_live_guest, SystemPowerdownEndsWithShutdownEventAndExit) {
  QemuProcess qemu(GuestArgs(false), dir_ / "qemu.log");
  auto client = QmpClient::Connect(dir_ / "qmp.sock", absl::Seconds(30));
  ASSERT_TRUE(client.ok()) << client.status() << Describe(qemu);
  QmpClient& qmp = **client;
  ASSERT_TRUE(WaitReady(qemu)) << "no GUEST-READY; console:\n" << Console() << Describe(qemu);
  Measure("QEMU start to GUEST-READY", absl::Now() - qemu.started());
  EXPECT_EQ(qmp.QueryStatus().value_or("error"), "running");

  const absl::Time pressed = absl::Now();
  ASSERT_TRUE(qmp.SystemPowerdown().ok());
  EXPECT_TRUE(qmp.WaitForEvent("POWERDOWN", absl::Seconds(5)).ok());
  absl::StatusOr<QmpEvent> shutdown = qmp.WaitForEvent("SHUTDOWN", absl::Seconds(10));
  ASSERT_TRUE(shutdown.ok()) << shutdown.status() << "\nconsole:\n" << Console();
  EXPECT_EQ(shutdown->data.value("guest", false), true);
  EXPECT_EQ(shutdown->data.value("reason", ""), "guest-shutdown");
  std::optional<int> status = qemu.WaitExit(absl::Seconds(5));
  ASSERT_TRUE(status.has_value()) << "QEMU still running 5s after the guest shut down" << Describe(qemu);
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << "wait status " << *status << Describe(qemu);
  const absl::Duration took = qemu.exited() - pressed;
  EXPECT_LT(took, absl::Seconds(5));
  Measure("system_powerdown to QEMU exit", took);
  EXPECT_TRUE(qmp.WaitForDisconnect(absl::Seconds(5)).ok());
}

TEST_F(qmp_live_guest, GuestAgentPingInfoAndShutdown) {
  QemuProcess qemu(GuestArgs(true), dir_ / "qemu.log");
  auto client = QmpClient::Connect(dir_ / "qmp.sock", absl::Seconds(30));
  ASSERT_TRUE(client.ok()) << client.status() << Describe(qemu);
  ASSERT_TRUE(WaitReady(qemu)) << "no GUEST-READY; console:\n" << Console() << Describe(qemu);
  EXPECT_THAT(Console(), HasSubstr("GUEST-AGENT listening on /dev/vport"));

  const absl::Time start = absl::Now();
  auto agent = GuestAgentClient::Connect(dir_ / "qga.sock", absl::Seconds(30));
  ASSERT_TRUE(agent.ok()) << agent.status() << "\nconsole:\n" << Console();
  Measure("guest agent connect + sync", absl::Now() - start);

  std::vector<absl::Duration> rtts;
  for (int i = 0; i < 10; ++i) {
    const absl::Time t = absl::Now();
    absl::Status ping = (*agent)->Ping(absl::Seconds(10));
    ASSERT_TRUE(ping.ok()) << ping;
    rtts.push_back(absl::Now() - t);
  }
  std::sort(rtts.begin(), rtts.end());
  Measure("guest-ping round trip (median of 10)", rtts[rtts.size() / 2]);
  Measure("guest-ping round trip (max of 10)", rtts.back());

  absl::StatusOr<nlohmann::json> info = (*agent)->Info();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ((*info)["version"], "ndq-test-agent");
  absl::Status unknown = (*agent)->Execute("guest-exec", {{"path", "/bin/true"}}).status();
  EXPECT_EQ(QmpErrorClass(unknown), "CommandNotFound") << unknown;
  EXPECT_TRUE((*agent)->Ping().ok());  // an error reply leaves the channel in sync

  const absl::Time asked = absl::Now();
  absl::Status shutdown = (*agent)->Shutdown("powerdown", absl::Seconds(10));
  ASSERT_TRUE(shutdown.ok()) << shutdown;
  absl::StatusOr<QmpEvent> event = (*client)->WaitForEvent("SHUTDOWN", absl::Seconds(10));
  ASSERT_TRUE(event.ok()) << event.status() << "\nconsole:\n" << Console();
  EXPECT_EQ(event->data.value("reason", ""), "guest-shutdown");
  std::optional<int> status = qemu.WaitExit(absl::Seconds(10));
  ASSERT_TRUE(status.has_value()) << "QEMU still running after guest-shutdown" << Describe(qemu);
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << "wait status " << *status << Describe(qemu);
  Measure("guest-shutdown to QEMU exit", qemu.exited() - asked);
  EXPECT_THAT(Console(), HasSubstr("GUEST-AGENT guest-shutdown powerdown"));
}

TEST_F(qmp_live_guest, GuestAgentConnectedDuringBootSyncsOnceTheAgentStarts) {
  QemuProcess qemu(GuestArgs(true), dir_ / "qemu.log");
  // Connect while the guest is still in the firmware: the sync is answered
  // only once the agent runs, ~4 s later.
  auto agent = GuestAgentClient::Connect(dir_ / "qga.sock", kBootTimeout);
  ASSERT_TRUE(agent.ok()) << agent.status() << "\nconsole:\n" << Console() << Describe(qemu);
  Measure("QEMU start to guest agent in sync", absl::Now() - qemu.started());
  EXPECT_TRUE((*agent)->Ping().ok());
}

TEST_F(qmp_live_guest, GuestWithoutAgentChannelTimesOutClearly) {
  // The agent port exists but nothing in the guest will ever answer on it:
  // connect before the guest runs (-S) and never start it.
  std::vector<std::string> args = GuestArgs(true);
  args.push_back("-S");
  QemuProcess qemu(args, dir_ / "qemu.log");
  const absl::Time start = absl::Now();
  auto agent = GuestAgentClient::Connect(dir_ / "qga.sock", absl::Seconds(2));
  ASSERT_FALSE(agent.ok());
  EXPECT_TRUE(absl::IsDeadlineExceeded(agent.status())) << agent.status();
  EXPECT_THAT(std::string(agent.status().message()), HasSubstr("qemu-guest-agent running in the guest"));
  EXPECT_LT(absl::Now() - start, absl::Seconds(4));
}

}  // namespace
}  // namespace ndq
