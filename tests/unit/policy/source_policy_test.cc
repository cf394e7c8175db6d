#include "policy/source_policy.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace ndq {
namespace {

using ::testing::HasSubstr;

NetworkSourcePolicy Policy(const std::vector<std::string>& allowlist) {
  absl::StatusOr<NetworkSourcePolicy> policy = NetworkSourcePolicy::Create(allowlist);
  EXPECT_TRUE(policy.ok()) << policy.status();
  return *policy;
}

IpAddress V4(const char* text) {
  sockaddr_in sin{};
  sin.sin_family = AF_INET;
  EXPECT_EQ(::inet_pton(AF_INET, text, &sin.sin_addr), 1) << text;
  IpAddress out;
  EXPECT_TRUE(AddressOf(reinterpret_cast<const sockaddr*>(&sin), &out));
  return out;
}

IpAddress V6(const char* text) {
  sockaddr_in6 sin6{};
  sin6.sin6_family = AF_INET6;
  EXPECT_EQ(::inet_pton(AF_INET6, text, &sin6.sin6_addr), 1) << text;
  IpAddress out;
  EXPECT_TRUE(AddressOf(reinterpret_cast<const sockaddr*>(&sin6), &out));
  return out;
}

TEST(UrlPrefix, ParsedAndNormalised) {
  absl::StatusOr<UrlPrefix> p = ParseUrlPrefix("HTTPS://Images.Example.COM./vm%20images/");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->scheme, "https");
  EXPECT_EQ(p->host, "images.example.com");
  EXPECT_EQ(p->port, "443");
  EXPECT_EQ(p->path, "/vm images/");
  p = ParseUrlPrefix("http://[0:0::1]:8080");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->host, "[::1]");
  EXPECT_EQ(p->port, "8080");
  EXPECT_EQ(p->path, "/");
}

TEST(UrlPrefix, RefusesWhatIsNoHttpPrefix) {
  for (const char* bad : {"ftp://example.com/", "file:///srv/images", "example.com/images", "/srv/images", "",
                          "http://", "https://user:pw@example.com/", "http://example.com/?x=1",
                          "http://example.com/#frag", "http://example.com:99999/", "http://exa mple.com/",
                          "http://example.com/a/%2e%2e/b"}) {
    absl::StatusOr<UrlPrefix> p = ParseUrlPrefix(bad);
    EXPECT_FALSE(p.ok()) << bad << " parsed as " << (p.ok() ? p->scheme + "://" + p->host + p->path : "");
    if (!p.ok() && *bad != '\0') {
      EXPECT_THAT(std::string(p.status().message()), HasSubstr(bad));
    }
  }
}

TEST(NetworkSourcePolicy, EmptyAllowlistAdmitsAnyHttpUrl) {
  const NetworkSourcePolicy policy = Policy({});
  EXPECT_TRUE(policy.Admit("http://example.com/a.img").ok());
  EXPECT_TRUE(policy.Admit("https://example.com:8443/a.img?sig=1").ok());
  absl::StatusOr<std::string> r = policy.Admit("ftp://example.com/a.img");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("not an http:// or https:// URL"));
}

TEST(NetworkSourcePolicy, PrefixMatchingIsOnParsedUrls) {
  const NetworkSourcePolicy policy = Policy({"http://good.example.com/images/", "https://mirror.example.org/vm"});
  for (const char* ok : {"http://good.example.com/images/a.img", "HTTP://GOOD.example.com/images/a.img",
                         "http://good.example.com:80/images/a.img", "http://good.example.com./images/a.img",
                         "http://good.example.com/images/sub/../a.img", "https://mirror.example.org/vm",
                         "https://mirror.example.org/vm/a.img", "https://mirror.example.org:443/vm/x?token=1"}) {
    absl::StatusOr<std::string> r = policy.Admit(ok);
    EXPECT_TRUE(r.ok()) << ok << ": " << r.status();
  }
  for (const char* bad : {
           "http://good.example.com@evil.example.net/images/a.img",  // user "good.example.com" on host evil
           "http://good.example.com.evil.org/images/a.img",          // host suffix
           "http://good.example.com:8080/images/a.img",              // another port
           "https://good.example.com/images/a.img",                  // another scheme
           "http://good.example.com/imagesX/a.img",                  // the path prefix ends in /
           "http://good.example.com/images/../secret.img",           // leaves the prefix once normalised
           "http://good.example.com/images/%2e%2e/secret.img",       // the same, encoded
           "http://good.example.com/images/..%2fsecret.img",
           "http://good.example.com/images\\..\\secret.img",
           "https://mirror.example.org/vm-other/a.img",              // /vm covers whole segments only
           "http://evil.example.net/http://good.example.com/images/a.img",
           "http://evil.example.net#@good.example.com/images/a.img",
       }) {
    absl::StatusOr<std::string> r = policy.Admit(bad);
    EXPECT_FALSE(r.ok()) << bad << " admitted as " << (r.ok() ? *r : "");
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), absl::StatusCode::kPermissionDenied) << bad << ": " << r.status();
    }
  }
  absl::StatusOr<std::string> r = policy.Admit("http://good.example.com.evil.org/images/a.img");
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("image_source_allowlist"));
}

