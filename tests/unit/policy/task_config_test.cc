#include "policy/task_config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

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
  const auto spec = TaskConfigSpec();
  const auto& attrs = spec.object().attributes();
  EXPECT_EQ(attrs.size(), expected.size());
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
