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

TEST(ErrorKind, ATagSurvivesCopiesAndWinsOverTheCode) {
  const absl::Status tagged = WithKind(absl::FailedPreconditionError("cannot start"), ErrorKind::kGone);
  const absl::Status copy = tagged;
  EXPECT_EQ(KindOf(copy), ErrorKind::kGone);
  EXPECT_EQ(copy.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(copy.message(), "cannot start");
}

TEST(ErrorKind, WithoutATagTheCodeDecides) {
  EXPECT_EQ(KindOf(absl::InvalidArgumentError("x")), ErrorKind::kBadConfig);
  EXPECT_EQ(KindOf(absl::PermissionDeniedError("x")), ErrorKind::kRefused);
  EXPECT_EQ(KindOf(absl::AlreadyExistsError("x")), ErrorKind::kConflict);
  EXPECT_EQ(KindOf(absl::NotFoundError("x")), ErrorKind::kGone);
  EXPECT_EQ(KindOf(absl::ResourceExhaustedError("x")), ErrorKind::kHostResource);
  EXPECT_EQ(KindOf(absl::DeadlineExceededError("x")), ErrorKind::kTransient);
  EXPECT_EQ(KindOf(absl::CancelledError("x")), ErrorKind::kCancelled);
  EXPECT_EQ(KindOf(absl::InternalError("x")), ErrorKind::kInternal);
}

TEST(ErrorKind, TaggingAnOkStatusLeavesItOk) { EXPECT_TRUE(WithKind(absl::OkStatus(), ErrorKind::kGone).ok()); }

TEST(ErrorKind, ErrnoSaysWhetherTheHostRanShort) {
  for (int err : {ENOSPC, EDQUOT, EMFILE, ENFILE, ENOMEM, EAGAIN}) {
    const absl::Status status = ErrnoError("cannot write", err);
    EXPECT_EQ(KindOf(status), ErrorKind::kHostResource) << err;
    EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted) << err;
    EXPECT_TRUE(Retryable(status)) << err;
  }
  EXPECT_EQ(ErrnoError("cannot open /x", ENOENT).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ErrnoError("cannot open /x", EACCES).code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(ErrnoError("cannot open /x", ENOENT).message(), "cannot open /x: No such file or directory");
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
