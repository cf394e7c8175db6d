#include "policy/source_policy.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <netinet/in.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace ndq {
namespace {

struct CurlUrlDeleter {
  void operator()(CURLU* u) const { curl_url_cleanup(u); }
};

// A URL as libcurl's parser took it apart.
struct ParsedUrl {
  UrlPrefix parts;
  bool has_login = false;  // user, password or login options
  bool has_query = false;
  bool has_fragment = false;
  std::string normalised;  // what libcurl makes of the whole URL again
};

// One part of `u`; nullopt when the URL has none.
absl::StatusOr<std::optional<std::string>> Part(CURLU* u, CURLUPart what, unsigned int flags) {
  char* out = nullptr;
  const CURLUcode rc = curl_url_get(u, what, &out, flags);
  if (rc == CURLUE_OK) {
    std::string value(out);
    curl_free(out);
    return value;
  }
  switch (rc) {
    case CURLUE_NO_USER:
    case CURLUE_NO_PASSWORD:
    case CURLUE_NO_OPTIONS:
    case CURLUE_NO_PORT:
    case CURLUE_NO_QUERY:
    case CURLUE_NO_FRAGMENT:
    case CURLUE_NO_ZONEID:
      return std::nullopt;
    default:
      return absl::InvalidArgumentError(curl_url_strerror(rc));
  }
}

// Lowercase, one trailing dot dropped ("example.com." is the same name), IPv6
// literals in canonical form ("[0:0::1]" is "[::1]"), a zone id kept.
std::string NormaliseHost(std::string host, const std::optional<std::string>& zone) {
  host = absl::AsciiStrToLower(host);
  if (absl::EndsWith(host, ".")) host.pop_back();
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') {
    std::string inner = host.substr(1, host.size() - 2);
    inner = inner.substr(0, inner.find('%'));  // libcurl may include the zone id here too
    in6_addr a;
    char text[INET6_ADDRSTRLEN];
    if (::inet_pton(AF_INET6, inner.c_str(), &a) == 1 && ::inet_ntop(AF_INET6, &a, text, sizeof text) != nullptr) {
      inner = text;
    }
    host = absl::StrCat("[", inner, zone ? absl::StrCat("%", absl::AsciiStrToLower(*zone)) : "", "]");
  }
  return host;
}

