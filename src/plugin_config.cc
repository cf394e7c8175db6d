#include "qemu_driver/plugin_config.h"

#include "nomadplugin/config_reader.h"

namespace ndq {

namespace hs = nomadplugin::hclspec;

nomadplugin::hclspec::Spec PluginConfigSpec() {
  return hs::Object({
      {"image_paths", hs::Attr("image_paths", "list(string)")},
      {"args_allowlist", hs::Attr("args_allowlist", "list(string)")},
      {"emulators_allowlist", hs::Attr("emulators_allowlist", "list(string)")},
      {"image_cache_dir", hs::Attr("image_cache_dir", "string")},
  });
}

absl::StatusOr<PluginConfig> DecodePluginConfig(const std::string& msgpack) {
  absl::StatusOr<nomadplugin::ConfigReader> reader =
      nomadplugin::ConfigReader::FromMsgpack(msgpack, "plugin config");
  if (!reader.ok()) return reader.status();
  PluginConfig config;
  config.image_paths = reader->StringList("image_paths").value_or(std::vector<std::string>{});
  config.args_allowlist = reader->StringList("args_allowlist").value_or(std::vector<std::string>{});
  config.emulators_allowlist = reader->StringList("emulators_allowlist").value_or(std::vector<std::string>{});
  config.image_cache_dir = reader->String("image_cache_dir").value_or("");
  for (const std::string& path : config.image_paths) {
    if (path.empty() || path[0] != '/') reader->AddProblem("image_paths", "entries must be absolute paths, got \"" + path + "\"");
  }
  if (!config.image_cache_dir.empty() && config.image_cache_dir[0] != '/') {
    reader->AddProblem("image_cache_dir", "must be an absolute path, got \"" + config.image_cache_dir + "\"");
  }
  if (absl::Status status = reader->status(); !status.ok()) return status;
  return config;
}

}  // namespace ndq
