// Conversion between Nomad's protobuf messages and the driver's own types:
// the one place below the gRPC services that knows both.
#pragma once

#include "nomad/driver.pb.h"
#include "policy/task_request.h"
#include "vm/task_manager.h"

namespace ndq {

namespace driverpb = hashicorp::nomad::plugins::drivers::proto;

TaskRequest TaskRequestFromProto(const driverpb::TaskConfig& task);
TaskIdentity TaskIdentityFromProto(const driverpb::TaskConfig& task);

// Nomad's TaskHandle for a started VM: its config as Nomad sent it, and our
// driver state.
driverpb::TaskHandle HandleToProto(const driverpb::TaskConfig& task, const DriverStateRecord& record);

driverpb::InspectTaskResponse InspectToProto(const TaskStatusInfo& info);
void ExitToProto(const ExitResult& exit, driverpb::ExitResult* out);

}  // namespace ndq
