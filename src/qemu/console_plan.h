// The console you can see (task config `console`) and the boot watch
// (`boot_timeout`, `boot_ready_port`): planned from the job's config and the
// task's directory, checked with every problem named by its field.
#pragma once

#include <string>
#include <vector>

#include "absl/time/time.h"

namespace ndq {

struct VmSpec;
struct TaskConfig;
struct TaskRequest;

// console = true: QEMU's VNC server and the guest's second serial port
// (ttyS1, an interactive console) on unix sockets in `dir`, a directory of
// the task dir that the driver makes for QEMU's user. Never TCP. The first
// serial port (ttyS0) stays QEMU's stdout, the task log.
struct ConsolePlan {
  bool enabled = false;
  std::string dir;            // <task dir>/console
  std::string serial_socket;  // <dir>/serial.sock: the guest's ttyS1
  std::string vnc_socket;     // <dir>/vnc.sock: VNC (RFB), no password: the socket's mode guards it
};

// boot_timeout: the guest must answer within `timeout`: its guest agent
// (guest-ping) when `guest_agent`, or TCP on the port_map label `port_label`
// (a connection the guest itself accepts). Zero timeout: no watch.
struct BootWatchPlan {
  absl::Duration timeout = absl::ZeroDuration();
  bool guest_agent = false;
  std::string port_label;  // empty: none
  std::string host_ip;     // where QEMU forwards the port from; empty: every address (127.0.0.1 is used)
  int host_port = 0;
  int guest_port = 0;
};

// The bounds of boot_timeout.
inline constexpr absl::Duration kMinBootTimeout = absl::Seconds(1);
inline constexpr absl::Duration kMaxBootTimeout = absl::Hours(24);

// The longest unix socket path (sun_path holds 108 bytes with its NUL).
inline constexpr size_t kMaxUnixSocketPath = 107;

// Fills spec.console and spec.boot_watch; spec.port_forwards and
// spec.guest_agent must already be planned.
void PlanConsole(const TaskConfig& config, const TaskRequest& task, VmSpec& spec, std::vector<std::string>& problems);

}  // namespace ndq
