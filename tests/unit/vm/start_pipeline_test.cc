// The start pipeline with a fake host: every stage is made to fail in turn,
// and whatever the stages before it made (image lease, overlay, state dir,
// cgroup, supervisor process) must be gone when StartTask returns.
#include "vm/start_pipeline.h"

#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_join.h"
#include "../../fakes/fake_vm_host.h"
#include "../../support/plugin_harness.h"
#include "../../support/temp_dir.h"
#include "base/error_kind.h"
#include "driver/error_classification.h"
#include "driver/task_proto.h"
#include "host/fingerprint.h"
#include "vm/event_bus.h"
#include "vm/task_manager.h"

namespace ndq {
namespace {

namespace fs = std::filesystem;
using ::ndq::testing::FakeAlloc;
using ::ndq::testing::FakeVmHost;
using ::ndq::testing::TempDir;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

class StartPipelineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    image_ = images_ / "base.img";
    auto made = RunCommand({"/usr/bin/qemu-img", "create", "-q", "-f", "raw", image_, "1M"}, absl::Seconds(30));
    ASSERT_TRUE(made.ok() && made->exit_code == 0);
    plugin_.state_dir = state_.path();
    plugin_.image_cache_dir = cache_.path();
    plugin_.image_paths = {images_.path()};
    plugin_.allow_unverified_images = true;
    plugin_.cgroup_parent = "ndq-unit";
  }

  std::unique_ptr<TaskManager> Manager(std::function<absl::Status(StartStage)> before_stage = {}) {
    TaskManagerOptions options;
    options.supervisor_path = "/nonexistent/nomad-qemu-supervisor";  // the fake host runs sleep instead
    options.start_timeout = absl::Milliseconds(300);
    options.host = &host_;
    options.before_stage = std::move(before_stage);
    return std::make_unique<TaskManager>(options, [this] { return plugin_; }, &fingerprinter_, &events_);
  }

  // A task booting image_ through image_source, with a blank disk, a
  // cloud-init seed, UEFI, a TPM and the console, so every stage makes something.
  TaskRequest Task() const {
    if (!task_) {
      task_ = TaskRequestFromProto(alloc_.Task({{"image_source", image_},
                                                {"accelerator", "tcg"},
                                                {"disk", {{{"size", "1M"}}}},
                                                {"cloud_init", {{"user_data", "#cloud-config\n"}}},
                                                {"firmware", "uefi"},
                                                {"tpm", true},
                                                {"console", true}}));
    }
    return *task_;
  }

  // Everything a start may make, still there.
  std::vector<std::string> Leftovers() const {
    std::vector<std::string> found;
    for (const std::string& dir : host_.live_cgroups()) found.push_back("cgroup " + dir);
    for (pid_t pid : host_.live_supervisors()) found.push_back("supervisor " + std::to_string(pid));
    std::error_code ignored;
    for (const auto& entry : fs::directory_iterator(state_.path(), ignored)) found.push_back(entry.path());
    for (const auto& entry : fs::directory_iterator(cache_.path(), ignored)) {
      const std::string name = entry.path().filename();
      if (name.rfind(".lease-", 0) == 0 || name.find(".part") != std::string::npos) found.push_back(name);
    }
    for (const char* name : {"image-overlay.qcow2", "disk1.raw", "cidata.iso", "uefi-vars.fd", "tpm", "console"}) {
      if (fs::exists(alloc_.task_dir() + "/" + name)) found.push_back(name);
    }
    return found;
  }

  TempDir state_, cache_, images_;
  std::string image_;
  PluginConfig plugin_;
  FakeAlloc alloc_{"pipeline"};
  FakeVmHost host_;
  Fingerprinter fingerprinter_{std::getenv("PATH") != nullptr ? std::getenv("PATH") : "/usr/bin", "/dev/kvm"};
  EventBus events_;
  mutable std::optional<TaskRequest> task_;  // one task ID per test
};

// The error a failing stage returns reaches the caller as it is, with the
// retry verdict of its kind; nothing any earlier stage made survives.
TEST_F(StartPipelineTest, EachStageFailingInTurnLeavesNothingBehind) {
  const std::map<StartStage, absl::Status> failures = {
      {StartStage::kDecode, absl::InvalidArgumentError("injected: bad config")},
      {StartStage::kAdmitImage, ErrnoError("injected: cache", ENOSPC)},
      {StartStage::kPlanVm, absl::InvalidArgumentError("injected: plan")},
      {StartStage::kPrepareMedia, ErrnoError("injected: blank disk", ENOSPC)},
      {StartStage::kOpenDisks, absl::PermissionDeniedError("injected: refused image")},
      {StartStage::kPrepareHost, ErrnoError("injected: state dir", EMFILE)},
      {StartStage::kWarmStart, ErrnoError("injected: template", EIO)},
      {StartStage::kAttachNetwork, ErrnoError("injected: tap", EBUSY)},
      {StartStage::kLaunch, ErrnoError("injected: spawn", EAGAIN)},
      {StartStage::kAwaitQmp, absl::InternalError("injected: qmp")},
  };
  for (StartStage failing : kAllStartStages) {
    // The fake host's QEMU never answers QMP, so the start never gets past
    // await QMP; a failing address wait and a failing restore are tested with
    // a real VM (tests/integration/vm_bridge_test.cc, vm_warm_start_test.cc).
    if (failing == StartStage::kAwaitAddress || failing == StartStage::kRestoreState) continue;
    SCOPED_TRACE(StartStageName(failing));
    std::vector<StartStage> ran;
    auto manager = Manager([&](StartStage stage) {
      ran.push_back(stage);
      return stage == failing ? failures.at(stage) : absl::OkStatus();
    });
    const int spawned_before = host_.supervisors_spawned();
    absl::StatusOr<DriverStateRecord> handle = manager->Start(Task());
    ASSERT_FALSE(handle.ok());
    EXPECT_EQ(std::string(handle.status().message()), std::string(failures.at(failing).message()));
    EXPECT_EQ(Retryable(handle.status()), Retryable(failures.at(failing)));
    EXPECT_EQ(StageOf(handle.status()), StartStageName(failing)) << "the error names its stage";
    EXPECT_EQ(ran.back(), failing) << "no stage runs after a failure";
    EXPECT_EQ(ran.size(), static_cast<size_t>(failing) + 1) << "every stage before it ran";
    // A failure at await QMP comes after a real process was started.
    EXPECT_EQ(host_.supervisors_spawned() - spawned_before, failing == StartStage::kAwaitQmp ? 1 : 0);
    EXPECT_THAT(Leftovers(), IsEmpty());
    EXPECT_FALSE(manager->Get(Task().identity.id).ok());
  }
}

