// Covers plugin/src/serve.cc: Serve runs in this process on a thread with its
// stdout (or stderr) swapped for a pipe; a real gRPC client reads the handshake
// line, calls the served services and asks for shutdown. Logs go to a captured logger.
#include "nomadplugin/serve.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <sstream>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <grpcpp/create_channel.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include "../../support/temp_dir.h"
#include "absl/synchronization/notification.h"
#include "go_plugin/controller.grpc.pb.h"
#include "grpc_health/health.grpc.pb.h"
#include "nomad/base.grpc.pb.h"

namespace nomadplugin {
namespace {

using ::ndq::testing::TempDir;
using ::testing::HasSubstr;
namespace basepb = hashicorp::nomad::plugins::base::proto;

constexpr char kCookieKey[] = "NDQ_SERVE_TEST_COOKIE";

// Swaps file descriptor `target` for a pipe's write end while alive.
class FdCapture {
 public:
  explicit FdCapture(int target) : target_(target) {
    std::fflush(nullptr);
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) return;
    read_fd_ = fds[0];
    saved_ = ::dup(target_);
    ::dup2(fds[1], target_);
    ::close(fds[1]);
  }
  ~FdCapture() {
    Restore();
    if (read_fd_ >= 0) ::close(read_fd_);
  }
  void Restore() {
    if (saved_ < 0) return;
    std::fflush(nullptr);
    ::dup2(saved_, target_);
    ::close(saved_);
    saved_ = -1;
  }
  // Up to and including the first newline; what came so far if `timeout` passes first.
  std::string ReadLine(absl::Duration timeout) {
    std::string line;
    const absl::Time deadline = absl::Now() + timeout;
    char c = 0;
    while (line.empty() || line.back() != '\n') {
      pollfd pfd = {read_fd_, POLLIN, 0};
      const int ms = static_cast<int>(absl::ToInt64Milliseconds(deadline - absl::Now()));
      if (ms <= 0 || ::poll(&pfd, 1, ms) <= 0 || ::read(read_fd_, &c, 1) != 1) break;
      line.push_back(c);
    }
    return line;
  }
  // Everything written, once restored (the pipe then has no writer left).
  std::string ReadAll() {
    Restore();
    std::string all;
    char buf[4096];
    ssize_t n;
    while ((n = ::read(read_fd_, buf, sizeof buf)) > 0) all.append(buf, static_cast<size_t>(n));
    return all;
  }

 private:
  int target_;
  int read_fd_ = -1;
  int saved_ = -1;
};

// A plugin service of the test's own whose PluginInfo can hold its call open.
class SlowInfo final : public basepb::BasePlugin::Service {
 public:
  grpc::Status PluginInfo(grpc::ServerContext* context, const basepb::PluginInfoRequest*,
                          basepb::PluginInfoResponse* response) override {
    entered_.Notify();
    while (hold_ && !release_.WaitForNotificationWithTimeout(absl::Milliseconds(5))) {
      if (context->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
    }
    response->set_name("slow-info");
    return grpc::Status::OK;
  }
  bool hold_ = false;  // set before serving
  absl::Notification entered_;
  absl::Notification release_;
};

// Saves an environment variable and puts it back when the test ends.
class SavedEnv {
 public:
  explicit SavedEnv(const char* name) : name_(name) {
    const char* value = std::getenv(name);
    if (value != nullptr) value_ = value;
    was_set_ = value != nullptr;
  }
  ~SavedEnv() {
    if (was_set_) ::setenv(name_, value_.c_str(), 1);
    else ::unsetenv(name_);
  }

 private:
  const char* name_;
  std::string value_;
  bool was_set_ = false;
};

class ServeTest : public ::testing::Test {
 protected:
  ServeTest() {
    ::setenv(kCookieKey, "let-me-in", 1);
    ::setenv("PLUGIN_UNIX_SOCKET_DIR", sockets_.path().c_str(), 1);
    ::unsetenv("PLUGIN_PROTOCOL_VERSIONS");
    auto logger = std::make_shared<spdlog::logger>(
        "serve-test", std::make_shared<spdlog::sinks::ostream_sink_mt>(log_));
    logger->set_level(spdlog::level::debug);
    spdlog::set_default_logger(std::move(logger));
  }
  ~ServeTest() override {
    if (server_thread_.joinable()) {  // a test that failed half way
      lifecycle_.RequestShutdown("test ended");
      info_.release_.Notify();
      server_thread_.join();
    }
    spdlog::set_default_logger(previous_logger_);
  }

  ServeOptions Options() {
    ServeOptions options;
    options.plugin_name = "serve-test";
    options.handshake = HandshakeConfig{kCookieKey, "let-me-in", {2, 3}};
    options.services = {&info_};
    options.lifecycle = &lifecycle_;
    return options;
  }
  // Starts Serve on a thread; returns the handshake line it printed.
  std::string StartServing(const ServeOptions& options) {
    FdCapture out(STDOUT_FILENO);
    server_thread_ = std::thread([this, options] { exit_code_ = Serve(options); });
    return out.ReadLine(absl::Seconds(10));
  }
  // Serve blocks SIGTERM in its thread, which the test's own thread must keep
  // (the children later tests spawn inherit its mask): so it runs on one of its own.
  static int ServeOnAThread(const ServeOptions& options) {
    int code = -1;
    std::thread([&] { code = Serve(options); }).join();
    return code;
  }
  int WaitForServeToReturn() {
    server_thread_.join();
    return exit_code_;
  }
  bool SocketDirIsEmpty() const { return std::filesystem::is_empty(sockets_.path()); }

