// The bootable test VM images (tests/fixtures/build-test-guest.sh), built once
// and cached; and small helpers for tests that run them.
#pragma once

#include <filesystem>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "files.h"
#include "host/run_command.h"
#include "base/small_file.h"

namespace ndq::testing {

// Boot to GUEST-READY takes ~4 s under TCG, far more on a loaded 2-core machine.
inline constexpr absl::Duration kGuestBootTimeout = absl::Seconds(120);

// Runs the fixture builder once per test binary (a no-op when its cache is
// current) and returns the directory holding guest.qcow2 and its variants.
inline absl::StatusOr<std::string> TestGuestDir() {
  static const absl::StatusOr<std::string> dir = []() -> absl::StatusOr<std::string> {
    std::string out;
    if (const char* env = std::getenv("TEST_GUEST_DIR"); env != nullptr && *env != '\0') {
      out = env;
    } else {
      const char* home = std::getenv("HOME");
      out = absl::StrCat(home != nullptr && *home != '\0' ? home : "/tmp", "/.cache/nomad-driver-qemu/test-guest");
    }
    const std::string script = absl::StrCat(NDQ_SOURCE_DIR, "/tests/fixtures/build-test-guest.sh");
    absl::StatusOr<CommandResult> built = RunCommand({"/bin/bash", script, out}, absl::Minutes(15));
    if (!built.ok()) return built.status();
    if (built->exit_code != 0) {
      return absl::InternalError(absl::StrCat(script, " failed (exit ", built->exit_code, "):\n", built->output));
    }
    if (!std::filesystem::exists(out + "/guest.qcow2")) {
      return absl::InternalError(absl::StrCat(script, " left no guest.qcow2 in ", out, ":\n", built->output));
    }
    return out;
  }();
  return dir;
}

// Waits until `path` contains `needle`; false at the deadline.
inline bool WaitForFileToContain(const std::string& path, const std::string& needle, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (ReadFile(path).find(needle) != std::string::npos) return true;
    absl::SleepFor(absl::Milliseconds(50));
  }
  return false;
}

}  // namespace ndq::testing
