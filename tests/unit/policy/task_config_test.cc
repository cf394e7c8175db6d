#include "policy/task_config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "../../support/msgpack_writer.h"

namespace ndq {
namespace {

using ::ndq::testing::MsgpackWriter;
using ::testing::HasSubstr;

// Nomad's qemu driver options and their HCL types: jobs written for it must
// parse against our schema unchanged.
TEST(TaskConfig, SchemaCoversNomadsQemuOptions) {
  const std::map<std::string, std::string> expected = {
      {"image_path", "string"},      {"emulator", "string"},        {"machine_type", "string"},
      {"drive_interface", "string"}, {"accelerator", "string"},     {"graceful_shutdown", "bool"},
      {"guest_agent", "bool"},       {"args", "list(string)"},      {"port_map", "list(map(number))"},
      {"image_source", "string"},    {"checksum", "string"},      {"image_sources", "list(string)"},
      {"checksum_url", "string"},    {"image_format", "string"},  {"disk_size", "string"},
      {"cpus", "number"},            {"instance_type", "string"},
  };
  // Ours beyond Nomad's: cloud images and VM hardware.
  const std::map<std::string, std::string> hardware = {
      {"disk_interface", "string"}, {"disk_cache", "string"},     {"disk_discard", "string"},
      {"kernel", "string"},         {"initrd", "string"},         {"kernel_cmdline", "string"},
      {"cdrom", "string"},          {"cdrom_source", "string"},   {"cdrom_checksum", "string"},
      {"boot_order", "string"},     {"net_device", "string"},     {"mac_address", "string"},
      {"firmware", "string"},       {"secure_boot", "bool"},      {"tpm", "bool"},
  };
  // Shares (qemu/share_plan.h) and the console and boot watch (issue 11).
  const std::map<std::string, std::string> operate = {{"share_alloc_dirs", "bool"},
                                                      {"console", "bool"},
                                                      {"boot_timeout", "string"},
                                                      {"boot_ready_port", "string"}};
  // Ours: bridge networking (src/qemu/network_plan.h).
  const std::map<std::string, std::string> network = {
      {"network_mode", "string"}, {"bridge", "string"}, {"advertise_address", "bool"}, {"advertise_timeout", "string"},
  };
  const auto spec = TaskConfigSpec();
  const auto& attrs = spec.object().attributes();
  // + the disk, cloud_init and warm_start blocks
  EXPECT_EQ(attrs.size(), expected.size() + hardware.size() + operate.size() + network.size() + 3);
  EXPECT_EQ(attrs.at("warm_start").block_value().name(), "warm_start");
  const auto& warm = attrs.at("warm_start").block_value().nested().object().attributes();
  EXPECT_EQ(warm.at("ready_port").attr().type(), "string");
  EXPECT_EQ(warm.at("ready_agent").attr().type(), "bool");
  EXPECT_EQ(warm.at("warm_pool").attr().type(), "number");
  EXPECT_EQ(warm.size(), 3u);
  for (const auto& [name, type] : network) {
    ASSERT_TRUE(attrs.count(name)) << name;
    EXPECT_EQ(attrs.at(name).attr().type(), type) << name;
  }
  for (const auto& [name, type] : operate) {
    ASSERT_TRUE(attrs.count(name)) << name;
    EXPECT_EQ(attrs.at(name).attr().type(), type) << name;
  }
  EXPECT_EQ(attrs.at("disk").block_list().name(), "disk");
  EXPECT_EQ(attrs.at("cloud_init").block_value().name(), "cloud_init");
  for (const auto& [name, type] : hardware) {
    ASSERT_TRUE(attrs.count(name)) << name;
    EXPECT_EQ(attrs.at(name).attr().type(), type) << name;
  }
  for (const auto& [name, type] : expected) {
    ASSERT_TRUE(attrs.count(name)) << name;
    EXPECT_EQ(attrs.at(name).attr().name(), name);
    EXPECT_EQ(attrs.at(name).attr().type(), type) << name;
  }
}

std::string FullConfig() {
  MsgpackWriter w;
  w.Map(15);
  w.Str("image_path").Str("local/linux.img");
  w.Str("image_sources").Nil();
  w.Str("checksum_url").Nil();
  w.Str("image_format").Str("qcow2");
  w.Str("disk_size").Str("20G");
  w.Str("image_source").Nil();
  w.Str("checksum").Nil();
  w.Str("emulator").Str("x86_64");
  w.Str("machine_type").Str("q35");
  w.Str("drive_interface").Str("virtio");
  w.Str("accelerator").Str("tcg");
  w.Str("graceful_shutdown").Bool(true);
  w.Str("guest_agent").Bool(false);
  w.Str("args").Array(2).Str("-smp").Str("2");
  w.Str("port_map").Array(1).Map(2).Str("http").FixInt(80).Str("ssh").FixInt(22);
  return w.bytes();
}

TEST(TaskConfig, DecodesEveryOption) {
  const absl::StatusOr<TaskConfig> c = DecodeTaskConfig(FullConfig());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->image_path, "local/linux.img");
  EXPECT_FALSE(c->image_source.has_value());
  EXPECT_EQ(c->emulator, "x86_64");
  EXPECT_EQ(c->machine_type, "q35");
  EXPECT_EQ(c->drive_interface, "virtio");
  EXPECT_EQ(c->accelerator, "tcg");
  EXPECT_TRUE(c->graceful_shutdown);
  EXPECT_FALSE(c->guest_agent);
  EXPECT_EQ(c->args, (std::vector<std::string>{"-smp", "2"}));
  EXPECT_EQ(c->port_map, (std::map<std::string, int64_t>{{"http", 80}, {"ssh", 22}}));
  EXPECT_EQ(c->image_format, "qcow2");
  EXPECT_EQ(c->disk_size, "20G");
  EXPECT_TRUE(c->image_sources.empty());
}

TEST(TaskConfig, DecodesConsoleOptions) {
  MsgpackWriter w;
  w.Map(4).Str("image_path").Str("a.img").Str("console").Bool(true).Str("boot_timeout").Str("90s");
  w.Str("boot_ready_port").Str("http");
  const absl::StatusOr<TaskConfig> c = DecodeTaskConfig(w.bytes(), /*reject_unknown=*/true);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->console);
  EXPECT_EQ(c->boot_timeout, "90s");
  EXPECT_EQ(c->boot_ready_port, "http");
  MsgpackWriter unset;
  unset.Map(3).Str("console").Nil().Str("boot_timeout").Nil().Str("boot_ready_port").Nil();
  const absl::StatusOr<TaskConfig> d = DecodeTaskConfig(unset.bytes());
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_FALSE(d->console);
  EXPECT_FALSE(d->boot_timeout.has_value());
  MsgpackWriter wrong;
  wrong.Map(1).Str("boot_timeout").FixInt(90);
  const absl::StatusOr<TaskConfig> e = DecodeTaskConfig(wrong.bytes());
  ASSERT_FALSE(e.ok());
  EXPECT_THAT(std::string(e.status().message()), HasSubstr("\"boot_timeout\""));
}