  SavedEnv saved_cookie_{kCookieKey};
  SavedEnv saved_socket_dir_{"PLUGIN_UNIX_SOCKET_DIR"};
  SavedEnv saved_versions_{"PLUGIN_PROTOCOL_VERSIONS"};
  SavedEnv saved_tmpdir_{"TMPDIR"};
  std::shared_ptr<spdlog::logger> previous_logger_ = spdlog::default_logger();
  std::ostringstream log_;
  TempDir sockets_;
  Lifecycle lifecycle_;
  SlowInfo info_;
  std::thread server_thread_;
  int exit_code_ = -1;
};

std::shared_ptr<grpc::Channel> ChannelTo(const HandshakeLine& line) {
  return grpc::CreateChannel("unix:" + line.address, grpc::InsecureChannelCredentials());
}

void SetDeadline(grpc::ClientContext* context, absl::Duration timeout) {
  context->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::milliseconds(absl::ToInt64Milliseconds(timeout)));
}

TEST_F(ServeTest, AnnouncesAPrivateSocketAndServesUntilTheControllerSaysStop) {
  ::setenv("PLUGIN_PROTOCOL_VERSIONS", "2,3,4", 1);
  const absl::StatusOr<HandshakeLine> line = ParseHandshakeLine(StartServing(Options()));
  ASSERT_TRUE(line.ok()) << line.status();
  EXPECT_EQ(line->app_version, 3);
  EXPECT_EQ(line->protocol, "grpc");
  const std::filesystem::path socket(line->address);
  EXPECT_EQ(socket.filename(), "plugin.sock");
  EXPECT_EQ(socket.parent_path().parent_path(), sockets_.path());
  struct stat st {};
  ASSERT_EQ(::stat(socket.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);

  auto channel = ChannelTo(*line);
  grpc::ClientContext info_context;
  SetDeadline(&info_context, absl::Seconds(10));
  basepb::PluginInfoResponse info;
  ASSERT_TRUE(basepb::BasePlugin::NewStub(channel)->PluginInfo(&info_context, {}, &info).ok());
  EXPECT_EQ(info.name(), "slow-info");
  grpc::ClientContext stop_context;
  SetDeadline(&stop_context, absl::Seconds(10));
  ::plugin::Empty empty;
  ASSERT_TRUE(::plugin::GRPCController::NewStub(channel)->Shutdown(&stop_context, empty, &empty).ok());

  EXPECT_EQ(WaitForServeToReturn(), 0);
  EXPECT_TRUE(SocketDirIsEmpty()) << "socket or its directory left behind";
  EXPECT_THAT(log_.str(), HasSubstr("plugin serving"));
  EXPECT_THAT(log_.str(), HasSubstr("plugin shutting down"));
  EXPECT_THAT(log_.str(), HasSubstr("controller"));
}

TEST_F(ServeTest, HealthIsServedBesideThePluginsServices) {
  const absl::StatusOr<HandshakeLine> line = ParseHandshakeLine(StartServing(Options()));
  ASSERT_TRUE(line.ok()) << line.status();
  EXPECT_EQ(line->app_version, 3) << "no version list from the host: our highest";
  grpc::ClientContext context;
  SetDeadline(&context, absl::Seconds(10));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service("plugin");
  grpc::health::v1::HealthCheckResponse response;
  ASSERT_TRUE(grpc::health::v1::Health::NewStub(ChannelTo(*line))->Check(&context, request, &response).ok());
  EXPECT_EQ(response.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  lifecycle_.RequestShutdown("test");
  EXPECT_EQ(WaitForServeToReturn(), 0);
  EXPECT_TRUE(SocketDirIsEmpty());
}

// A call in flight when shutdown is requested may finish within the grace period.
TEST_F(ServeTest, CallInFlightAtShutdownFinishes) {
  info_.hold_ = true;
  ServeOptions options = Options();
  options.grace = absl::Seconds(10);
  const absl::StatusOr<HandshakeLine> line = ParseHandshakeLine(StartServing(options));
  ASSERT_TRUE(line.ok()) << line.status();
  grpc::Status call_status;
  basepb::PluginInfoResponse info;
  std::thread client([&] {
    grpc::ClientContext context;
    SetDeadline(&context, absl::Seconds(20));
    call_status = basepb::BasePlugin::NewStub(ChannelTo(*line))->PluginInfo(&context, {}, &info);
  });
  ASSERT_TRUE(info_.entered_.WaitForNotificationWithTimeout(absl::Seconds(10)));
  lifecycle_.RequestShutdown("test");
  info_.release_.Notify();
  client.join();
  EXPECT_TRUE(call_status.ok()) << call_status.error_message();
  EXPECT_EQ(info.name(), "slow-info");
  EXPECT_EQ(WaitForServeToReturn(), 0);
}

TEST_F(ServeTest, CallOutlivingTheGraceIsCancelled) {
  info_.hold_ = true;
  ServeOptions options = Options();
  options.grace = absl::Milliseconds(100);
  const absl::StatusOr<HandshakeLine> line = ParseHandshakeLine(StartServing(options));
  ASSERT_TRUE(line.ok()) << line.status();
  grpc::Status call_status;
  std::thread client([&] {
    grpc::ClientContext context;
    SetDeadline(&context, absl::Seconds(20));
    basepb::PluginInfoResponse info;
    call_status = basepb::BasePlugin::NewStub(ChannelTo(*line))->PluginInfo(&context, {}, &info);
  });
  ASSERT_TRUE(info_.entered_.WaitForNotificationWithTimeout(absl::Seconds(10)));
  const absl::Time start = absl::Now();
  lifecycle_.RequestShutdown("test");
  EXPECT_EQ(WaitForServeToReturn(), 0);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(100));
  client.join();
  EXPECT_FALSE(call_status.ok());
  EXPECT_THAT(log_.str(), HasSubstr("calls still running at shutdown are cancelled"));
  EXPECT_TRUE(SocketDirIsEmpty());
}

TEST_F(ServeTest, WithoutTheCookieItExplainsAndExits) {
  ::unsetenv(kCookieKey);
  FdCapture err(STDERR_FILENO);
  const int code = ServeOnAThread(Options());
  EXPECT_EQ(code, 1);
  EXPECT_EQ(err.ReadAll(), CookieMismatchMessage(Options().handshake, "serve-test"));
  EXPECT_TRUE(SocketDirIsEmpty());
}

TEST_F(ServeTest, IncompatibleHostVersionsExit) {
  ::setenv("PLUGIN_PROTOCOL_VERSIONS", "1", 1);
  FdCapture out(STDOUT_FILENO);
  EXPECT_EQ(ServeOnAThread(Options()), 1);
  EXPECT_EQ(out.ReadAll(), "") << "no handshake line";
  EXPECT_THAT(log_.str(), HasSubstr("incompatible plugin protocol"));
  EXPECT_TRUE(SocketDirIsEmpty());
}

TEST_F(ServeTest, SocketDirThatCannotBeCreatedIsAnError) {
  const std::string absent = sockets_ / "absent";
  ::setenv("PLUGIN_UNIX_SOCKET_DIR", absent.c_str(), 1);
  EXPECT_EQ(ServeOnAThread(Options()), 1);
  EXPECT_THAT(log_.str(), HasSubstr("cannot create a socket directory under " + absent + ": No such file or directory"));
}

TEST_F(ServeTest, SocketPathTooLongForUnixIsAnErrorAndLeavesNothing) {
  const std::string deep = sockets_ / std::string(110, 'd');
  ASSERT_TRUE(std::filesystem::create_directory(deep));
  ::setenv("PLUGIN_UNIX_SOCKET_DIR", deep.c_str(), 1);
  EXPECT_EQ(ServeOnAThread(Options()), 1);
  EXPECT_THAT(log_.str(), HasSubstr("longer than a unix socket allows"));
  EXPECT_TRUE(std::filesystem::is_empty(deep)) << "the socket directory was left behind";
}

TEST_F(ServeTest, PrivateSocketDirFallsBackToTmpdir) {
  ::unsetenv("PLUGIN_UNIX_SOCKET_DIR");
  ::setenv("TMPDIR", sockets_.path().c_str(), 1);
  const absl::StatusOr<std::string> dir = MakePrivateSocketDir();
  ASSERT_TRUE(dir.ok()) << dir.status();
  EXPECT_THAT(*dir, ::testing::MatchesRegex(sockets_.path() + "/plugin-[A-Za-z0-9]{6}"));
  struct stat st {};
  ASSERT_EQ(::stat(dir->c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
}

TEST(PrepareProcessSignals, BlocksSigtermInTheThreadAndIgnoresSigintAndSigpipe) {
  struct sigaction old_int {}, old_pipe {};
  ::sigaction(SIGINT, nullptr, &old_int);
  ::sigaction(SIGPIPE, nullptr, &old_pipe);
  bool term_blocked = false;
  std::thread([&] {
    PrepareProcessSignals();
    sigset_t mask;
    pthread_sigmask(SIG_SETMASK, nullptr, &mask);
    term_blocked = sigismember(&mask, SIGTERM) == 1;
  }).join();
  struct sigaction now_int {}, now_pipe {};
  ::sigaction(SIGINT, nullptr, &now_int);
  ::sigaction(SIGPIPE, nullptr, &now_pipe);
  ::sigaction(SIGINT, &old_int, nullptr);
  ::sigaction(SIGPIPE, &old_pipe, nullptr);
  EXPECT_TRUE(term_blocked);
  EXPECT_EQ(now_int.sa_handler, SIG_IGN);
  EXPECT_EQ(now_pipe.sa_handler, SIG_IGN);
}

}  // namespace
}  // namespace nomadplugin
