// The host side of the console you can see (task config `console`), and
// screenshots of a VM's display.
#pragma once

#include <sys/types.h>

#include <csignal>

#include <optional>
#include <string>

#include "base/timeouts.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "base/rollback.h"
#include "qemu/console_plan.h"
#include "vm/vm_task.h"

namespace ndq {

// Makes <task dir>/console for QEMU's user (uid/gid; nullopt: the plugin's
// own), not following links, and clears sockets a previous run left there.
// The undo removes the sockets and the directory.
absl::Status MakeConsoleDir(const ConsolePlan& console, std::optional<std::pair<uid_t, gid_t>> owner,
                            Rollback& rollback);

// Removes the console's sockets and its directory (once the VM is gone).
// Does nothing for an empty `dir`.
void RemoveConsoleDir(const std::string& dir);

// The signal that asks for a screenshot (SignalTask); it is not forwarded
// to QEMU.
inline constexpr int kScreenshotSignal = SIGUSR2;
inline constexpr absl::Duration kScreenshotTimeout = timeouts::kScreenshot;
// A PNG larger than this is refused (QEMU's 4K screen is ≈2 MiB).
inline constexpr size_t kMaxScreenshotBytes = 64u << 20;

// Takes a PNG of the VM's display (QMP screendump): QEMU writes it into the
// VM's run/ dir (its own), the plugin copies it, opened without following
// links and checked to be a regular file starting with the PNG signature,
// into the alloc's log dir (alloc/logs, each component opened with
// O_NOFOLLOW; the file created with O_EXCL) as
// "<task>.screenshot.<UTC time>.png". Returns the file's path.
absl::StatusOr<std::string> TakeScreenshot(VmTask& vm);

// The last `max_lines` lines of `text` (a serial console tail), with
// terminal escape sequences, \r and other control bytes removed.
std::string LastLines(const std::string& text, size_t max_lines);

}  // namespace ndq
