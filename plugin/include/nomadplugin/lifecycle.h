// The plugin process's shutdown state, shared by the server loop and every
// long-lived stream so they all end promptly when the host asks the plugin to stop.
#pragma once

#include <string>

#include <grpcpp/server_context.h>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace nomadplugin {

class Lifecycle {
 public:
  // How often a waiting stream looks at whether its client went away: the sync
  // gRPC API offers no cancellation callback, only ServerContext::IsCancelled().
  static constexpr absl::Duration kCancelCheckInterval = absl::Milliseconds(200);

  void RequestShutdown(const std::string& reason);
  bool ShutdownRequested() const;
  std::string ShutdownReason() const;

  // Blocks until shutdown is requested (true) or `timeout` passes (false).
  bool WaitForShutdown(absl::Duration timeout) const;

  enum class Wake { kShutdown, kCancelled, kTimeout };
  // For streaming handlers: sleeps up to `timeout`, waking early on shutdown
  // (at once) or when the client cancels the call (noticed within
  // `cancel_check`: the sync API has no cancellation callback, so it polls).
  Wake SleepInStream(grpc::ServerContext* context, absl::Duration timeout,
                     absl::Duration cancel_check = kCancelCheckInterval) const;

 private:
  mutable absl::Mutex mu_;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  std::string reason_ ABSL_GUARDED_BY(mu_);
};

}  // namespace nomadplugin