TEST(NetworkSourcePolicy, AdmitReturnsTheUrlAsChecked) {
  const NetworkSourcePolicy policy = Policy({"http://good.example.com/images/"});
  absl::StatusOr<std::string> r = policy.Admit("http://good.example.com/images/sub/../a.img");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, "http://good.example.com/images/a.img");
}

TEST(NetworkSourcePolicy, LinkLocalAddresses) {
  EXPECT_TRUE(IsLinkLocal(V4("169.254.169.254")));
  EXPECT_TRUE(IsLinkLocal(V4("169.254.0.1")));
  EXPECT_FALSE(IsLinkLocal(V4("169.253.255.255")));
  EXPECT_FALSE(IsLinkLocal(V4("127.0.0.1")));
  EXPECT_FALSE(IsLinkLocal(V4("10.0.0.1")));
  EXPECT_TRUE(IsLinkLocal(V6("fe80::1")));
  EXPECT_TRUE(IsLinkLocal(V6("febf:ffff::1")));
  EXPECT_FALSE(IsLinkLocal(V6("fec0::1")));
  EXPECT_TRUE(IsLinkLocal(V6("::ffff:169.254.169.254")));
  EXPECT_FALSE(IsLinkLocal(V6("::ffff:127.0.0.1")));
  EXPECT_FALSE(IsLinkLocal(V6("::1")));
  EXPECT_EQ(AddressText(V6("::ffff:169.254.169.254")), "169.254.169.254");
  EXPECT_EQ(AddressText(V6("fe80::1")), "fe80::1");

  const NetworkSourcePolicy any = Policy({});
  EXPECT_FALSE(any.MayConnect(V4("169.254.169.254")));
  EXPECT_FALSE(any.MayConnect(V6("::ffff:169.254.169.254")));
  EXPECT_FALSE(any.MayConnect(V6("fe80::1")));
  EXPECT_TRUE(any.MayConnect(V4("127.0.0.1")));
  EXPECT_TRUE(any.MayConnect(V6("::1")));
  for (const char* url : {"http://169.254.169.254/latest/meta-data/", "http://[::ffff:169.254.169.254]/",
                          "http://[fe80::1]/x", "http://0xa9fea9fe/", "http://2852039166/"}) {
    absl::StatusOr<std::string> r = any.Admit(url);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kPermissionDenied) << url << ": " << r.status();
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("is link-local and refused")) << url;
  }
}

TEST(NetworkSourcePolicy, AnAllowlistEntryNamingTheAddressAllowsIt) {
  const NetworkSourcePolicy policy = Policy({"http://169.254.77.1:8080/", "http://[fe80::7]/", "http://named.test/"});
  EXPECT_TRUE(policy.MayConnect(V4("169.254.77.1")));
  EXPECT_TRUE(policy.MayConnect(V6("::ffff:169.254.77.1")));
  EXPECT_TRUE(policy.MayConnect(V6("fe80::7")));
  EXPECT_FALSE(policy.MayConnect(V4("169.254.77.2")));
  EXPECT_FALSE(policy.MayConnect(V6("fe80::8")));
  EXPECT_TRUE(policy.Admit("http://169.254.77.1:8080/a.img").ok());
  EXPECT_TRUE(policy.Admit("http://[fe80::7]/a.img").ok());
}

TEST(NetworkSourcePolicy, BadEntryNamesTheField) {
  absl::StatusOr<NetworkSourcePolicy> policy = NetworkSourcePolicy::Create({"http://ok.example.com/", "ftp://x/"});
  ASSERT_FALSE(policy.ok());
  EXPECT_THAT(std::string(policy.status().message()), HasSubstr("image_source_allowlist"));
  EXPECT_THAT(std::string(policy.status().message()), HasSubstr("ftp://x/"));
}

}  // namespace
}  // namespace ndq
