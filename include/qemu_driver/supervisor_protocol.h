// The contract between the plugin and nomad-qemu-supervisor, the small process
// that runs one VM and outlives plugin restarts: its command line, the files it
// keeps in the task's state directory, and the format of its exit record.
//
// The supervisor includes this header for the names only; the functions are
// defined in src/supervisor_protocol.cc (plugin side) so the supervisor binary
// never links a JSON library.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ndq::supervisor {

// Files in the state directory. Each is written to "<name>.tmp", fsynced and
// renamed, so a reader sees either no file or a complete one.
inline constexpr char kPidFile[] = "qemu.pid";          // QEMU's pid, decimal + "\n"
inline constexpr char kExitFile[] = "exit.json";        // written once, when QEMU is gone
inline constexpr char kLogFile[] = "supervisor.log";    // the supervisor's stdout/stderr
inline constexpr char kTempSuffix[] = ".tmp";
// The one directory of a VM's state that QEMU's user may write: its sockets.
inline constexpr char kRunDir[] = "run";
inline constexpr char kQmpSocket[] = "qmp.sock";         // in kRunDir
inline constexpr char kGuestAgentSocket[] = "qga.sock";  // in kRunDir, with guest_agent

// Command line:
//   nomad-qemu-supervisor --state-dir DIR (--stdout PATH --stderr PATH | --pooled) [--user NAME]
//                         [--cgroup PROCS_FILE]... [--netns PATH] [--pass-fds N]
//                         [--swtpm PATH --swtpm-state DIR --swtpm-socket PATH] -- QEMU ARGS...
// --pass-fds N: fds 3 .. 3+N-1, open when the supervisor starts, reach QEMU
// as they are (the disk images the plugin admitted and opened); every other
// inherited fd is closed.
// QEMU's child joins each --cgroup (a cgroup.procs file) and the network
// namespace --netns (e.g. /var/run/netns/NAME) before exec, and before it
// drops privileges for --user.
// --swtpm, --swtpm-state, --swtpm-socket (all three or none): before QEMU, the
// supervisor starts `PATH socket --tpm2` with its state in DIR and its control
// socket at --swtpm-socket (the socket QEMU's tpm emulator connects to), placed
// like QEMU (cgroups, netns, --user; DIR must be writable by that user). QEMU
// starts only once that socket exists; swtpm is stopped before exit.json is
// written. swtpm's option syntax splits on commas, so neither path may hold one.
inline constexpr char kArgStateDir[] = "--state-dir";
inline constexpr char kArgStdout[] = "--stdout";
inline constexpr char kArgStderr[] = "--stderr";
inline constexpr char kArgUser[] = "--user";
// --user-ids UID:GID[:G1,G2,...] (with --user): the user's ids and
// supplementary groups as the plugin looked them up, so the supervisor needs
// no user database of its own (it is linked statically: its start is on
// every StartTask's path). --user without it: the user is unknown, and QEMU
// does not run (exit.json says so).
inline constexpr char kArgUserIds[] = "--user-ids";
inline constexpr int kMaxUserGroups = 64;
inline constexpr char kArgCgroup[] = "--cgroup";
inline constexpr char kArgNetns[] = "--netns";
inline constexpr char kArgPassFds[] = "--pass-fds";
inline constexpr char kArgSwtpm[] = "--swtpm";
inline constexpr char kArgSwtpmState[] = "--swtpm-state";
inline constexpr char kArgSwtpmSocket[] = "--swtpm-socket";
// --pooled (in place of --stdout and --stderr): a warm pool's QEMU, started
// before any task wants it. Its output waits in its pipes until the plugin
// hands it to a task: it writes kHandoverFile in the state directory (the
// task's stdout path, a newline, its stderr path, a newline) and sends the
// supervisor SIGUSR1; from then on the output goes there as for any VM.
inline constexpr char kArgPooled[] = "--pooled";
inline constexpr char kHandoverFile[] = "handover";
inline constexpr int kHandoverSignal = 10;  // SIGUSR1 on Linux (checked in the supervisor)
inline constexpr int kFirstPassedFd = 3;
inline constexpr int kMaxPassedFds = 32;
inline constexpr int kMaxCgroups = 8;  // one per v1 controller is five
inline constexpr char kArgEndOfOptions[] = "--";

