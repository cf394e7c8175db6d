#include "policy/plugin_config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/msgpack_writer.h"

namespace ndq {
namespace {

using ::ndq::testing::MsgpackWriter;
using ::testing::HasSubstr;

TEST(PluginConfig, SchemaHasNomadsOptionsAndOurs) {
  const auto spec = PluginConfigSpec();
  const auto& attrs = spec.object().attributes();
  for (const char* name : {"image_paths", "args_allowlist", "emulators_allowlist"}) {
    ASSERT_TRUE(attrs.count(name)) << name;
    EXPECT_EQ(attrs.at(name).attr().type(), "list(string)") << name;
    EXPECT_FALSE(attrs.at(name).attr().required()) << name;
  }
  EXPECT_EQ(attrs.at("image_cache_dir").attr().type(), "string");
}

TEST(PluginConfig, DecodesLikeNomadSendsIt) {
  MsgpackWriter w;
  w.Map(4);
  w.Str("image_paths").Array(1).Str("/srv/images");
  w.Str("args_allowlist").Array(2).Str("-drive").Str("-device");
  w.Str("emulators_allowlist").Nil();
  w.Str("image_cache_dir").Nil();
  const absl::StatusOr<PluginConfig> config = DecodePluginConfig(w.bytes());
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->image_paths, std::vector<std::string>{"/srv/images"});
  EXPECT_EQ(config->args_allowlist, (std::vector<std::string>{"-drive", "-device"}));
  EXPECT_TRUE(config->emulators_allowlist.empty());
  EXPECT_TRUE(config->image_cache_dir.empty());
}

TEST(PluginConfig, EmptyConfigIsValid) {
  const absl::StatusOr<PluginConfig> config = DecodePluginConfig("");
  ASSERT_TRUE(config.ok());
  EXPECT_TRUE(config->image_paths.empty());
}

TEST(PluginConfig, ErrorsNameTheField) {
  MsgpackWriter w;
  w.Map(3);
  w.Str("image_paths").Str("/srv/images");
  w.Str("emulators_allowlist").Array(1).FixInt(1);
  w.Str("image_cache_dir").Str("relative/dir");
  const absl::StatusOr<PluginConfig> config = DecodePluginConfig(w.bytes());
  ASSERT_FALSE(config.ok());
  const std::string message(config.status().message());
  EXPECT_THAT(message, HasSubstr("\"image_paths\" must be a list of strings, got string \"/srv/images\""));
  EXPECT_THAT(message, HasSubstr("\"emulators_allowlist[0]\" must be a string"));
  EXPECT_THAT(message, HasSubstr("\"image_cache_dir\" must be an absolute path"));
}

TEST(PluginConfig, ImagePathsMustBeAbsolute) {
  MsgpackWriter w;
  w.Map(1).Str("image_paths").Array(1).Str("images");
  EXPECT_THAT(std::string(DecodePluginConfig(w.bytes()).status().message()),
              HasSubstr("\"image_paths\" entries must be absolute paths"));
}

}  // namespace
}  // namespace ndq

namespace ndq {
namespace {

TEST(PluginConfig, StateDirAndSupervisorPath) {
  MsgpackWriter w;
  w.Map(2).Str("state_dir").Str("/run/ndq").Str("supervisor_path").Str("/usr/libexec/nomad-qemu-supervisor");
  const absl::StatusOr<PluginConfig> config = DecodePluginConfig(w.bytes());
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->state_dir, "/run/ndq");
  EXPECT_EQ(config->supervisor_path, "/usr/libexec/nomad-qemu-supervisor");
}

TEST(PluginConfig, StateDirMustLeaveRoomForSockets) {
  MsgpackWriter w;
  w.Map(2).Str("state_dir").Str("/" + std::string(90, 'x')).Str("supervisor_path").Str("bin/sup");
  const std::string message(DecodePluginConfig(w.bytes()).status().message());
  EXPECT_THAT(message, HasSubstr("\"state_dir\" is longer than 70 characters"));
  EXPECT_THAT(message, HasSubstr("\"supervisor_path\" must be an absolute path"));
}

}  // namespace
}  // namespace ndq

