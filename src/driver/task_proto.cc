#include "driver/task_proto.h"

namespace ndq {

TaskIdentity TaskIdentityFromProto(const driverpb::TaskConfig& task) {
  return TaskIdentity{task.id(),    task.name(),   task.alloc_id(), task.namespace_(),
                      task.job_id(), task.task_group_name()};
}

namespace {

TaskResources ResourcesFromProto(const driverpb::Resources& resources) {
  TaskResources out;
  const driverpb::AllocatedTaskResources& allocated = resources.allocated_resources();
  out.memory_mb = allocated.memory().memory_mb();
  out.memory_max_mb = allocated.memory().memory_max_mb();
  const driverpb::LinuxResources& linux = resources.linux_resources();
  out.cpu_shares = linux.cpu_shares() > 0 ? linux.cpu_shares() : allocated.cpu().cpu_shares();
  out.cpuset_cpus = linux.cpuset_cpus();
  out.cpuset_cgroup = linux.cpuset_cgroup();
  if (!allocated.networks().empty()) {
    const driverpb::NetworkResource& network = allocated.networks(0);
    out.task_network_ip = network.ip();
    for (const auto* list : {&network.reserved_ports(), &network.dynamic_ports()}) {
      for (const driverpb::NetworkPort& port : *list) out.task_ports.push_back(TaskPort{port.label(), port.value()});
    }
  }
  for (const driverpb::PortMapping& mapping : resources.ports()) {
    out.group_ports.push_back(GroupPort{mapping.label(), mapping.host_ip(), mapping.value(), mapping.to()});
  }
  return out;
}

}  // namespace

TaskRequest TaskRequestFromProto(const driverpb::TaskConfig& task) {
  TaskRequest request;
  request.identity = TaskIdentityFromProto(task);
  request.alloc_dir = task.alloc_dir();
  request.user = task.user();
  request.stdout_path = task.stdout_path();
  request.stderr_path = task.stderr_path();
  request.driver_config = task.msgpack_driver_config();
  request.resources = ResourcesFromProto(task.resources());
  const driverpb::NetworkIsolationSpec& isolation = task.network_isolation_spec();
  if (isolation.mode() != driverpb::NetworkIsolationSpec::HOST) request.netns_path = isolation.path();
  request.dns_searches.assign(task.dns().searches().begin(), task.dns().searches().end());
  request.dns_servers.assign(task.dns().servers().begin(), task.dns().servers().end());
  for (const driverpb::Mount& mount : task.mounts()) {
    request.mounts.push_back(VolumeMount{mount.task_path(), mount.host_path(), mount.readonly()});
  }
  return request;
}

driverpb::TaskHandle HandleToProto(const driverpb::TaskConfig& task, const DriverStateRecord& record) {
  driverpb::TaskHandle handle;
  handle.set_version(1);
  *handle.mutable_config() = task;
  handle.set_state(driverpb::RUNNING);
  handle.set_driver_state(record.Encode());
  return handle;
}

void ExitToProto(const ExitResult& exit, driverpb::ExitResult* out) {
  out->set_exit_code(exit.exit_code);
  out->set_signal(exit.signal);
  out->set_oom_killed(exit.oom_killed);
}

void NetworkToProto(const AdvertisedNetwork& network, driverpb::NetworkOverride* out) {
  out->set_addr(network.ip);
  out->set_auto_advertise(network.auto_advertise);
  for (const auto& [label, port] : network.port_map) (*out->mutable_port_map())[label] = port;
}

driverpb::InspectTaskResponse InspectToProto(const TaskStatusInfo& info) {
  driverpb::InspectTaskResponse response;
  driverpb::TaskStatus* status = response.mutable_task();
  status->set_id(info.identity.id);
  status->set_name(info.identity.name);
  status->mutable_started_at()->set_seconds(absl::ToUnixSeconds(info.started_at));
  status->set_state(info.exit ? driverpb::EXITED : driverpb::RUNNING);
  if (info.exit) {
    status->mutable_completed_at()->set_seconds(absl::ToUnixSeconds(info.exit->completed_at));
    ExitToProto(*info.exit, status->mutable_result());
  }
  auto& attrs = *response.mutable_driver()->mutable_attributes();
  for (const auto& [key, value] : info.attributes) attrs[key] = value;
  // Unset without an address: Nomad treats a present override as the driver network.
  if (!info.network.ip.empty()) NetworkToProto(info.network, response.mutable_network_override());
  return response;
}

}  // namespace ndq
