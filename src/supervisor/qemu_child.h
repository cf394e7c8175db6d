// Starts QEMU as the supervisor's child, bound to the supervisor's lifetime.
#pragma once

#include <sys/types.h>

#include "error_text.h"
#include "qemu_driver/supervisor_protocol.h"

namespace ndq::supervisor {

// The account QEMU runs as, resolved before forking so an unknown user is
// reported without starting anything.
struct RunAs {
  const char* name = nullptr;  // nullptr: stay as the supervisor's user
  uid_t uid = 0;
  gid_t gid = 0;
};

// Looks up `name` in the user database; false with *error set when unknown.
bool ResolveUser(const char* name, RunAs* out, ErrorText* error);

struct ChildSetup {
  char* const* argv = nullptr;  // argv[0] is the path executed (no PATH search)
  int stdout_fd = -1;           // becomes QEMU's stdout as is
  int stderr_fd = -1;           // becomes QEMU's stderr (the supervisor's pipe)
  RunAs run_as;
  int cgroup_fds[kMaxCgroups] = {};  // cgroup.procs files, opened for writing
  int cgroup_count = 0;
  int netns_fd = -1;                 // a network namespace to enter; -1: stay
};

// Forks and execs QEMU: stdin /dev/null, default signal dispositions, an empty
// signal mask, in its cgroups and network namespace, and SIGKILL when the
// supervisor dies. Returns the pid once the
// exec succeeded; on failure returns -1 with *error set and the child reaped.
pid_t StartQemu(const ChildSetup& setup, ErrorText* error);

}  // namespace ndq::supervisor