namespace ndq {
namespace {

TEST(ParseSize, UnitsAreBinaryAsInQemuImg) {
  EXPECT_EQ(*ParseSize("20G"), 20ll << 30);
  EXPECT_EQ(*ParseSize("512M"), 512ll << 20);
  EXPECT_EQ(*ParseSize("1.5T"), 3ll << 39);
  EXPECT_EQ(*ParseSize("1048576"), 1048576);
  EXPECT_EQ(*ParseSize("4GiB"), 4ll << 30);
  EXPECT_FALSE(ParseSize("20 apples").ok());
  EXPECT_FALSE(ParseSize("G").ok());
  EXPECT_FALSE(ParseSize("-5G").ok());
}

TEST(PluginConfig, ImageDownloadOptions) {
  MsgpackWriter w;
  w.Map(4).Str("allow_unverified_images").Bool(true).Str("max_image_size").Str("10G").Str("image_cache_max_size")
      .Str("50G").Str("ca_file").Str("/etc/ssl/extra.pem");
  const absl::StatusOr<PluginConfig> config = DecodePluginConfig(w.bytes());
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(config->allow_unverified_images);
  EXPECT_EQ(config->max_image_size, 10ll << 30);
  EXPECT_EQ(config->image_cache_max_size, 50ll << 30);
  EXPECT_EQ(config->ca_file, "/etc/ssl/extra.pem");
  MsgpackWriter bad;
  bad.Map(1).Str("max_image_size").Str("lots");
  EXPECT_THAT(std::string(DecodePluginConfig(bad.bytes()).status().message()), HasSubstr("\"max_image_size\""));
}

TEST(PluginConfig, IsolationOptions) {
  const absl::StatusOr<PluginConfig> defaults = DecodePluginConfig(MsgpackWriter().Map(0).bytes());
  ASSERT_TRUE(defaults.ok());
  EXPECT_EQ(defaults->cgroup_parent, "nomad");
  EXPECT_EQ(defaults->memory_overhead, 128ll << 20);
  EXPECT_EQ(defaults->pids_limit, 1024);

  MsgpackWriter w;
  w.Map(3).Str("cgroup_parent").Str("vms").Str("memory_overhead").Str("64MiB").Str("pids_limit").Uint16(4096);
  const absl::StatusOr<PluginConfig> config = DecodePluginConfig(w.bytes());
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->cgroup_parent, "vms");
  EXPECT_EQ(config->memory_overhead, 64ll << 20);
  EXPECT_EQ(config->pids_limit, 4096);

  for (const char* parent : {"/sys/fs/cgroup/x", "../escape", ""}) {
    MsgpackWriter bad;
    bad.Map(1).Str("cgroup_parent").Str(parent);
    EXPECT_THAT(std::string(DecodePluginConfig(bad.bytes()).status().message()), HasSubstr("\"cgroup_parent\"")) << parent;
  }
  MsgpackWriter negative;
  negative.Map(1).Str("pids_limit").Int8(-1);
  EXPECT_THAT(std::string(DecodePluginConfig(negative.bytes()).status().message()), HasSubstr("\"pids_limit\""));
  MsgpackWriter overhead;
  overhead.Map(1).Str("memory_overhead").Str("a little");
  EXPECT_THAT(std::string(DecodePluginConfig(overhead.bytes()).status().message()), HasSubstr("\"memory_overhead\""));
}

TEST(PluginConfig, SandboxIsOnUnlessTurnedOff) {
  MsgpackWriter w;
  w.Map(1).Str("state_dir").Str("/run/ndq");
  EXPECT_TRUE(DecodePluginConfig(w.bytes())->sandbox);
  MsgpackWriter off;
  off.Map(1).Str("sandbox").Bool(false);
  EXPECT_FALSE(DecodePluginConfig(off.bytes())->sandbox);
}

TEST(PluginConfig, QemuUserMustBeAnExistingUnprivilegedUser) {
  MsgpackWriter nobody;
  nobody.Map(1).Str("qemu_user").Str("nobody");
  ASSERT_TRUE(DecodePluginConfig(nobody.bytes()).ok());
  EXPECT_EQ(DecodePluginConfig(nobody.bytes())->qemu_user, "nobody");
  MsgpackWriter missing;
  missing.Map(1).Str("qemu_user").Str("no-such-user-ndq");
  EXPECT_THAT(std::string(DecodePluginConfig(missing.bytes()).status().message()),
              HasSubstr("\"qemu_user\" user \"no-such-user-ndq\" does not exist"));
  MsgpackWriter root;
  root.Map(1).Str("qemu_user").Str("root");
  EXPECT_THAT(std::string(DecodePluginConfig(root.bytes()).status().message()), HasSubstr("is root"));
}

}  // namespace
}  // namespace ndq

