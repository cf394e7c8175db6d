#include "vm/vm_watches.h"

#include <signal.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "nomadplugin/hclog.h"
#include "vm/console.h"

namespace ndq {
namespace {

namespace log = nomadplugin::hclog;

}  // namespace

void VmWatches::Begin(const TaskIdentity& task, const std::shared_ptr<VmTask>& vm, LaunchedVm& launched) {
  if (launched.spec.boot_watch.timeout > absl::ZeroDuration()) WatchBoot(task, vm, launched);
  if (launched.warm_capture) WatchWarm(task, vm, launched);
  if (launched.record.warm_start == "restored" && launched.spec.guest_agent) SetRestoredClock(task, vm, launched);
}

std::string VmWatches::TakeBootFailure(const std::string& id) {
  absl::MutexLock lock(&mu_);
  auto it = boot_failures_.find(id);
  if (it == boot_failures_.end()) return "";
  std::string failure = std::move(it->second);
  boot_failures_.erase(it);
  return failure;
}

void VmWatches::End(const std::string& id) {
  std::unique_ptr<BootWatch> watch, warm;
  {
    absl::MutexLock lock(&mu_);
    if (auto it = boot_watches_.find(id); it != boot_watches_.end()) {
      watch = std::move(it->second);
      boot_watches_.erase(it);
    }
    if (auto it = warm_watches_.find(id); it != warm_watches_.end()) {
      warm = std::move(it->second);
      warm_watches_.erase(it);
    }
  }
  watch.reset();  // joins, outside the lock
  warm.reset();
}

// --- boot_timeout ---------------------------------------------------------------------

void VmWatches::WatchBoot(const TaskIdentity& task, const std::shared_ptr<VmTask>& vm, const LaunchedVm& launched) {
  const BootWatchPlan& plan = launched.spec.boot_watch;
  std::string waited_for = plan.guest_agent ? "the guest agent (guest-ping)" : "";
  if (!plan.port_label.empty()) {
    absl::StrAppend(&waited_for, waited_for.empty() ? "" : " or ", "port \"", plan.port_label, "\" (TCP, guest port ",
                    plan.guest_port, ")");
  }
  BootWatchContext context;
  context.vm = vm;
  context.plan = plan;
  context.netns = launched.netns;
  context.started = launched.record.started_at;
  context.on_ready = [this, task](const std::string& what, absl::Duration elapsed) {
    emit_(task, absl::StrCat("Guest ready: ", what, " answered ", absl::FormatDuration(absl::Trunc(elapsed, absl::Milliseconds(100))),
                            " after QEMU started"),
         {{"boot_ready", what}});
  };
  std::weak_ptr<VmTask> weak = vm;
  context.on_timeout = [this, task, weak, timeout = plan.timeout, waited_for] {
    if (std::shared_ptr<VmTask> held = weak.lock()) FailBoot(task, held, timeout, waited_for);
  };
  auto watch = std::make_unique<BootWatch>(std::move(context));
  // A watch this replaces ends in `watch`, joined after the lock is released
  // (declared after it): its callbacks take the lock.
  absl::MutexLock lock(&mu_);
  boot_watches_[task.id].swap(watch);
}

void VmWatches::FailBoot(const TaskIdentity& task, const std::shared_ptr<VmTask>& vm, absl::Duration timeout,
                           const std::string& waited_for) {
  absl::StatusOr<std::string> shot = TakeScreenshot(*vm);
  std::string failure = absl::StrCat("the VM did not become ready within boot_timeout ", absl::FormatDuration(timeout),
                                     ": ", waited_for, " did not answer; ");
  std::map<std::string, std::string> annotations = {{"boot_timeout", absl::FormatDuration(timeout)}};
  if (shot.ok()) {
    absl::StrAppend(&failure, "screenshot ", *shot);
    annotations["screenshot"] = *shot;
  } else {
    absl::StrAppend(&failure, "no screenshot (", shot.status().message(), ")");
  }
  log::Warn("guest not ready in time; stopping the VM", {{"task_id", task.id}, {"error", failure}});
  {
    absl::MutexLock lock(&mu_);
    boot_failures_[task.id] = failure;
  }
  emit_(task, "Boot timeout: " + failure, annotations);
  // The guest is stuck: no power button; QEMU exits on SIGTERM, then SIGKILL.
  if (absl::Status stopped = vm->Stop(kBootFailureStopTimeout, SIGTERM); !stopped.ok()) {
    log::Warn("could not stop the VM after its boot timeout",
              {{"task_id", task.id}, {"error", std::string(stopped.message())}});
  }
}

// --- warm_start -----------------------------------------------------------------------

void VmWatches::WatchWarm(const TaskIdentity& task, const std::shared_ptr<VmTask>& vm, LaunchedVm& launched) {
  BootWatchContext context;
  context.vm = vm;
  context.plan = launched.spec.warm.ready;
  context.netns = launched.netns;
  context.started = launched.record.started_at;
  std::weak_ptr<VmTask> weak = vm;
  std::shared_ptr<WarmCapture> capture = std::move(launched.warm_capture);
  context.on_ready = [this, task, weak, capture](const std::string& what, absl::Duration) {
    if (std::shared_ptr<VmTask> held = weak.lock()) SaveWarmTemplate(task, *held, *capture, what);
    *capture = WarmCapture{};  // its files are QEMU's alone now
  };
  context.on_timeout = [this, task, timeout = context.plan.timeout] {
    emit_(task, absl::StrCat("Warm start: no template saved: the guest was not ready within ",
                            absl::FormatDuration(timeout)),
         {{"warm_start", "cold"}});
  };
  auto watch = std::make_unique<BootWatch>(std::move(context));
  absl::MutexLock lock(&mu_);  // as in WatchBoot: a replaced watch is joined unlocked
  warm_watches_[task.id].swap(watch);
}

void VmWatches::SaveWarmTemplate(const TaskIdentity& task, VmTask& vm, WarmCapture& capture,
                                   const std::string& ready) {
  absl::StatusOr<SavedTemplate> saved = SaveTemplate(vm, capture);
  if (!saved.ok()) {
    const bool raced = absl::IsAlreadyExists(saved.status());
    if (!raced) {
      log::Warn("warm_start: no template saved", {{"task_id", task.id}, {"error", std::string(saved.status().message())}});
    }
    emit_(task, absl::StrCat("Warm start: no template saved: ", saved.status().message()), {{"warm_start", "cold"}});
    return;
  }
  auto ms = [](absl::Duration d) { return std::to_string(absl::ToInt64Milliseconds(d)); };
  emit_(task,
       absl::StrCat("Warm start: template ", saved->key.substr(0, 12), " saved once ", ready, " answered (RAM ",
                    saved->ram_bytes >> 20, " MiB, device state ", saved->state_bytes >> 10, " KiB, disk ",
                    saved->disk_bytes >> 10, " KiB); the guest was paused ", ms(saved->paused), " ms"),
       {{"warm_template", saved->key},
        {"warm_template_ms", ms(saved->total)},
        {"warm_pause_ms", ms(saved->paused)},
        {"warm_ram_bytes", std::to_string(saved->ram_bytes)},
        {"warm_state_bytes", std::to_string(saved->state_bytes)},
        {"warm_disk_bytes", std::to_string(saved->disk_bytes)}});
  if (on_template_saved_) on_template_saved_();  // templates count against image_cache_max_size
}

void VmWatches::SetRestoredClock(const TaskIdentity& task, const std::shared_ptr<VmTask>& vm,
                                   const LaunchedVm& launched) {
  // The guest resumed with the template's time; once its agent answers, the
  // host's time is set, so logs, certificates and timers are not off by the
  // template's age. Not on StartTask's path: the agent answers after the
  // guest has run a little.
  BootWatchContext context;
  context.vm = vm;
  context.plan.guest_agent = true;
  context.plan.timeout = kRestoredClockTimeout;
  context.netns = launched.netns;
  context.started = absl::Now();
  std::weak_ptr<VmTask> weak = vm;
  context.on_ready = [this, task, weak](const std::string&, absl::Duration) {
    std::shared_ptr<VmTask> held = weak.lock();
    if (!held) return;
    absl::Status set = SetGuestClock(*held);
    if (set.ok()) {
      emit_(task, "Warm start: the guest's clock was set to the host's time", {{"warm_clock", "set"}});
    } else {
      emit_(task, absl::StrCat("Warm start: the guest's clock could not be set: ", set.message()),
           {{"warm_clock", "failed"}});
    }
  };
  context.on_timeout = [this, task] {
    emit_(task, "Warm start: the guest's clock was not set: its agent did not answer within " +
                   absl::FormatDuration(kRestoredClockTimeout),
         {{"warm_clock", "failed"}});
  };
  auto watch = std::make_unique<BootWatch>(std::move(context));
  absl::MutexLock lock(&mu_);  // as in WatchBoot: a replaced watch is joined unlocked
  warm_watches_[task.id].swap(watch);
}

}  // namespace ndq
