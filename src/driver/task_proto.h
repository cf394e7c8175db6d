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

// advertise_address's result as Nomad's NetworkOverride; callers set it only
// when there is an address (Nomad treats a present override as the driver network).
void NetworkToProto(const AdvertisedNetwork& network, driverpb::NetworkOverride* out);
driverpb::InspectTaskResponse InspectToProto(const TaskStatusInfo& info);
void ExitToProto(const ExitResult& exit, driverpb::ExitResult* out);

}  // namespace ndq
