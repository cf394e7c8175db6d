// Which network image sources a job may name (the operator's
// image_source_allowlist) and which addresses a download may connect to.
// URLs are compared after libcurl's URL parser has taken them apart, never as
// raw strings, so "http://good.example.com@evil/" (user "good.example.com" on
// host "evil") or "http://good.example.com.evil.org/" match no prefix for
// good.example.com.
#pragma once

#include <sys/socket.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace ndq {

// One image_source_allowlist entry, parsed.
struct UrlPrefix {
  std::string scheme;  // "http" or "https"
  std::string host;    // lowercased, without a trailing dot; IPv6 in brackets, canonical form
  std::string port;    // as given, else the scheme's default ("80", "443")
  std::string path;    // URL-decoded, starts with '/'
};

// An allowlist entry: http:// or https://, a host, optionally a port and a
// path; no user name or password, query or fragment. The error says what is
// wrong, without the field name (the caller names it).
absl::StatusOr<UrlPrefix> ParseUrlPrefix(const std::string& entry);

// IPv6 bytes; IPv4 addresses as IPv4-mapped (::ffff:a.b.c.d).
using IpAddress = std::array<uint8_t, 16>;

// 169.254.0.0/16 (also IPv4-mapped) or fe80::/10.
bool IsLinkLocal(const IpAddress& address);

// From a sockaddr_in or sockaddr_in6; false for other families.
bool AddressOf(const sockaddr* addr, IpAddress* out);

// "169.254.169.254", "fe80::1" (an IPv4-mapped address is shown as IPv4).
std::string AddressText(const IpAddress& address);

class NetworkSourcePolicy {
 public:
  // `allowlist` empty: any http/https URL. An entry that does not parse is an
  // InvalidArgument error naming image_source_allowlist and the entry.
  static absl::StatusOr<NetworkSourcePolicy> Create(const std::vector<std::string>& allowlist);

  // The URL to request for `url` (libcurl's normalised form of it, so what was
  // checked is what is fetched), or why it may not be fetched:
  // InvalidArgument when it is no http/https URL, PermissionDenied when no
  // allowlist prefix matches or its host is a link-local IP literal not named
  // in the allowlist. Messages name the URL, not the task config field.
  absl::StatusOr<std::string> Admit(const std::string& url) const;

  // Whether a connection to `address` may be made: anything but link-local
  // addresses, and those only when an allowlist entry's host is that address.
  bool MayConnect(const IpAddress& address) const;

 private:
  bool Matches(const UrlPrefix& url) const;

  std::vector<UrlPrefix> prefixes_;
  std::vector<IpAddress> named_addresses_;  // allowlist hosts that are IP literals
};

}  // namespace ndq
