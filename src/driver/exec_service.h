// Nomad's ExecTask (script checks) and ExecTaskStreaming (`nomad alloc exec`)
// on top of TaskManager::Exec: commands run in the guest through its agent.
//
// qemu-guest-agent 7.2 shapes both: it takes a command's stdin only when the
// command starts, and hands over its output only once it has ended. So a
// streamed exec buffers stdin (up to GuestExec::kMaxStdin) until Nomad closes
// it, or nothing more has come for kStdinQuiet (an interactive terminal that
// types nothing), then starts the command; input that comes later is dropped
// and counted in a note on stderr. The output is sent in 64 KiB frames as
// soon as the agent reports it.
#pragma once

#include <functional>

#include <grpcpp/grpcpp.h>

#include "base/timeouts.h"
#include "absl/time/time.h"
#include "nomad/driver.grpc.pb.h"
#include "vm/task_manager.h"

namespace ndq {

namespace driverpb = hashicorp::nomad::plugins::drivers::proto;

// How long a streamed exec waits for more stdin before it starts the command.
inline constexpr absl::Duration kStdinQuiet = timeouts::kExecStdinQuiet;

grpc::Status ExecTaskOnce(TaskManager& tasks, grpc::ServerContext* context, const driverpb::ExecTaskRequest& request,
                          driverpb::ExecTaskResponse* response, const std::function<bool()>& shutting_down);

using ExecStream = grpc::ServerReaderWriter<driverpb::ExecTaskStreamingResponse, driverpb::ExecTaskStreamingRequest>;
grpc::Status ExecTaskStreamed(TaskManager& tasks, grpc::ServerContext* context, ExecStream* stream,
                              const std::function<bool()>& shutting_down);

}  // namespace ndq
