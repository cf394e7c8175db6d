// Booting the test guest through the plugin, as the integration tests do.
#pragma once

#include <signal.h>

#include <filesystem>
#include <functional>
#include <iterator>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "plugin_harness.h"
#include "vm/vm_task.h"
#include "test_guest.h"

namespace ndq::testing {

// The cached image of a test guest variant, e.g. "guest-busy.qcow2".
inline std::string Guest(const std::string& variant) {
  absl::StatusOr<std::string> dir = TestGuestDir();
  EXPECT_TRUE(dir.ok()) << dir.status();
  return dir.ok() ? *dir + "/" + variant : variant;
}

inline bool ProcessAlive(pid_t pid) { return pid > 0 && ::kill(pid, 0) == 0; }

// Polls `condition` until it holds (true) or `timeout` passes (false).
inline bool WaitUntil(const std::function<bool()>& condition, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!condition()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(20));
  }
  return true;
}

// The driver state inside a TaskHandle.
inline DriverStateRecord RecordOf(const driverpb::TaskHandle& handle) {
  auto record = DriverStateRecord::Decode(handle.driver_state());
  EXPECT_TRUE(record.ok()) << record.status();
  return record.ok() ? *record : DriverStateRecord{};
}

// What an exec returned (ExecOnce, or a streamed exec the test drives).
struct ExecOutcome {
  grpc::Status status;
  std::string out, err;
  int exit_code = -1;
  int signal = 0;
  bool stdout_closed = false, stderr_closed = false;
  int frames = 0;
};

// One ExecTask call, as Nomad's script checks make it (a zero timeout: none).
inline ExecOutcome ExecOnce(PluginHarness& harness, const std::string& id, const std::vector<std::string>& argv,
                            absl::Duration timeout = absl::ZeroDuration()) {
  auto context = harness.client().NewContext(absl::Seconds(120));
  driverpb::ExecTaskRequest request;
  request.set_task_id(id);
  for (const std::string& arg : argv) request.add_command(arg);
  request.mutable_timeout()->set_seconds(absl::ToInt64Seconds(timeout));
  driverpb::ExecTaskResponse response;
  ExecOutcome outcome;
  outcome.status = harness.driver().ExecTask(context.get(), request, &response);
  outcome.out = response.stdout();
  outcome.err = response.stderr();
  outcome.exit_code = response.result().exit_code();
  outcome.signal = response.result().signal();
  return outcome;
}

// The page at http://127.0.0.1:PORT/, or "" when it cannot be fetched.
inline std::string HttpGet(int port, int max_seconds = 5) {
  auto out = RunCommand({"/usr/bin/curl", "-s", "--max-time", std::to_string(max_seconds),
                         "http://127.0.0.1:" + std::to_string(port) + "/"},
                        absl::Seconds(max_seconds + 5));
  return out.ok() && out->exit_code == 0 ? out->output : "";
}

// http://127.0.0.1:PORT/PATH, or "" when it cannot be fetched.
inline std::string Page(int port, const std::string& path) {
  auto out = RunCommand({"/usr/bin/curl", "-s", "--fail", "--max-time", "5",
                         absl::StrCat("http://127.0.0.1:", port, "/", path)},
                        absl::Seconds(10));
  return out.ok() && out->exit_code == 0 ? out->output : "";
}

// The names in `dir` (not below it); empty when it cannot be read.
inline std::set<std::string> Listing(const std::string& dir) {
  std::set<std::string> names;
  std::error_code ignored;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ignored)) names.insert(entry.path().filename());
  return names;
}

// What VMs left in the plugin's state_dir: its listing without the files
// the plugin keeps there for itself (the host's probed facts).
inline std::set<std::string> VmStateLeft(const std::string& state_dir) {
  std::set<std::string> names = Listing(state_dir);
  names.erase("pool");  // the warm pool's own directory (see VmProcessesLeft)
  // The plugin's host facts, and their temporary while the fingerprinter's
  // background probe writes them (renamed into place a moment later).
  for (auto it = names.begin(); it != names.end();) {
    it = it->rfind("host-facts.json", 0) == 0 ? names.erase(it) : std::next(it);
  }
  return names;
}

// The warm pool's slots (vm/warm_pool.h): QEMUs the plugin keeps ready on
// purpose, beyond the tasks that made them, each in <state_dir>/pool/<slot>.
inline std::set<std::string> PoolSlots(const std::string& state_dir) { return Listing(state_dir + "/pool"); }

// Processes of VMs still running under `state_dir`, not counting the QEMUs
// (and supervisors) that wait in the warm pool. A pooled QEMU handed to a
// task keeps its old slot path in its command line, but that slot no longer
// exists, so a task's VM left behind is always counted.
inline std::vector<pid_t> VmProcessesLeft(const std::string& state_dir) {
  const std::set<std::string> slots = PoolSlots(state_dir);
  std::vector<pid_t> left;
  for (pid_t pid : ProcessesMentioning(state_dir)) {
    std::string cmdline = ReadSmallFile("/proc/" + std::to_string(pid) + "/cmdline").value_or("");
    std::replace(cmdline.begin(), cmdline.end(), '\0', ' ');
    bool pooled = false;
    for (const std::string& slot : slots) {
      const std::string dir = state_dir + "/pool/" + slot;
      pooled = pooled || cmdline.find(dir + " ") != std::string::npos || cmdline.find(dir + "/") != std::string::npos;
    }
    if (!pooled) left.push_back(pid);
  }
  return left;
}

// The job config the tests boot the guest with: TCG, the task's overlay on a
// virtio disk, graceful shutdown, port "http" to the guest's web server.
// `extra` adds or overrides options.
inline nlohmann::json GuestConfig(const nlohmann::json& extra = nlohmann::json::object()) {
  nlohmann::json config = {{"image_path", "local/disk.qcow2"},
                           {"accelerator", "tcg"},
                           {"drive_interface", "virtio"},
                           {"graceful_shutdown", true},
                           {"port_map", {{{"http", 80}}}}};
  for (const auto& [key, value] : extra.items()) config[key] = value;
  return config;
}

// Starts `image` (an overlay on it) in `alloc` with the task port "http" on
// `http_port`, and waits until the guest says it is ready.
inline driverpb::TaskHandle StartTestGuest(PluginHarness& harness, FakeAlloc& alloc, const std::string& image,
                                           int http_port, const nlohmann::json& extra = nlohmann::json::object()) {
  alloc.AddOverlay(image);
  driverpb::TaskConfig task = alloc.Task(GuestConfig(extra));
  AddTaskPort(&task, "http", http_port);
  driverpb::TaskHandle handle;
  const grpc::Status status = harness.Start(task, &handle);
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE(WaitForFileToContain(alloc.stdout_path(), "GUEST-READY", kGuestBootTimeout))
      << "serial console:\n" << ReadFile(alloc.stdout_path());
  return handle;
}

}  // namespace ndq::testing