absl::StatusOr<ParsedUrl> Parse(const std::string& url) {
  std::unique_ptr<CURLU, CurlUrlDeleter> u(curl_url());
  if (!u) return absl::InternalError("curl_url failed");
  // No CURLU_NON_SUPPORT_SCHEME, no scheme guessing: "example.com/x" is no URL here.
  if (const CURLUcode rc = curl_url_set(u.get(), CURLUPART_URL, url.c_str(), 0); rc != CURLUE_OK) {
    return absl::InvalidArgumentError(absl::StrCat("\"", url, "\" is not a valid URL (", curl_url_strerror(rc), ")"));
  }
  ParsedUrl parsed;
  auto get = [&](CURLUPart what, unsigned int flags) -> absl::StatusOr<std::optional<std::string>> {
    absl::StatusOr<std::optional<std::string>> part = Part(u.get(), what, flags);
    if (!part.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("\"", url, "\" is not a valid URL (", part.status().message(), ")"));
    }
    return part;
  };
  absl::StatusOr<std::optional<std::string>> scheme = get(CURLUPART_SCHEME, 0);
  if (!scheme.ok()) return scheme.status();
  parsed.parts.scheme = absl::AsciiStrToLower(scheme->value_or(""));
  if (parsed.parts.scheme != "http" && parsed.parts.scheme != "https") {
    return absl::InvalidArgumentError(
        absl::StrCat("\"", url, "\" is not an http:// or https:// URL (scheme \"", parsed.parts.scheme, "\")"));
  }
  absl::StatusOr<std::optional<std::string>> host = get(CURLUPART_HOST, 0);
  if (!host.ok()) return host.status();
  if (!host->has_value() || (*host)->empty()) {
    return absl::InvalidArgumentError(absl::StrCat("\"", url, "\" names no host"));
  }
  absl::StatusOr<std::optional<std::string>> zone = get(CURLUPART_ZONEID, 0);
  if (!zone.ok()) return zone.status();
  parsed.parts.host = NormaliseHost(**host, *zone);
  absl::StatusOr<std::optional<std::string>> port = get(CURLUPART_PORT, CURLU_DEFAULT_PORT);
  if (!port.ok()) return port.status();
  parsed.parts.port = port->value_or("");
  // Decoded, so "%2e%2e" is seen as the ".." a server may make of it; libcurl
  // refuses to decode control characters (%00) here.
  absl::StatusOr<std::optional<std::string>> path = get(CURLUPART_PATH, CURLU_URLDECODE);
  if (!path.ok()) return path.status();
  parsed.parts.path = path->value_or("/");
  if (parsed.parts.path.empty() || parsed.parts.path[0] != '/') parsed.parts.path.insert(0, "/");
  for (CURLUPart login : {CURLUPART_USER, CURLUPART_PASSWORD, CURLUPART_OPTIONS}) {
    absl::StatusOr<std::optional<std::string>> p = get(login, 0);
    if (!p.ok()) return p.status();
    parsed.has_login = parsed.has_login || p->has_value();
  }
  absl::StatusOr<std::optional<std::string>> query = get(CURLUPART_QUERY, 0);
  if (!query.ok()) return query.status();
  parsed.has_query = query->has_value();
  absl::StatusOr<std::optional<std::string>> fragment = get(CURLUPART_FRAGMENT, 0);
  if (!fragment.ok()) return fragment.status();
  parsed.has_fragment = fragment->has_value();
  absl::StatusOr<std::optional<std::string>> whole = get(CURLUPART_URL, 0);
  if (!whole.ok()) return whole.status();
  parsed.normalised = whole->value_or(url);
  return parsed;
}

// Whether `host` (normalised) is an IP literal, and which.
bool HostAddress(const std::string& host, IpAddress* out) {
  in_addr v4;
  if (::inet_pton(AF_INET, host.c_str(), &v4) == 1) {
    out->fill(0);
    (*out)[10] = 0xff;
    (*out)[11] = 0xff;
    std::memcpy(out->data() + 12, &v4, 4);
    return true;
  }
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') {
    const std::string inner = host.substr(1, host.find('%') == std::string::npos ? host.size() - 2 : host.find('%') - 1);
    in6_addr v6;
    if (::inet_pton(AF_INET6, inner.c_str(), &v6) == 1) {
      std::memcpy(out->data(), &v6, 16);
      return true;
    }
  }
  return false;
}

// Path segments "." or ".." (only possible here when percent-encoded: libcurl
// removes literal ones) or backslashes, which servers may resolve to a path
// outside the prefix after the prefix was checked.
bool HasAmbiguousSegments(const std::string& path) {
  if (path.find('\\') != std::string::npos) return true;
  for (absl::string_view segment : absl::StrSplit(path, '/')) {
    if (segment == "." || segment == "..") return true;
  }
  return false;
}

bool PathUnder(const std::string& path, const std::string& prefix) {
  if (prefix == "/") return true;
  // A prefix without a trailing slash covers whole segments: /vm covers /vm and
  // /vm/x, not /vm-other.
  if (absl::EndsWith(prefix, "/")) return absl::StartsWith(path, prefix);
  return path == prefix || absl::StartsWith(path, prefix + "/");
}

}  // namespace

absl::StatusOr<UrlPrefix> ParseUrlPrefix(const std::string& entry) {
  absl::StatusOr<ParsedUrl> parsed = Parse(entry);
  if (!parsed.ok()) return parsed.status();
  if (parsed->has_login) {
    return absl::InvalidArgumentError(absl::StrCat("\"", entry, "\" must not hold a user name or password"));
  }
  if (parsed->has_query || parsed->has_fragment) {
    return absl::InvalidArgumentError(absl::StrCat("\"", entry, "\" must not hold a query or fragment"));
  }
  if (HasAmbiguousSegments(parsed->parts.path)) {
    return absl::InvalidArgumentError(absl::StrCat("\"", entry, "\" has a . or .. path segment or a backslash"));
  }
  return parsed->parts;
}

