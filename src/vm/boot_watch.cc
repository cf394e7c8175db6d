#include "vm/boot_watch.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "base/unique_fd.h"
#include "nomadplugin/hclog.h"
#include "qemu/guest_agent_client.h"

namespace ndq {
namespace {

namespace log = nomadplugin::hclog;

// A TCP connection to QEMU's forward of the port; QEMU accepts it whether or
// not the guest listens (it then tries the guest), so this alone says little.
UniqueFd ConnectForward(const std::string& host_ip, int port, absl::Duration timeout) {
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.valid()) return UniqueFd();
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (::inet_pton(AF_INET, host_ip.empty() ? "127.0.0.1" : host_ip.c_str(), &addr.sin_addr) != 1) return UniqueFd();
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 && errno != EINPROGRESS) {
    return UniqueFd();
  }
  pollfd p{fd.get(), POLLOUT, 0};
  int error = 0;
  socklen_t len = sizeof error;
  // A spent slice polls once: a negative timeout would make poll wait forever.
  const int wait_ms = static_cast<int>(std::max<int64_t>(0, absl::ToInt64Milliseconds(timeout)));
  if (::poll(&p, 1, wait_ms) != 1 ||
      ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &error, &len) != 0 || error != 0) {
    return UniqueFd();
  }
  return fd;
}

// True when the guest closed (or reset) the connection QEMU made for us.
bool ClosedByPeer(int fd) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, 0) != 1) return false;
  char byte;
  const ssize_t n = ::recv(fd, &byte, 1, MSG_PEEK);
  return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK);
}

}  // namespace

bool UsernetHasEstablished(const std::string& info_usernet, int host_port, int guest_port) {
  // "  TCP[ESTABLISHED]   21       127.0.0.1 18080       10.0.2.15    80     0     0"
  // (QEMU 7.2 / libslirp 4.7: a forwarded connection lists the forward's
  // host port as its source port).
  for (absl::string_view line : absl::StrSplit(info_usernet, '\n')) {
    std::vector<absl::string_view> cols = absl::StrSplit(line, ' ', absl::SkipEmpty());
    int source = 0, dest = 0;
    if (cols.size() >= 6 && cols[0] == "TCP[ESTABLISHED]" && absl::SimpleAtoi(cols[3], &source) &&
        absl::SimpleAtoi(cols[5], &dest) && source == host_port && dest == guest_port) {
      return true;
    }
  }
  return false;
}

BootWatch::BootWatch(BootWatchContext context) : context_(std::move(context)) {
  thread_ = std::thread([this] { Run(); });
}

BootWatch::~BootWatch() {
  {
    absl::MutexLock lock(&mu_);
    cancelled_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

bool BootWatch::Cancelled(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithTimeout(absl::Condition(&cancelled_), timeout);
  return cancelled_;
}

bool BootWatch::AgentAnswers(absl::Duration timeout) {
  // The task's shared session: QEMU serves the agent's socket to one client,
  // which an exec or a graceful stop during the boot may need too.
  absl::StatusOr<std::shared_ptr<GuestAgentClient>> agent = context_.vm->GuestAgent(timeout);
  if (!agent.ok()) return false;
  if ((*agent)->Ping(timeout).ok()) return true;
  context_.vm->DropGuestAgent(*agent);
  return false;
}

// The port answers when the guest itself accepted our connection: QEMU's
// slirp shows it ESTABLISHED while it is still open on our side.
bool BootWatch::PortAnswers(absl::Time deadline) {
  const BootWatchPlan& plan = context_.plan;
  UniqueFd fd = ConnectForward(plan.host_ip, plan.host_port, std::min(deadline - absl::Now(), kProbeTimeout));
  if (!fd.valid()) return false;
  absl::Duration pause = absl::Milliseconds(20);
  while (absl::Now() < deadline && !ClosedByPeer(fd.get())) {
    absl::StatusOr<nlohmann::json> info =
        context_.vm->ExecuteQmp("human-monitor-command", {{"command-line", "info usernet"}}, kProbeTimeout);
    if (!info.ok() || !info->is_string()) return false;
    if (UsernetHasEstablished(info->get<std::string>(), plan.host_port, plan.guest_port)) return true;
    if (Cancelled(std::min(pause, deadline - absl::Now()))) return false;
    pause *= 2;
  }
  return false;
}

void BootWatch::Run() {
  const BootWatchPlan& plan = context_.plan;
  if (!context_.netns.empty()) {
    // This thread alone enters the allocation's namespace, where the port is.
    UniqueFd ns(::open(context_.netns.c_str(), O_RDONLY | O_CLOEXEC));
    if (!ns.valid() || ::setns(ns.get(), CLONE_NEWNET) != 0) {
      log::Warn("boot watch cannot enter the task's network namespace", {{"netns", context_.netns}});
    }
  }
  const absl::Time deadline = context_.started + plan.timeout;
  absl::Duration pause = absl::Milliseconds(250);
  while (absl::Now() < deadline) {
    if (context_.vm->result()) return;
    const absl::Duration slice = std::min(deadline - absl::Now(), kProbeTimeout);
    if (plan.guest_agent && AgentAnswers(slice)) {
      context_.on_ready("the guest agent", absl::Now() - context_.started);
      return;
    }
    if (!plan.port_label.empty() && PortAnswers(std::min(deadline, absl::Now() + kProbeTimeout))) {
      context_.on_ready("port \"" + plan.port_label + "\"", absl::Now() - context_.started);
      return;
    }
    if (Cancelled(std::min(pause, std::max(deadline - absl::Now(), absl::ZeroDuration())))) return;
    pause = std::min(pause * 2, kMaxPause);
  }
  if (Cancelled(absl::ZeroDuration()) || context_.vm->result()) return;
  context_.on_timeout();
}

}  // namespace ndq
