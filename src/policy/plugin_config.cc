#include "policy/plugin_config.h"

#include <pwd.h>

#include "nomadplugin/config_reader.h"
#include "policy/source_policy.h"

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

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
      {"allow_unverified_images", hs::Attr("allow_unverified_images", "bool")},
      {"max_image_size", hs::Attr("max_image_size", "string")},
      {"image_cache_max_size", hs::Attr("image_cache_max_size", "string")},
      {"ca_file", hs::Attr("ca_file", "string")},
      {"image_source_allowlist", hs::Attr("image_source_allowlist", "list(string)")},
      {"cgroup_parent", hs::Default(hs::Attr("cgroup_parent", "string"), hs::Literal("\"nomad\""))},
      {"memory_overhead", hs::Default(hs::Attr("memory_overhead", "string"), hs::Literal("\"128MiB\""))},
      {"pids_limit", hs::Default(hs::Attr("pids_limit", "number"), hs::Literal("1024"))},
      {"sandbox", hs::Default(hs::Attr("sandbox", "bool"), hs::Literal("true"))},
      {"qemu_user", hs::Attr("qemu_user", "string")},
      {"bridges_allowlist", hs::Attr("bridges_allowlist", "list(string)")},
  });
}

absl::StatusOr<int64_t> ParseSize(const std::string& text) {
  absl::string_view rest = absl::StripAsciiWhitespace(text);
  const size_t end = rest.find_first_not_of("0123456789.");
  double number = 0;
  if (end == 0 || !absl::SimpleAtod(rest.substr(0, end), &number) || number < 0) {
    return absl::InvalidArgumentError(absl::StrCat("\"", text, "\" is not a size (e.g. 20G, 512M)"));
  }
  std::string unit = absl::AsciiStrToUpper(end == absl::string_view::npos ? "" : rest.substr(end));
  if (absl::EndsWith(unit, "IB")) unit.resize(unit.size() - 2);
  else if (unit.size() > 1 && absl::EndsWith(unit, "B")) unit.pop_back();
  double scale = 1;
  if (unit == "" || unit == "B") scale = 1;
  else if (unit == "K") scale = 1024.0;
  else if (unit == "M") scale = 1024.0 * 1024;
  else if (unit == "G") scale = 1024.0 * 1024 * 1024;
  else if (unit == "T") scale = 1024.0 * 1024 * 1024 * 1024;
  else return absl::InvalidArgumentError(absl::StrCat("\"", text, "\" has an unknown size unit (use K, M, G or T)"));
  const double bytes = number * scale;
  if (bytes > 9.0e18) return absl::InvalidArgumentError(absl::StrCat("\"", text, "\" is too large"));
  return static_cast<int64_t>(bytes);
}

bool IsInterfaceName(const std::string& name) {
  // IFNAMSIZ is 16 with the NUL; "." and ".." are not names; the kernel also
  // refuses '/', ':' and whitespace, and we keep to a plain set.
  if (name.empty() || name.size() > 15 || name == "." || name == "..") return false;
  for (char c : name) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') return false;
  }
  return true;
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
  config.allow_unverified_images = reader->Bool("allow_unverified_images").value_or(false);
  config.ca_file = reader->String("ca_file").value_or("");
  config.sandbox = reader->Bool("sandbox").value_or(true);
  config.qemu_user = reader->String("qemu_user").value_or("");
  if (!config.qemu_user.empty()) {
    passwd entry{};
    passwd* found = nullptr;
    char buf[4096];
    if (::getpwnam_r(config.qemu_user.c_str(), &entry, buf, sizeof buf, &found) != 0 || found == nullptr) {
      reader->AddProblem("qemu_user", "user \"" + config.qemu_user + "\" does not exist on this host");
    } else if (found->pw_uid == 0) {
      reader->AddProblem("qemu_user", "\"" + config.qemu_user + "\" is root; name an unprivileged user");
    }
  }
  config.image_source_allowlist = reader->StringList("image_source_allowlist").value_or(std::vector<std::string>{});
  for (const std::string& entry : config.image_source_allowlist) {
    absl::StatusOr<UrlPrefix> prefix = ParseUrlPrefix(entry);
    if (!prefix.ok()) {
      reader->AddProblem("image_source_allowlist",
                         absl::StrCat("entries must be http:// or https:// URL prefixes with a host: ",
                                      prefix.status().message()));
    }
  }
  config.cgroup_parent = reader->String("cgroup_parent").value_or(config.cgroup_parent);
  if (config.cgroup_parent.empty() || config.cgroup_parent[0] == '/' || absl::StrContains(config.cgroup_parent, "..")) {
    reader->AddProblem("cgroup_parent", "must be a relative cgroup path such as \"nomad\" (no leading / or ..), got \"" +
                                            config.cgroup_parent + "\"");
  }
  if (std::optional<int64_t> pids = reader->Integer("pids_limit")) {
    if (*pids < 0) reader->AddProblem("pids_limit", "must be 0 (no limit) or more");
    else config.pids_limit = *pids;
  }
  for (const auto& [field, target] : {std::pair<const char*, int64_t*>{"max_image_size", &config.max_image_size},
                                      {"image_cache_max_size", &config.image_cache_max_size},
                                      {"memory_overhead", &config.memory_overhead}}) {
    if (std::optional<std::string> text = reader->String(field)) {
      absl::StatusOr<int64_t> bytes = ParseSize(*text);
      if (bytes.ok()) *target = *bytes;
      else reader->AddProblem(field, std::string(bytes.status().message()));
    }
  }
  // Leaves room for "/<16 hex>/run/qmp.sock" under the 108-byte unix socket limit.
  constexpr size_t kMaxStateDir = 70;
  if (config.state_dir.size() > kMaxStateDir) {
    reader->AddProblem("state_dir", "is longer than 70 characters, too long for the VMs' unix sockets");
  }
  for (const auto& [field, value] : {std::pair<const char*, const std::string*>{"image_cache_dir", &config.image_cache_dir},
                                     {"state_dir", &config.state_dir},
                                     {"supervisor_path", &config.supervisor_path},
                                     {"ca_file", &config.ca_file}}) {
    if (!value->empty() && (*value)[0] != '/') {
      reader->AddProblem(field, "must be an absolute path, got \"" + *value + "\"");
    }
  }
  config.bridges_allowlist = reader->StringList("bridges_allowlist").value_or(std::vector<std::string>{});
  for (const std::string& bridge : config.bridges_allowlist) {
    if (!IsInterfaceName(bridge)) {
      reader->AddProblem("bridges_allowlist", "entries must be interface names (1-15 of A-Z a-z 0-9 . _ -), got \"" +
                                                  bridge + "\"");
    }
  }
  for (const std::string& path : config.image_paths) {
    if (path.empty() || path[0] != '/') reader->AddProblem("image_paths", "entries must be absolute paths, got \"" + path + "\"");
  }
  if (absl::Status status = reader->status(); !status.ok()) return status;
  return config;
}

}  // namespace ndq
