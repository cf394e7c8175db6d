#include "nomadplugin/handshake.h"

#include <gtest/gtest.h>

namespace nomadplugin {
namespace {

TEST(Handshake, NomadValues) {
  const HandshakeConfig config = NomadHandshake();
  EXPECT_EQ(config.cookie_key, "NOMAD_PLUGIN_MAGIC_COOKIE");
  EXPECT_EQ(config.cookie_value, "e4327c2e01eabfd75a8a67adb114fb34a757d57eee7728d857a8cec6e91a7255");
  EXPECT_EQ(config.app_versions, std::vector<int>{2});
}

TEST(Handshake, CookieMustMatchExactly) {
  const HandshakeConfig config = NomadHandshake();
  EXPECT_TRUE(CookieMatches(config, config.cookie_value.c_str()));
  EXPECT_FALSE(CookieMatches(config, nullptr));
  EXPECT_FALSE(CookieMatches(config, ""));
  EXPECT_FALSE(CookieMatches(config, (config.cookie_value + "x").c_str()));
}

TEST(Handshake, NegotiatesHighestCommonVersion) {
  HandshakeConfig config = NomadHandshake();
  config.app_versions = {1, 2};
  EXPECT_EQ(*NegotiateAppVersion(config, "2"), 2);
  EXPECT_EQ(*NegotiateAppVersion(config, "1,2,3"), 2);
  EXPECT_EQ(*NegotiateAppVersion(config, "1"), 1);
  EXPECT_EQ(*NegotiateAppVersion(config, "3, 1"), 1);
}

TEST(Handshake, NoListMeansOurHighest) {
  HandshakeConfig config = NomadHandshake();
  config.app_versions = {1, 2};
  EXPECT_EQ(*NegotiateAppVersion(config, nullptr), 2);
  EXPECT_EQ(*NegotiateAppVersion(config, ""), 2);
}

TEST(Handshake, NoCommonVersionIsAnErrorNamingBothSides) {
  const absl::StatusOr<int> v = NegotiateAppVersion(NomadHandshake(), "1,3");
  ASSERT_FALSE(v.ok());
  EXPECT_NE(v.status().message().find("[1,3]"), absl::string_view::npos) << v.status();
  EXPECT_NE(v.status().message().find("[2]"), absl::string_view::npos) << v.status();
}

TEST(Handshake, GarbageVersionIsAnError) {
  EXPECT_FALSE(NegotiateAppVersion(NomadHandshake(), "two").ok());
}

TEST(Handshake, FormatsSixFieldsWithEmptyCertificate) {
  EXPECT_EQ(FormatHandshakeLine({1, 2, "unix", "/tmp/p/plugin.sock", "grpc"}),
            "1|2|unix|/tmp/p/plugin.sock|grpc|\n");
}

TEST(Handshake, ParsesWhatItFormats) {
  const absl::StatusOr<HandshakeLine> line = ParseHandshakeLine("1|2|unix|/a/b.sock|grpc|\n");
  ASSERT_TRUE(line.ok()) << line.status();
  EXPECT_EQ(line->core_version, 1);
  EXPECT_EQ(line->app_version, 2);
  EXPECT_EQ(line->network, "unix");
  EXPECT_EQ(line->address, "/a/b.sock");
  EXPECT_EQ(line->protocol, "grpc");
}

TEST(Handshake, ParseRejectsMalformedLines) {
  EXPECT_FALSE(ParseHandshakeLine("hello world").ok());
  EXPECT_FALSE(ParseHandshakeLine("x|2|unix|/a|grpc").ok());
  EXPECT_FALSE(ParseHandshakeLine("1|2|pipe|/a|grpc").ok());
  EXPECT_EQ(ParseHandshakeLine("1|2|tcp|127.0.0.1:1234")->protocol, "netrpc");
}

}  // namespace
}  // namespace nomadplugin
