// Waiting on a condition with a deadline, instead of sleeping and hoping.
#pragma once

#include <functional>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace ndq::testing {

// Polls `condition` every 5 ms until it holds (true) or `timeout` passes (false).
inline bool Eventually(const std::function<bool()>& condition, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!condition()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return true;
}

}  // namespace ndq::testing
