// qemu-driverctl run: one task through its whole life, as Nomad would drive it.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "nomad/driver.pb.h"
#include "nomadplugin/driver_client.h"

namespace ndq::ctl {

struct RunOptions {
  std::string task_file;
  std::string alloc_dir;    // empty: a fresh temporary directory
  std::string check_http;   // port label: fetch the page, then stop the task
  double kill_timeout_s = 5;
};

// A task file is JSON:
//   {"name": "web", "memory_mb": 256, "cpuset": "0",
//    "ports": {"http": 0},          // label -> host port (0: pick a free one)
//    "config": { ...the job's task config block... }}
// Relative paths in config.image_path are relative to the task directory, as in Nomad.
absl::StatusOr<hashicorp::nomad::plugins::drivers::proto::TaskConfig> TaskFromFile(const nlohmann::json& file,
                                                                                   const std::string& alloc_dir);

int RunTask(nomadplugin::DriverClient& client, const RunOptions& options);

}  // namespace ndq::ctl
