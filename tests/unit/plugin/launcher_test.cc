// Covers plugin/src/launcher.cc: real child processes (small shell scripts in a
// temp dir) print handshake lines that point at a real in-process gRPC server
// with go-plugin's health and controller services, or misbehave in the ways a plugin can.
#include "nomadplugin/launcher.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/eventually.h"
#include "../../support/temp_dir.h"
#include "../../support/unix_grpc_server.h"
#include "nomadplugin/go_plugin_services.h"

namespace nomadplugin {
namespace {

using ::ndq::testing::Eventually;
using ::ndq::testing::TempDir;
using ::ndq::testing::UnixGrpcServer;
using ::testing::HasSubstr;

// Prints a handshake line announcing $SOCK (set by the test).
constexpr char kPrintHandshake[] = "printf '1|2|unix|%s|grpc|\\n' \"$SOCK\"\n";

class LauncherTest : public ::testing::Test {
 protected:
  LauncherTest() : health_(&lifecycle_), controller_(&lifecycle_), server_({&health_, &controller_}) {}

  // An executable shell script in the temp dir.
  std::string Script(const std::string& body) {
    const std::string path = scripts_ / ("plugin" + std::to_string(++scripts_written_) + ".sh");
    std::ofstream(path) << "#!/bin/sh\n" << body;
    ::chmod(path.c_str(), 0755);
    return path;
  }
  LaunchOptions Options(const std::string& body) {
    LaunchOptions options;
    options.binary = Script(body);
    options.env["SOCK"] = server_.socket_path();
    options.handshake_timeout = absl::Seconds(5);
    return options;
  }
  std::unique_ptr<PluginProcess> Launch(const LaunchOptions& options) {
    absl::StatusOr<std::unique_ptr<PluginProcess>> plugin = PluginProcess::Launch(options);
    EXPECT_TRUE(plugin.ok()) << plugin.status();
    return plugin.ok() ? std::move(*plugin) : nullptr;
  }
  std::string LaunchError(const LaunchOptions& options) {
    absl::StatusOr<std::unique_ptr<PluginProcess>> plugin = PluginProcess::Launch(options);
    EXPECT_FALSE(plugin.ok());
    if (plugin.ok()) return "";
    EXPECT_EQ(plugin.status().code(), absl::StatusCode::kFailedPrecondition) << plugin.status();
    return std::string(plugin.status().message());
  }