TEST_F(StartPipelineTest, QemuNeverAnsweringTimesOutRetryablyAndKillsTheSupervisor) {
  auto manager = Manager();
  absl::StatusOr<DriverStateRecord> handle = manager->Start(Task());
  ASSERT_FALSE(handle.ok());
  EXPECT_EQ(handle.status().code(), absl::StatusCode::kDeadlineExceeded) << std::string(handle.status().message());
  EXPECT_THAT(handle.status().message(), HasSubstr("QEMU did not answer on its QMP socket within 300ms"));
  EXPECT_TRUE(Retryable(handle.status()));
  EXPECT_EQ(StageOf(handle.status()), StartStageName(StartStage::kAwaitQmp));
  EXPECT_EQ(host_.supervisors_spawned(), 1);
  EXPECT_EQ(host_.cgroups_made(), 1);
  EXPECT_THAT(Leftovers(), IsEmpty());
  // The supervisor was asked to place QEMU in the cgroup the host made.
  EXPECT_THAT(absl::StrJoin(host_.last_argv(), " "), HasSubstr("/nonexistent-fake-cgroup/ndq-unit/"));
}

// A state_dir whose sockets cannot fit a unix socket address fails every
// start the same way: Nomad must not restart the task for it.
TEST_F(StartPipelineTest, AStateDirTooLongForSocketsIsAConfigErrorNotRetried) {
  const std::string deep = state_.path() + "/" + std::string(60, 's') + "/" + std::string(60, 't');
  fs::create_directories(deep);
  plugin_.state_dir = deep;
  auto manager = Manager();
  absl::StatusOr<DriverStateRecord> handle = manager->Start(Task());
  ASSERT_FALSE(handle.ok());
  EXPECT_THAT(handle.status().message(), HasSubstr("is too long"));
  EXPECT_EQ(KindOf(handle.status()), ErrorKind::kBadConfig);
  EXPECT_FALSE(Retryable(handle.status()));
  EXPECT_EQ(StageOf(handle.status()), StartStageName(StartStage::kPrepareHost));
  EXPECT_EQ(host_.supervisors_spawned(), 0);
  fs::remove_all(state_.path() + "/" + std::string(60, 's'));
  EXPECT_THAT(Leftovers(), IsEmpty());
}

TEST_F(StartPipelineTest, HostFailuresKeepTheirKind) {
  auto manager = Manager();
  host_.FailSpawnWith(ErrnoError("cannot run the supervisor", EAGAIN));
  absl::StatusOr<DriverStateRecord> handle = manager->Start(Task());
  ASSERT_FALSE(handle.ok());
  EXPECT_EQ(KindOf(handle.status()), ErrorKind::kHostResource);
  EXPECT_TRUE(Retryable(handle.status())) << "a host out of processes may have room later";
  EXPECT_THAT(Leftovers(), IsEmpty());

  host_.FailSpawnWith(absl::OkStatus());
  host_.FailCgroupWith(absl::InvalidArgumentError("cpuset \"9-7\" is not valid"));
  handle = manager->Start(Task());
  ASSERT_FALSE(handle.ok());
  EXPECT_FALSE(Retryable(handle.status()));
  EXPECT_EQ(host_.supervisors_spawned(), 0) << "nothing is launched without its cgroup";
  EXPECT_THAT(Leftovers(), IsEmpty());
}

TEST_F(StartPipelineTest, ACallerGivingUpStopsTheStartBeforeTheNextStage) {
  bool gave_up = false;
  std::vector<StartStage> ran;
  auto manager = Manager([&](StartStage stage) {
    ran.push_back(stage);
    if (stage == StartStage::kOpenDisks) gave_up = true;  // the caller leaves during this stage
    return absl::OkStatus();
  });
  absl::StatusOr<DriverStateRecord> handle = manager->Start(Task(), [&] { return gave_up; });
  ASSERT_FALSE(handle.ok());
  EXPECT_EQ(handle.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(ran.back(), StartStage::kOpenDisks);
  EXPECT_EQ(host_.cgroups_made(), 0);
  EXPECT_THAT(Leftovers(), IsEmpty());
}

TEST_F(StartPipelineTest, AStartThatFailedCanBeRepeated) {
  int attempts = 0;
  auto manager = Manager([&](StartStage stage) {
    return stage == StartStage::kLaunch && ++attempts == 1 ? absl::UnavailableError("injected once")
                                                           : absl::OkStatus();
  });
  const TaskRequest task = Task();
  EXPECT_EQ(manager->Start(task).status().message(), "injected once");
  // The second attempt gets as far as the fake host allows (no QMP): the
  // first left no state dir or mark that would refuse it as a duplicate.
  EXPECT_EQ(manager->Start(task).status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(Leftovers(), IsEmpty());
}

}  // namespace
}  // namespace ndq
