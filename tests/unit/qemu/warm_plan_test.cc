// warm_start planning through PlanVm: when the guest counts as ready, and
// what a template cannot carry; every problem names "warm_start".
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <limits>

#include "qemu/vm_spec.h"

namespace ndq {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

class WarmPlanning : public ::testing::Test {
 protected:
  void SetUp() override {
    task_.identity = {"a1/web/0", "web", "a1"};
    task_.alloc_dir = "/var/nomad/alloc/a1";
    task_.resources.memory_mb = 256;
    task_.resources.task_network_ip = "127.0.0.1";
    task_.resources.task_ports = {{"http", 25080}, {"dns", 25053}};
    config_.image_path = "local/disk.qcow2";
    config_.port_map = {{"http", 80}};
    config_.warm_start = WarmStartConfig{"http", false, std::nullopt};
  }
  absl::StatusOr<VmSpec> Plan() const { return PlanVm(config_, task_, PluginConfig{}, host_); }
  std::string Problems() const {
    absl::StatusOr<VmSpec> spec = Plan();
    EXPECT_FALSE(spec.ok());
    return spec.ok() ? "" : std::string(spec.status().message());
  }

  TaskConfig config_;
  TaskRequest task_;
  HostCapabilities host_ = {{{"x86_64", "/usr/bin/qemu-system-x86_64"}}};
};

TEST_F(WarmPlanning, OffUnlessAsked) {
  config_.warm_start.reset();
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_FALSE(spec->warm.enabled);
}

TEST_F(WarmPlanning, ReadyPortIsThePortMapLabelsForward) {
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_TRUE(spec->warm.enabled);
  EXPECT_EQ(spec->warm.ready.port_label, "http");
  EXPECT_EQ(spec->warm.ready.host_port, 25080);
  EXPECT_EQ(spec->warm.ready.guest_port, 80);
  EXPECT_FALSE(spec->warm.ready.guest_agent);
  EXPECT_EQ(spec->warm.ready.timeout, kWarmReadyTimeout);
}

TEST_F(WarmPlanning, WarmPoolIsOneUnlessSetAndZeroTurnsItOff) {
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->warm.pool_size, 1);
  for (int64_t size : {0, 3, kMaxWarmPool}) {
    config_.warm_start->warm_pool = size;
    spec = Plan();
    ASSERT_TRUE(spec.ok()) << spec.status();
    EXPECT_EQ(spec->warm.pool_size, size);
  }
}

TEST_F(WarmPlanning, HostileWarmPoolSizesAreRefusedNamingTheField) {
  for (int64_t size : {int64_t{-1}, int64_t{kMaxWarmPool + 1}, int64_t{1} << 40, std::numeric_limits<int64_t>::min()}) {
    config_.warm_start->warm_pool = size;
    EXPECT_THAT(Problems(), HasSubstr("task config \"warm_start\": warm_pool must be from 0 to 8, got " +
                                      std::to_string(size)));
  }
}

TEST_F(WarmPlanning, ReadyAgentNeedsTheGuestAgent) {
  config_.warm_start = WarmStartConfig{std::nullopt, true, std::nullopt};
  EXPECT_THAT(Problems(), HasSubstr("task config \"warm_start\": ready_agent needs guest_agent = true"));
  config_.guest_agent = true;
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_TRUE(spec->warm.ready.guest_agent);
  EXPECT_TRUE(spec->warm.ready.port_label.empty());
}

TEST_F(WarmPlanning, ExactlyOneReadinessProbe) {
  config_.warm_start = WarmStartConfig{std::nullopt, false, std::nullopt};
  EXPECT_THAT(Problems(), HasSubstr("\"warm_start\": set exactly one of ready_port"));
  config_.guest_agent = true;
  config_.warm_start = WarmStartConfig{"http", true, std::nullopt};
  EXPECT_THAT(Problems(), HasSubstr("\"warm_start\": set exactly one of ready_port"));
}

TEST_F(WarmPlanning, HostileReadyPortNamesTheLabels) {
  for (const char* label : {"nope", "", "http,hostfwd=tcp::22-:22", "../../etc/passwd"}) {
    config_.warm_start = WarmStartConfig{label, false, std::nullopt};
    EXPECT_THAT(Problems(), AllOf(HasSubstr("\"warm_start\": ready_port"), HasSubstr("is not a TCP port_map label"),
                                  HasSubstr("port_map has \"http\"")))
        << label;
  }
  EXPECT_THAT(Problems(), ::testing::Not(HasSubstr("\"http\", \"http\"")));  // TCP and UDP: one label
  config_.port_map.clear();
  EXPECT_THAT(Problems(), HasSubstr("the task config has no port_map"));
}

TEST_F(WarmPlanning, WhatATemplateCannotCarryIsRefusedAllAtOnce) {
  config_.tpm = true;
  config_.firmware = "uefi";
  config_.disks.push_back(DiskConfig{});
  config_.disks.back().size = "1G";
  config_.cdrom = "local/x.iso";
  config_.cloud_init = CloudInitConfig{};
  config_.share_alloc_dirs = true;
  host_.uefi = FirmwareFiles{"/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"};
  host_.swtpm = "/usr/bin/swtpm";
  const std::string problems = Problems();
  EXPECT_THAT(problems, HasSubstr("task config \"warm_start\": cannot be used with"));
  for (const char* what : {"tpm", "firmware = \"uefi\"", "disk blocks", "cdrom", "cloud_init", "share_alloc_dirs"}) {
    EXPECT_THAT(problems, HasSubstr(what)) << what;
  }
}

TEST_F(WarmPlanning, BridgeModeIsRefused) {
  PluginConfig plugin;
  plugin.bridges_allowlist = {"br0"};
  config_.network_mode = "bridge";
  config_.bridge = "br0";
  absl::StatusOr<VmSpec> spec = PlanVm(config_, task_, plugin, host_);
  ASSERT_FALSE(spec.ok());
  EXPECT_THAT(spec.status().message(), HasSubstr("network_mode = \"bridge\""));
  EXPECT_THAT(spec.status().message(), HasSubstr("\"warm_start\""));
}

TEST_F(WarmPlanning, KernelOnlyVmHasNoDiskToSave) {
  config_.image_path.reset();
  config_.kernel = "local/vmlinuz";
  EXPECT_THAT(Problems(), HasSubstr("a VM without a boot disk"));
}

}  // namespace
}  // namespace ndq
