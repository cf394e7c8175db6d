// Runs a go-plugin gRPC server the way a Nomad client expects: cookie check,
// version negotiation, a private unix socket, the handshake line, then serving
// until the host calls GRPCController/Shutdown or the process gets SIGTERM.
#pragma once

#include <string>
#include <vector>

#include <grpcpp/impl/codegen/service_type.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "nomadplugin/handshake.h"
#include "nomadplugin/lifecycle.h"

namespace nomadplugin {

struct ServeOptions {
  std::string plugin_name;
  HandshakeConfig handshake = NomadHandshake();
  // The plugin's own services; health, controller and stdio are added here.
  std::vector<grpc::Service*> services;
  // Shared with the services so long-lived streams end at shutdown.
  Lifecycle* lifecycle = nullptr;
  // How long in-flight calls may run on after shutdown is requested.
  absl::Duration grace = absl::Seconds(2);
};

// Blocks SIGTERM (Serve takes it with sigwait on its own thread) and ignores
// SIGINT and SIGPIPE. Call first in main, before any thread exists, since
// threads inherit the mask: one started earlier would let SIGTERM kill the plugin.
void PrepareProcessSignals();

// Returns the process exit code.
int Serve(const ServeOptions& options);

// A fresh directory (mode 0700) for the plugin's socket, under
// PLUGIN_UNIX_SOCKET_DIR, else TMPDIR, else /tmp.
absl::StatusOr<std::string> MakePrivateSocketDir();

}  // namespace nomadplugin
