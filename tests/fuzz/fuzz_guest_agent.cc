// qemu-guest-agent replies (they come from inside the guest, which the job
// controls), fed through a socketpair into the real GuestAgentClient:
// guest-sync-delimited with its 0xFF sentinel, replies and error replies,
// guest-shutdown's silent acceptance. See scripted_peer.h for the input format;
// "$ID" stands for the random sync id of the request being answered.
#include <cstddef>
#include <cstdint>
#include <thread>

#include <spdlog/spdlog.h>

#include "qemu/guest_agent_client.h"
#include "qemu/qmp_client.h"
#include "scripted_peer.h"

namespace {
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
    absl::StatusOr<std::unique_ptr<ndq::GuestAgentClient>> client =
        ndq::GuestAgentClient::Adopt(fds[0], "fuzz peer", kTimeout);
    if (client.ok()) {
      ndq::GuestAgentClient& agent = **client;
      (void)agent.Ping(kTimeout);
      (void)agent.Info(kTimeout);
      absl::StatusOr<nlohmann::json> reply = agent.Execute("guest-exec-status", {{"pid", 1}}, kTimeout);
      if (!reply.ok()) (void)ndq::QmpErrorClass(reply.status());
      (void)agent.Shutdown("powerdown", kTimeout);
      (void)agent.Sync(kTimeout);
    }
  }
  peer.join();
  return 0;
}
