#include "output_files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>


namespace ndq::supervisor {

OutputOpen TryOpenOutput(const char* what, const char* path, int* fd, ErrorText* error) {
  // O_NONBLOCK makes a FIFO without a reader fail with ENXIO instead of blocking.
  // O_NOFOLLOW: the path lies in the allocation, which jobs write; a link
  // planted there must not make root append QEMU's output to a host file.
  const int opened = ::open(path, O_WRONLY | O_CREAT | O_APPEND | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC, 0640);
  if (opened >= 0) {
    // Our copies expect ordinary blocking writes.
    const int flags = ::fcntl(opened, F_GETFL);
    if (flags < 0 || ::fcntl(opened, F_SETFL, flags & ~O_NONBLOCK) < 0) {
      error->Set("%s %s: fcntl: %s", what, path, std::strerror(errno));
      ::close(opened);
      return OutputOpen::kFailed;
    }
    *fd = opened;
    return OutputOpen::kOpened;
  }
  const int err = errno;
  struct stat st {};
  if (err == ENXIO && ::stat(path, &st) == 0 && S_ISFIFO(st.st_mode)) return OutputOpen::kNoReaderYet;
  error->Set("open %s %s: %s", what, path, std::strerror(err));
  return OutputOpen::kFailed;
}

}  // namespace ndq::supervisor
