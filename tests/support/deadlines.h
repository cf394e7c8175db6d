// The bound a test waits for what must happen (a reply, an exit, an event):
// generous, so that a loaded machine does not fail a test that is right.
#pragma once

#include "absl/time/time.h"

namespace ndq::testing {

inline constexpr absl::Duration kGenerous = absl::Seconds(10);

}  // namespace ndq::testing
