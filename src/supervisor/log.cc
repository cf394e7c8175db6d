#include "log.h"

#include <time.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>

namespace ndq::supervisor {

int64_t NowUnixMs() {
  timespec ts{};
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

void Log(const char* fmt, ...) {
  const int64_t now = NowUnixMs();
  const time_t secs = static_cast<time_t>(now / 1000);
  tm utc{};
  ::gmtime_r(&secs, &utc);
  char line[2048];
  int n = std::snprintf(line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ nomad-qemu-supervisor[%d]: ",
                        utc.tm_year + 1900, utc.tm_mon + 1, utc.tm_mday, utc.tm_hour, utc.tm_min, utc.tm_sec,
                        static_cast<int>(now % 1000), static_cast<int>(::getpid()));
  va_list ap;
  va_start(ap, fmt);
  const int m = std::vsnprintf(line + n, sizeof line - static_cast<size_t>(n), fmt, ap);
  va_end(ap);
  // vsnprintf reports the untruncated length; keep room for the newline.
  n = m < 0 ? n : (n + m < static_cast<int>(sizeof line) - 1 ? n + m : static_cast<int>(sizeof line) - 2);
  line[n++] = '\n';
  [[maybe_unused]] const ssize_t ignored = ::write(STDERR_FILENO, line, static_cast<size_t>(n));
}

}  // namespace ndq::supervisor
