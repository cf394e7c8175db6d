// A real gRPC server on a unix socket in a private temporary directory, for
// tests of gRPC services and clients in the same process.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>

#include "temp_dir.h"

namespace ndq::testing {

class UnixGrpcServer {
 public:
  explicit UnixGrpcServer(const std::vector<grpc::Service*>& services) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort(target(), grpc::InsecureServerCredentials());
    for (grpc::Service* service : services) builder.RegisterService(service);
    server_ = builder.BuildAndStart();
  }
  ~UnixGrpcServer() { Stop(); }
  UnixGrpcServer(const UnixGrpcServer&) = delete;
  UnixGrpcServer& operator=(const UnixGrpcServer&) = delete;

  bool started() const { return server_ != nullptr; }
  std::string socket_path() const { return dir_ / "grpc.sock"; }
  std::string target() const { return "unix:" + socket_path(); }
  std::shared_ptr<grpc::Channel> NewChannel() const {
    return grpc::CreateChannel(target(), grpc::InsecureChannelCredentials());
  }

  // Cancels the calls still running and waits for their handlers to return.
  void Stop() {
    if (server_ == nullptr) return;
    server_->Shutdown(std::chrono::system_clock::now());
    server_->Wait();
    server_.reset();
  }
  // Lets running calls finish on their own, with no deadline: returns once every handler has.
  void StopWhenIdle() {
    if (server_ == nullptr) return;
    server_->Shutdown();
    server_->Wait();
    server_.reset();
  }

 private:

  TempDir dir_;
  std::unique_ptr<grpc::Server> server_;
};

}  // namespace ndq::testing
