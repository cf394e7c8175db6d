// Starts a plugin binary the way a Nomad client does (environment, cookie,
// handshake line on stdout, gRPC over the announced socket) and keeps its stderr.
// Used by qemu-driverctl and by the tests; nothing here is specific to QEMU.
#pragma once

#include <sys/types.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/channel.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "nomadplugin/handshake.h"

namespace nomadplugin {

struct LaunchOptions {
  std::string binary;
  std::vector<std::string> args;
  // Set on top of (or instead of) the inherited environment, as Nomad does.
  std::map<std::string, std::string> env;
  std::vector<std::string> unset_env;
  bool set_cookie = true;
  std::string protocol_versions = "2";
  absl::Duration handshake_timeout = absl::Seconds(10);
  // Copy each stderr line of the plugin to ours as it arrives.
  bool echo_stderr = false;
};

// How a process ended, decoded from its wait status.
struct ExitStatus {
  int code = -1;    // exit code, or -1 when killed by a signal
  int signal = 0;   // terminating signal, 0 when it exited
  std::string ToString() const;
};

class PluginProcess {
 public:
  // Starts the binary and waits for its handshake line. A plugin that exits or
  // prints garbage first is an error whose message carries its exit status and stderr.
  static absl::StatusOr<std::unique_ptr<PluginProcess>> Launch(const LaunchOptions& options);

  // Kills the plugin (SIGKILL) if it is still running.
  ~PluginProcess();

  pid_t pid() const { return pid_; }
  const HandshakeLine& handshake() const { return handshake_; }
  // The handshake line exactly as printed, newline included.
  const std::string& raw_handshake() const { return raw_handshake_; }
  std::shared_ptr<grpc::Channel> channel() const { return channel_; }

  // grpc.health.v1 Check of service "plugin", as go-plugin's client pings it.
  absl::Status CheckHealth(absl::Duration timeout);

  // GRPCController/Shutdown, then waits for the exit; like Nomad, SIGKILL after `timeout`.
  absl::StatusOr<ExitStatus> Shutdown(absl::Duration timeout);

  // Waits for the process to exit; DeadlineExceeded if it does not within `timeout`.
  absl::StatusOr<ExitStatus> WaitExit(absl::Duration timeout);

  void Signal(int signal);

  std::vector<std::string> StderrLines() const;
  // Anything printed to stdout after the handshake line (a protocol violation).
  std::string ExtraStdout() const;
  // Waits until a stderr line satisfies `match`.
  bool WaitForStderrLine(const std::function<bool(const std::string&)>& match, absl::Duration timeout);

 private:
  PluginProcess() = default;
  void ReadOutputs();  // runs on reader_

  pid_t pid_ = -1;
  int pidfd_ = -1;
  int stdout_fd_ = -1;
  int stderr_fd_ = -1;
  int wake_read_fd_ = -1;   // tells the reader to stop even if a grandchild keeps the pipes open
  int wake_write_fd_ = -1;
  bool echo_stderr_ = false;
  HandshakeLine handshake_;
  std::string raw_handshake_;
  std::shared_ptr<grpc::Channel> channel_;
  std::thread reader_;
  std::optional<ExitStatus> exit_;

  mutable absl::Mutex mu_;
  bool got_handshake_ ABSL_GUARDED_BY(mu_) = false;
  bool outputs_closed_ ABSL_GUARDED_BY(mu_) = false;
  std::string stdout_buffer_ ABSL_GUARDED_BY(mu_);
  std::string extra_stdout_ ABSL_GUARDED_BY(mu_);
  std::string stderr_partial_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> stderr_lines_ ABSL_GUARDED_BY(mu_);
};

}  // namespace nomadplugin
