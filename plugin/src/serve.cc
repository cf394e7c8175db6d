#include "nomadplugin/serve.h"

#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>

#include <grpc/support/log.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>
#include <grpcpp/support/server_interceptor.h>

#include "absl/strings/str_cat.h"
#include "nomadplugin/go_plugin_services.h"
#include "nomadplugin/hclog.h"

namespace nomadplugin {
namespace {

// gRPC core's own diagnostics go to the same hclog stream as ours.
void GrpcLogToHclog(gpr_log_func_args* args) {
  spdlog::level::level_enum level = spdlog::level::debug;
  if (args->severity == GPR_LOG_SEVERITY_ERROR) level = spdlog::level::err;
  else if (args->severity == GPR_LOG_SEVERITY_INFO) level = spdlog::level::debug;
  hclog::Log(level, args->message, {{"source", "grpc"}, {"file", args->file}, {"line", args->line}});
}

bool WriteAll(int fd, const std::string& data) {
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

// SIGTERM is blocked in every thread and taken here with sigwait, so no work
// ever runs inside a signal handler.
class TermSignalWatcher {
 public:
  explicit TermSignalWatcher(Lifecycle* lifecycle)
      : thread_([this, lifecycle] {
          sigset_t set;
          sigemptyset(&set);
          sigaddset(&set, SIGTERM);
          int sig = 0;
          while (sigwait(&set, &sig) == 0) {
            if (stopping_.load()) return;
            hclog::Info("received SIGTERM, shutting down");
            lifecycle->RequestShutdown("SIGTERM");
          }
        }) {}
  ~TermSignalWatcher() {
    stopping_.store(true);
    pthread_kill(thread_.native_handle(), SIGTERM);
    thread_.join();
  }

 private:
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

// Counts the calls the server is handling, so shutdown can wait for them.
class InFlightCalls {
 public:
  void Add(int delta) {
    absl::MutexLock lock(&mu_);
    count_ += delta;
  }
  int count() const {
    absl::MutexLock lock(&mu_);
    return count_;
  }
  bool WaitUntilIdle(absl::Duration timeout) const {
    absl::MutexLock lock(&mu_);
    auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return count_ == 0; };
    return mu_.AwaitWithTimeout(absl::Condition(&idle), timeout);
  }

 private:
  mutable absl::Mutex mu_;
  int count_ ABSL_GUARDED_BY(mu_) = 0;
};

// One interceptor lives exactly as long as its call: it counts the call in and out.
class CallTracker final : public grpc::experimental::Interceptor {
 public:
  explicit CallTracker(std::shared_ptr<InFlightCalls> calls) : calls_(std::move(calls)) { calls_->Add(1); }
  ~CallTracker() override { calls_->Add(-1); }
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override { methods->Proceed(); }

 private:
  std::shared_ptr<InFlightCalls> calls_;
};

class InFlightCallCounter final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit InFlightCallCounter(std::shared_ptr<InFlightCalls> calls) : calls_(std::move(calls)) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo*) override {
    return new CallTracker(calls_);
  }

 private:
  std::shared_ptr<InFlightCalls> calls_;
};

}  // namespace

void PrepareProcessSignals() {
  // The plugin shares the agent's process group: a Ctrl-C meant for the agent
  // must not kill it, and after an agent crash its stdio are broken pipes.
  ::signal(SIGINT, SIG_IGN);
  ::signal(SIGPIPE, SIG_IGN);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

absl::StatusOr<std::string> MakePrivateSocketDir() {
  const char* base = std::getenv("PLUGIN_UNIX_SOCKET_DIR");
  if (base == nullptr || *base == '\0') base = std::getenv("TMPDIR");
  if (base == nullptr || *base == '\0') base = "/tmp";
  std::string templ = absl::StrCat(base, "/plugin-XXXXXX");
  if (::mkdtemp(templ.data()) == nullptr) {
    return absl::InternalError(absl::StrCat("cannot create a socket directory under ", base, ": ",
                                            std::strerror(errno)));
  }
  return templ;  // mkdtemp creates it with mode 0700
}

int Serve(const ServeOptions& options) {
  if (!CookieMatches(options.handshake, std::getenv(options.handshake.cookie_key.c_str()))) {
    const std::string message = CookieMismatchMessage(options.handshake, options.plugin_name);
    WriteAll(STDERR_FILENO, message);
    return 1;
  }
  absl::StatusOr<int> version =
      NegotiateAppVersion(options.handshake, std::getenv("PLUGIN_PROTOCOL_VERSIONS"));
  if (!version.ok()) {
    hclog::Error(std::string(version.status().message()));
    return 1;
  }

  PrepareProcessSignals();
  gpr_set_log_function(GrpcLogToHclog);

  absl::StatusOr<std::string> dir = MakePrivateSocketDir();
  if (!dir.ok()) {
    hclog::Error(std::string(dir.status().message()));
    return 1;
  }
  const std::string socket_path = *dir + "/plugin.sock";
  auto cleanup_paths = [&] {
    ::unlink(socket_path.c_str());
    ::rmdir(dir->c_str());
  };
  if (socket_path.size() >= sizeof(sockaddr_un{}.sun_path)) {
    hclog::Error("plugin socket path is longer than a unix socket allows; set PLUGIN_UNIX_SOCKET_DIR "
                 "to a shorter directory",
                 {{"path", socket_path}});
    cleanup_paths();
    return 1;
  }

  Lifecycle* lifecycle = options.lifecycle;
  HealthService health(lifecycle);
  ControllerService controller(lifecycle);
  StdioService stdio(lifecycle);

  grpc::ServerBuilder builder;
  auto in_flight = std::make_shared<InFlightCalls>();
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(std::make_unique<InFlightCallCounter>(in_flight));
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  builder.AddListeningPort("unix:" + socket_path, grpc::InsecureServerCredentials());
  builder.RegisterService(&health);
  builder.RegisterService(&controller);
  builder.RegisterService(&stdio);
  for (grpc::Service* service : options.services) builder.RegisterService(service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr) {
    hclog::Error("cannot listen on the plugin socket", {{"path", socket_path}});
    cleanup_paths();
    return 1;
  }
  ::chmod(socket_path.c_str(), 0600);

  TermSignalWatcher term_watcher(lifecycle);
  const std::string line = FormatHandshakeLine(
      HandshakeLine{kCoreProtocolVersion, *version, "unix", socket_path, "grpc"});
  if (!WriteAll(STDOUT_FILENO, line)) {
    hclog::Error("cannot write the handshake line to stdout");
    lifecycle->RequestShutdown("stdout closed");
  }
  hclog::Info("plugin serving", {{"address", socket_path}, {"protocol_version", *version}});

  while (!lifecycle->WaitForShutdown(absl::InfiniteDuration())) {
  }
  hclog::Info("plugin shutting down", {{"reason", lifecycle->ShutdownReason()}});
  // gRPC's graceful shutdown also waits for idle client connections to go away,
  // which a host that just called Shutdown does not do: so wait for our own
  // calls to finish (long-lived streams end on the lifecycle), then stop at once.
  if (!in_flight->WaitUntilIdle(options.grace)) {
    hclog::Warn("calls still running at shutdown are cancelled", {{"calls", in_flight->count()}});
  }
  server->Shutdown(std::chrono::system_clock::now());
  server->Wait();
  cleanup_paths();
  return 0;
}

}  // namespace nomadplugin
