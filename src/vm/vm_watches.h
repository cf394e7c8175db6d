// The watches that follow a VM after StartTask returned, each on its own
// thread (vm/boot_watch.h): boot_timeout (the guest must answer in time, or
// the VM is stopped with a screenshot and the reason kept for its exit), a
// cold warm_start VM's readiness (then its template is saved), and a
// restored VM's clock (set once its agent answers).
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>

#include "base/timeouts.h"
#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "vm/boot_watch.h"
#include "vm/start_pipeline.h"
#include "vm/vm_task.h"
#include "vm/warm_start.h"

namespace ndq {

// boot_timeout: how much of the serial console a failed boot reports, and
// how long QEMU gets to exit on SIGTERM before SIGKILL.
inline constexpr size_t kBootFailureTailLines = 20;
inline constexpr absl::Duration kBootFailureStopTimeout = timeouts::kBootFailureStop;

// How long a restored guest's agent gets to answer before its clock is set.
inline constexpr absl::Duration kRestoredClockTimeout = timeouts::kRestoredClock;

class VmWatches {
 public:
  // Events go to `emit`; `on_template_saved` runs after a template is saved
  // (the cache may have grown past its bound).
  using Emit = std::function<void(const TaskIdentity&, const std::string&, const std::map<std::string, std::string>&)>;
  VmWatches(Emit emit, std::function<void()> on_template_saved)
      : emit_(std::move(emit)), on_template_saved_(std::move(on_template_saved)) {}
  // Joins every watch's thread.
  ~VmWatches() = default;

  // Starts what the launched VM needs: its boot watch, its warm_start watch
  // (takes launched.warm_capture), the restored clock.
  void Begin(const TaskIdentity& task, const std::shared_ptr<VmTask>& vm, LaunchedVm& launched);
  // Ends the task's watches (not from one of their own threads).
  void End(const std::string& id);
  // Why the task's boot failed (boot_timeout), once; empty when it did not.
  std::string TakeBootFailure(const std::string& id);

 private:
  void WatchBoot(const TaskIdentity& task, const std::shared_ptr<VmTask>& vm, const LaunchedVm& launched);
  // The guest did not answer in time: screenshot, stop, and the reason kept for the exit.
  void FailBoot(const TaskIdentity& task, const std::shared_ptr<VmTask>& vm, absl::Duration timeout,
                const std::string& waited_for);
  // warm_start on a cold VM: once its guest is ready, save it as a template.
  void WatchWarm(const TaskIdentity& task, const std::shared_ptr<VmTask>& vm, LaunchedVm& launched);
  void SaveWarmTemplate(const TaskIdentity& task, VmTask& vm, WarmCapture& capture, const std::string& ready);
  // A VM restored from a template, with guest_agent: its clock set once the agent answers.
  void SetRestoredClock(const TaskIdentity& task, const std::shared_ptr<VmTask>& vm, const LaunchedVm& launched);

  const Emit emit_;
  const std::function<void()> on_template_saved_;
  absl::Mutex mu_;
  std::map<std::string, std::string> boot_failures_ ABSL_GUARDED_BY(mu_);
  // Declared last, so destroyed first: their threads call the members above.
  std::map<std::string, std::unique_ptr<BootWatch>> boot_watches_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::unique_ptr<BootWatch>> warm_watches_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ndq
