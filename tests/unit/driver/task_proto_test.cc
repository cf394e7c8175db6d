// Nomad's messages in and out of the driver's own types.
#include "driver/task_proto.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <tuple>

namespace ndq {
namespace {

driverpb::TaskConfig FullTask() {
  driverpb::TaskConfig task;
  task.set_id("9f1c/web/1");
  task.set_name("web");
  task.set_alloc_id("9f1c");
  task.set_namespace_("tenant-a");
  task.set_job_id("shop");
  task.set_job_name("shop");
  task.set_task_group_name("frontend");
  task.set_alloc_dir("/var/nomad/alloc/9f1c");
  task.set_user("nobody");
  task.set_stdout_path("/var/nomad/alloc/9f1c/alloc/logs/web.stdout.0");
  task.set_stderr_path("/var/nomad/alloc/9f1c/alloc/logs/web.stderr.0");
  task.set_msgpack_driver_config(std::string("\x81\xa1" "a\x01", 4));
  auto* resources = task.mutable_resources();
  resources->mutable_allocated_resources()->mutable_memory()->set_memory_mb(512);
  resources->mutable_allocated_resources()->mutable_memory()->set_memory_max_mb(1024);
  resources->mutable_allocated_resources()->mutable_cpu()->set_cpu_shares(500);
  resources->mutable_linux_resources()->set_cpuset_cpus("0-1");
  resources->mutable_linux_resources()->set_cpuset_cgroup("/nomad/9f1c.web");
  auto* network = resources->mutable_allocated_resources()->add_networks();
  network->set_ip("10.0.0.5");
  auto* reserved = network->add_reserved_ports();
  reserved->set_label("ssh");
  reserved->set_value(2222);
  auto* dynamic = network->add_dynamic_ports();
  dynamic->set_label("http");
  dynamic->set_value(25000);
  auto* group = resources->add_ports();
  group->set_label("db");
  group->set_host_ip("10.0.0.6");
  group->set_value(26000);
  group->set_to(5432);
  task.mutable_network_isolation_spec()->set_mode(driverpb::NetworkIsolationSpec::GROUP);
  task.mutable_network_isolation_spec()->set_path("/var/run/netns/9f1c");
  task.mutable_dns()->add_searches("example.com");
  task.mutable_dns()->add_servers("10.0.0.1");
  return task;
}

TEST(TaskRequestFromProto, EveryFieldTheCoreUsesIsCarried) {
  const TaskRequest request = TaskRequestFromProto(FullTask());
  EXPECT_EQ(request.identity.id, "9f1c/web/1");
  EXPECT_EQ(request.identity.name, "web");
  EXPECT_EQ(request.identity.alloc_id, "9f1c");
  // Whose task it is: a warm template never leaves it.
  EXPECT_EQ(request.identity.namespace_name, "tenant-a");
  EXPECT_EQ(request.identity.job_id, "shop");
  EXPECT_EQ(request.identity.task_group, "frontend");
  EXPECT_EQ(request.alloc_dir, "/var/nomad/alloc/9f1c");
  EXPECT_EQ(request.task_dir(), "/var/nomad/alloc/9f1c/web");
  EXPECT_EQ(request.user, "nobody");
  EXPECT_EQ(request.stdout_path, "/var/nomad/alloc/9f1c/alloc/logs/web.stdout.0");
  EXPECT_EQ(request.stderr_path, "/var/nomad/alloc/9f1c/alloc/logs/web.stderr.0");
  EXPECT_EQ(request.driver_config, FullTask().msgpack_driver_config());
  EXPECT_EQ(request.resources.memory_mb, 512);
  EXPECT_EQ(request.resources.memory_max_mb, 1024);
  EXPECT_EQ(request.resources.cpu_shares, 500);
  EXPECT_EQ(request.resources.cpuset_cpus, "0-1");
  EXPECT_EQ(request.resources.cpuset_cgroup, "/nomad/9f1c.web");
  EXPECT_EQ(request.resources.task_network_ip, "10.0.0.5");
  ASSERT_EQ(request.resources.task_ports.size(), 2u);
  EXPECT_EQ(request.resources.task_ports[0].label, "ssh");  // reserved before dynamic
  EXPECT_EQ(request.resources.task_ports[1].value, 25000);
  ASSERT_EQ(request.resources.group_ports.size(), 1u);
  EXPECT_EQ(request.resources.group_ports[0].host_ip, "10.0.0.6");
  EXPECT_EQ(request.resources.group_ports[0].to, 5432);
  EXPECT_EQ(request.netns_path, "/var/run/netns/9f1c");
  EXPECT_EQ(request.dns_searches, std::vector<std::string>{"example.com"});
  EXPECT_EQ(request.dns_servers, std::vector<std::string>{"10.0.0.1"});
}

TEST(TaskRequestFromProto, LinuxCpuSharesWinAndHostModeHasNoNamespace) {
  driverpb::TaskConfig task = FullTask();
  task.mutable_resources()->mutable_linux_resources()->set_cpu_shares(700);
  task.mutable_network_isolation_spec()->set_mode(driverpb::NetworkIsolationSpec::HOST);
  const TaskRequest request = TaskRequestFromProto(task);
  EXPECT_EQ(request.resources.cpu_shares, 700);
  EXPECT_EQ(request.netns_path, "") << "host mode runs in the host's namespace whatever the path";
}

TEST(TaskRequestFromProto, AnEmptyTaskIsEmpty) {
  const TaskRequest request = TaskRequestFromProto(driverpb::TaskConfig());
  EXPECT_EQ(request.identity.id, "");
  EXPECT_FALSE(request.resources.task_network_ip.has_value());
  EXPECT_TRUE(request.resources.task_ports.empty());
  EXPECT_EQ(request.netns_path, "");
}

TEST(TaskRequestFromProto, VolumeMountsAreCarriedInOrder) {
  driverpb::TaskConfig task;
  for (const auto& [task_path, host_path, readonly] :
       {std::tuple{"/srv/data", "/opt/volumes/data", true}, std::tuple{"/srv/rw", "/opt/volumes/rw", false}}) {
    driverpb::Mount* mount = task.add_mounts();
    mount->set_task_path(task_path);
    mount->set_host_path(host_path);
    mount->set_readonly(readonly);
    mount->set_propagation_mode("private");
  }
  const TaskRequest request = TaskRequestFromProto(task);
  ASSERT_EQ(request.mounts.size(), 2u);
  EXPECT_EQ(request.mounts[0].task_path, "/srv/data");
  EXPECT_EQ(request.mounts[0].host_path, "/opt/volumes/data");
  EXPECT_TRUE(request.mounts[0].readonly);
  EXPECT_EQ(request.mounts[1].task_path, "/srv/rw");
  EXPECT_FALSE(request.mounts[1].readonly);
}

TEST(HandleToProto, NomadGetsItsConfigBackAndOurState) {
  DriverStateRecord record;
  record.state_dir = "/run/nomad-driver-qemu/0123";
  record.qemu_pid = 77;
  const driverpb::TaskHandle handle = HandleToProto(FullTask(), record);
  EXPECT_EQ(handle.version(), 1);
  EXPECT_EQ(handle.state(), driverpb::RUNNING);
  EXPECT_EQ(handle.config().SerializeAsString(), FullTask().SerializeAsString());
  absl::StatusOr<DriverStateRecord> back = DriverStateRecord::Decode(handle.driver_state());
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->qemu_pid, 77);
}

TEST(InspectToProto, AnExitedTaskCarriesItsResult) {
  TaskStatusInfo info;
  info.identity = {"9f1c/web/1", "web", "9f1c"};
  info.started_at = absl::FromUnixSeconds(1000);
  ExitResult exit;
  exit.exit_code = 137;
  exit.signal = 9;
  exit.oom_killed = true;
  exit.completed_at = absl::FromUnixSeconds(2000);
  info.exit = exit;
  info.attributes = {{"qemu_pid", "77"}};
  const driverpb::InspectTaskResponse response = InspectToProto(info);
  EXPECT_EQ(response.task().id(), "9f1c/web/1");
  EXPECT_EQ(response.task().name(), "web");
  EXPECT_EQ(response.task().state(), driverpb::EXITED);
  EXPECT_EQ(response.task().started_at().seconds(), 1000);
  EXPECT_EQ(response.task().completed_at().seconds(), 2000);
  EXPECT_EQ(response.task().result().exit_code(), 137);
  EXPECT_EQ(response.task().result().signal(), 9);
  EXPECT_TRUE(response.task().result().oom_killed());
  EXPECT_EQ(response.driver().attributes().at("qemu_pid"), "77");
  info.exit.reset();
  EXPECT_EQ(InspectToProto(info).task().state(), driverpb::RUNNING);
}

}  // namespace
}  // namespace ndq