bool IsLinkLocal(const IpAddress& a) {
  static constexpr uint8_t kMapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  if (std::memcmp(a.data(), kMapped, sizeof kMapped) == 0) return a[12] == 169 && a[13] == 254;
  return a[0] == 0xfe && (a[1] & 0xc0) == 0x80;
}

bool AddressOf(const sockaddr* addr, IpAddress* out) {
  if (addr == nullptr) return false;
  if (addr->sa_family == AF_INET) {
    const auto* v4 = reinterpret_cast<const sockaddr_in*>(addr);
    out->fill(0);
    (*out)[10] = 0xff;
    (*out)[11] = 0xff;
    std::memcpy(out->data() + 12, &v4->sin_addr, 4);
    return true;
  }
  if (addr->sa_family == AF_INET6) {
    std::memcpy(out->data(), &reinterpret_cast<const sockaddr_in6*>(addr)->sin6_addr, 16);
    return true;
  }
  return false;
}

std::string AddressText(const IpAddress& a) {
  char text[INET6_ADDRSTRLEN] = "";
  static constexpr uint8_t kMapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  if (std::memcmp(a.data(), kMapped, sizeof kMapped) == 0) {
    ::inet_ntop(AF_INET, a.data() + 12, text, sizeof text);
  } else {
    ::inet_ntop(AF_INET6, a.data(), text, sizeof text);
  }
  return text;
}

absl::StatusOr<NetworkSourcePolicy> NetworkSourcePolicy::Create(const std::vector<std::string>& allowlist) {
  NetworkSourcePolicy policy;
  for (const std::string& entry : allowlist) {
    absl::StatusOr<UrlPrefix> prefix = ParseUrlPrefix(entry);
    if (!prefix.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("plugin config \"image_source_allowlist\": ", prefix.status().message()));
    }
    IpAddress address;
    if (HostAddress(prefix->host, &address)) policy.named_addresses_.push_back(address);
    policy.prefixes_.push_back(*std::move(prefix));
  }
  return policy;
}

bool NetworkSourcePolicy::Matches(const UrlPrefix& url) const {
  return std::any_of(prefixes_.begin(), prefixes_.end(), [&](const UrlPrefix& p) {
    return p.scheme == url.scheme && p.host == url.host && p.port == url.port && PathUnder(url.path, p.path);
  });
}

absl::StatusOr<std::string> NetworkSourcePolicy::Admit(const std::string& url) const {
  absl::StatusOr<ParsedUrl> parsed = Parse(url);
  if (!parsed.ok()) return parsed.status();
  if (!prefixes_.empty()) {
    if (HasAmbiguousSegments(parsed->parts.path)) {
      return absl::PermissionDeniedError(absl::StrCat(
          "\"", url, "\" has an encoded . or .. path segment or a backslash, refused with image_source_allowlist set"));
    }
    if (!Matches(parsed->parts)) {
      return absl::PermissionDeniedError(
          absl::StrCat("\"", url, "\" matches no prefix in the plugin config's image_source_allowlist"));
    }
  }
  IpAddress address;
  if (HostAddress(parsed->parts.host, &address) && !MayConnect(address)) {
    return absl::PermissionDeniedError(absl::StrCat("\"", url, "\": the address ", AddressText(address),
                                                    " is link-local and refused"));
  }
  return parsed->normalised;
}

bool NetworkSourcePolicy::MayConnect(const IpAddress& address) const {
  if (!IsLinkLocal(address)) return true;
  return std::find(named_addresses_.begin(), named_addresses_.end(), address) != named_addresses_.end();
}

}  // namespace ndq
