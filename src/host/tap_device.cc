#include "host/tap_device.h"

#include <fcntl.h>
#include <net/if.h>  // before any linux/ header: glibc's ifreq, not the kernel's
#include <linux/if_tun.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
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

bool IsDirectory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// Copies the bridge's MTU to the TAP (a bridge takes the smallest MTU of its
// ports, so a default-MTU TAP would shrink a jumbo-frame bridge), attaches
// the TAP and brings it up.
absl::Status AttachAndRaise(const std::string& tap, const std::string& bridge, int index) {
  UniqueFd sock(::socket(AF_LOCAL, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!sock.valid()) return ErrnoError("cannot open a socket to configure TAP " + tap, errno);
  ifreq mtu = NamedRequest(bridge);
  if (::ioctl(sock.get(), SIOCGIFMTU, &mtu) == 0) {
    ifreq set = NamedRequest(tap);
    set.ifr_mtu = mtu.ifr_mtu;
    if (::ioctl(sock.get(), SIOCSIFMTU, &set) != 0) {
      return ErrnoError(absl::StrCat("cannot set TAP ", tap, "'s MTU to bridge ", bridge, "'s ", mtu.ifr_mtu), errno);
    }
  }
  ifreq add = NamedRequest(bridge);
  add.ifr_ifindex = index;
  if (::ioctl(sock.get(), SIOCBRADDIF, &add) != 0) {
    return ErrnoError(absl::StrCat("cannot attach TAP ", tap, " to bridge ", bridge), errno);
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
  if (!IsDirectory("/sys/class/net/" + bridge + "/bridge")) {
    return absl::FailedPreconditionError(absl::StrCat(
        "bridge \"", bridge, "\" (from the plugin's bridges_allowlist) does not exist on this host or is not a bridge"));
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

// Hand-written rtnetlink (one message, no library): RTM_DELLINK by index,
// acknowledged with NLMSG_ERROR (error 0 on success).
absl::Status DeleteTap(const std::string& name) {
  const unsigned index = ::if_nametoindex(name.c_str());
  if (index == 0) return absl::OkStatus();
  // Only ever a TAP (tun devices have tun_flags), never a bridge or a NIC.
  if (::access(("/sys/class/net/" + name + "/tun_flags").c_str(), F_OK) != 0) {
    return absl::FailedPreconditionError(absl::StrCat("network interface ", name, " is not a TAP; left alone"));
  }
  UniqueFd sock(::socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE));
  if (!sock.valid()) return ErrnoError("cannot open an rtnetlink socket", errno);
  struct {
    nlmsghdr header;
    ifinfomsg info;
  } request{};
  request.header.nlmsg_len = sizeof request;
  request.header.nlmsg_type = RTM_DELLINK;
  request.header.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
  request.header.nlmsg_seq = 1;
  request.info.ifi_family = AF_UNSPEC;
  request.info.ifi_index = static_cast<int>(index);
  sockaddr_nl kernel{};
  kernel.nl_family = AF_NETLINK;
  if (::sendto(sock.get(), &request, sizeof request, 0, reinterpret_cast<sockaddr*>(&kernel), sizeof kernel) < 0) {
    return ErrnoError("cannot ask the kernel to delete TAP " + name, errno);
  }
  alignas(nlmsghdr) char reply[1024];
  const ssize_t n = ::recv(sock.get(), reply, sizeof reply, 0);
  if (n < static_cast<ssize_t>(NLMSG_LENGTH(sizeof(nlmsgerr)))) return ErrnoError("no answer deleting TAP " + name, errno);
  const auto* header = reinterpret_cast<const nlmsghdr*>(reply);
  if (header->nlmsg_type == NLMSG_ERROR) {
    const int error = -static_cast<const nlmsgerr*>(NLMSG_DATA(header))->error;
    if (error != 0 && error != ENODEV) return ErrnoError("cannot delete TAP " + name, error);
  }
  return absl::OkStatus();
}

}  // namespace ndq
