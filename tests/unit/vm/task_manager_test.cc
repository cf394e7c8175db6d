// The task registry around the start pipeline, with a fake host: duplicates,
// unknown tasks, and RecoverTask from whatever driver state Nomad hands back.
#include "vm/task_manager.h"

#include <cstdlib>
#include <filesystem>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../fakes/fake_vm_host.h"
#include "../../support/plugin_harness.h"
#include "../../support/temp_dir.h"
#include "host/fingerprint.h"
#include "vm/event_bus.h"

namespace ndq {
namespace {

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

  absl::Status Recover(const std::string& id, const std::string& driver_state) {
    return manager_->Recover(TaskIdentity{id, "web", "a"}, driver_state);
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
  EXPECT_EQ(manager_->Start(TaskRequest{}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(TaskManagerTest, RecoverRefusesDamagedOrMissingState) {
  EXPECT_EQ(Recover("", DriverStateRecord{}.Encode()).code(), absl::StatusCode::kInvalidArgument);
  const absl::Status damaged = Recover("a/web/1", "not json");
  EXPECT_FALSE(damaged.ok());
  EXPECT_THAT(damaged.message(), HasSubstr("task a/web/1"));
  DriverStateRecord gone;
  gone.state_dir = state_ / "0000000000000000";
  const absl::Status missing = Recover("a/web/1", gone.Encode());
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
  ASSERT_TRUE(Recover("a/web/2", record.Encode()).ok());
  absl::StatusOr<std::optional<ExitResult>> exit = manager_->Wait("a/web/2", absl::Seconds(5));
  ASSERT_TRUE(exit.ok()) << exit.status();
  ASSERT_TRUE(exit->has_value());
  EXPECT_FALSE((*exit)->error.empty()) << "no exit record: the reason says so";
  absl::StatusOr<TaskStatusInfo> inspected = manager_->Inspect("a/web/2");
  ASSERT_TRUE(inspected.ok());
  EXPECT_TRUE(inspected->exit.has_value());
  EXPECT_EQ(inspected->identity.name, "web");
  EXPECT_EQ(inspected->attributes.at("state_dir"), record.state_dir);
  // Recovering twice is a no-op; destroying removes the state directory.
  EXPECT_TRUE(Recover("a/web/2", record.Encode()).ok());
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
