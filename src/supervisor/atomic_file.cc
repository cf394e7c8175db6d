#include "atomic_file.h"

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "qemu_driver/supervisor_protocol.h"

namespace ndq::supervisor {

bool WriteFileAtomically(int dir_fd, const char* name, const char* data, size_t len, ErrorText* error) {
  char temp[256];
  if (std::snprintf(temp, sizeof temp, "%s%s", name, kTempSuffix) >= static_cast<int>(sizeof temp)) {
    error->Set("file name too long: %s", name);
    return false;
  }
  const int fd = ::openat(dir_fd, temp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0640);
  if (fd < 0) {
    error->Set("create %s: %s", temp, std::strerror(errno));
    return false;
  }
  for (size_t done = 0; done < len;) {
    const ssize_t n = ::write(fd, data + done, len - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      error->Set("write %s: %s", temp, std::strerror(errno));
      ::close(fd);
      ::unlinkat(dir_fd, temp, 0);
      return false;
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    error->Set("fsync %s: %s", temp, std::strerror(errno));
    ::close(fd);
    ::unlinkat(dir_fd, temp, 0);
    return false;
  }
  ::close(fd);
  if (::renameat(dir_fd, temp, dir_fd, name) != 0) {
    error->Set("rename %s to %s: %s", temp, name, std::strerror(errno));
    ::unlinkat(dir_fd, temp, 0);
    return false;
  }
  // Without this the rename itself may be lost in a crash.
  if (::fsync(dir_fd) != 0) {
    error->Set("fsync state directory after renaming %s: %s", name, std::strerror(errno));
    return false;
  }
  return true;
}

}  // namespace ndq::supervisor
