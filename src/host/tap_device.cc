#include "host/tap_device.h"

#include <fcntl.h>
#include <net/if.h>  // before any linux/ header: glibc's ifreq, not the kernel's
#include <linux/if_tun.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "base/error_kind.h"

namespace ndq {
namespace {

// An ifreq naming `name` (at most IFNAMSIZ - 1 characters, checked by callers).
ifreq NamedRequest(const std::string& name) {
  ifreq request{};
  std::strncpy(request.ifr_name, name.c_str(), IFNAMSIZ - 1);
  return request;
}

// Attaches the TAP (which fails for anything but a bridge), gives it the
// bridge's MTU as read before (a bridge follows the smallest MTU of its
// ports, so a default-MTU TAP would shrink a jumbo-frame bridge), and brings
// it up.
absl::Status AttachAndRaise(const std::string& tap, const std::string& bridge, int index) {
  UniqueFd sock(::socket(AF_LOCAL, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!sock.valid()) return ErrnoError("cannot open a socket to configure TAP " + tap, errno);
  ifreq mtu = NamedRequest(bridge);
  const bool have_mtu = ::ioctl(sock.get(), SIOCGIFMTU, &mtu) == 0;
  ifreq add = NamedRequest(bridge);
  add.ifr_ifindex = index;
  if (::ioctl(sock.get(), SIOCBRADDIF, &add) != 0) {
    const int error = errno;
    if (error == EOPNOTSUPP || error == EINVAL) {
      return ConfigError(absl::StrCat("\"", bridge, "\" (from the plugin's bridges_allowlist) is not a bridge"));
    }
    return ErrnoError(absl::StrCat("cannot attach TAP ", tap, " to bridge ", bridge), error);
  }
  if (have_mtu) {
    ifreq set = NamedRequest(tap);
    set.ifr_mtu = mtu.ifr_mtu;
    if (::ioctl(sock.get(), SIOCSIFMTU, &set) != 0) {
      return ErrnoError(absl::StrCat("cannot set TAP ", tap, "'s MTU to bridge ", bridge, "'s ", mtu.ifr_mtu), errno);
    }
  }
  ifreq flags = NamedRequest(tap);
  if (::ioctl(sock.get(), SIOCGIFFLAGS, &flags) != 0) return ErrnoError("cannot read TAP " + tap + "'s flags", errno);
  flags.ifr_flags |= IFF_UP;
  if (::ioctl(sock.get(), SIOCSIFFLAGS, &flags) != 0) return ErrnoError("cannot bring TAP " + tap + " up", errno);
  return absl::OkStatus();
}

}  // namespace

std::string TapName(const std::string& task_key) { return "ndq" + task_key.substr(0, 12); }

bool InterfaceExists(const std::string& name) { return ::if_nametoindex(name.c_str()) != 0; }

absl::StatusOr<UniqueFd> CreateBridgedTap(const std::string& name, const std::string& bridge) {
  if (name.empty() || name.size() >= IFNAMSIZ || bridge.empty() || bridge.size() >= IFNAMSIZ) {
    return absl::InvalidArgumentError("TAP and bridge names must be 1 to 15 characters");
  }
  // Interfaces are looked up by ioctl, not in /sys/class/net: sysfs shows
  // the namespace of whoever mounted it, which need not be the plugin's.
  if (!InterfaceExists(bridge)) {
    return ConfigError(
        absl::StrCat("bridge \"", bridge, "\" (from the plugin's bridges_allowlist) does not exist on this host"));
  }
  // TUNSETIFF would attach to an existing TAP of the name instead of failing.
  if (InterfaceExists(name)) {
    return absl::AlreadyExistsError(absl::StrCat("network interface ", name,
                                                 " already exists: another VM of this task may still be running"));
  }
  UniqueFd tun(::open("/dev/net/tun", O_RDWR | O_CLOEXEC));
  if (!tun.valid()) return ErrnoError("cannot open /dev/net/tun to make a TAP", errno);
  ifreq request = NamedRequest(name);
  request.ifr_flags = IFF_TAP | IFF_NO_PI;
  if (::ioctl(tun.get(), TUNSETIFF, &request) != 0) return ErrnoError("cannot create TAP " + name, errno);
  const unsigned index = ::if_nametoindex(name.c_str());
  if (index == 0) return ErrnoError("TAP " + name + " vanished after creation", errno);
  if (absl::Status attached = AttachAndRaise(name, bridge, static_cast<int>(index)); !attached.ok()) return attached;
  return tun;
}

// TUNSETIFF on an existing name attaches to it only when it is a TAP that no
// one holds open (a persistent leftover); clearing TUNSETPERSIST then makes
// our close remove it. A TAP still open in a QEMU gives EBUSY and any other
// kind of interface EINVAL: both are left alone.
absl::Status DeleteTap(const std::string& name) {
  if (name.empty() || name.size() >= IFNAMSIZ || !InterfaceExists(name)) return absl::OkStatus();
  UniqueFd tun(::open("/dev/net/tun", O_RDWR | O_CLOEXEC));
  if (!tun.valid()) return ErrnoError("cannot open /dev/net/tun to remove TAP " + name, errno);
  ifreq request = NamedRequest(name);
  request.ifr_flags = IFF_TAP | IFF_NO_PI;
  if (::ioctl(tun.get(), TUNSETIFF, &request) != 0) {
    return ErrnoError(absl::StrCat("network interface ", name, " is not a TAP the driver can take over; left alone"),
                      errno);
  }
  if (::ioctl(tun.get(), TUNSETPERSIST, 0) != 0) return ErrnoError("cannot make TAP " + name + " non-persistent", errno);
  return absl::OkStatus();  // removed when `tun` closes
}

}  // namespace ndq
