// A plugin launched as Nomad launches it, configured with a private state
// directory, plus builders for the TaskConfig messages Nomad sends.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <signal.h>

#include <algorithm>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include <gtest/gtest.h>

#include "google_rpc/status.pb.h"
#include "nomad/structs.pb.h"
#include "absl/strings/numbers.h"

#include "../support/temp_dir.h"
#include "nomadplugin/driver_client.h"
#include "nomadplugin/launcher.h"
#include "host/cgroups.h"
#include "host/run_command.h"
#include "base/small_file.h"

namespace ndq {
// The tests speak Nomad's messages, as Nomad does.
namespace driverpb = hashicorp::nomad::plugins::drivers::proto;
}  // namespace ndq

namespace ndq::testing {

// A TCP port on 127.0.0.1 that was free a moment ago.
inline int FreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

// Pids of processes whose command line mentions `needle` (e.g. a state dir).
// Processes come and go while this scans (the tests start and kill them all
// the time): one that is gone before its cmdline is read is skipped, and
// nothing here throws.
inline std::vector<pid_t> ProcessesMentioning(const std::string& needle) {
  std::vector<pid_t> found;
  std::error_code ec;
  for (std::filesystem::directory_iterator it("/proc", ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename();
    int pid = 0;
    if (!absl::SimpleAtoi(name, &pid) || pid <= 0) continue;
    std::optional<std::string> cmdline = ReadSmallFile("/proc/" + name + "/cmdline");
    if (!cmdline) continue;  // gone, or not ours to read
    std::replace(cmdline->begin(), cmdline->end(), '\0', ' ');
    if (cmdline->find(needle) != std::string::npos) found.push_back(pid);
  }
  return found;
}

// Kills every VM (supervisor and QEMU) whose state lives under `state_dir`.
inline void KillVmsUnder(const std::string& state_dir) {
  for (pid_t pid : ProcessesMentioning(state_dir)) ::kill(pid, SIGKILL);
}

// The cgroup hierarchies' roots: /sys/fs/cgroup (v2) and each v1 controller's.
inline std::vector<std::string> CgroupRoots() {
  std::vector<std::string> roots = {"/sys/fs/cgroup"};
  std::error_code ignored;
  for (const auto& entry : std::filesystem::directory_iterator("/sys/fs/cgroup", ignored)) {
    if (entry.is_directory(ignored)) roots.push_back(entry.path());
  }
  return roots;
}

// Every VM cgroup under `parent`, on any hierarchy.
inline std::vector<std::string> CgroupsUnder(const std::string& parent) {
  std::vector<std::string> found;
  std::error_code ignored;
  for (const std::string& root : CgroupRoots()) {
    for (const auto& entry : std::filesystem::directory_iterator(root + "/" + parent, ignored)) {
      if (entry.is_directory(ignored)) found.push_back(entry.path());
    }
  }
  return found;
}

// Removes the cgroup `parent` and every VM cgroup under it, on each mounted
// cgroup hierarchy, killing what is still inside.
inline void RemoveCgroupTree(const std::string& parent) {
  std::error_code ignored;
  // The driver's own removal (kill what is left, rmdir), children first.
  TaskCgroup tree;
  tree.created = CgroupsUnder(parent);
  for (const std::string& root : CgroupRoots()) {
    if (std::filesystem::is_directory(root + "/" + parent, ignored)) tree.created.push_back(root + "/" + parent);
  }
  RemoveTaskCgroup(tree);
}

// Whether a failed StartTask tells Nomad to retry: the RecoverableError that
// the plugin packs into the status details (nullopt when there is none).
inline std::optional<bool> StartIsRecoverable(const grpc::Status& status) {
  google::rpc::Status rich;
  hashicorp::nomad::plugins::shared::structs::RecoverableError detail;
  if (!rich.ParseFromString(status.error_details()) || rich.details_size() != 1 ||
      !rich.details(0).UnpackTo(&detail)) {
    return std::nullopt;
  }
  return detail.recoverable();
}

class PluginHarness {
 public:
  // `plugin_config` is the operator's plugin block as JSON; state_dir is ours.
  // VMs get their cgroups under a parent of their own (unless the config
  // names one), removed with the harness.
  // `wrapper`, when given, is a command the plugin binary is appended to and
  // run by, e.g. {"/usr/bin/nsenter", "--net=/run/netns/x", "--"} to run the
  // plugin in another network namespace (it must exec, keeping the pid).
  explicit PluginHarness(const std::string& state_dir, nlohmann::json plugin_config = nlohmann::json::object(),
                         std::vector<std::string> wrapper = {})
      : state_dir_(state_dir), plugin_config_(std::move(plugin_config)), wrapper_(std::move(wrapper)) {
    plugin_config_["state_dir"] = state_dir_;
    if (!plugin_config_.contains("cgroup_parent")) {
      static int harnesses = 0;
      plugin_config_["cgroup_parent"] = "ndq-test-" + std::to_string(::getpid()) + "-" + std::to_string(++harnesses);
    }
    Restart();
  }
  ~PluginHarness() {
    plugin_.reset();
    client_.reset();
    KillVmsUnder(state_dir_);
    RemoveCgroupTree(plugin_config_["cgroup_parent"].get<std::string>());
  }
  PluginHarness(const PluginHarness&) = delete;
  PluginHarness& operator=(const PluginHarness&) = delete;
  const std::string& cgroup_parent() const { return plugin_config_["cgroup_parent"].get_ref<const std::string&>(); }

  // Starts a fresh plugin process (the old one, if any, is killed first).
  void Restart() {
    plugin_.reset();
    client_.reset();
    nomadplugin::LaunchOptions options;
    options.binary = NDQ_PLUGIN_BINARY;
    if (!wrapper_.empty()) {
      options.binary = wrapper_[0];
      options.args.assign(wrapper_.begin() + 1, wrapper_.end());
      options.args.push_back(NDQ_PLUGIN_BINARY);
    }
    // NDQ_PLUGIN_STDERR=1 shows the plugin's log lines (debugging a test).
    const char* echo = std::getenv("NDQ_PLUGIN_STDERR");
    options.echo_stderr = echo != nullptr && std::string(echo) == "1";
    auto plugin = nomadplugin::PluginProcess::Launch(options);
    ASSERT_TRUE(plugin.ok()) << plugin.status();
    plugin_ = std::move(*plugin);
    client_ = std::make_unique<nomadplugin::DriverClient>(plugin_->channel(), absl::Seconds(120));
    const absl::Status status = client_->SetConfig(plugin_config_);
    ASSERT_TRUE(status.ok()) << status;
  }

  nomadplugin::PluginProcess& process() { return *plugin_; }
  nomadplugin::DriverClient& client() { return *client_; }
  driverpb::Driver::Stub& driver() { return client_->driver(); }

  grpc::Status Start(const driverpb::TaskConfig& task, driverpb::TaskHandle* handle) {
    auto context = client_->NewContext();
    driverpb::StartTaskRequest request;
    *request.mutable_task() = task;
    driverpb::StartTaskResponse response;
    grpc::Status status = driver().StartTask(context.get(), request, &response);
    if (handle != nullptr) *handle = response.handle();
    return status;
  }

  grpc::Status Wait(const std::string& id, driverpb::WaitTaskResponse* response, absl::Duration timeout) {
    auto context = client_->NewContext(timeout);
    driverpb::WaitTaskRequest request;
    request.set_task_id(id);
    return driver().WaitTask(context.get(), request, response);
  }

  grpc::Status Stop(const std::string& id, absl::Duration timeout, const std::string& signal = "") {
    auto context = client_->NewContext();
    driverpb::StopTaskRequest request;
    request.set_task_id(id);
    request.mutable_timeout()->set_seconds(absl::ToInt64Seconds(timeout));
    request.mutable_timeout()->set_nanos(
        static_cast<int32_t>(absl::ToInt64Nanoseconds(timeout - absl::Seconds(absl::ToInt64Seconds(timeout)))));
    request.set_signal(signal);
    driverpb::StopTaskResponse response;
    return driver().StopTask(context.get(), request, &response);
  }

  grpc::Status Destroy(const std::string& id, bool force) {
    auto context = client_->NewContext();
    driverpb::DestroyTaskRequest request;
    request.set_task_id(id);
    request.set_force(force);
    driverpb::DestroyTaskResponse response;
    return driver().DestroyTask(context.get(), request, &response);
  }

  grpc::Status Recover(const driverpb::TaskHandle& handle) {
    auto context = client_->NewContext();
    driverpb::RecoverTaskRequest request;
    *request.mutable_handle() = handle;  // task_id left empty, as after an agent restart
    driverpb::RecoverTaskResponse response;
    return driver().RecoverTask(context.get(), request, &response);
  }

  grpc::Status Inspect(const std::string& id, driverpb::InspectTaskResponse* response) {
    auto context = client_->NewContext();
    driverpb::InspectTaskRequest request;
    request.set_task_id(id);
    return driver().InspectTask(context.get(), request, response);
  }

  grpc::Status Signal(const std::string& id, const std::string& signal) {
    auto context = client_->NewContext();
    driverpb::SignalTaskRequest request;
    request.set_task_id(id);
    request.set_signal(signal);
    driverpb::SignalTaskResponse response;
    return driver().SignalTask(context.get(), request, &response);
  }

 private:
  std::string state_dir_;
  nlohmann::json plugin_config_;
  std::vector<std::string> wrapper_;
  std::unique_ptr<nomadplugin::PluginProcess> plugin_;
  std::unique_ptr<nomadplugin::DriverClient> client_;
};

// An allocation directory laid out as Nomad lays it out, with one task.
class FakeAlloc {
 public:
  explicit FakeAlloc(const std::string& task_name) : task_name_(task_name) {
    std::filesystem::create_directories(task_dir() + "/local");
    std::filesystem::create_directories(dir_.path() + "/alloc/logs");
  }
  const std::string& alloc_dir() const { return dir_.path(); }
  std::string task_dir() const { return dir_.path() + "/" + task_name_; }
  std::string stdout_path() const { return dir_.path() + "/alloc/logs/" + task_name_ + ".stdout.0"; }
  std::string stderr_path() const { return dir_.path() + "/alloc/logs/" + task_name_ + ".stderr.0"; }

  // The job the allocation belongs to, as Nomad names it (namespace and job ID).
  void SetJob(const std::string& namespace_name, const std::string& job_id) {
    namespace_ = namespace_name;
    job_id_ = job_id;
  }

  // A copy-on-write disk in the task's local/ dir backed by `base`.
  std::string AddOverlay(const std::string& base, const std::string& name = "disk.qcow2") {
    const std::string path = task_dir() + "/local/" + name;
    auto out = RunCommand({"/usr/bin/qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, path},
                          absl::Seconds(30));
    EXPECT_TRUE(out.ok() && out->exit_code == 0) << (out.ok() ? out->output : std::string(out.status().message()));
    return path;
  }

  // Nomad's TaskConfig for this task; `driver_config` is the job's config block.
  driverpb::TaskConfig Task(const nlohmann::json& driver_config, int memory_mb = 256) const {
    static int counter = 0;
    driverpb::TaskConfig task;
    const std::string alloc_id = "0f5e8a2c-6a4b-4c1e-9d7a-" + std::to_string(100000000000 + ++counter + ::getpid());
    task.set_id(alloc_id + "/" + task_name_ + "/" + std::to_string(10000000 + counter));
    task.set_name(task_name_);
    task.set_alloc_id(alloc_id);
    task.set_alloc_dir(dir_.path());
    task.set_stdout_path(stdout_path());
    task.set_stderr_path(stderr_path());
    task.set_namespace_(namespace_);
    task.set_job_id(job_id_);
    task.set_job_name(job_id_);
    task.set_task_group_name("group");
    std::vector<uint8_t> msgpack = nlohmann::json::to_msgpack(driver_config);
    task.set_msgpack_driver_config(std::string(msgpack.begin(), msgpack.end()));
    task.mutable_resources()->mutable_allocated_resources()->mutable_memory()->set_memory_mb(memory_mb);
    return task;
  }

 private:
  TempDir dir_;
  std::string task_name_;
  std::string namespace_ = "default";
  std::string job_id_ = "test";
};

// Adds a task-level (legacy) network port, as Nomad puts it in networks[0].
inline void AddTaskPort(driverpb::TaskConfig* task, const std::string& label, int port) {
  auto* resources = task->mutable_resources()->mutable_allocated_resources();
  if (resources->networks_size() == 0) resources->add_networks()->set_ip("127.0.0.1");
  auto* p = resources->mutable_networks(0)->add_dynamic_ports();
  p->set_label(label);
  p->set_value(port);
}

// Adds a group-network port, as Nomad puts it in resources.ports.
inline void AddGroupPort(driverpb::TaskConfig* task, const std::string& label, int port, int to = 0) {
  auto* p = task->mutable_resources()->add_ports();
  p->set_label(label);
  p->set_value(port);
  p->set_to(to);
  p->set_host_ip("127.0.0.1");
}

}  // namespace ndq::testing
