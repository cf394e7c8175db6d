#include "qemu/guest_address.h"

#include <gtest/gtest.h>

namespace ndq {
namespace {

// The shape of qemu-ga 7.2's guest-network-get-interfaces reply.
nlohmann::json Reply() {
  return nlohmann::json::parse(R"([
    {"name": "lo", "hardware-address": "00:00:00:00:00:00",
     "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}]},
    {"name": "eth0", "hardware-address": "02:1a:2b:3c:4d:5e",
     "ip-addresses": [{"ip-address-type": "ipv6", "ip-address": "fe80::1a:2bff:fe3c:4d5e", "prefix": 64},
                      {"ip-address-type": "ipv4", "ip-address": "169.254.7.7", "prefix": 16},
                      {"ip-address-type": "ipv4", "ip-address": "10.213.0.57", "prefix": 24}],
     "statistics": {"rx-bytes": 1}}])");
}

TEST(GuestIpv4ForMac, FindsTheNicByMacAnyCase) {
  EXPECT_EQ(GuestIpv4ForMac(Reply(), "02:1a:2b:3c:4d:5e"), "10.213.0.57");
  EXPECT_EQ(GuestIpv4ForMac(Reply(), "02:1A:2B:3C:4D:5E"), "10.213.0.57");
  EXPECT_EQ(GuestIpv4ForMac(Reply(), "02:00:00:00:00:01"), std::nullopt);
}

TEST(GuestIpv4ForMac, NoAddressYet) {
  nlohmann::json reply = Reply();
  reply[1]["ip-addresses"].erase(2);
  EXPECT_EQ(GuestIpv4ForMac(reply, "02:1a:2b:3c:4d:5e"), std::nullopt) << "link-local is no address to advertise";
  reply[1].erase("ip-addresses");
  EXPECT_EQ(GuestIpv4ForMac(reply, "02:1a:2b:3c:4d:5e"), std::nullopt);
}

// The reply comes from the guest: junk is skipped, never trusted.
TEST(GuestIpv4ForMac, HostileRepliesAreIgnored) {
  for (const char* text : {R"("not a list")", R"([1, null, "x"])",
                           R"([{"hardware-address": 5, "ip-addresses": []}])",
                           R"([{"hardware-address": "02:1a:2b:3c:4d:5e", "ip-addresses": "10.0.0.1"}])",
                           R"([{"hardware-address": "02:1a:2b:3c:4d:5e", "ip-addresses": [
                               {"ip-address-type": "ipv4", "ip-address": "10.0.0.1; rm -rf /"},
                               {"ip-address-type": "ipv4", "ip-address": 167772161},
                               {"ip-address-type": "ipv4", "ip-address": "0.0.0.0"}]}])"}) {
    EXPECT_EQ(GuestIpv4ForMac(nlohmann::json::parse(text), "02:1a:2b:3c:4d:5e"), std::nullopt) << text;
  }
}

}  // namespace
}  // namespace ndq
