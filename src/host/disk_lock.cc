#include "host/disk_lock.h"

#include <fcntl.h>

#include <cerrno>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "base/error_kind.h"

namespace ndq {
namespace {

// A lock of `type` on QEMU's lock byte `at`.
struct flock ByteLock(short type, off_t at) {
  struct flock lock {};
  lock.l_type = type;
  lock.l_whence = SEEK_SET;
  lock.l_start = at;
  lock.l_len = 1;
  return lock;
}

// Whether another open file holds a lock on byte `at` that any write lock
// would meet: 1 yes, 0 no, -1 error (errno set).
int HeldByAnother(int fd, off_t at) {
  struct flock probe = ByteLock(F_WRLCK, at);
  if (::fcntl(fd, F_OFD_GETLK, &probe) != 0) return -1;
  return probe.l_type == F_UNLCK ? 0 : 1;
}

int TakeShared(int fd, off_t at) {
  struct flock lock = ByteLock(F_RDLCK, at);
  return ::fcntl(fd, F_OFD_SETLK, &lock);
}

// Two starts of this plugin check and take in turn.
absl::Mutex reservations;

}  // namespace

absl::Status ReserveDisk(int fd, bool writable, const std::string& what) {
  const off_t held = kQemuLockPermBase + (writable ? kQemuPermWrite : kQemuPermConsistentRead);
  const off_t unshared = kQemuLockSharedBase + kQemuPermWrite;
  // A writer conflicts with any other writer (byte 101) and with anyone who
  // shares no write (201); a reader only with a writer that would change the
  // disk under it (101).
  std::vector<off_t> checked = {kQemuLockPermBase + kQemuPermWrite};
  if (writable) checked.push_back(unshared);
  absl::MutexLock lock(&reservations);
  for (off_t at : checked) {
    const int conflict = HeldByAnother(fd, at);
    if (conflict < 0) return ErrnoNow(absl::StrCat("cannot check whether ", what, " is in use"));
    if (conflict > 0) {
      return WithKind(absl::FailedPreconditionError(absl::StrCat(
                          what, " is in use by another VM", writable ? "" : " that writes it",
                          ": two VMs never share a disk they write; stop the other allocation first")),
                      ErrorKind::kConflict);
    }
  }
  if (TakeShared(fd, held) != 0 || TakeShared(fd, unshared) != 0) {
    const absl::Status failed = ErrnoNow(absl::StrCat("cannot reserve ", what));
    struct flock release {};
    release.l_type = F_UNLCK;
    release.l_whence = SEEK_SET;  // l_start 0, l_len 0: every byte this open file locked
    (void)::fcntl(fd, F_OFD_SETLK, &release);
    return failed;
  }
  return absl::OkStatus();
}

}  // namespace ndq
