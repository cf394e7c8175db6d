#include "nomadplugin/config_reader.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/msgpack_writer.h"

namespace nomadplugin {
namespace {

using ::ndq::testing::MsgpackWriter;
using ::testing::HasSubstr;

ConfigReader Read(const std::string& bytes) {
  absl::StatusOr<ConfigReader> reader = ConfigReader::FromMsgpack(bytes, "task config");
  EXPECT_TRUE(reader.ok()) << reader.status();
  return *reader;
}

TEST(ConfigReader, EveryOptionTypeAsCtySendsIt) {
  MsgpackWriter w;
  w.Map(6);
  w.Str("name").Str("vm1");
  w.Str("flag").Bool(true);
  w.Str("memory").Uint16(2048);
  w.Str("ratio").Float64(0.75);
  w.Str("args").Array(2).Str("-smp").Str("2");
  w.Str("port_map").Array(2).Map(1).Str("http").FixInt(80).Map(1).Str("ssh").Float64(22.0);
  ConfigReader r = Read(w.bytes());
  EXPECT_EQ(r.String("name"), "vm1");
  EXPECT_EQ(r.Bool("flag"), true);
  EXPECT_EQ(r.Integer("memory"), 2048);
  EXPECT_EQ(r.Number("ratio"), 0.75);
  EXPECT_EQ(r.StringList("args"), (std::vector<std::string>{"-smp", "2"}));
  const auto ports = r.IntegerMapList("port_map");
  ASSERT_TRUE(ports.has_value());
  EXPECT_EQ(ports->at("http"), 80);
  EXPECT_EQ(ports->at("ssh"), 22);
  EXPECT_TRUE(r.status().ok()) << r.status();
}

TEST(ConfigReader, NilAndAbsentAreUnset) {
  MsgpackWriter w;
  w.Map(3).Str("image_path").Nil().Str("args").Nil().Str("port_map").Nil();
  ConfigReader r = Read(w.bytes());
  EXPECT_FALSE(r.String("image_path").has_value());
  EXPECT_FALSE(r.StringList("args").has_value());
  EXPECT_FALSE(r.IntegerMapList("port_map").has_value());
  EXPECT_FALSE(r.Bool("never_sent").has_value());
  EXPECT_TRUE(r.status().ok());
}

TEST(ConfigReader, IntegerEncodings) {
  MsgpackWriter w;
  w.Map(5);
  w.Str("neg").Int8(-5);
  w.Str("big").Uint64(1ull << 40);
  w.Str("i64").Int64(-(1ll << 40));
  w.Str("whole_float").Float64(512.0);
  w.Str("huge_as_string").Str("123456789012");
  ConfigReader r = Read(w.bytes());
  EXPECT_EQ(r.Integer("neg"), -5);
  EXPECT_EQ(r.Integer("big"), 1ll << 40);
  EXPECT_EQ(r.Integer("i64"), -(1ll << 40));
  EXPECT_EQ(r.Integer("whole_float"), 512);
  EXPECT_EQ(r.Integer("huge_as_string"), 123456789012);
  EXPECT_TRUE(r.status().ok()) << r.status();
}

TEST(ConfigReader, WrongTypesNameTheFieldAndAreAllReported) {
  MsgpackWriter w;
  w.Map(5);
  w.Str("image_path").FixInt(42);
  w.Str("graceful_shutdown").Str("yes");
  w.Str("memory").Float64(1.5);
  w.Str("args").Array(2).Str("-m").FixInt(3);
  w.Str("port_map").Array(1).Map(1).Str("http").Str("eighty");
  ConfigReader r = Read(w.bytes());
  EXPECT_FALSE(r.String("image_path").has_value());
  EXPECT_FALSE(r.Bool("graceful_shutdown").has_value());
  EXPECT_FALSE(r.Integer("memory").has_value());
  EXPECT_FALSE(r.StringList("args").has_value());
  EXPECT_FALSE(r.IntegerMapList("port_map").has_value());
  const std::string message(r.status().message());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(message, HasSubstr("invalid task config"));
  EXPECT_THAT(message, HasSubstr("\"image_path\" must be a string, got number 42"));
  EXPECT_THAT(message, HasSubstr("\"graceful_shutdown\" must be a bool, got string \"yes\""));
  EXPECT_THAT(message, HasSubstr("\"memory\" must be a whole number, got number 1.5"));
  EXPECT_THAT(message, HasSubstr("\"args[1]\" must be a string"));
  EXPECT_THAT(message, HasSubstr("\"port_map.http\" must be a whole number, got string \"eighty\""));
}

TEST(ConfigReader, SingleMapIsAcceptedForMapList) {
  MsgpackWriter w;
  w.Map(1).Str("port_map").Map(2).Str("a").FixInt(1).Str("b").FixInt(2);
  ConfigReader r = Read(w.bytes());
  EXPECT_EQ(r.IntegerMapList("port_map")->size(), 2u);
}

TEST(ConfigReader, NotMsgpackIsAnError) {
  const absl::StatusOr<ConfigReader> r = ConfigReader::FromMsgpack(std::string("\xc1\xc1\xc1", 3), "plugin config");
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("plugin config is not valid msgpack"));
}

TEST(ConfigReader, RootMustBeAMap) {
  MsgpackWriter w;
  w.Array(1).Str("x");
  ConfigReader r = Read(w.bytes());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("must be a map of options"));
}

// msgpack's reader recurses per level: a few hundred kilobytes of one-element
// arrays (0x91) overflowed the stack (reproduced through fuzz_task_config).
TEST(ConfigReader, DeepNestingIsRefusedNotAStackOverflow) {
  MsgpackWriter w;
  w.Map(1).Str("args");
  const std::string deep = w.bytes() + std::string(1000000, '\x91') + "\xc0";
  const absl::StatusOr<ConfigReader> r = ConfigReader::FromMsgpack(deep, "task config");
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(r.status())) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("task config is nested more than 64 levels deep"));

  // Up to the bound it is an ordinary value (of the wrong type here).
  const std::string ok = w.bytes() + std::string(ConfigReader::kMaxConfigDepth - 1, '\x91') + "\xc0";
  ConfigReader within = Read(ok);
  EXPECT_FALSE(within.StringList("args").has_value());
  EXPECT_THAT(std::string(within.status().message()), HasSubstr("\"args[0]\" must be a string"));
}

TEST(ConfigReader, EmptyInputIsEmptyConfig) {
  ConfigReader r = Read("");
  EXPECT_TRUE(r.status().ok());
  EXPECT_FALSE(r.String("anything").has_value());
}

TEST(ConfigReader, RejectsUnknownFieldsWhenAsked) {
  MsgpackWriter w;
  w.Map(2).Str("image_path").Str("a.img").Str("imagepath").Str("b.img");
  ConfigReader r = Read(w.bytes());
  r.RejectUnknownFields({"image_path"});
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("\"imagepath\" is not a known option"));
}

}  // namespace
}  // namespace nomadplugin
