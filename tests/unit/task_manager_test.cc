// The task registry around the start pipeline, with a fake host: duplicates,
// unknown tasks, and RecoverTask from whatever driver state Nomad hands back.
#include "vm/task_manager.h"

#include <cstdlib>
#include <filesystem>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../fakes/fake_vm_host.h"
#include "../support/plugin_harness.h"
#include "../support/temp_dir.h"
#include "host/fingerprint.h"
#include "vm/event_bus.h"

namespace ndq {
namespace {

using ::ndq::testing::FakeAlloc;
using ::ndq::testing::FakeVmHost;
using ::ndq::testing::TempDir;
using ::testing::HasSubstr;

class TaskManagerTest : public ::testing::Test {
 protected:
  TaskManagerTest() {
    plugin_.state_dir = state_.path();
    plugin_.image_cache_dir = cache_.path();
    TaskManagerOptions options;
    options.supervisor_path = "/nonexistent/nomad-qemu-supervisor";
    options.start_timeout = absl::Milliseconds(200);
    options.host = &host_;
    manager_ = std::make_unique<TaskManager>(options, [this] { return plugin_; }, &fingerprinter_, &events_);
  }

  driverpb::TaskHandle Handle(const std::string& id, const DriverStateRecord& record) {
    driverpb::TaskHandle handle;
    handle.mutable_config()->set_id(id);
    handle.mutable_config()->set_name("web");
    handle.set_driver_state(record.Encode());
    return handle;
  }

  TempDir state_, cache_;
  PluginConfig plugin_;
  FakeVmHost host_;
  Fingerprinter fingerprinter_{std::getenv("PATH") != nullptr ? std::getenv("PATH") : "/usr/bin", "/dev/kvm"};
  EventBus events_;
  std::unique_ptr<TaskManager> manager_;
};

TEST_F(TaskManagerTest, UnknownTasksAreNotFoundButDestroyingOneIsFine) {
  EXPECT_EQ(manager_->Wait("nope", absl::Milliseconds(1)).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(manager_->Stop("nope", absl::Seconds(1), "").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(manager_->Inspect("nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(manager_->Signal("nope", "SIGTERM").code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(manager_->Destroy("nope", true).ok()) << "destroying what is gone is not an error for Nomad";
}

TEST_F(TaskManagerTest, ATaskWithoutIdIsRefused) {
  driverpb::TaskConfig task;
  EXPECT_EQ(manager_->Start(task).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(TaskManagerTest, RecoverRefusesDamagedOrMissingState) {
  EXPECT_EQ(manager_->Recover(Handle("", DriverStateRecord{})).code(), absl::StatusCode::kInvalidArgument);
  driverpb::TaskHandle garbage = Handle("a/web/1", DriverStateRecord{});
  garbage.set_driver_state("not json");
  const absl::Status damaged = manager_->Recover(garbage);
  EXPECT_FALSE(damaged.ok());
  EXPECT_THAT(damaged.message(), HasSubstr("task a/web/1"));
  DriverStateRecord gone;
  gone.state_dir = state_ / "0000000000000000";
  const absl::Status missing = manager_->Recover(Handle("a/web/1", gone));
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.message(), HasSubstr("is gone"));
}

// A VM that ended while the plugin was away: recovered as exited, with the
// supervisor's record; no process is signalled (its pids are long gone).
TEST_F(TaskManagerTest, AVmThatEndedMeanwhileIsRecoveredAsExited) {
  DriverStateRecord record;
  record.state_dir = state_ / "feedfacefeedface";
  std::filesystem::create_directories(record.state_dir);
  record.supervisor_pid = 999999999;  // beyond pid_max: certainly not running
  record.qemu_pid = 999999998;
  ASSERT_TRUE(manager_->Recover(Handle("a/web/2", record)).ok());
  absl::StatusOr<std::optional<ExitResult>> exit = manager_->Wait("a/web/2", absl::Seconds(5));
  ASSERT_TRUE(exit.ok()) << exit.status();
  ASSERT_TRUE(exit->has_value());
  EXPECT_FALSE((*exit)->error.empty()) << "no exit record: the reason says so";
  absl::StatusOr<driverpb::InspectTaskResponse> inspected = manager_->Inspect("a/web/2");
  ASSERT_TRUE(inspected.ok());
  EXPECT_EQ(inspected->task().state(), driverpb::EXITED);
  // Recovering twice is a no-op; destroying removes the state directory.
  EXPECT_TRUE(manager_->Recover(Handle("a/web/2", record)).ok());
  EXPECT_TRUE(manager_->Destroy("a/web/2", false).ok());
  EXPECT_FALSE(std::filesystem::exists(record.state_dir));
}

TEST_F(TaskManagerTest, StateAndCacheDirsFollowThePluginConfig) {
  EXPECT_EQ(manager_->StateRoot(), state_.path());
  EXPECT_EQ(manager_->CacheDir(), cache_.path());
  plugin_.state_dir.clear();
  EXPECT_NE(manager_->StateRoot(), state_.path());
}

}  // namespace
}  // namespace ndq
