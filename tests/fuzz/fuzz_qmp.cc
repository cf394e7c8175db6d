// QMP as QEMU speaks it, fed through a socketpair into the real QmpClient
// (greeting and version, qmp_capabilities, replies matched by id, error
// replies, events and their timestamps), with the task's event wording
// (DescribeQmpEvent) as the handler. See scripted_peer.h for the input format;
// the client's request ids are 1 (qmp_capabilities), 2, 3, ... in order.
#include <cstddef>
#include <cstdint>
#include <thread>

#include <spdlog/spdlog.h>

#include "qemu/qmp_client.h"
#include "vm/vm_task.h"
#include "scripted_peer.h"

namespace {
// Long enough to never cut a well-formed exchange short on a loaded machine;
// the peer's EOF ends everything else early.
constexpr absl::Duration kTimeout = absl::Seconds(2);
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  int fds[2];
  ndqfuzz::MakePair(fds);
  std::thread peer(ndqfuzz::ServePeer, fds[1], ndqfuzz::SplitChunks(data, size));
  {
    absl::StatusOr<std::unique_ptr<ndq::QmpClient>> client = ndq::QmpClient::Adopt(fds[0], "fuzz peer", kTimeout);
    if (client.ok()) {
      ndq::QmpClient& qmp = **client;
      (void)qmp.version().ToString();
      (void)qmp.offered_capabilities();
      qmp.SetEventHandler([&qmp](const ndq::QmpEvent& event) {
        (void)ndq::DescribeQmpEvent(event);
        // Refused, not deadlocked, on the reader thread.
        if (qmp.Execute("query-status").ok()) __builtin_trap();
      });
      absl::StatusOr<std::string> status = qmp.QueryStatus(kTimeout);
      absl::Status powerdown = qmp.SystemPowerdown(kTimeout);
      absl::StatusOr<nlohmann::json> reply = qmp.Execute("human-monitor-command", {{"command-line", "info"}}, kTimeout);
      if (!reply.ok()) (void)ndq::QmpErrorClass(reply.status());
      (void)qmp.WaitForEvent("SHUTDOWN", absl::ZeroDuration());
      (void)qmp.Quit(kTimeout);
      (void)qmp.WaitForDisconnect(kTimeout);
      (void)qmp.disconnect_reason();
    }
  }
  peer.join();
  return 0;
}
