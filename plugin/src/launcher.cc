#include "nomadplugin/launcher.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "go_plugin/controller.grpc.pb.h"
#include "grpc_health/health.grpc.pb.h"

extern char** environ;

namespace nomadplugin {
namespace {

absl::Status ErrnoError(absl::string_view what) {
  return absl::InternalError(absl::StrCat(what, ": ", std::strerror(errno)));
}

std::chrono::system_clock::time_point DeadlineAfter(absl::Duration timeout) {
  return std::chrono::system_clock::now() +
         std::chrono::milliseconds(absl::ToInt64Milliseconds(timeout));
}

ExitStatus DecodeWaitStatus(int status) {
  ExitStatus out;
  if (WIFEXITED(status)) out.code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) out.signal = WTERMSIG(status);
  return out;
}

std::vector<std::string> BuildEnvironment(const LaunchOptions& options) {
  std::map<std::string, std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    absl::string_view entry(*e);
    const size_t eq = entry.find('=');
    if (eq == absl::string_view::npos) continue;
    env[std::string(entry.substr(0, eq))] = std::string(entry.substr(eq + 1));
  }
  for (const std::string& name : options.unset_env) env.erase(name);
  // What Nomad's plugin loader adds to the agent's environment.
  const HandshakeConfig nomad = NomadHandshake();
  if (options.set_cookie) env[nomad.cookie_key] = nomad.cookie_value;
  env["PLUGIN_PROTOCOL_VERSIONS"] = options.protocol_versions;
  env["PLUGIN_MIN_PORT"] = "10000";
  env["PLUGIN_MAX_PORT"] = "25000";
  for (const auto& [key, value] : options.env) env[key] = value;
  std::vector<std::string> out;
  for (const auto& [key, value] : env) out.push_back(key + "=" + value);
  return out;
}

}  // namespace

std::string ExitStatus::ToString() const {
  if (signal != 0) return absl::StrCat("killed by signal ", signal);
  return absl::StrCat("exit code ", code);
}

