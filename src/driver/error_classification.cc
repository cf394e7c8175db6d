#include "driver/error_classification.h"

#include "google_rpc/status.pb.h"
#include "nomad/structs.pb.h"

namespace ndq {
namespace {

// Bad configuration, refused files and a task that exists or is gone stay
// so on retry; a host short of resources, the network, timing, QEMU's own
// start and our bugs may not.
constexpr ErrorClass kTable[] = {
    {ErrorKind::kBadConfig, false},   {ErrorKind::kRefused, false},    {ErrorKind::kConflict, false},
    {ErrorKind::kGone, false},        {ErrorKind::kHostResource, true}, {ErrorKind::kTransient, true},
    {ErrorKind::kQemuFailed, true},   {ErrorKind::kCancelled, true},   {ErrorKind::kInternal, true},
};

}  // namespace

ErrorClass Classify(ErrorKind kind) {
  for (const ErrorClass& row : kTable) {
    if (row.kind == kind) return row;
  }
  return {kind, true};
}

bool Retryable(const absl::Status& status) { return Classify(KindOf(status)).retryable; }

grpc::Status ToGrpc(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

grpc::Status StartFailure(const absl::Status& status) {
  hashicorp::nomad::plugins::shared::structs::RecoverableError detail;
  detail.set_recoverable(Retryable(status));
  google::rpc::Status rich;
  rich.set_code(static_cast<int>(grpc::StatusCode::FAILED_PRECONDITION));
  rich.set_message(std::string(status.message()));
  rich.add_details()->PackFrom(detail);
  return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, std::string(status.message()), rich.SerializeAsString());
}

}  // namespace ndq
