// Formats exit.json (see include/qemu_driver/supervisor_protocol.h) into a
// caller's fixed buffer, with strings escaped so any bytes yield valid JSON.
#pragma once

#include <cstddef>
#include <cstdint>

#include "error_text.h"
#include "qemu_driver/supervisor_protocol.h"

namespace ndq::supervisor {

struct ExitFacts {
  int exit_code = -1;
  int signal = 0;
  bool core_dumped = false;
  int64_t started_at_ms = 0;
  int64_t exited_at_ms = 0;
  const char* stderr_tail = "";
  size_t stderr_tail_len = 0;  // at most kStderrTailBytes
  const char* stdout_tail = "";  // QEMU's stdout: the guest's serial console (ttyS0)
  size_t stdout_tail_len = 0;    // at most kStdoutTailBytes
  const char* error = "";      // NUL-terminated, at most kMaxErrorBytes
};

// Every input byte escapes to at most 6 output bytes ("\u00XX", "\ufffd").
inline constexpr size_t kMaxExitRecordBytes = 6 * (kStderrTailBytes + kStdoutTailBytes + kMaxErrorBytes) + 256;

// Writes the record into out[kMaxExitRecordBytes]; returns its length.
size_t FormatExitRecord(const ExitFacts& facts, char* out);

}  // namespace ndq::supervisor
