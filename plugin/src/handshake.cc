#include "nomadplugin/handshake.h"

#include <algorithm>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace nomadplugin {

HandshakeConfig NomadHandshake() {
  return HandshakeConfig{
      "NOMAD_PLUGIN_MAGIC_COOKIE",
      "e4327c2e01eabfd75a8a67adb114fb34a757d57eee7728d857a8cec6e91a7255",
      {2},
  };
}

bool CookieMatches(const HandshakeConfig& config, const char* env_value) {
  return env_value != nullptr && config.cookie_value == env_value;
}

std::string CookieMismatchMessage(const HandshakeConfig& config, std::string_view plugin_name) {
  return absl::StrCat(absl::string_view(plugin_name.data(), plugin_name.size()),
                      " is a Nomad plugin and is started by the Nomad client agent, not by hand: "
                      "place it in the agent's plugin_dir (",
                      config.cookie_key, " is not set to the expected value).\n");
}

absl::StatusOr<int> NegotiateAppVersion(const HandshakeConfig& config, const char* env_value) {
  if (config.app_versions.empty()) {
    return absl::InvalidArgumentError("plugin declares no protocol versions");
  }
  const int ours_max = *std::max_element(config.app_versions.begin(), config.app_versions.end());
  if (env_value == nullptr || *env_value == '\0') return ours_max;

  int best = -1;
  for (absl::string_view part : absl::StrSplit(env_value, ',', absl::SkipWhitespace())) {
    int v = 0;
    if (!absl::SimpleAtoi(part, &v)) {
      return absl::InvalidArgumentError(
          absl::StrCat("PLUGIN_PROTOCOL_VERSIONS has a non-numeric entry \"", part, "\""));
    }
    if (std::find(config.app_versions.begin(), config.app_versions.end(), v) !=
        config.app_versions.end()) {
      best = std::max(best, v);
    }
  }
  if (best < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("incompatible plugin protocol: the host speaks versions [", env_value,
                     "], this plugin speaks [", absl::StrJoin(config.app_versions, ","), "]"));
  }
  return best;
}

std::string FormatHandshakeLine(const HandshakeLine& line) {
  return absl::StrCat(line.core_version, "|", line.app_version, "|", line.network, "|",
                      line.address, "|", line.protocol, "|\n");
}

absl::StatusOr<HandshakeLine> ParseHandshakeLine(std::string_view text) {
  absl::string_view trimmed = absl::StripTrailingAsciiWhitespace(absl::string_view(text.data(), text.size()));
  std::vector<std::string> parts = absl::StrSplit(trimmed, '|');
  if (parts.size() < 4) {
    return absl::InvalidArgumentError(
        absl::StrCat("handshake line has ", parts.size(), " fields, want at least 4: \"", trimmed, "\""));
  }
  HandshakeLine line;
  if (!absl::SimpleAtoi(parts[0], &line.core_version) ||
      !absl::SimpleAtoi(parts[1], &line.app_version)) {
    return absl::InvalidArgumentError(absl::StrCat("handshake versions are not numbers: \"", trimmed, "\""));
  }
  line.network = parts[2];
  line.address = parts[3];
  // go-plugin treats a missing protocol field as its legacy net/rpc protocol.
  line.protocol = parts.size() > 4 ? parts[4] : "netrpc";
  if (line.network != "unix" && line.network != "tcp") {
    return absl::InvalidArgumentError(absl::StrCat("unknown handshake network \"", line.network, "\""));
  }
  return line;
}

}  // namespace nomadplugin
