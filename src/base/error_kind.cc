#include "base/error_kind.h"

#include <cerrno>
#include <cstring>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"

namespace ndq {
namespace {

// The payloads' type URLs; their values are the kind's and the stage's names.
constexpr char kKindPayload[] = "type.nomad-driver-qemu/error-kind";
constexpr char kStagePayload[] = "type.nomad-driver-qemu/start-stage";

constexpr ErrorKind kAllKinds[] = {ErrorKind::kBadConfig,    ErrorKind::kRefused,   ErrorKind::kConflict,
                                   ErrorKind::kGone,         ErrorKind::kHostResource, ErrorKind::kTransient,
                                   ErrorKind::kQemuFailed,   ErrorKind::kCancelled, ErrorKind::kInternal};

ErrorKind KindOfCode(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange: return ErrorKind::kBadConfig;
    case absl::StatusCode::kPermissionDenied: return ErrorKind::kRefused;
    case absl::StatusCode::kAlreadyExists: return ErrorKind::kConflict;
    case absl::StatusCode::kNotFound: return ErrorKind::kGone;
    case absl::StatusCode::kResourceExhausted: return ErrorKind::kHostResource;
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kFailedPrecondition: return ErrorKind::kTransient;
    case absl::StatusCode::kCancelled: return ErrorKind::kCancelled;
    default: return ErrorKind::kInternal;
  }
}

absl::StatusCode CodeOfErrno(int err) {
  switch (KindOfErrno(err)) {
    case ErrorKind::kHostResource: return absl::StatusCode::kResourceExhausted;
    case ErrorKind::kGone: return absl::StatusCode::kNotFound;
    case ErrorKind::kRefused: return absl::StatusCode::kPermissionDenied;
    case ErrorKind::kConflict: return absl::StatusCode::kAlreadyExists;
    default: return absl::StatusCode::kInternal;
  }
}

}  // namespace

const char* ErrorKindName(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kBadConfig: return "bad_config";
    case ErrorKind::kRefused: return "refused";
    case ErrorKind::kConflict: return "conflict";
    case ErrorKind::kGone: return "gone";
    case ErrorKind::kHostResource: return "host_resource";
    case ErrorKind::kTransient: return "transient";
    case ErrorKind::kQemuFailed: return "qemu_failed";
    case ErrorKind::kCancelled: return "cancelled";
    case ErrorKind::kInternal: return "internal";
  }
  return "internal";
}

absl::Status WithKind(absl::Status status, ErrorKind kind) {
  if (!status.ok()) status.SetPayload(kKindPayload, absl::Cord(ErrorKindName(kind)));
  return status;
}

ErrorKind KindOf(const absl::Status& status) {
  if (auto tag = status.GetPayload(kKindPayload)) {
    for (ErrorKind kind : kAllKinds) {
      if (*tag == ErrorKindName(kind)) return kind;
    }
  }
  return KindOfCode(status.code());
}

ErrorKind KindOfErrno(int err) {
  switch (err) {
    case ENOSPC:
    case EDQUOT:
    case EMFILE:
    case ENFILE:
    case ENOMEM:
    case EAGAIN:
    case EMLINK:
    case EROFS:
    case EIO: return ErrorKind::kHostResource;
    case ENOENT:
    case ENOTDIR: return ErrorKind::kGone;
    case EACCES:
    case EPERM:
    case ELOOP:
    case ENOEXEC: return ErrorKind::kRefused;
    case EEXIST: return ErrorKind::kConflict;
    case EINTR:
    case ETIMEDOUT:
    case EBUSY: return ErrorKind::kTransient;
    default: return ErrorKind::kInternal;
  }
}

absl::Status ErrnoError(const std::string& what, int err) {
  return WithKind(absl::Status(CodeOfErrno(err), absl::StrCat(what, ": ", std::strerror(err))), KindOfErrno(err));
}

absl::Status ConfigError(absl::string_view message) {
  return WithKind(absl::FailedPreconditionError(message), ErrorKind::kBadConfig);
}

absl::Status RefusedError(absl::string_view message) {
  return WithKind(absl::FailedPreconditionError(message), ErrorKind::kRefused);
}

absl::Status WithStage(absl::Status status, absl::string_view stage) {
  if (!status.ok() && !status.GetPayload(kStagePayload)) status.SetPayload(kStagePayload, absl::Cord(stage));
  return status;
}

std::string StageOf(const absl::Status& status) {
  auto stage = status.GetPayload(kStagePayload);
  return stage.has_value() ? std::string(*stage) : std::string();
}

}  // namespace ndq
