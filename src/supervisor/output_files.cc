#include "output_files.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>

#include "log.h"
#include "signal_fd.h"

namespace ndq::supervisor {
namespace {

// How often to look for a FIFO reader. The kernel offers no event for "a reader
// arrived" that a writer could wait on while also watching for SIGTERM, and a
// plain blocking open(2) could not be interrupted without a signal handler.
constexpr int kReaderPollMs = 100;

}  // namespace

int OpenOutput(const char* what, const char* path, int signal_fd, ErrorText* error) {
  bool logged_wait = false;
  for (;;) {
    // O_NONBLOCK makes a FIFO without a reader fail with ENXIO instead of blocking.
    // O_NOFOLLOW: the path lies in the allocation, which jobs write; a link
    // planted there must not make root append QEMU's output to a host file.
    const int fd = ::open(path, O_WRONLY | O_CREAT | O_APPEND | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC, 0640);
    if (fd >= 0) {
      // QEMU and our stderr copy expect ordinary blocking writes.
      const int flags = ::fcntl(fd, F_GETFL);
      if (flags < 0 || ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0) {
        error->Set("%s %s: fcntl: %s", what, path, std::strerror(errno));
        ::close(fd);
        return -1;
      }
      if (logged_wait) Log("%s FIFO %s has a reader", what, path);
      return fd;
    }
    const int err = errno;
    struct stat st {};
    if (err != ENXIO || ::stat(path, &st) != 0 || !S_ISFIFO(st.st_mode)) {
      error->Set("open %s %s: %s", what, path, std::strerror(err));
      return -1;
    }
    if (!logged_wait) {
      Log("waiting for a reader on %s FIFO %s", what, path);
      logged_wait = true;
    }
    pollfd pfd = {signal_fd, POLLIN, 0};
    if (::poll(&pfd, 1, kReaderPollMs) > 0 && DrainSignals(signal_fd)) {
      error->Set("SIGTERM while waiting for a reader on %s FIFO %s", what, path);
      return -1;
    }
  }
}

}  // namespace ndq::supervisor
