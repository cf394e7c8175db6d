// Starts QEMU, and swtpm beside it, as the supervisor's children, bound to the
// supervisor's lifetime.
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
  gid_t groups[kMaxUserGroups] = {};  // supplementary groups (setgroups before exec)
  int group_count = 0;
};

// Takes the ids of --user-ids ("UID:GID[:G1,G2,...]") for user `name`; false
// with *error set when malformed.
bool ParseUserIds(const char* name, const char* ids, RunAs* out, ErrorText* error);

struct ChildSetup {
  char* const* argv = nullptr;  // argv[0] is the path executed (no PATH search)
  int stdout_fd = -1;           // becomes QEMU's stdout as is
  int stderr_fd = -1;           // becomes QEMU's stderr (the supervisor's pipe)
  RunAs run_as;
  int cgroup_fds[kMaxCgroups] = {};  // cgroup.procs files, opened for writing
  int cgroup_count = 0;
  int netns_fd = -1;                 // a network namespace to enter; -1: stay
  // Closes the fds kFirstPassedFd.. (QEMU's disk images, open without
  // close-on-exec) in a child that must not hold them: swtpm.
  int close_passed_fds = 0;
};

// Forks and execs setup.argv (QEMU or swtpm): stdin /dev/null, default signal
// dispositions, an empty signal mask, in its cgroups and network namespace, as
// run_as, and SIGKILL when the supervisor dies. Returns the pid once the exec
// succeeded; on failure returns -1 with *error set and the child reaped.
pid_t StartChild(const ChildSetup& setup, ErrorText* error);

}  // namespace ndq::supervisor
