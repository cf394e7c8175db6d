// What went wrong, in the driver's own terms, carried on an absl::Status so
// every layer can say it where the error arises. Whether Nomad may retry a
// kind, and which gRPC code it becomes, is decided in one table in the driver
// layer (driver/error_classification.h), nowhere else.
#pragma once

#include <cerrno>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace ndq {

enum class ErrorKind {
  kBadConfig,     // the job's or operator's config is wrong: same result on retry
  kRefused,       // a file, URL or user the job may not use
  kConflict,      // the task is already started, or its state is
  kGone,          // the task, its state or a binary is not there
  kHostResource,  // the host ran short (disk full, no fds, no memory): may pass
  kTransient,     // a network, timing or peer problem: may pass
  kQemuFailed,    // QEMU itself refused to start the VM
  kCancelled,     // the caller gave up or the plugin is shutting down
  kInternal,      // a bug or an unexpected system error
};

const char* ErrorKindName(ErrorKind kind);

// `status` (not OK) tagged with `kind`; its code and message are kept.
absl::Status WithKind(absl::Status status, ErrorKind kind);

// The kind a status was tagged with; without a tag, the kind its code
// implies (InvalidArgument is kBadConfig, and so on).
ErrorKind KindOf(const absl::Status& status);

// The kind of a failed system call: ENOSPC, EMFILE, ENOMEM, EAGAIN, ... are
// the host running short; ENOENT is kGone; EACCES/EPERM are kRefused.
ErrorKind KindOfErrno(int err);

// A status for a failed system call: "<what>: <strerror>", with its code and
// kind following errno.
absl::Status ErrnoError(const std::string& what, int err);
// The same for the call that just failed (errno as it is now).
inline absl::Status ErrnoNow(const std::string& what) { return ErrnoError(what, errno); }

// Errors whose kind is known where they arise, so no code has to imply it:
// the job's or the operator's configuration cannot work here (kBadConfig),
// or the driver refuses what it found in a place it owns (kRefused). Both
// are FailedPrecondition, and neither is retried by Nomad.
absl::Status ConfigError(absl::string_view message);
absl::Status RefusedError(absl::string_view message);

// The start stage an error arose in ("plan VM", "await QMP", ...), carried beside
// its kind; empty when no stage tagged it. The first tag stays.
absl::Status WithStage(absl::Status status, absl::string_view stage);
std::string StageOf(const absl::Status& status);

}  // namespace ndq
