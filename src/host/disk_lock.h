// Whether another VM holds a disk, read from the locks QEMU itself takes, and
// the reservation of a disk for one VM before its QEMU starts.
//
// QEMU (file-posix, locking=auto) marks an image it opens with shared OFD
// locks on single bytes: 100 + i for each permission i it holds, 200 + i for
// each permission it does not let others hold (i = 0 consistent read, 1 write,
// 2 write unchanged, 3 resize). A writer thus holds byte 101, and unless
// share-rw is on, byte 201. A lock is held by an open file description, so
// the driver's reservation on the fd it hands QEMU becomes QEMU's own.
#pragma once

#include <sys/types.h>

#include <string>

#include "absl/status/status.h"

namespace ndq {

// QEMU's lock bytes (block/file-posix.c, QEMU 4.0 to at least 9.x).
inline constexpr off_t kQemuLockPermBase = 100;
inline constexpr off_t kQemuLockSharedBase = 200;
inline constexpr int kQemuPermConsistentRead = 0;
inline constexpr int kQemuPermWrite = 1;

// Reserves the disk open at `fd` for one VM, as QEMU would lock it: a writer
// (`writable`) holds "write" and shares it with nobody; a reader holds
// "consistent read" and lets nobody write. Fails with kConflict, naming
// `what`, when another open file (another QEMU, another reservation) holds it
// in a way that conflicts; then nothing is taken. Races between two
// reservations in this process are excluded; with another process (a QEMU
// starting at the same moment) as narrow as QEMU's own check.
absl::Status ReserveDisk(int fd, bool writable, const std::string& what);

}  // namespace ndq
