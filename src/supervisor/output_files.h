// Opens the --stdout/--stderr destinations: regular files (appended, created
// 0640), /dev/null, or FIFOs that Nomad's log reader will open.
#pragma once

#include "error_text.h"

namespace ndq::supervisor {

// Returns a blocking, close-on-exec fd, or -1 with *error set. Opening a FIFO
// for writing waits for its reader; meanwhile a SIGTERM read from `signal_fd`
// abandons the wait, so a plugin can always stop a supervisor that is stuck here.
int OpenOutput(const char* what, const char* path, int signal_fd, ErrorText* error);

}  // namespace ndq::supervisor