namespace ndq {
namespace {

TEST(PluginConfig, ImageSourceAllowlist) {
  const auto spec = PluginConfigSpec();
  const auto& attrs = spec.object().attributes();
  ASSERT_TRUE(attrs.count("image_source_allowlist"));
  EXPECT_EQ(attrs.at("image_source_allowlist").attr().type(), "list(string)");

  const absl::StatusOr<PluginConfig> defaults = DecodePluginConfig(MsgpackWriter().Map(0).bytes());
  ASSERT_TRUE(defaults.ok());
  EXPECT_TRUE(defaults->image_source_allowlist.empty());

  MsgpackWriter w;
  w.Map(1).Str("image_source_allowlist").Array(3).Str("https://images.example.com/vm/").Str("http://10.0.0.5:8080")
      .Str("http://169.254.169.254/latest/");
  const absl::StatusOr<PluginConfig> config = DecodePluginConfig(w.bytes());
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->image_source_allowlist,
            (std::vector<std::string>{"https://images.example.com/vm/", "http://10.0.0.5:8080",
                                      "http://169.254.169.254/latest/"}));
}

TEST(PluginConfig, ImageSourceAllowlistEntriesMustBeHttpPrefixesWithAHost) {
  for (const char* bad : {"images.example.com/vm/", "ftp://images.example.com/", "file:///srv/images", "https://",
                          "https://user:secret@images.example.com/", "https://images.example.com/?a=b",
                          "/srv/images"}) {
    MsgpackWriter w;
    w.Map(1).Str("image_source_allowlist").Array(2).Str("https://ok.example.com/").Str(bad);
    const absl::StatusOr<PluginConfig> config = DecodePluginConfig(w.bytes());
    ASSERT_FALSE(config.ok()) << bad;
    const std::string message(config.status().message());
    EXPECT_THAT(message, HasSubstr("\"image_source_allowlist\" entries must be http:// or https:// URL prefixes"))
        << bad;
    EXPECT_THAT(message, HasSubstr(std::string("\"") + bad + "\"")) << "names the entry: " << message;
    EXPECT_THAT(message, ::testing::Not(HasSubstr("ok.example.com"))) << message;
  }
  MsgpackWriter wrong_type;
  wrong_type.Map(1).Str("image_source_allowlist").Str("https://images.example.com/");
  EXPECT_THAT(std::string(DecodePluginConfig(wrong_type.bytes()).status().message()),
              HasSubstr("\"image_source_allowlist\" must be a list of strings"));
}

// --- bridge networking ---------------------------------------------------------

TEST(PluginConfig, BridgesAllowlist) {
  const auto spec = PluginConfigSpec();
  EXPECT_EQ(spec.object().attributes().at("bridges_allowlist").attr().type(), "list(string)");
  MsgpackWriter w;
  w.Map(1).Str("bridges_allowlist").Array(2).Str("br0").Str("virbr-1.2_x");
  const absl::StatusOr<PluginConfig> config = DecodePluginConfig(w.bytes());
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->bridges_allowlist, (std::vector<std::string>{"br0", "virbr-1.2_x"}));
  EXPECT_TRUE(DecodePluginConfig("")->bridges_allowlist.empty()) << "off unless the operator lists bridges";
}

TEST(PluginConfig, BridgesAllowlistEntriesAreInterfaceNames) {
  for (const std::string& bad : std::vector<std::string>{"", "br0,x", "a/b", std::string(16, 'b'), "br 0", ".."}) {
    MsgpackWriter w;
    w.Map(1).Str("bridges_allowlist").Array(1).Str(bad);
    const absl::StatusOr<PluginConfig> config = DecodePluginConfig(w.bytes());
    ASSERT_FALSE(config.ok()) << bad;
    EXPECT_THAT(std::string(config.status().message()), HasSubstr("\"bridges_allowlist\" entries must be interface names"));
  }
}

}  // namespace
}  // namespace ndq
