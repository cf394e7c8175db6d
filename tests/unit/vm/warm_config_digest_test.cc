// The config part of a warm-start template's key: the same for two tasks of
// one job (names, host ports, MAC, paths differ), different as soon as
// anything the saved guest depends on differs.
#include <gtest/gtest.h>

#include "../../support/warm_spec.h"
#include "vm/warm_start.h"

namespace ndq {
namespace {

VmSpec Task(const std::string& name, int host_port) { return ::ndq::testing::WarmTaskSpec(name, host_port); }

// The boot chain as the open-disks stage opened it: an overlay on a base.
const std::vector<DiskNode> kBoot = {DiskNode{"qcow2", false, 3}, DiskNode{"qcow2", true, 4}};

TEST(WarmConfigDigest, PerTaskValuesDoNotCount) {
  EXPECT_EQ(WarmConfigDigest(Task("a", 25001), kBoot, ""), WarmConfigDigest(Task("b", 31999), kBoot, ""));
  VmSpec other_binary = Task("a", 25001);
  other_binary.emulator_path = "/opt/qemu/bin/qemu-system-x86_64";  // the version is keyed instead
  EXPECT_EQ(WarmConfigDigest(other_binary, kBoot, ""), WarmConfigDigest(Task("a", 25001), kBoot, ""));
  // Whether the layer QEMU gets is writable does not count: the template's is not.
  std::vector<DiskNode> read_only = kBoot;
  read_only[0].read_only = true;
  EXPECT_EQ(WarmConfigDigest(Task("a", 25001), read_only, ""), WarmConfigDigest(Task("a", 25001), kBoot, ""));
}

TEST(WarmConfigDigest, WhatTheGuestDependsOnCounts) {
  const std::string base = WarmConfigDigest(Task("a", 25001), kBoot, "");
  std::vector<std::function<void(VmSpec&)>> changes = {
      [](VmSpec& s) { s.memory_mb = 512; },
      [](VmSpec& s) { s.cpus = 2; },
      [](VmSpec& s) { s.args = {"-rtc", "base=localtime"}; },
      [](VmSpec& s) { s.port_forwards[0].guest_port = 8080; },
      [](VmSpec& s) { s.drive_interface = "ide"; },
      [](VmSpec& s) { s.guest_agent = false; },
      [](VmSpec& s) { s.net_device = "e1000"; },
      [](VmSpec& s) { s.machine_type = "q35"; },
  };
  for (size_t i = 0; i < changes.size(); ++i) {
    VmSpec spec = Task("a", 25001);
    changes[i](spec);
    EXPECT_NE(WarmConfigDigest(spec, kBoot, ""), base) << "change " << i;
  }
  EXPECT_NE(WarmConfigDigest(Task("a", 25001), {kBoot[0]}, ""), base) << "a chain of another length";
  EXPECT_NE(WarmConfigDigest(Task("a", 25001), kBoot, "nobody"), base);
}

}  // namespace
}  // namespace ndq
