// Helpers shared by the tests of QEMU's control channels (qemu/control_socket,
// qemu/qmp_client, qemu/guest_agent_client): time bounds, a unix socket bound
// at a path, and JSON nested deeper than any real message.
#pragma once

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstddef>
#include <string>

#include "absl/time/time.h"
#include "deadlines.h"

namespace ndq::testing {

inline constexpr absl::Duration kFast = absl::Seconds(2);       // bound on "fails at once"

// A stream socket bound at `path` (not yet listening); -1 when it cannot be.
inline int BindUnix(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  path.copy(addr.sun_path, sizeof addr.sun_path - 1);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// `depth` nested JSON arrays: [[[...]]].
inline std::string Nested(size_t depth) { return std::string(depth, '[') + std::string(depth, ']'); }

}  // namespace ndq::testing
