#include "qemu_child.h"

#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>

#include "qemu_driver/supervisor_protocol.h"

namespace ndq::supervisor {
namespace {

// What the child reports through its close-on-exec pipe when it cannot exec:
// the step that failed and errno. A successful exec closes the pipe unwritten.
enum class Step : int { kStdin, kRedirect, kCgroup, kNetns, kGroups, kSetgid, kSetuid, kDeathSignal, kExec };

struct ChildFailure {
  Step step;
  int err;
};

const char* StepName(Step step) {
  switch (step) {
    case Step::kStdin: return "open /dev/null as stdin";
    case Step::kRedirect: return "redirect stdout/stderr";
    case Step::kCgroup: return "join the VM's cgroup";
    case Step::kNetns: return "enter the network namespace";
    case Step::kGroups: return "setgroups";
    case Step::kSetgid: return "setgid";
    case Step::kSetuid: return "setuid";
    case Step::kDeathSignal: return "prctl(PR_SET_PDEATHSIG)";
    case Step::kExec: return "exec";
  }
  return "?";
}

// Decimal text of a pid without stdio (only async-signal-safe calls may run
// between fork and exec).
int FormatPid(pid_t pid, char (&out)[16]) {
  char reversed[16];
  int n = 0;
  auto value = static_cast<unsigned long>(pid);
  do {
    reversed[n++] = static_cast<char>('0' + value % 10);
    value /= 10;
  } while (value != 0 && n < 15);
  for (int i = 0; i < n; ++i) out[i] = reversed[n - 1 - i];
  return n;
}

[[noreturn]] void FailInChild(int report_fd, Step step, int err) {
  const ChildFailure failure = {step, err};
  [[maybe_unused]] const ssize_t ignored = ::write(report_fd, &failure, sizeof failure);
  ::_exit(kCouldNotRunExitCode);
}

// Runs between fork and exec: only async-signal-safe calls (the user and its
// groups were looked up before the fork).
[[noreturn]] void ExecInChild(const ChildSetup& s, pid_t supervisor, int report_fd) {
  // Ignored dispositions survive exec (we ignore SIGINT, SIGHUP, SIGPIPE); a
  // VM must start with the defaults so it can be stopped normally.
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  for (int sig = 1; sig < NSIG; ++sig) {
    if (sig != SIGKILL && sig != SIGSTOP) ::sigaction(sig, &dfl, nullptr);
  }
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);

  const int null_fd = ::open("/dev/null", O_RDONLY);
  if (null_fd < 0) FailInChild(report_fd, Step::kStdin, errno);
  // All our own fds are >= 3 (main made sure 0-2 are occupied), so these
  // dup2s never clobber one another.
  if (::dup2(null_fd, STDIN_FILENO) < 0) FailInChild(report_fd, Step::kStdin, errno);
  if (::dup2(s.stdout_fd, STDOUT_FILENO) < 0 || ::dup2(s.stderr_fd, STDERR_FILENO) < 0) {
    FailInChild(report_fd, Step::kRedirect, errno);
  }
  ::close(null_fd);
  if (s.close_passed_fds > 0) {
    ::close_range(kFirstPassedFd, static_cast<unsigned>(kFirstPassedFd + s.close_passed_fds - 1), 0);
  }

  // Before exec, so all of QEMU's memory is charged to its cgroup; before
  // dropping privileges, which both need.
  if (s.cgroup_count > 0) {
    char pid_text[16];
    const int len = FormatPid(::getpid(), pid_text);
    for (int i = 0; i < s.cgroup_count; ++i) {
      if (::write(s.cgroup_fds[i], pid_text, static_cast<size_t>(len)) != len) {
        FailInChild(report_fd, Step::kCgroup, errno);
      }
    }
  }
  if (s.netns_fd >= 0 && ::setns(s.netns_fd, CLONE_NEWNET) != 0) FailInChild(report_fd, Step::kNetns, errno);

  if (s.run_as.name != nullptr) {
    if (::setgroups(static_cast<size_t>(s.run_as.group_count), s.run_as.groups) != 0) {
      FailInChild(report_fd, Step::kGroups, errno);
    }
    if (::setgid(s.run_as.gid) != 0) FailInChild(report_fd, Step::kSetgid, errno);
    if (::setuid(s.run_as.uid) != 0) FailInChild(report_fd, Step::kSetuid, errno);
  }
  // After setuid/setgid: changing credentials clears the parent-death signal.
  if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) FailInChild(report_fd, Step::kDeathSignal, errno);
  // The supervisor may have died before prctl; then nobody would ever kill us.
  if (::getppid() != supervisor) ::_exit(kCouldNotRunExitCode);

  ::execv(s.argv[0], s.argv);
  FailInChild(report_fd, Step::kExec, errno);
}

}  // namespace

namespace {

// One unsigned decimal id up to the next `stop` (or the end); advances *p.
bool TakeId(const char** p, char stop, unsigned* out) {
  const char* s = *p;
  unsigned long v = 0;
  const char* start = s;
  while (*s >= '0' && *s <= '9' && s - start < 10) v = v * 10 + static_cast<unsigned long>(*s++ - '0');
  if (s == start || (*s != stop && *s != '\0') || v > 0xfffffffeUL) return false;
  *out = static_cast<unsigned>(v);
  *p = *s == stop ? s + 1 : s;
  return true;
}

}  // namespace

bool ParseUserIds(const char* name, const char* ids, RunAs* out, ErrorText* error) {
  const char* p = ids;
  unsigned uid = 0, gid = 0;
  bool ok = TakeId(&p, ':', &uid) && TakeId(&p, ':', &gid);
  int count = 0;
  while (ok && *p != '\0') {
    unsigned group = 0;
    ok = count < kMaxUserGroups && TakeId(&p, ',', &group);
    if (ok) out->groups[count++] = group;
  }
  if (!ok) {
    error->Set("%s \"%s\" is not UID:GID[:G1,G2,...] (at most %d groups)", kArgUserIds, ids, kMaxUserGroups);
    return false;
  }
  out->name = name;
  out->uid = uid;
  out->gid = gid;
  out->group_count = count;
  return true;
}

pid_t StartChild(const ChildSetup& setup, ErrorText* error) {
  int report[2];
  if (::pipe2(report, O_CLOEXEC) != 0) {
    error->Set("pipe: %s", std::strerror(errno));
    return -1;
  }
  const pid_t supervisor = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    error->Set("fork: %s", std::strerror(errno));
    ::close(report[0]);
    ::close(report[1]);
    return -1;
  }
  if (pid == 0) {
    ::close(report[0]);
    ExecInChild(setup, supervisor, report[1]);
  }
  ::close(report[1]);
  ChildFailure failure{};
  ssize_t n;
  do {
    n = ::read(report[0], &failure, sizeof failure);
  } while (n < 0 && errno == EINTR);
  ::close(report[0]);
  if (n == 0) return pid;  // exec closed the pipe

  while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
  }
  if (n != static_cast<ssize_t>(sizeof failure)) {
    error->Set("child exited before exec (no report)");
    return -1;
  }
  if (failure.step == Step::kExec) {
    error->Set("exec %s: %s", setup.argv[0], std::strerror(failure.err));
  } else if (setup.run_as.name != nullptr &&
             (failure.step == Step::kGroups || failure.step == Step::kSetgid || failure.step == Step::kSetuid)) {
    error->Set("%s for user \"%s\": %s", StepName(failure.step), setup.run_as.name, std::strerror(failure.err));
  } else {
    error->Set("%s: %s", StepName(failure.step), std::strerror(failure.err));
  }
  return -1;
}

}  // namespace ndq::supervisor
