// TAP devices for network_mode = "bridge": made through /dev/net/tun,
// attached to a host bridge with ioctls, handed to QEMU as an open fd.
//
// A TAP made here is not persistent: the kernel removes it when the last fd
// on it closes. The driver and the supervisor close their copies once QEMU
// has its own, so the TAP lives exactly as long as QEMU, also when the plugin
// crashes. DeleteTap removes a leftover of the same name all the same
// (destroy, recovery), for a TAP someone made persistent.
//
// The TAP is made in the plugin's network namespace, where the operator's
// bridges are; QEMU may run in the allocation's namespace (Nomad's group
// network bridge mode): an open TAP fd works from any namespace.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "base/unique_fd.h"

namespace ndq {

// The TAP's name for a task key (16 hex digits): "ndq" + the key's first 12,
// 15 characters (IFNAMSIZ - 1), the same after a plugin restart.
std::string TapName(const std::string& task_key);

// Makes the TAP `name` (IFF_TAP | IFF_NO_PI, not persistent), gives it the
// bridge's MTU, attaches it to `bridge` (SIOCBRADDIF) and brings it up.
// Returns the tun fd (close-on-exec); closing it removes the TAP. Fails when
// an interface of that name exists already, and when `bridge` is missing or
// not a bridge. Only ioctls: no netlink, no sysfs.
absl::StatusOr<UniqueFd> CreateBridgedTap(const std::string& name, const std::string& bridge);

// Whether a network interface `name` exists in the plugin's namespace.
bool InterfaceExists(const std::string& name);

// Removes a leftover TAP `name` that nobody holds open (e.g. made
// persistent); nothing when it does not exist. A TAP still open in a QEMU,
// or an interface of another kind, is left alone (an error says so).
absl::Status DeleteTap(const std::string& name);

}  // namespace ndq
