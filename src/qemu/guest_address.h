// The guest's own IPv4 address on a NIC, as its guest agent reports it
// (guest-network-get-interfaces), for advertise_address.
#pragma once

#include <sys/types.h>

#include <functional>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace ndq {

// The first IPv4 address of the interface whose hardware-address is `mac`
// (any case) in a guest-network-get-interfaces reply; link-local
// (169.254/16) and malformed addresses are skipped. The reply comes from the
// guest: anything unexpected in it is ignored, never trusted.
std::optional<std::string> GuestIpv4ForMac(const nlohmann::json& interfaces, const std::string& mac);

struct GuestAddressWait {
  std::string agent_socket;
  pid_t qemu_pid = 0;   // the agent's socket must be served by this process
  int qemu_pidfd = -1;  // readable once QEMU has exited: the wait ends at once
  std::string mac;
  absl::Time deadline;
  std::function<bool()> cancelled;  // may be empty
};

// Asks the agent until it reports an IPv4 address for the NIC, QEMU exits,
// the caller gives up (Cancelled) or the deadline passes (DeadlineExceeded
// naming what was last seen). Between attempts it waits on QEMU's pidfd
// with a backoff from 100 ms to 1 s: the agent has no event for a new lease.
absl::StatusOr<std::string> AwaitGuestAddress(const GuestAddressWait& wait);

}  // namespace ndq