  TempDir scripts_;
  int scripts_written_ = 0;
  Lifecycle lifecycle_;
  HealthService health_;
  ControllerService controller_;
  UnixGrpcServer server_;
};

bool HasLine(const std::string& wanted, const std::string& line) { return line == wanted; }

TEST(ExitStatus, SaysHowTheProcessEnded) {
  EXPECT_EQ((ExitStatus{0, 0}).ToString(), "exit code 0");
  EXPECT_EQ((ExitStatus{3, 0}).ToString(), "exit code 3");
  EXPECT_EQ((ExitStatus{-1, SIGKILL}).ToString(), "killed by signal 9");
}

TEST_F(LauncherTest, ReadsTheHandshakeAndConnectsToTheAnnouncedSocket) {
  ASSERT_TRUE(server_.started());
  auto plugin = Launch(Options(std::string(kPrintHandshake) + "exec sleep 30\n"));
  ASSERT_NE(plugin, nullptr);
  EXPECT_EQ(plugin->raw_handshake(), "1|2|unix|" + server_.socket_path() + "|grpc|\n");
  EXPECT_EQ(plugin->handshake().core_version, 1);
  EXPECT_EQ(plugin->handshake().app_version, 2);
  EXPECT_EQ(plugin->handshake().network, "unix");
  EXPECT_EQ(plugin->handshake().address, server_.socket_path());
  EXPECT_GT(plugin->pid(), 0);
  EXPECT_TRUE(plugin->CheckHealth(absl::Seconds(5)).ok());
  EXPECT_EQ(plugin->ExtraStdout(), "");
}

TEST_F(LauncherTest, ConnectsOverTcpToo) {
  int port = 0;
  HealthService tcp_health(&lifecycle_);
  grpc::ServerBuilder tcp_builder;
  tcp_builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  tcp_builder.RegisterService(&tcp_health);
  std::unique_ptr<grpc::Server> tcp_server = tcp_builder.BuildAndStart();
  ASSERT_NE(tcp_server, nullptr);
  LaunchOptions options = Options("printf '1|2|tcp|127.0.0.1:%s|grpc|\\n' \"$PORT\"\nexec sleep 30\n");
  options.env["PORT"] = std::to_string(port);
  auto plugin = Launch(options);
  ASSERT_NE(plugin, nullptr);
  EXPECT_EQ(plugin->handshake().address, "127.0.0.1:" + std::to_string(port));
  EXPECT_TRUE(plugin->CheckHealth(absl::Seconds(5)).ok());
  tcp_server->Shutdown(std::chrono::system_clock::now());
}

TEST_F(LauncherTest, GivesThePluginNomadsEnvironment) {
  LaunchOptions options = Options(
      "echo \"cookie=$NOMAD_PLUGIN_MAGIC_COOKIE\" \"versions=$PLUGIN_PROTOCOL_VERSIONS\" >&2\n"
      "echo \"ports=$PLUGIN_MIN_PORT-$PLUGIN_MAX_PORT\" \"home=${HOME-unset}\" \"path=$PATH\" >&2\n"
      "echo \"args=$*\" \"extra=$EXTRA\" >&2\n" +
      std::string(kPrintHandshake) + "exec sleep 30\n");
  options.args = {"--one", "two"};
  options.protocol_versions = "1,2";
  options.unset_env = {"HOME"};
  options.env["EXTRA"] = "x y";
  options.env["PLUGIN_MAX_PORT"] = "30000";  // the caller's values win over Nomad's
  auto plugin = Launch(options);
  ASSERT_NE(plugin, nullptr);
  const char* path = std::getenv("PATH");
  const std::string want_last = "args=--one two extra=x y";
  ASSERT_TRUE(plugin->WaitForStderrLine([&](const std::string& l) { return HasLine(want_last, l); },
                                        absl::Seconds(5)));
  EXPECT_THAT(plugin->StderrLines(),
              ::testing::ElementsAre("cookie=" + NomadHandshake().cookie_value + " versions=1,2",
                                     "ports=10000-30000 home=unset path=" + std::string(path ? path : ""),
                                     want_last));
}

TEST_F(LauncherTest, WithoutTheCookieThePluginSeesNone) {
  LaunchOptions options =
      Options("echo \"cookie=${NOMAD_PLUGIN_MAGIC_COOKIE-unset}\" >&2\n" + std::string(kPrintHandshake) +
              "exec sleep 30\n");
  options.set_cookie = false;
  options.unset_env = {"NOMAD_PLUGIN_MAGIC_COOKIE"};
  auto plugin = Launch(options);
  ASSERT_NE(plugin, nullptr);
  EXPECT_TRUE(plugin->WaitForStderrLine([](const std::string& l) { return HasLine("cookie=unset", l); },
                                        absl::Seconds(5)));
}

TEST_F(LauncherTest, KeepsWhatIsPrintedOnStdoutAfterTheHandshake) {
  auto plugin = Launch(Options("printf '1|2|unix|%s|grpc|\\nstray\\n' \"$SOCK\"\necho later\nexec sleep 30\n"));
  ASSERT_NE(plugin, nullptr);
  EXPECT_EQ(plugin->raw_handshake(), "1|2|unix|" + server_.socket_path() + "|grpc|\n");
  EXPECT_TRUE(Eventually([&] { return plugin->ExtraStdout() == "stray\nlater\n"; }, absl::Seconds(5)))
      << plugin->ExtraStdout();
}

TEST_F(LauncherTest, SplitsStderrIntoLinesAndKeepsAnUnfinishedLastOne) {
  auto plugin = Launch(Options(std::string(kPrintHandshake) + "printf 'one\\ntwo\\nthr' >&2\nprintf 'ee' >&2\n"));
  ASSERT_NE(plugin, nullptr);
  ASSERT_TRUE(plugin->WaitExit(absl::Seconds(5)).ok());
  EXPECT_TRUE(plugin->WaitForStderrLine([](const std::string& l) { return HasLine("three", l); },
                                        absl::Seconds(5)));
  EXPECT_THAT(plugin->StderrLines(), ::testing::ElementsAre("one", "two", "three"));
}

TEST_F(LauncherTest, WaitForStderrLineGivesUpWhenThePluginsOutputsClose) {
  auto plugin = Launch(Options(std::string(kPrintHandshake) + "echo bye >&2\n"));
  ASSERT_NE(plugin, nullptr);
  const absl::Time start = absl::Now();
  EXPECT_FALSE(plugin->WaitForStderrLine([](const std::string& l) { return HasLine("never", l); },
                                         absl::Seconds(30)));
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  EXPECT_THAT(plugin->StderrLines(), ::testing::ElementsAre("bye"));
}

TEST_F(LauncherTest, MissingBinaryIsNotFound) {
  LaunchOptions options;
  options.binary = scripts_ / "absent";
  const auto plugin = PluginProcess::Launch(options);
  EXPECT_EQ(plugin.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(plugin.status().message(), "cannot start " + options.binary + ": No such file or directory");
}

TEST_F(LauncherTest, PluginExitingWithoutAHandshakeIsAnErrorWithItsStatusAndStderr) {
  LaunchOptions options = Options("echo 'cookie mismatch' >&2\necho 'run by Nomad' >&2\nexit 7\n");
  EXPECT_EQ(LaunchError(options), "plugin " + options.binary +
                                      " gave no handshake line (exit code 7); stderr: cookie mismatch\nrun by Nomad");
}

TEST_F(LauncherTest, UnfinishedHandshakeLineIsNoHandshake) {
  LaunchOptions options = Options("printf '1|2|unix|%s' \"$SOCK\"\nexit 0\n");
  EXPECT_THAT(LaunchError(options), HasSubstr("gave no handshake line (exit code 0)"));
}

TEST_F(LauncherTest, MalformedHandshakeIsAnErrorQuotingIt) {
  LaunchOptions options = Options("echo hello\nexit 3\n");
  const std::string message = LaunchError(options);
  EXPECT_THAT(message, HasSubstr("plugin " + options.binary + " handshake line has 1 fields, want at least 4: \"hello\""));
  EXPECT_THAT(message, HasSubstr("(exit code 3)"));
}

TEST_F(LauncherTest, PluginThatDoesNotSpeakGrpcIsRefused) {
  LaunchOptions options = Options("printf '1|2|unix|%s|netrpc|\\n' \"$SOCK\"\nexit 0\n");
  EXPECT_THAT(LaunchError(options), HasSubstr("does not speak gRPC (exit code 0)"));
  // go-plugin reads a line without the protocol field as its legacy net/rpc.
  LaunchOptions legacy = Options("printf '1|2|unix|%s\\n' \"$SOCK\"\nexit 0\n");
  EXPECT_THAT(LaunchError(legacy), HasSubstr("does not speak gRPC"));
}

// The plugin stays silent past the handshake timeout, then exits.
TEST_F(LauncherTest, SilentPluginTimesOut) {
  LaunchOptions options = Options("echo thinking >&2\nsleep 0.3\nexit 5\n");
  options.handshake_timeout = absl::Milliseconds(100);
  const absl::Time start = absl::Now();
  EXPECT_THAT(LaunchError(options), HasSubstr("gave no handshake line (exit code 5); stderr: thinking"));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(100));
}

TEST_F(LauncherTest, HandshakeNamingASocketNobodyListensOnIsAnError) {
  LaunchOptions options = Options("printf '1|2|unix|%s|grpc|\\n' \"$SOCK.none\"\nsleep 0.5\nexit 4\n");
  options.handshake_timeout = absl::Milliseconds(200);
  EXPECT_THAT(LaunchError(options),
              HasSubstr("accepts no connection on unix:" + server_.socket_path() + ".none (exit code 4)"));
}

TEST_F(LauncherTest, CheckHealthReportsNotServingAndAGoneServer) {
  auto plugin = Launch(Options(std::string(kPrintHandshake) + "exec sleep 30\n"));
  ASSERT_NE(plugin, nullptr);
  lifecycle_.RequestShutdown("test");
  const absl::Status not_serving = plugin->CheckHealth(absl::Seconds(5));
  EXPECT_EQ(not_serving.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(not_serving.message(), "plugin reports it is not serving");
  server_.Stop();
  const absl::Status gone = plugin->CheckHealth(absl::Seconds(5));
  EXPECT_EQ(gone.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(gone.message()), ::testing::StartsWith("health check failed: "));
}

// The script leaves once the test writes to its fifo, which the test does when
// the controller service has received Shutdown.
TEST_F(LauncherTest, ShutdownCallsTheControllerAndWaitsForTheExit) {
  const std::string fifo = scripts_ / "fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  LaunchOptions options = Options(std::string(kPrintHandshake) + "read line < \"$FIFO\"\nexit 3\n");
  options.env["FIFO"] = fifo;
  auto plugin = Launch(options);
  ASSERT_NE(plugin, nullptr);
  std::thread host_side([&] {
    if (!lifecycle_.WaitForShutdown(absl::Seconds(10))) return;
    std::ofstream(fifo) << "go\n";
  });
  const absl::StatusOr<ExitStatus> exit = plugin->Shutdown(absl::Seconds(10));
  host_side.join();
  ASSERT_TRUE(exit.ok()) << exit.status();
  EXPECT_EQ(exit->code, 3);
  EXPECT_EQ(lifecycle_.ShutdownReason(), "controller");
}

TEST_F(LauncherTest, ShutdownKillsAPluginThatStaysUp) {
  auto plugin = Launch(Options(std::string(kPrintHandshake) + "exec sleep 30\n"));
  ASSERT_NE(plugin, nullptr);
  const absl::StatusOr<ExitStatus> exit = plugin->Shutdown(absl::Milliseconds(200));
  ASSERT_TRUE(exit.ok()) << exit.status();
  EXPECT_EQ(exit->signal, SIGKILL);
  EXPECT_EQ(exit->code, -1);
  EXPECT_TRUE(lifecycle_.ShutdownRequested());
}

TEST_F(LauncherTest, WaitExitTimesOutThenReportsTheSignal) {
  auto plugin = Launch(Options(std::string(kPrintHandshake) + "exec sleep 30\n"));
  ASSERT_NE(plugin, nullptr);
  const absl::StatusOr<ExitStatus> running = plugin->WaitExit(absl::Milliseconds(50));
  EXPECT_EQ(running.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(running.status().message(), "plugin pid " + std::to_string(plugin->pid()) + " still running");
  plugin->Signal(SIGTERM);
  const absl::StatusOr<ExitStatus> exit = plugin->WaitExit(absl::Seconds(5));
  ASSERT_TRUE(exit.ok()) << exit.status();
  EXPECT_EQ(exit->ToString(), "killed by signal 15");
  plugin->Signal(SIGKILL);  // gone and reaped: nothing is sent, the status stays
  const absl::StatusOr<ExitStatus> again = plugin->WaitExit(absl::Seconds(5));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->signal, SIGTERM);
}

TEST_F(LauncherTest, DestructorKillsAndReapsTheProcess) {
  auto plugin = Launch(Options(std::string(kPrintHandshake) + "exec sleep 30\n"));
  ASSERT_NE(plugin, nullptr);
  const pid_t pid = plugin->pid();
  plugin.reset();
  EXPECT_EQ(::kill(pid, 0), -1);
  EXPECT_EQ(errno, ESRCH) << "the plugin is still running or left a zombie";
}

// A grandchild that inherited the plugin's stdout and stderr keeps them open
// after the plugin is gone: the destructor must not wait for it.
TEST_F(LauncherTest, DestructorDoesNotWaitForAGrandchildHoldingTheOutputs) {
  auto plugin = Launch(Options("sleep 30 &\necho \"grandchild $!\" >&2\n" + std::string(kPrintHandshake) +
                               "exec sleep 30\n"));
  ASSERT_NE(plugin, nullptr);
  pid_t grandchild = 0;
  ASSERT_TRUE(plugin->WaitForStderrLine(
      [&](const std::string& l) { return std::sscanf(l.c_str(), "grandchild %d", &grandchild) == 1; },
      absl::Seconds(5)));
  ASSERT_EQ(::kill(grandchild, 0), 0);
  const absl::Time start = absl::Now();
  plugin.reset();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  ::kill(grandchild, SIGKILL);
}

}  // namespace
}  // namespace nomadplugin
