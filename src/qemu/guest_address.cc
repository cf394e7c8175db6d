#include "qemu/guest_address.h"

#include <arpa/inet.h>
#include <poll.h>

#include <algorithm>
#include <memory>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/timeouts.h"
#include "qemu/guest_agent_client.h"

namespace ndq {
namespace {

bool IsUsableIpv4(const std::string& text) {
  in_addr addr{};
  if (::inet_pton(AF_INET, text.c_str(), &addr) != 1) return false;
  const uint32_t host = ntohl(addr.s_addr);
  return (host >> 16) != 0xA9FE && host != 0;  // not 169.254/16, not 0.0.0.0
}

std::string StringAt(const nlohmann::json& object, const char* key) {
  if (!object.is_object()) return "";
  const auto it = object.find(key);
  return it != object.end() && it->is_string() ? it->get<std::string>() : "";
}

// Waits up to `timeout` for QEMU's exit; true when it has exited.
bool QemuExitedWithin(int pidfd, absl::Duration timeout) {
  if (pidfd < 0) return false;
  pollfd p{pidfd, POLLIN, 0};
  const int ms = static_cast<int>(std::max<int64_t>(0, absl::ToInt64Milliseconds(timeout)));
  return ::poll(&p, 1, ms) > 0 && (p.revents & (POLLIN | POLLHUP)) != 0;
}

}  // namespace

std::optional<std::string> GuestIpv4ForMac(const nlohmann::json& interfaces, const std::string& mac) {
  if (!interfaces.is_array()) return std::nullopt;
  for (const nlohmann::json& nic : interfaces) {
    if (!absl::EqualsIgnoreCase(StringAt(nic, "hardware-address"), mac)) continue;
    const auto addresses = nic.find("ip-addresses");
    if (addresses == nic.end() || !addresses->is_array()) continue;
    for (const nlohmann::json& address : *addresses) {
      const std::string ip = StringAt(address, "ip-address");
      if (StringAt(address, "ip-address-type") == "ipv4" && IsUsableIpv4(ip)) return ip;
    }
  }
  return std::nullopt;
}

absl::StatusOr<std::string> AwaitGuestAddress(const GuestAddressWait& wait) {
  std::unique_ptr<GuestAgentClient> agent;
  std::string last = "the guest agent has not answered";
  absl::Duration backoff = absl::Milliseconds(100);
  while (true) {
    if (wait.cancelled && wait.cancelled()) return absl::CancelledError("StartTask was cancelled");
    const absl::Duration left = wait.deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      return absl::DeadlineExceededError(absl::StrCat("task config \"advertise_address\": the guest reported no IPv4 "
                                                      "address for its NIC ", wait.mac, " in time (", last,
                                                      "); raise advertise_timeout or check the guest's DHCP"));
    }
    // Short slices, so a caller that gives up is noticed within seconds.
    const absl::Duration slice = std::min(left, timeouts::kQmpQuick);
    if (!agent) {
      absl::StatusOr<std::unique_ptr<GuestAgentClient>> connected =
          GuestAgentClient::Connect(wait.agent_socket, slice, wait.qemu_pid);
      if (connected.ok()) agent = *std::move(connected);
      else last = std::string(connected.status().message());
    }
    if (agent) {
      absl::StatusOr<nlohmann::json> reply = agent->Execute("guest-network-get-interfaces", nullptr, slice);
      if (reply.ok()) {
        if (std::optional<std::string> ip = GuestIpv4ForMac(*reply, wait.mac)) return *ip;
        last = "the NIC has no IPv4 address yet";
      } else {
        last = std::string(reply.status().message());
        agent.reset();  // resynchronize on a fresh session
      }
    }
    if (QemuExitedWithin(wait.qemu_pidfd, std::min(backoff, wait.deadline - absl::Now()))) {
      return absl::FailedPreconditionError("QEMU exited while the driver waited for the guest's address");
    }
    backoff = std::min(backoff * 2, absl::Seconds(1));
  }
}

}  // namespace ndq
