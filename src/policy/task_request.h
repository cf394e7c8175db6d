// What Nomad asks the driver to run, in the driver's own terms. The driver
// layer converts Nomad's TaskConfig into this (driver/task_proto.h); nothing
// below it sees Nomad's protobuf messages.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace ndq {

// Which task a VM belongs to, for events, logs and Inspect.
struct TaskIdentity {
  std::string id;  // Nomad's "<alloc id>/<task name>/<random>"
  std::string name;
  std::string alloc_id;
  // Whose task it is: what a saved VM (a warm template) is kept within.
  std::string namespace_name = {};
  std::string job_id = {};
  std::string task_group = {};
};

// A port of the task's own network (networks[0]: reserved, then dynamic).
struct TaskPort {
  std::string label;
  int value = 0;
};

// A port of the group's network block (Nomad's port mapping).
struct GroupPort {
  std::string label;
  std::string host_ip;
  int value = 0;  // the host's port
  int to = 0;     // inside the allocation's namespace; 0: same as value
};

struct TaskResources {
  int64_t memory_mb = 0;
  int64_t memory_max_mb = 0;  // 0: no memory_max
  int64_t cpu_shares = 0;     // Nomad's CPU share (MHz)
  std::string cpuset_cpus;    // reserved cores, e.g. "0-1"; empty: none
  std::string cpuset_cgroup;  // Nomad's own cgroup for the task, when it made one
  std::optional<std::string> task_network_ip;  // networks[0]'s address; nullopt: no task network
  std::vector<TaskPort> task_ports;
  std::vector<GroupPort> group_ports;
};

// A volume Nomad mounts for the task (a host volume, a CSI volume): Nomad's
// MountConfig. host_path is Nomad's (from the client's config or a CSI
// plugin), never the job's; task_path is the job's volume_mount destination.
struct VolumeMount {
  std::string task_path;
  std::string host_path;
  bool readonly = false;
};

struct TaskRequest {
  TaskIdentity identity;
  std::string alloc_dir;
  std::string user;  // the task's user; empty: the plugin's qemu_user
  std::string stdout_path;
  std::string stderr_path;
  std::string driver_config;  // the job's config block, msgpack as Nomad sent it
  TaskResources resources;
  // The allocation's network namespace (bridge mode); empty: the host's.
  std::string netns_path;
  std::vector<std::string> dns_searches;
  std::vector<std::string> dns_servers;
  std::vector<VolumeMount> mounts;  // Nomad's volume mounts, in order

  std::string task_dir() const { return alloc_dir + "/" + identity.name; }
};

// The task's own disk made from image_source: a qcow2 overlay in its task dir
// on the cached image. Planning names it before the image is fetched.
inline constexpr char kBootOverlayName[] = "image-overlay.qcow2";

}  // namespace ndq
