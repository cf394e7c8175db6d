// Error kinds carried on statuses: tags, the codes' defaults, errno.
#include "base/error_kind.h"

#include <cerrno>

#include <gtest/gtest.h>

namespace ndq {
namespace {

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
  }
  EXPECT_EQ(ErrnoError("cannot open /x", ENOENT).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ErrnoError("cannot open /x", EACCES).code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(ErrnoError("cannot open /x", ENOENT).message(), "cannot open /x: No such file or directory");
}

TEST(ErrorKind, ConfigAndRefusedErrorsCarryTheirKindNotTheCodesDefault) {
  // FailedPrecondition alone means a transient kind (a peer not ready yet):
  // these say at their source that a retry cannot help.
  const absl::Status config = ConfigError("state_dir is too long");
  EXPECT_EQ(config.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(KindOf(config), ErrorKind::kBadConfig);
  EXPECT_EQ(config.message(), "state_dir is too long");
  EXPECT_EQ(KindOf(RefusedError("x is not a directory the driver made")), ErrorKind::kRefused);
  EXPECT_EQ(KindOf(absl::FailedPreconditionError("QMP is not up yet")), ErrorKind::kTransient);
}

TEST(ErrorKind, TheFirstStageTagStaysAndTheKindIsKept) {
  const absl::Status tagged = WithStage(WithStage(ConfigError("bad"), "plan_vm"), "launch");
  EXPECT_EQ(StageOf(tagged), "plan_vm");
  EXPECT_EQ(KindOf(tagged), ErrorKind::kBadConfig);
  EXPECT_EQ(StageOf(absl::InternalError("x")), "");
  EXPECT_TRUE(WithStage(absl::OkStatus(), "launch").ok());
}

}  // namespace
}  // namespace ndq