// The supervisor's own exit status.
inline constexpr int kExitOk = 0;              // QEMU ran; exit.json has its status
inline constexpr int kExitCouldNotRun = 1;     // exit.json written with `error` set
inline constexpr int kExitUsage = 2;           // bad command line; no exit.json
inline constexpr int kExitRecordFailed = 3;    // exit.json could not be written (see supervisor.log)

// exit_code recorded when QEMU never ran (`error` is then non-empty).
inline constexpr int kCouldNotRunExitCode = 127;
// How much of QEMU's stderr the exit record keeps (the last bytes).
inline constexpr size_t kStderrTailBytes = 4096;
// How much of QEMU's stdout (the guest's serial console, ttyS0) it keeps.
inline constexpr size_t kStdoutTailBytes = 4096;

// exit.json, one JSON object:
//   {"exit_code":7,"signal":0,"core_dumped":false,"started_at":1700000000000,
//    "exited_at":1700000000123,"stderr_tail":"...","stdout_tail":"...","error":""}
//   (stdout_tail is absent in records of supervisors before issue 11)
struct ExitRecord {
  int exit_code = -1;         // -1 when killed by a signal
  int signal = 0;             // 0 when QEMU exited by itself
  bool core_dumped = false;
  int64_t started_at_ms = 0;  // unix time in milliseconds
  int64_t exited_at_ms = 0;
  std::string stderr_tail;    // valid UTF-8 (invalid bytes became U+FFFD)
  std::string stdout_tail;    // the same for stdout: the last of the serial console
  std::string error;          // non-empty: QEMU never ran, and why
};

// Parses the contents of exit.json. Unknown fields are ignored so an older
// plugin can read a newer supervisor's record. On failure returns nullopt and
// sets *error.
std::optional<ExitRecord> ParseExitRecord(std::string_view json, std::string* error);

// Reads DIR/exit.json. nullopt with *error empty: there is no record (yet);
// nullopt with *error set: it exists but cannot be read or parsed.
std::optional<ExitRecord> ReadExitRecord(const std::string& state_dir, std::string* error);

// Reads DIR/qemu.pid, with the same nullopt/*error convention as ReadExitRecord.
std::optional<pid_t> ReadQemuPid(const std::string& state_dir, std::string* error);

// Where QEMU is placed before it runs.
struct Placement {
  std::vector<std::string> cgroup_procs;  // at most kMaxCgroups
  std::string netns;                      // empty: the supervisor's own
  int passed_fds = 0;                     // fds kFirstPassedFd.. handed to QEMU
  // A TPM for the VM: the swtpm binary, its state directory and its control
  // socket. All empty: no TPM. "= {}" keeps brace-initialized Placements that
  // stop at passed_fds free of missing-initializer warnings.
  std::string swtpm_path = {}, swtpm_state_dir = {}, swtpm_socket = {};
  // A warm pool's QEMU (--pooled): the output paths come at handover, so
  // SupervisorArgv leaves out --stdout and --stderr.
  bool pooled = false;
};

// The supervisor's argv (argv[0] = supervisor_path). An empty `user` runs QEMU
// as the supervisor's own user; a user this process can look up also gets
// --user-ids (UserIds).
// "UID:GID:G1,G2,..." for --user-ids (its groups as getgrouplist gives them,
// the primary one included); nullopt when `user` is unknown or has more than
// kMaxUserGroups groups (the supervisor then looks it up and reports it).
std::optional<std::string> UserIds(const std::string& user);

std::vector<std::string> SupervisorArgv(const std::string& supervisor_path, const std::string& state_dir,
                                        const std::string& stdout_path, const std::string& stderr_path,
                                        const std::string& user, const std::vector<std::string>& qemu_argv,
                                        const Placement& placement = {});

}  // namespace ndq::supervisor
