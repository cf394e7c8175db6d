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
      {"state_dir", hs::Attr("state_dir", "string")},
      {"supervisor_path", hs::Attr("supervisor_path", "string")},
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
  config.state_dir = reader->String("state_dir").value_or("");
  config.supervisor_path = reader->String("supervisor_path").value_or("");
  // Leaves room for "/<16 hex>/qmp.sock" under the 108-byte unix socket limit.
  constexpr size_t kMaxStateDir = 80;
  if (config.state_dir.size() > kMaxStateDir) {
    reader->AddProblem("state_dir", "is longer than 80 characters, too long for the VMs' unix sockets");
  }
  for (const auto& [field, value] : {std::pair<const char*, const std::string*>{"image_cache_dir", &config.image_cache_dir},
                                     {"state_dir", &config.state_dir},
                                     {"supervisor_path", &config.supervisor_path}}) {
    if (!value->empty() && (*value)[0] != '/') {
      reader->AddProblem(field, "must be an absolute path, got \"" + *value + "\"");
    }
  }
  for (const std::string& path : config.image_paths) {
    if (path.empty() || path[0] != '/') reader->AddProblem("image_paths", "entries must be absolute paths, got \"" + path + "\"");
  }
  if (absl::Status status = reader->status(); !status.ok()) return status;
  return config;
}

}  // namespace ndq
