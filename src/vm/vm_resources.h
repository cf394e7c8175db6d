// What one VM holds on the host besides its processes, in one record. Each
// start stage adds what it makes; the record goes into the driver state (so a
// relaunched plugin knows it too); and one Release serves a failed start,
// DestroyTask and recovery alike, so no second list of undo steps exists.
//
// Not in it: the files in the task dir (overlays, the seed, a blank data disk,
// the UEFI variable store, the TPM's state). They are the task's disk and
// firmware state, left for the operator to look at and for Nomad to collect
// with the allocation; a start removes the ones it made only if it fails
// (the start's rollback).
#pragma once

#include <string>
#include <vector>

#include "host/cgroups.h"
#include "host/vm_host.h"
#include "image/image_cache.h"
#include "vm/vm_task.h"

namespace ndq {

struct VmResources {
  std::string state_dir;    // <state_dir>/<task key>, removed whole
  TaskCgroup cgroup;        // version kNone: none was made
  std::string tap;          // network_mode = "bridge": the TAP's name
  std::string console_dir;  // console = true: its sockets' directory in the task dir
  // Cached images and warm templates leased under the task's key.
  std::vector<std::string> leases;
};

// The record's resources, as the driver state keeps them.
VmResources ResourcesOf(const DriverStateRecord& record);
void KeepResourcesIn(const VmResources& resources, DriverStateRecord& record);

// Releases everything in `resources`: the TAP, the cgroup, the console and
// state directories, then the leases (in `cache`, under `lease`). What is already gone is fine; a failure is logged, not returned:
// the caller could do nothing more about it.
void Release(const VmResources& resources, VmHost& host, ImageCache& cache, const std::string& lease);

}  // namespace ndq
