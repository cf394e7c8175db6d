// The driver's one table of errors: kinds from errno and status codes, and
// what Nomad is told (retry or not) for each.
#include "driver/error_classification.h"

#include <cerrno>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "base/error_kind.h"
#include "google_rpc/status.pb.h"
#include "nomad/structs.pb.h"

namespace ndq {
namespace {

using ::testing::HasSubstr;

TEST(ErrorClassification, AHostShortOfResourcesMayRetryAMissingFileMayNot) {
  for (int err : {ENOSPC, EDQUOT, EMFILE, ENFILE, ENOMEM, EAGAIN}) EXPECT_TRUE(Retryable(ErrnoError("x", err))) << err;
  EXPECT_FALSE(Retryable(ErrnoError("cannot open /x", ENOENT)));
  EXPECT_FALSE(Retryable(ErrnoError("cannot open /x", EACCES)));
}

TEST(ErrorClassification, ConfigAndRefusalsAreFinalHostAndNetworkTroubleIsNot) {
  EXPECT_FALSE(Classify(ErrorKind::kBadConfig).retryable);
  EXPECT_FALSE(Classify(ErrorKind::kRefused).retryable);
  EXPECT_FALSE(Classify(ErrorKind::kConflict).retryable);
  EXPECT_FALSE(Classify(ErrorKind::kGone).retryable);
  EXPECT_TRUE(Classify(ErrorKind::kHostResource).retryable);
  EXPECT_TRUE(Classify(ErrorKind::kTransient).retryable);
  EXPECT_TRUE(Classify(ErrorKind::kQemuFailed).retryable);
  EXPECT_TRUE(Classify(ErrorKind::kCancelled).retryable);
  EXPECT_TRUE(Classify(ErrorKind::kInternal).retryable);
}

// Nomad reads a failed StartTask as FAILED_PRECONDITION with a
// RecoverableError detail; the verdict comes from the table.
TEST(ErrorClassification, StartFailureCarriesTheTablesVerdict) {
  for (const auto& [status, recoverable] :
       std::vector<std::pair<absl::Status, bool>>{{ErrnoError("qemu-img: disk", ENOSPC), true},
                                                  {absl::InvalidArgumentError("task config \"memory\""), false}}) {
    const grpc::Status grpc_status = StartFailure(status);
    EXPECT_EQ(grpc_status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_EQ(grpc_status.error_message(), status.message());
    google::rpc::Status rich;
    ASSERT_TRUE(rich.ParseFromString(grpc_status.error_details()));
    ASSERT_EQ(rich.details_size(), 1);
    hashicorp::nomad::plugins::shared::structs::RecoverableError detail;
    ASSERT_TRUE(rich.details(0).UnpackTo(&detail));
    EXPECT_EQ(detail.recoverable(), recoverable) << status;
  }
}

TEST(ErrorClassification, OtherCallsKeepTheStatusCode) {
  const grpc::Status status = ToGrpc(absl::NotFoundError("task x is not known to this driver"));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(status.error_message(), HasSubstr("not known"));
  EXPECT_TRUE(ToGrpc(absl::OkStatus()).ok());
}

}  // namespace
}  // namespace ndq