TEST(TaskConfig, UnsetOptionsKeepDefaults) {
  MsgpackWriter w;
  w.Map(2).Str("image_path").Str("a.img").Str("graceful_shutdown").Nil();
  const absl::StatusOr<TaskConfig> c = DecodeTaskConfig(w.bytes());
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(c->graceful_shutdown);
  EXPECT_TRUE(c->args.empty());
  EXPECT_TRUE(c->port_map.empty());
}

TEST(TaskConfig, UnknownOptionsOnlyRejectedWhenAsked) {
  MsgpackWriter w;
  w.Map(2).Str("image_path").Str("a.img").Str("gracefull_shutdown").Bool(true);
  EXPECT_TRUE(DecodeTaskConfig(w.bytes()).ok());
  const absl::StatusOr<TaskConfig> strict = DecodeTaskConfig(w.bytes(), /*reject_unknown=*/true);
  ASSERT_FALSE(strict.ok());
  EXPECT_THAT(std::string(strict.status().message()), HasSubstr("\"gracefull_shutdown\" is not a known option"));
}

TEST(TaskConfig, WrongTypeNamesTheOption) {
  MsgpackWriter w;
  w.Map(1).Str("port_map").Str("http=80");
  const absl::StatusOr<TaskConfig> c = DecodeTaskConfig(w.bytes());
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("\"port_map\" must be a map of numbers"));
}

