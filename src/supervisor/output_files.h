// Opens the --stdout/--stderr destinations: regular files (appended, created
// 0640), /dev/null, or FIFOs that Nomad's log reader opens. QEMU never waits
// for a reader: it starts at once, its output waits in its pipe until the
// reader is there (see Supervise in supervisor_main.cc).
#pragma once

#include "error_text.h"

namespace ndq::supervisor {

// How often a FIFO without a reader is tried again. The kernel offers no
// event for "a reader arrived" that a writer could wait on.
inline constexpr int kReaderPollMs = 100;

enum class OutputOpen { kOpened, kNoReaderYet, kFailed };

// One attempt: kOpened with a blocking, close-on-exec *fd; kNoReaderYet for a
// FIFO nobody reads yet (logged once per `what` by the caller); kFailed with
// *error set.
OutputOpen TryOpenOutput(const char* what, const char* path, int* fd, ErrorText* error);

}  // namespace ndq::supervisor
