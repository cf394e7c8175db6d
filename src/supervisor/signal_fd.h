// Reading the supervisor's signalfd (SIGTERM and SIGCHLD) while it waits for
// something other than QEMU's exit: a FIFO reader, swtpm's socket or exit.
#pragma once

#include <sys/signalfd.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstddef>

namespace ndq::supervisor {

// Reads every pending signal; true when a SIGTERM was among them. SIGCHLDs
// only wake the caller, which then asks waitpid whose child it was.
inline bool DrainSignals(int signal_fd) {
  bool term = false;
  signalfd_siginfo info[4];
  for (;;) {
    const ssize_t n = ::read(signal_fd, info, sizeof info);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return term;
    for (size_t i = 0; i < static_cast<size_t>(n) / sizeof info[0]; ++i) {
      if (info[i].ssi_signo == SIGTERM) term = true;
    }
  }
}

}  // namespace ndq::supervisor