// Blocks arrive as Nomad's hcldec makes them: a block as a map, repeated
// blocks as a list of maps.
TEST(TaskConfig, DecodesDiskAndCloudInitBlocks) {
  const nlohmann::json config = {
      {"kernel", "local/vmlinuz"},
      {"tpm", true},
      {"disk",
       {{{"size", "10GiB"}, {"interface", "nvme"}, {"serial", "data1"}, {"readonly", false}},
        {{"image_path", "local/ro.qcow2"}, {"readonly", true}}}},
      {"cloud_init", {{"user_data", "#cloud-config\n"}, {"ssh_authorized_keys", {"ssh-ed25519 AAAA k"}}}},
  };
  const std::vector<uint8_t> bytes = nlohmann::json::to_msgpack(config);
  const absl::StatusOr<TaskConfig> c = DecodeTaskConfig(std::string(bytes.begin(), bytes.end()), true);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->kernel, "local/vmlinuz");
  EXPECT_TRUE(c->tpm);
  ASSERT_EQ(c->disks.size(), 2u);
  EXPECT_EQ(c->disks[0].size, "10GiB");
  EXPECT_EQ(c->disks[0].interface, "nvme");
  EXPECT_EQ(c->disks[0].serial, "data1");
  EXPECT_EQ(c->disks[1].image_path, "local/ro.qcow2");
  EXPECT_TRUE(c->disks[1].readonly);
  ASSERT_TRUE(c->cloud_init.has_value());
  EXPECT_EQ(c->cloud_init->user_data, "#cloud-config\n");
  EXPECT_EQ(c->cloud_init->ssh_authorized_keys, std::vector<std::string>{"ssh-ed25519 AAAA k"});
}

TEST(TaskConfig, BlockProblemsNameTheBlockAndIndex) {
  const nlohmann::json config = {
      {"disk", {{{"size", 10}}, {{"readonly", "yes"}, {"sise", "1G"}}}},
      {"cloud_init", {{"user_data", 7}}},
  };
  const std::vector<uint8_t> bytes = nlohmann::json::to_msgpack(config);
  const absl::StatusOr<TaskConfig> c = DecodeTaskConfig(std::string(bytes.begin(), bytes.end()), true);
  ASSERT_FALSE(c.ok());
  const std::string message(c.status().message());
  EXPECT_THAT(message, HasSubstr("\"disk[0].size\" must be a string"));
  EXPECT_THAT(message, HasSubstr("\"disk[1].readonly\" must be a bool"));
  EXPECT_THAT(message, HasSubstr("\"disk[1].sise\" is not a known option"));
  EXPECT_THAT(message, HasSubstr("\"cloud_init.user_data\" must be a string"));
}

// A job's config nested a million levels deep overflowed the stack of the
// msgpack reader (reproduced through fuzz_task_config); now it is an error.
TEST(TaskConfig, DeeplyNestedConfigIsAnErrorNotACrash) {
  MsgpackWriter w;
  w.Map(1).Str("port_map");
  const absl::StatusOr<TaskConfig> c = DecodeTaskConfig(w.bytes() + std::string(1000000, '\x91') + "\xc0");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("nested more than"));
}

}  // namespace
}  // namespace ndq
