// How messages show a value a job or an operator wrote: in double quotes, and
// bounded, so a megabyte of job config is never echoed back into an error,
// an event or a log line.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace ndq {

// Values longer than this show their first kQuotedMaxBytes bytes.
inline constexpr size_t kQuotedMaxBytes = 200;

// "value", or "first 200 bytes..." (N bytes) for a longer one.
std::string Quoted(absl::string_view s);
// "a", "b", "c"
std::string QuotedList(const std::vector<std::string>& items);

}  // namespace ndq
