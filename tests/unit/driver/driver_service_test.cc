// The Driver service in process, over a TaskManager with a fake host: what
// Nomad reads from each call (codes, RecoverableError, handle, inspect, wait).
#include "driver/driver_service.h"

#include <cstdlib>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../fakes/fake_vm_host.h"
#include "../../support/plugin_harness.h"
#include "../../support/temp_dir.h"
#include "base/error_kind.h"

namespace ndq {
namespace {

using ::ndq::testing::FakeAlloc;
using ::ndq::testing::FakeVmHost;
using ::ndq::testing::TempDir;
using ::testing::HasSubstr;

class DriverServiceTest : public ::testing::Test {
 protected:
  DriverServiceTest() {
    PluginConfig plugin;
    plugin.state_dir = state_.path();
    plugin.image_cache_dir = cache_.path();
    plugin.image_paths = {alloc_.alloc_dir()};
    settings_.Set(plugin, std::nullopt);
    TaskManagerOptions options;
    options.supervisor_path = "/nonexistent/nomad-qemu-supervisor";
    options.start_timeout = absl::Milliseconds(200);
    options.host = &host_;
    tasks_ = std::make_unique<TaskManager>(options, [this] { return settings_.plugin_config(); }, &fingerprinter_,
                                           &events_);
    service_ = std::make_unique<DriverService>(&settings_, &fingerprinter_, tasks_.get(), &events_, &lifecycle_);
  }

  grpc::Status Start(const nlohmann::json& config) {
    grpc::ServerContext context;
    driverpb::StartTaskRequest request;
    *request.mutable_task() = alloc_.Task(config);
    driverpb::StartTaskResponse response;
    return service_->StartTask(&context, &request, &response);
  }

  TempDir state_, cache_;
  FakeAlloc alloc_{"web"};
  FakeVmHost host_;
  Fingerprinter fingerprinter_{std::getenv("PATH") != nullptr ? std::getenv("PATH") : "/usr/bin", "/dev/kvm"};
  EventBus events_;
  DriverSettings settings_;
  nomadplugin::Lifecycle lifecycle_;
  std::unique_ptr<TaskManager> tasks_;
  std::unique_ptr<DriverService> service_;
};

TEST_F(DriverServiceTest, ABadConfigIsAFinalStartFailure) {
  const grpc::Status status = Start({{"image_path", "local/disk.qcow2"}, {"accelerator", "warp"}});
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(), HasSubstr("accelerator"));
  EXPECT_EQ(::ndq::testing::StartIsRecoverable(status), false);
}

TEST_F(DriverServiceTest, AHostShortOfProcessesIsARetryableStartFailure) {
  std::filesystem::copy_file(NDQ_SOURCE_DIR "/README.md", alloc_.task_dir() + "/local/disk.img");
  host_.FailSpawnWith(ErrnoError("cannot run the supervisor", EAGAIN));
  const grpc::Status status = Start({{"image_path", "local/disk.img"}, {"image_format", "raw"}});
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(), HasSubstr("cannot run the supervisor"));
  EXPECT_EQ(::ndq::testing::StartIsRecoverable(status), true);
  EXPECT_TRUE(host_.live_cgroups().empty());
}

TEST_F(DriverServiceTest, UnknownTasksAreNotFoundExceptForDestroy) {
  grpc::ServerContext context;
  driverpb::InspectTaskRequest inspect;
  inspect.set_task_id("nope");
  driverpb::InspectTaskResponse inspected;
  EXPECT_EQ(service_->InspectTask(&context, &inspect, &inspected).error_code(), grpc::StatusCode::NOT_FOUND);
  driverpb::DestroyTaskRequest destroy;
  destroy.set_task_id("nope");
  driverpb::DestroyTaskResponse destroyed;
  EXPECT_TRUE(service_->DestroyTask(&context, &destroy, &destroyed).ok());
}

// After an agent restart Nomad may send the handle without the task id; the
// request's id is used, and the recovered task answers Inspect and Wait.
TEST_F(DriverServiceTest, RecoverTaskFillsTheIdAndTheTaskAnswersInspectAndWait) {
  DriverStateRecord record;
  record.state_dir = state_ / "feedfacefeedface";
  std::filesystem::create_directories(record.state_dir);
  record.supervisor_pid = 999999999;  // not running: the VM ended while the plugin was away
  record.qemu_pid = 999999998;
  grpc::ServerContext context;
  driverpb::RecoverTaskRequest recover;
  recover.set_task_id("9f1c/web/7");
  recover.mutable_handle()->mutable_config()->set_name("web");
  recover.mutable_handle()->set_driver_state(record.Encode());
  driverpb::RecoverTaskResponse recovered;
  ASSERT_TRUE(service_->RecoverTask(&context, &recover, &recovered).ok());

  driverpb::InspectTaskRequest inspect;
  inspect.set_task_id("9f1c/web/7");
  driverpb::InspectTaskResponse inspected;
  ASSERT_TRUE(service_->InspectTask(&context, &inspect, &inspected).ok());
  EXPECT_EQ(inspected.task().id(), "9f1c/web/7");
  EXPECT_EQ(inspected.task().name(), "web");
  EXPECT_EQ(inspected.task().state(), driverpb::EXITED);
  EXPECT_EQ(inspected.driver().attributes().at("state_dir"), record.state_dir);

  driverpb::WaitTaskRequest wait;
  wait.set_task_id("9f1c/web/7");
  driverpb::WaitTaskResponse waited;
  ASSERT_TRUE(service_->WaitTask(&context, &wait, &waited).ok());
  EXPECT_FALSE(waited.err().empty()) << "no exit record: the reason says so";
}

// Exec of a task the driver does not run is refused before any agent is asked
// (running exec end to end: tests/integration/vm_exec_test.cc).
TEST_F(DriverServiceTest, ExecOfAnUnknownTaskIsNotFound) {
  grpc::ServerContext context;
  driverpb::ExecTaskRequest request;
  request.set_task_id("a/web/1");
  request.add_command("true");
  driverpb::ExecTaskResponse response;
  const grpc::Status status = service_->ExecTask(&context, &request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(status.error_message(), HasSubstr("a/web/1"));
}

}  // namespace
}  // namespace ndq
