#include "nomadplugin/lifecycle.h"

#include <algorithm>

namespace nomadplugin {

void Lifecycle::RequestShutdown(const std::string& reason) {
  absl::MutexLock lock(&mu_);
  if (shutdown_) return;
  shutdown_ = true;
  reason_ = reason;
}

bool Lifecycle::ShutdownRequested() const {
  absl::MutexLock lock(&mu_);
  return shutdown_;
}

std::string Lifecycle::ShutdownReason() const {
  absl::MutexLock lock(&mu_);
  return reason_;
}

bool Lifecycle::WaitForShutdown(absl::Duration timeout) const {
  absl::MutexLock lock(&mu_);
  return mu_.AwaitWithTimeout(absl::Condition(&shutdown_), timeout);
}

Lifecycle::Wake Lifecycle::SleepInStream(grpc::ServerContext* context, absl::Duration timeout,
                                         absl::Duration cancel_check) const {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    if (context != nullptr && context->IsCancelled()) return Wake::kCancelled;
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) return Wake::kTimeout;
    if (WaitForShutdown(std::min(left, cancel_check))) return Wake::kShutdown;
  }
}

}  // namespace nomadplugin
