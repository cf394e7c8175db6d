// The supervisor's own log: one line per event on its stderr, which the plugin
// points at supervisor.log in the state directory.
#pragma once

#include <cstdint>

namespace ndq::supervisor {

// Unix time in milliseconds.
int64_t NowUnixMs();

// "2024-05-01T12:00:00.123Z nomad-qemu-supervisor[42]: <message>\n", written
// with one write(2) so lines never interleave; write errors are ignored.
__attribute__((format(printf, 1, 2))) void Log(const char* fmt, ...);

}  // namespace ndq::supervisor
