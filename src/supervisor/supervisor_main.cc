// nomad-qemu-supervisor: runs one QEMU for the plugin, outlives plugin crashes
// and restarts, and records how QEMU ended where a restarted plugin finds it.
// The contract is in include/qemu_driver/supervisor_protocol.h; the design
// notes are in docs/architecture.md ("Per-VM supervisor").
//
// It stays small on purpose (libc only, fixed buffers, no heap use of its own):
// one runs per VM for the VM's whole life.
#include <fcntl.h>
#include <poll.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "atomic_file.h"
#include "error_text.h"
#include "exit_record.h"
#include "log.h"
#include "output_files.h"
#include "qemu_child.h"
#include "signal_fd.h"
#include "qemu_driver/supervisor_protocol.h"
#include "swtpm.h"
#include "tail_buffer.h"

namespace ndq::supervisor {
namespace {

constexpr char kUsage[] =
    "usage: nomad-qemu-supervisor --state-dir DIR (--stdout PATH --stderr PATH | --pooled) [--user NAME]\n"
    "                             [--cgroup PROCS_FILE]... [--netns PATH] [--pass-fds N]\n"
    "                             [--swtpm PATH --swtpm-state DIR --swtpm-socket PATH] -- QEMU [ARGS...]\n";
// After QEMU is gone, a process it left behind may still hold the stderr pipe
// and keep writing; stop draining after this much.
constexpr size_t kMaxDrainBytes = 1 << 20;
// How long a log FIFO still without a reader is waited for once QEMU exited.
constexpr int kPendingOutputGraceMs = 5000;

using OutputTail = TailBuffer<kStderrTailBytes>;
static_assert(kStdoutTailBytes == kStderrTailBytes, "one ring type serves both streams");

struct Options {
  const char* state_dir = nullptr;
  const char* stdout_path = nullptr;
  const char* stderr_path = nullptr;
  const char* user = nullptr;
  const char* user_ids = nullptr;  // --user-ids: the plugin's lookup of --user
  const char* cgroups[kMaxCgroups] = {};
  int cgroup_count = 0;
  const char* netns = nullptr;
  const char* pass_fds = nullptr;  // read before anything else (PassedFdCount)
  bool pooled = false;             // --pooled: the output paths come at handover
  SwtpmOptions swtpm;
  char** qemu_argv = nullptr;  // NULL-terminated: the tail of our own argv
};

__attribute__((format(printf, 1, 2))) int UsageError(const char* fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "nomad-qemu-supervisor: %s\n%s", msg, kUsage);
  return kExitUsage;
}

// How many fds from kFirstPassedFd on the plugin handed us for QEMU (the
// value of --pass-fds); read before the arguments are parsed, because every
// other inherited fd is closed first. 0 when absent or malformed (ParseArgs
// reports the latter).
int PassedFdCount(int argc, char** argv) {
  for (int i = 1; i + 1 < argc && std::strcmp(argv[i], kArgEndOfOptions) != 0; ++i) {
    if (std::strcmp(argv[i], kArgPassFds) != 0) continue;
    char* end = nullptr;
    const long n = std::strtol(argv[i + 1], &end, 10);
    if (end == argv[i + 1] || *end != '\0' || n < 0 || n > kMaxPassedFds) return 0;
    return static_cast<int>(n);
  }
  return 0;
}

bool ParseArgs(int argc, char** argv, Options* opts, ErrorText* error) {
  for (int i = 1; i < argc; ++i) {
    const char* arg = argv[i];
    if (std::strcmp(arg, kArgEndOfOptions) == 0) {
      opts->qemu_argv = argv + i + 1;
      break;
    }
    if (std::strcmp(arg, kArgPooled) == 0) {
      opts->pooled = true;
      continue;
    }
    const bool cgroup = std::strcmp(arg, kArgCgroup) == 0;
    if (cgroup && opts->cgroup_count == kMaxCgroups) {
      error->Set("more than %d %s arguments", kMaxCgroups, kArgCgroup);
      return false;
    }
    const char** slot = std::strcmp(arg, kArgStateDir) == 0 ? &opts->state_dir
                        : std::strcmp(arg, kArgStdout) == 0 ? &opts->stdout_path
                        : std::strcmp(arg, kArgStderr) == 0 ? &opts->stderr_path
                        : std::strcmp(arg, kArgUser) == 0   ? &opts->user
                        : std::strcmp(arg, kArgUserIds) == 0 ? &opts->user_ids
                        : std::strcmp(arg, kArgNetns) == 0  ? &opts->netns
                        : std::strcmp(arg, kArgPassFds) == 0 ? &opts->pass_fds
                        : std::strcmp(arg, kArgSwtpm) == 0 ? &opts->swtpm.path
                        : std::strcmp(arg, kArgSwtpmState) == 0 ? &opts->swtpm.state_dir
                        : std::strcmp(arg, kArgSwtpmSocket) == 0 ? &opts->swtpm.socket
                        : cgroup                            ? &opts->cgroups[opts->cgroup_count++]
                                                            : nullptr;
    if (slot == nullptr) {
      error->Set("unknown argument \"%s\"", arg);
      return false;
    }
    if (i + 1 >= argc || argv[i + 1][0] == '\0') {
      error->Set("%s needs a non-empty value", arg);
      return false;
    }
    *slot = argv[++i];
  }
  const char* missing = opts->state_dir == nullptr                      ? kArgStateDir
                        : opts->stdout_path == nullptr && !opts->pooled ? kArgStdout
                        : opts->stderr_path == nullptr && !opts->pooled ? kArgStderr
                                                                        : nullptr;
  if (missing != nullptr) {
    error->Set("%s is required", missing);
    return false;
  }
  if (opts->user_ids != nullptr && opts->user == nullptr) {
    error->Set("%s needs %s", kArgUserIds, kArgUser);
    return false;
  }
  if (opts->pooled && (opts->stdout_path != nullptr || opts->stderr_path != nullptr)) {
    error->Set("%s takes no %s or %s: they come at handover", kArgPooled, kArgStdout, kArgStderr);
    return false;
  }
  if (opts->pass_fds != nullptr && PassedFdCount(argc, argv) == 0) {
    error->Set("%s takes a count from 1 to %d, got \"%s\"", kArgPassFds, kMaxPassedFds, opts->pass_fds);
    return false;
  }
  if (!CheckSwtpmOptions(opts->swtpm, error)) return false;
  if (opts->qemu_argv == nullptr || opts->qemu_argv[0] == nullptr) {
    error->Set("no QEMU command after \"%s\"", kArgEndOfOptions);
    return false;
  }
  return true;
}

// Our fds must never land on 0-2: the child's dup2s onto 0-2 would clobber them.
void EnsureStandardFds() {
  for (int fd = 0; fd <= 2; ++fd) {
    if (::fcntl(fd, F_GETFD) < 0 && errno == EBADF) ::open("/dev/null", O_RDWR);
  }
}

static_assert(kHandoverSignal == SIGUSR1, "the protocol's handover signal is SIGUSR1");

// Returns a signalfd for SIGTERM, SIGCHLD and SIGUSR1 (a pooled VM's handover), or -1.
int DetachAndTakeSignals() {
  // The plugin shares the Nomad agent's process group and session; a Ctrl-C
  // or hangup there must not reach the VM. Fails only if we already lead a
  // group, e.g. the plugin spawned us with setsid itself.
  if (::setsid() < 0 && ::getsid(0) != ::getpid()) Log("setsid: %s", std::strerror(errno));
  struct sigaction act {};
  act.sa_handler = SIG_IGN;
  for (int sig : {SIGINT, SIGHUP, SIGPIPE}) ::sigaction(sig, &act, nullptr);
  // An inherited SIG_IGN for SIGCHLD would make the kernel reap QEMU for us
  // and lose its exit status.
  act.sa_handler = SIG_DFL;
  for (int sig : {SIGTERM, SIGCHLD, SIGUSR1}) ::sigaction(sig, &act, nullptr);
  // Set, not add to, the mask: the plugin may have spawned us with SIGTERM blocked.
  sigset_t taken;
  sigemptyset(&taken);
  sigaddset(&taken, SIGTERM);
  sigaddset(&taken, SIGCHLD);
  sigaddset(&taken, SIGUSR1);
  ::sigprocmask(SIG_SETMASK, &taken, nullptr);
  return ::signalfd(-1, &taken, SFD_NONBLOCK | SFD_CLOEXEC);
}

// A stale record from an earlier run in the same directory would tell a
// restarted plugin that this VM already exited.
void RemoveStaleFiles(int dir_fd) {
  for (const char* name : {kPidFile, kExitFile, kHandoverFile}) {
    char temp[256];
    std::snprintf(temp, sizeof temp, "%s%s", name, kTempSuffix);
    ::unlinkat(dir_fd, name, 0);
    ::unlinkat(dir_fd, temp, 0);
  }
}

void DescribeCommand(char* const* argv, char* out, size_t cap) {
  size_t len = 0;
  out[0] = '\0';
  for (; *argv != nullptr && len + 1 < cap; ++argv) {
    const int n = std::snprintf(out + len, cap - len, "%s%s", len == 0 ? "" : " ", *argv);
    if (n < 0) break;
    len += static_cast<size_t>(n);
  }
  if (len + 1 >= cap && cap > 4) std::memcpy(out + cap - 4, "...", 4);
}

void WriteAll(int fd, const char* data, size_t len) {
  while (len > 0) {
    const ssize_t n = ::write(fd, data, len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // the log reader may be gone; QEMU must not notice
    data += n;
    len -= static_cast<size_t>(n);
  }
}

enum class Copied { kSome, kNoneNow, kEof };

// One of QEMU's output streams: the read end of its pipe, where it is copied
// to (Nomad's log FIFO) and its tail for the exit record. stdout carries the
// guest's first serial port (ttyS0), so its tail is the last lines of the
// serial console; both tails are fixed rings a guest cannot grow.
struct Stream {
  int pipe_fd = -1;
  int out_fd = -1;  // -1 while its FIFO has no reader (pending)
  OutputTail* tail = nullptr;
  bool open = true;
  const char* what = "";  // "stdout" or "stderr"
  const char* path = nullptr;  // nullptr: a pooled VM's, not handed over yet
  bool pending = false;  // waiting for a FIFO reader or a handover; the output waits in the pipe meanwhile

  // Whether its pipe is read now: not while the output waits for a reader,
  // so QEMU's output is kept (in the pipe), not dropped.
  bool Readable() const { return open && !pending; }
};

// The first try at a stream's destination, before QEMU starts: a FIFO
// without a reader is tried again later (QEMU does not wait for it); any
// other failure means QEMU does not start.
bool OpenOutputFirst(Stream* stream, ErrorText* error) {
  if (stream->path == nullptr) {  // pooled: kept until the handover names it
    stream->pending = true;
    return true;
  }
  switch (TryOpenOutput(stream->what, stream->path, &stream->out_fd, error)) {
    case OutputOpen::kOpened: return true;
    case OutputOpen::kNoReaderYet:
      stream->pending = true;
      Log("waiting for a reader on %s FIFO %s (QEMU starts meanwhile)", stream->what, stream->path);
      return true;
    case OutputOpen::kFailed: return false;
  }
  return false;
}

// A pending stream tried again; true once it no longer waits.
bool RetryPendingOutput(Stream* stream) {
  if (!stream->pending) return true;
  if (stream->path == nullptr) return false;
  ErrorText error;
  switch (TryOpenOutput(stream->what, stream->path, &stream->out_fd, &error)) {
    case OutputOpen::kNoReaderYet: return false;
    case OutputOpen::kOpened: Log("%s FIFO %s has a reader", stream->what, stream->path); break;
    case OutputOpen::kFailed:
      // Replaced meanwhile (the allocation is the job's to write): its tail
      // is still kept for the exit record.
      Log("%s: %s; its output is kept only in the exit record's tail", stream->what, error.text);
      break;
  }
  stream->pending = false;
  return true;
}

// One read from a stream's pipe (non-blocking), copied to its output and tail.
Copied CopyStream(Stream* stream, size_t* bytes) {
  char buf[4096];
  const ssize_t n = ::read(stream->pipe_fd, buf, sizeof buf);
  if (n < 0) return errno == EINTR ? Copied::kSome : errno == EAGAIN ? Copied::kNoneNow : Copied::kEof;
  if (n == 0) return Copied::kEof;
  if (stream->out_fd >= 0) WriteAll(stream->out_fd, buf, static_cast<size_t>(n));
  stream->tail->Append(buf, static_cast<size_t>(n));
  *bytes += static_cast<size_t>(n);
  return Copied::kSome;
}

// Whatever QEMU wrote last is what explains its exit.
void Drain(Stream* stream) {
  size_t drained = 0;
  while (stream->open && drained < kMaxDrainBytes) {
    const Copied c = CopyStream(stream, &drained);
    if (c == Copied::kNoneNow || c == Copied::kEof) break;
  }
}

// A pooled VM handed to a task: its output paths from kHandoverFile (two
// lines). Kept in static buffers: the supervisor has no heap of its own.
void TakeHandover(int dir_fd, Stream streams[2]) {
  static char text[2 * 4096 + 2];
  if (streams[0].path != nullptr) {
    Log("%s ignored: the output already has its destination", kHandoverFile);
    return;
  }
  const int fd = ::openat(dir_fd, kHandoverFile, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  ssize_t len = fd < 0 ? -1 : ::read(fd, text, sizeof text - 1);
  if (fd >= 0) ::close(fd);
  char* second = len > 0 ? static_cast<char*>(std::memchr(text, '\n', static_cast<size_t>(len))) : nullptr;
  char* end = second != nullptr ? static_cast<char*>(std::memchr(second + 1, '\n', static_cast<size_t>(text + len - second - 1))) : nullptr;
  if (end == nullptr || second == text || end == second + 1) {
    Log("%s unreadable or malformed: the output stays in QEMU's pipes", kHandoverFile);
    return;
  }
  *second = '\0';
  *end = '\0';
  streams[0].path = text;
  streams[1].path = second + 1;
  Log("handed over: stdout to %s, stderr to %s", streams[0].path, streams[1].path);
  for (int i = 0; i < 2; ++i) RetryPendingOutput(&streams[i]);
}

// SIGTERM is forwarded to QEMU; SIGUSR1 hands a pooled VM's output over.
void HandleSignals(int signal_fd, pid_t qemu, int dir_fd, Stream streams[2]) {
  signalfd_siginfo info[8];
  ssize_t n;
  while ((n = ::read(signal_fd, info, sizeof info)) > 0) {
    for (size_t i = 0; i < static_cast<size_t>(n) / sizeof info[0]; ++i) {
      if (info[i].ssi_signo == SIGUSR1) TakeHandover(dir_fd, streams);
      if (info[i].ssi_signo != SIGTERM) continue;
      Log("SIGTERM from pid %u: forwarding to QEMU pid %d", info[i].ssi_pid, static_cast<int>(qemu));
      ::kill(qemu, SIGTERM);  // a zombie not yet reaped ignores it harmlessly
    }
  }
}

// Whether a stream waits for a FIFO reader to come (polled): a pooled VM's
// waits for its handover instead (a signal).
bool AwaitsReader(const Stream& stream) { return stream.pending && stream.path != nullptr; }

// QEMU has exited while a log FIFO still had no reader: what it wrote last
// is worth a short wait for the reader (Nomad's log collector), but never
// more than kPendingOutputGrace, and a SIGTERM ends the wait.
void AwaitPendingReaders(int signal_fd, Stream streams[2]) {
  const int64_t give_up_ms = NowUnixMs() + kPendingOutputGraceMs;
  if (!AwaitsReader(streams[0]) && !AwaitsReader(streams[1])) return;  // a pooled VM never handed over
  for (;;) {
    const bool out_done = RetryPendingOutput(&streams[0]);
    const bool err_done = RetryPendingOutput(&streams[1]);
    if (out_done && err_done) return;
    if (NowUnixMs() >= give_up_ms) {
      Log("no reader came for QEMU's output within %d ms of its exit; its tail is in the exit record",
          kPendingOutputGraceMs);
      return;
    }
    pollfd pfd = {signal_fd, POLLIN, 0};
    if (::poll(&pfd, 1, kReaderPollMs) > 0 && DrainSignals(signal_fd)) return;
  }
}

// Runs until QEMU is reaped; returns its wait status. streams[0] is stdout,
// streams[1] stderr.
int Supervise(pid_t qemu, int signal_fd, int dir_fd, Stream streams[2]) {
  size_t copied = 0;
  for (;;) {
    pollfd fds[3] = {{signal_fd, POLLIN, 0}, {-1, POLLIN, 0}, {-1, POLLIN, 0}};
    for (int i = 0; i < 2; ++i) fds[i + 1].fd = streams[i].Readable() ? streams[i].pipe_fd : -1;  // -1: ignored
    const bool waiting = AwaitsReader(streams[0]) || AwaitsReader(streams[1]);
    if (::poll(fds, 3, waiting ? kReaderPollMs : -1) < 0) {
      if (errno == EINTR) continue;
      // Cannot happen with valid fds; still, QEMU's status must be recorded.
      Log("poll: %s; waiting for QEMU without copying its output", std::strerror(errno));
      int status = 0;
      while (::waitpid(qemu, &status, 0) < 0 && errno == EINTR) {
      }
      return status;
    }
    for (int i = 0; i < 2; ++i) {
      if (streams[i].Readable() && fds[i + 1].revents != 0 && CopyStream(&streams[i], &copied) == Copied::kEof) {
        streams[i].open = false;  // QEMU closed it; it may still be running
      }
      RetryPendingOutput(&streams[i]);
    }
    if ((fds[0].revents & POLLIN) == 0) continue;
    HandleSignals(signal_fd, qemu, dir_fd, streams);
    int status = 0;
    if (::waitpid(qemu, &status, WNOHANG) == qemu) {
      AwaitPendingReaders(signal_fd, streams);
      for (int i = 0; i < 2; ++i) streams[i].pending = false;  // from here on: the reader or the tail only
      Drain(&streams[0]);
      Drain(&streams[1]);
      return status;
    }
  }
}

// Writes exit.json and returns the supervisor's exit status.
int RecordExit(int dir_fd, const ExitFacts& facts, int success_status) {
  static char record[kMaxExitRecordBytes];
  const size_t len = FormatExitRecord(facts, record);
  ErrorText error;
  if (!WriteFileAtomically(dir_fd, kExitFile, record, len, &error)) {
    Log("could not write %s: %s", kExitFile, error.text);
    return kExitRecordFailed;
  }
  return success_status;
}

int CouldNotRun(int dir_fd, int64_t started_at_ms, const ErrorText& why) {
  Log("could not run QEMU: %s", why.text);
  ExitFacts facts;
  facts.exit_code = kCouldNotRunExitCode;
  facts.started_at_ms = started_at_ms;
  facts.exited_at_ms = NowUnixMs();
  facts.error = why.text;
  return RecordExit(dir_fd, facts, kExitCouldNotRun);
}

// Nothing the plugin had open (its gRPC sockets, Nomad's pipes) may stay
// open for the VM's lifetime through us or QEMU; only the images it passed.
// Returns a passed fd that is not open, or -1.
int KeepOnlyPassedFds(int passed_fds) {
  ::close_range(static_cast<unsigned>(kFirstPassedFd + passed_fds), ~0U, 0);
  for (int fd = kFirstPassedFd; fd < kFirstPassedFd + passed_fds; ++fd) {
    if (::fcntl(fd, F_GETFD) < 0) return fd;
    ::fcntl(fd, F_SETFD, 0);  // QEMU inherits it
  }
  return -1;
}

// QEMU's setup, and our ends of its stdout and stderr (streams[0], [1]):
// the read end of its pipe and where it is copied to (--stdout, --stderr).
struct Child {
  ChildSetup setup;
  Stream streams[2];
};

// A pipe for one of QEMU's outputs: our end non-blocking, QEMU's end blocking.
bool MakeOutputPipe(const char* name, int* ours, int* qemus, ErrorText* error) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0 || ::fcntl(fds[0], F_SETFL, O_NONBLOCK) != 0) {
    error->Set("%s pipe: %s", name, std::strerror(errno));
    return false;
  }
  *ours = fds[0];
  *qemus = fds[1];
  return true;
}

// Opens what QEMU is started with. Opened here so a missing namespace or
// cgroup is reported as such, not as a failed step in the child.
bool PrepareChild(const Options& opts, Child* child, ErrorText* error) {
  ChildSetup& setup = child->setup;
  setup.argv = opts.qemu_argv;
  // The plugin passes the ids of every user it could look up (the
  // supervisor reads no user database: it is linked statically).
  if (opts.user != nullptr && opts.user_ids == nullptr) {
    error->Set("user \"%s\" does not exist (the plugin found no ids for it)", opts.user);
    return false;
  }
  if (opts.user_ids != nullptr && !ParseUserIds(opts.user, opts.user_ids, &setup.run_as, error)) return false;
  for (int i = 0; i < opts.cgroup_count; ++i) {
    setup.cgroup_fds[i] = ::open(opts.cgroups[i], O_WRONLY | O_CLOEXEC);
    if (setup.cgroup_fds[i] < 0) {
      error->Set("cgroup %s: %s", opts.cgroups[i], std::strerror(errno));
      return false;
    }
    setup.cgroup_count = i + 1;
  }
  if (opts.netns != nullptr) {
    setup.netns_fd = ::open(opts.netns, O_RDONLY | O_CLOEXEC);
    if (setup.netns_fd < 0) {
      error->Set("network namespace %s: %s", opts.netns, std::strerror(errno));
      return false;
    }
  }
  if (!OpenOutputFirst(&child->streams[0], error) || !OpenOutputFirst(&child->streams[1], error)) return false;
  return MakeOutputPipe("stdout", &child->streams[0].pipe_fd, &setup.stdout_fd, error) &&
         MakeOutputPipe("stderr", &child->streams[1].pipe_fd, &setup.stderr_fd, error);
}

// Once QEMU is started: only QEMU writes these; holding them would delay EOF
// for the log readers.
void CloseChildFds(const ChildSetup& setup, int passed_fds) {
  ::close(setup.stdout_fd);
  ::close(setup.stderr_fd);
  for (int i = 0; i < setup.cgroup_count; ++i) ::close(setup.cgroup_fds[i]);
  if (setup.netns_fd >= 0) ::close(setup.netns_fd);
  for (int fd = kFirstPassedFd; fd < kFirstPassedFd + passed_fds; ++fd) ::close(fd);
}

void WritePidFile(int dir_fd, pid_t qemu) {
  char pid_text[16];
  const int pid_len = std::snprintf(pid_text, sizeof pid_text, "%d\n", static_cast<int>(qemu));
  ErrorText error;
  if (!WriteFileAtomically(dir_fd, kPidFile, pid_text, static_cast<size_t>(pid_len), &error)) {
    // QEMU runs on; the plugin still has our pid to stop it through us.
    Log("could not write %s: %s", kPidFile, error.text);
  }
}

// Logs how QEMU ended (its wait status) and returns what exit.json records.
ExitFacts QemuExitFacts(pid_t qemu, int status, int64_t started_at_ms, const OutputTail& out_tail,
                        const OutputTail& tail) {
  ExitFacts facts;
  facts.started_at_ms = started_at_ms;
  facts.exited_at_ms = NowUnixMs();
  if (WIFEXITED(status)) {
    facts.exit_code = WEXITSTATUS(status);
    Log("QEMU pid %d exited with code %d", static_cast<int>(qemu), facts.exit_code);
  } else {
    facts.exit_code = -1;
    facts.signal = WTERMSIG(status);
    facts.core_dumped = WCOREDUMP(status);
    Log("QEMU pid %d killed by signal %d%s", static_cast<int>(qemu), facts.signal,
        facts.core_dumped ? " (core dumped)" : "");
  }
  static char tail_text[kStderrTailBytes];
  facts.stderr_tail = tail_text;
  facts.stderr_tail_len = tail.CopyOut(tail_text);
  static char stdout_text[kStdoutTailBytes];
  facts.stdout_tail = stdout_text;
  facts.stdout_tail_len = out_tail.CopyOut(stdout_text);
  return facts;
}

int Run(int argc, char** argv) {
  EnsureStandardFds();
  const int passed_fds = PassedFdCount(argc, argv);
  if (const int missing = KeepOnlyPassedFds(passed_fds); missing >= 0) {
    return UsageError("%s %d: fd %d is not open", kArgPassFds, passed_fds, missing);
  }

  Options opts;
  ErrorText error;
  if (!ParseArgs(argc, argv, &opts, &error)) return UsageError("%s", error.text);
  const int dir_fd = ::open(opts.state_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0) return UsageError("state directory %s: %s", opts.state_dir, std::strerror(errno));

  const int signal_fd = DetachAndTakeSignals();
  char command[1024];
  DescribeCommand(opts.qemu_argv, command, sizeof command);
  Log("starting in %s%s%s%s: %s", opts.state_dir, opts.pooled ? " (pooled)" : "", opts.user != nullptr ? " as user " : "",
      opts.user != nullptr ? opts.user : "", command);
  RemoveStaleFiles(dir_fd);
  int64_t started_at_ms = NowUnixMs();
  if (signal_fd < 0) {
    error.Set("signalfd: %s", std::strerror(errno));
    return CouldNotRun(dir_fd, started_at_ms, error);
  }
  static OutputTail out_tail, err_tail;
  Child child;
  child.streams[0].what = "stdout";
  child.streams[0].path = opts.stdout_path;
  child.streams[0].tail = &out_tail;
  child.streams[1].what = "stderr";
  child.streams[1].path = opts.stderr_path;
  child.streams[1].tail = &err_tail;
  if (!PrepareChild(opts, &child, &error)) return CouldNotRun(dir_fd, started_at_ms, error);

  // Before QEMU, whose TPM backend connects to swtpm's socket at start-up.
  const pid_t swtpm = opts.swtpm.path == nullptr
                          ? 0
                          : StartSwtpm(opts.swtpm, child.setup, passed_fds, signal_fd, &error);
  if (swtpm < 0) return CouldNotRun(dir_fd, started_at_ms, error);

  started_at_ms = NowUnixMs();
  const pid_t qemu = StartChild(child.setup, &error);
  CloseChildFds(child.setup, passed_fds);
  if (qemu < 0) {
    StopSwtpm(swtpm, signal_fd);
    return CouldNotRun(dir_fd, started_at_ms, error);
  }
  WritePidFile(dir_fd, qemu);
  Log("QEMU running as pid %d", static_cast<int>(qemu));

  const int status = Supervise(qemu, signal_fd, dir_fd, child.streams);
  const ExitFacts facts = QemuExitFacts(qemu, status, started_at_ms, out_tail, err_tail);
  // Gone before exit.json appears: a plugin that sees the record may remove
  // the TPM's state directory.
  StopSwtpm(swtpm, signal_fd);
  return RecordExit(dir_fd, facts, kExitOk);
}

}  // namespace
}  // namespace ndq::supervisor

int main(int argc, char** argv) { return ndq::supervisor::Run(argc, argv); }
