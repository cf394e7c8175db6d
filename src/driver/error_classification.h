// The one table that turns the driver's errors into what Nomad sees: the gRPC
// code, and for StartTask whether Nomad may retry (RecoverableError).
#pragma once

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "base/error_kind.h"

namespace ndq {

struct ErrorClass {
  ErrorKind kind;
  // Whether the same request may succeed later without a change to the job.
  bool retryable;
};

// The table's row for `kind`.
ErrorClass Classify(ErrorKind kind);
// Whether Nomad may retry a start that failed with `status`.
bool Retryable(const absl::Status& status);

// An error of any call but StartTask: the status's own code and message.
grpc::Status ToGrpc(const absl::Status& status);
// A failed StartTask the way Nomad reads it: FAILED_PRECONDITION with a
// RecoverableError detail that carries Retryable(status).
grpc::Status StartFailure(const absl::Status& status);

}  // namespace ndq
