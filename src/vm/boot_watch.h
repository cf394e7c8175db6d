// boot_timeout: a thread per watched VM that waits, after StartTask has
// returned, until the guest answers (its guest agent, or TCP on the
// boot_ready_port label through QEMU's port forward) or the time is up.
// The task then fails like any VM that ends: WaitTask reports it.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "base/timeouts.h"
#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "qemu/console_plan.h"
#include "vm/vm_task.h"

namespace ndq {

struct BootWatchContext {
  std::shared_ptr<VmTask> vm;
  BootWatchPlan plan;
  std::string netns;  // the allocation's network namespace (where the port is); empty: the host's
  absl::Time started;  // when QEMU started; the timeout counts from here
  // Called once on the watch's thread: `what` answered after `elapsed`.
  std::function<void(const std::string& what, absl::Duration elapsed)> on_ready;
  // Called once on the watch's thread when nothing answered in time (and the VM still runs).
  std::function<void()> on_timeout;
};

class BootWatch {
 public:
  explicit BootWatch(BootWatchContext context);
  // Stops watching (without calling back) and joins the thread.
  ~BootWatch();
  BootWatch(const BootWatch&) = delete;
  BootWatch& operator=(const BootWatch&) = delete;

  // Each probe's bound, and the longest pause between probes.
  static constexpr absl::Duration kProbeTimeout = timeouts::kBootProbe;
  static constexpr absl::Duration kMaxPause = timeouts::kBootProbeMaxPause;

 private:
  void Run();
  bool AgentAnswers(absl::Duration timeout);
  bool PortAnswers(absl::Time deadline);
  // Waits up to `timeout`; true once the watch is cancelled.
  bool Cancelled(absl::Duration timeout);

  BootWatchContext context_;
  absl::Mutex mu_;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

// Whether QEMU's `info usernet` shows an established connection through the
// forward of `host_port` to the guest's `guest_port` (the guest accepted it).
bool UsernetHasEstablished(const std::string& info_usernet, int host_port, int guest_port);

}  // namespace ndq
