// A fixed-size error message: the supervisor allocates nothing on the heap, so
// failures are described into a buffer the caller owns.
#pragma once

#include <cstdarg>
#include <cstddef>
#include <cstdio>

namespace ndq::supervisor {

inline constexpr size_t kMaxErrorBytes = 1024;

struct ErrorText {
  char text[kMaxErrorBytes] = "";

  bool empty() const { return text[0] == '\0'; }
  __attribute__((format(printf, 2, 3))) void Set(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
  }
};

}  // namespace ndq::supervisor