absl::StatusOr<std::unique_ptr<PluginProcess>> PluginProcess::Launch(const LaunchOptions& options) {
  int out_pipe[2], err_pipe[2], wake_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0) return ErrnoError("pipe");
  if (::pipe2(err_pipe, O_CLOEXEC) != 0) return ErrnoError("pipe");
  if (::pipe2(wake_pipe, O_CLOEXEC) != 0) return ErrnoError("pipe");

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, out_pipe[1], STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, err_pipe[1], STDERR_FILENO);

  std::vector<std::string> argv_storage = {options.binary};
  argv_storage.insert(argv_storage.end(), options.args.begin(), options.args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_storage = BuildEnvironment(options);
  std::vector<char*> envp;
  for (std::string& e : env_storage) envp.push_back(e.data());
  envp.push_back(nullptr);

  std::unique_ptr<PluginProcess> proc(new PluginProcess());
  const int rc = ::posix_spawn(&proc->pid_, options.binary.c_str(), &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  if (rc != 0) {
    ::close(out_pipe[0]);
    ::close(err_pipe[0]);
    ::close(wake_pipe[0]);
    ::close(wake_pipe[1]);
    proc->pid_ = -1;
    return absl::NotFoundError(absl::StrCat("cannot start ", options.binary, ": ", std::strerror(rc)));
  }
  proc->pidfd_ = static_cast<int>(::syscall(SYS_pidfd_open, proc->pid_, 0));
  proc->stdout_fd_ = out_pipe[0];
  proc->stderr_fd_ = err_pipe[0];
  proc->wake_read_fd_ = wake_pipe[0];
  proc->wake_write_fd_ = wake_pipe[1];
  proc->echo_stderr_ = options.echo_stderr;
  proc->reader_ = std::thread([p = proc.get()] { p->ReadOutputs(); });

  std::string line;
  {
    absl::MutexLock lock(&proc->mu_);
    // The lock expression names `proc`: clang does not see an init-capture there.
    auto ready = [&proc]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(proc->mu_) {
      return proc->got_handshake_ || proc->outputs_closed_;
    };
    proc->mu_.AwaitWithTimeout(absl::Condition(&ready), options.handshake_timeout);
    if (proc->got_handshake_) line = proc->stdout_buffer_;
  }
  auto fail = [&](absl::string_view why) -> absl::Status {
    absl::StatusOr<ExitStatus> exit = proc->WaitExit(absl::Seconds(2));
    return absl::FailedPreconditionError(absl::StrCat(
        "plugin ", options.binary, " ", why, " (",
        exit.ok() ? exit->ToString() : std::string("still running"), "); stderr: ",
        absl::StrJoin(proc->StderrLines(), "\n")));
  };
  if (line.empty()) return fail("gave no handshake line");
  absl::StatusOr<HandshakeLine> parsed = ParseHandshakeLine(line);
  if (!parsed.ok()) return fail(parsed.status().message());
  if (parsed->protocol != "grpc") return fail("does not speak gRPC");
  proc->handshake_ = *parsed;
  proc->raw_handshake_ = line;

  const std::string target =
      parsed->network == "unix" ? "unix:" + parsed->address : parsed->address;
  proc->channel_ = grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
  if (!proc->channel_->WaitForConnected(DeadlineAfter(options.handshake_timeout))) {
    return fail(absl::StrCat("accepts no connection on ", target));
  }
  return proc;
}

PluginProcess::~PluginProcess() {
  if (pid_ > 0 && !exit_) {
    ::kill(pid_, SIGKILL);
    WaitExit(absl::Seconds(10)).IgnoreError();
  }
  if (wake_write_fd_ >= 0) {
    ::close(wake_write_fd_);  // EOF on the wake pipe stops the reader
  }
  if (reader_.joinable()) reader_.join();
  for (int fd : {pidfd_, stdout_fd_, stderr_fd_, wake_read_fd_}) {
    if (fd >= 0) ::close(fd);
  }
}

void PluginProcess::ReadOutputs() {
  bool stdout_open = true, stderr_open = true;
  char buf[4096];
  while (stdout_open || stderr_open) {
    pollfd fds[3] = {{stdout_open ? stdout_fd_ : -1, POLLIN, 0},
                     {stderr_open ? stderr_fd_ : -1, POLLIN, 0},
                     {wake_read_fd_, POLLIN, 0}};
    if (::poll(fds, 3, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (fds[2].revents != 0) break;
    if (fds[0].revents != 0) {
      const ssize_t n = ::read(stdout_fd_, buf, sizeof buf);
      if (n <= 0) {
        stdout_open = false;
      } else {
        absl::MutexLock lock(&mu_);
        if (got_handshake_) {
          extra_stdout_.append(buf, static_cast<size_t>(n));
        } else {
          stdout_buffer_.append(buf, static_cast<size_t>(n));
          if (const size_t nl = stdout_buffer_.find('\n'); nl != std::string::npos) {
            extra_stdout_ = stdout_buffer_.substr(nl + 1);
            stdout_buffer_.resize(nl + 1);
            got_handshake_ = true;
          }
        }
      }
    }
    if (fds[1].revents != 0) {
      const ssize_t n = ::read(stderr_fd_, buf, sizeof buf);
      if (n <= 0) {
        stderr_open = false;
      } else {
        absl::MutexLock lock(&mu_);
        stderr_partial_.append(buf, static_cast<size_t>(n));
        size_t nl;
        while ((nl = stderr_partial_.find('\n')) != std::string::npos) {
          std::string one = stderr_partial_.substr(0, nl);
          stderr_partial_.erase(0, nl + 1);
          if (echo_stderr_) std::fprintf(stderr, "%s\n", one.c_str());
          stderr_lines_.push_back(std::move(one));
        }
      }
    }
  }
  absl::MutexLock lock(&mu_);
  if (!stderr_partial_.empty()) stderr_lines_.push_back(std::move(stderr_partial_));
  stderr_partial_.clear();
  outputs_closed_ = true;
}

absl::Status PluginProcess::CheckHealth(absl::Duration timeout) {
  auto stub = grpc::health::v1::Health::NewStub(channel_);
  grpc::ClientContext context;
  context.set_deadline(DeadlineAfter(timeout));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service("plugin");
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) {
    return absl::UnavailableError(absl::StrCat("health check failed: ", status.error_message()));
  }
  if (response.status() != grpc::health::v1::HealthCheckResponse::SERVING) {
    return absl::UnavailableError("plugin reports it is not serving");
  }
  return absl::OkStatus();
}

absl::StatusOr<ExitStatus> PluginProcess::Shutdown(absl::Duration timeout) {
  auto stub = ::plugin::GRPCController::NewStub(channel_);
  grpc::ClientContext context;
  context.set_deadline(DeadlineAfter(timeout));
  ::plugin::Empty request, response;
  stub->Shutdown(&context, request, &response);  // the connection may drop as it exits
  absl::StatusOr<ExitStatus> exit = WaitExit(timeout);
  if (exit.ok()) return exit;
  Signal(SIGKILL);
  return WaitExit(absl::Seconds(10));
}

absl::StatusOr<ExitStatus> PluginProcess::WaitExit(absl::Duration timeout) {
  if (exit_) return *exit_;
  pollfd pfd = {pidfd_, POLLIN, 0};
  const int ms = timeout == absl::InfiniteDuration() ? -1 : static_cast<int>(absl::ToInt64Milliseconds(timeout));
  int ready;
  do {
    ready = ::poll(&pfd, 1, ms);
  } while (ready < 0 && errno == EINTR);
  if (ready == 0) return absl::DeadlineExceededError(absl::StrCat("plugin pid ", pid_, " still running"));
  int status = 0;
  if (::waitpid(pid_, &status, 0) != pid_) return ErrnoError("waitpid");
  exit_ = DecodeWaitStatus(status);
  return *exit_;
}

void PluginProcess::Signal(int signal) {
  if (pid_ > 0 && !exit_) ::kill(pid_, signal);
}

std::vector<std::string> PluginProcess::StderrLines() const {
  absl::MutexLock lock(&mu_);
  return stderr_lines_;
}

std::string PluginProcess::ExtraStdout() const {
  absl::MutexLock lock(&mu_);
  return extra_stdout_;
}

bool PluginProcess::WaitForStderrLine(const std::function<bool(const std::string&)>& match,
                                      absl::Duration timeout) {
  size_t seen = 0;
  auto found = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (; seen < stderr_lines_.size(); ++seen) {
      if (match(stderr_lines_[seen])) return true;
    }
    return outputs_closed_;
  };
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithTimeout(absl::Condition(&found), timeout);
  return seen < stderr_lines_.size();
}

}  // namespace nomadplugin
