// The driver's QMP and guest-agent clients on a ScriptedPeer's end: what the
// tests of the layers above the clients start from.
#pragma once

#include <memory>
#include <string>

#include <gtest/gtest.h>

#include "qemu/guest_agent_client.h"
#include "qemu/qmp_client.h"
#include "scripted_qmp.h"

namespace ndq::testing {

// Null (and a test failure) when the handshake fails; `name` is the peer's
// name in the client's messages.
inline std::unique_ptr<QmpClient> AdoptQmpOrDie(ScriptedPeer& peer, const std::string& name = "test peer") {
  auto client = QmpClient::Adopt(peer.client_fd(), name, kScriptStepTimeout);
  EXPECT_TRUE(client.ok()) << client.status();
  return client.ok() ? std::move(*client) : nullptr;
}

inline std::unique_ptr<GuestAgentClient> AdoptAgentOrDie(ScriptedPeer& peer, const std::string& name = "test agent") {
  auto client = GuestAgentClient::Adopt(peer.client_fd(), name, kScriptStepTimeout);
  EXPECT_TRUE(client.ok()) << client.status();
  return client.ok() ? std::move(*client) : nullptr;
}

}  // namespace ndq::testing
