// The go-plugin handshake: the magic cookie, protocol version negotiation and
// the one line a plugin prints on stdout so its host can connect.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace nomadplugin {

// go-plugin's own wire protocol version, the first field of the handshake line.
inline constexpr int kCoreProtocolVersion = 1;

struct HandshakeConfig {
  std::string cookie_key;
  std::string cookie_value;
  // Application protocol versions this plugin speaks, any order.
  std::vector<int> app_versions;
};

// Nomad's values: the cookie every Nomad plugin checks, and app protocol 2.
HandshakeConfig NomadHandshake();

// OK when `env_value` (null when the variable is unset) equals the cookie.
bool CookieMatches(const HandshakeConfig& config, const char* env_value);

// The message a person sees when they run the plugin by hand.
std::string CookieMismatchMessage(const HandshakeConfig& config, std::string_view plugin_name);

// Picks the highest version both sides speak. `env_value` is the host's
// comma-separated PLUGIN_PROTOCOL_VERSIONS (null or empty: the host predates the
// list, so our highest version is offered). No common version is an error.
absl::StatusOr<int> NegotiateAppVersion(const HandshakeConfig& config, const char* env_value);

struct HandshakeLine {
  int core_version = 0;
  int app_version = 0;
  std::string network;   // "unix" or "tcp"
  std::string address;   // socket path or host:port
  std::string protocol;  // "grpc"
};

// "1|2|unix|/path|grpc|\n": the sixth (TLS certificate) field stays empty.
std::string FormatHandshakeLine(const HandshakeLine& line);

// Parses what a plugin printed; the trailing newline and certificate field are optional.
absl::StatusOr<HandshakeLine> ParseHandshakeLine(std::string_view text);

}  // namespace nomadplugin
