// The VM's TPM: an swtpm process beside QEMU, started before QEMU (whose tpm
// emulator backend connects to swtpm's control socket at start-up) and stopped
// once QEMU is gone, so no swtpm outlives its VM.
#pragma once

#include <sys/types.h>

#include "error_text.h"
#include "qemu_child.h"

namespace ndq::supervisor {

struct SwtpmOptions {
  const char* path = nullptr;  // the swtpm binary; nullptr: no TPM
  const char* state_dir = nullptr;
  const char* socket = nullptr;  // its control socket, the one QEMU connects to
};

// All three options or none; paths swtpm's comma-separated option values can
// carry; a socket path that fits a sockaddr_un.
bool CheckSwtpmOptions(const SwtpmOptions& opts, ErrorText* error);

// Starts swtpm placed like QEMU (a copy of QEMU's setup: its cgroups, network
// namespace and user), without QEMU's passed fds, its output going to the
// supervisor's own stderr (supervisor.log), and waits until its control socket
// exists. Returns its pid, or -1 with *error = "swtpm failed to start: ..." and
// no swtpm left running: it exited, did not create the socket in time, or a
// SIGTERM (read from `signal_fd`) called the start off.
pid_t StartSwtpm(const SwtpmOptions& opts, const ChildSetup& qemu_setup, int passed_fds, int signal_fd,
                 ErrorText* error);

// Stops and reaps swtpm: SIGTERM, a short wait, then SIGKILL. Nothing for a
// pid <= 0.
void StopSwtpm(pid_t swtpm, int signal_fd);

}  // namespace ndq::supervisor
