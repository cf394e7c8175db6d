// Booting the test guest through the plugin, as the integration tests do.
#pragma once

#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "plugin_harness.h"
#include "test_guest.h"

namespace ndq::testing {

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
