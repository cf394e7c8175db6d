// Task events for Nomad's TaskEvents stream: every subscriber (each open
// stream) gets every event published after it subscribed, in order.
#pragma once

#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace ndq {

struct TaskEvent {
  std::string task_id;
  std::string alloc_id;
  std::string task_name;
  std::string message;
  std::map<std::string, std::string> annotations;
  absl::Time time;
};

class EventBus {
 public:
  class Subscription {
   public:
    // The next event, waiting up to `timeout`.
    std::optional<TaskEvent> Next(absl::Duration timeout);

   private:
    friend class EventBus;
    static constexpr size_t kMaxQueued = 4096;  // a stuck reader loses the oldest
    absl::Mutex mu_;
    std::deque<TaskEvent> queue_ ABSL_GUARDED_BY(mu_);
  };

  std::shared_ptr<Subscription> Subscribe();
  void Unsubscribe(const std::shared_ptr<Subscription>& subscription);
  void Publish(TaskEvent event);

 private:
  absl::Mutex mu_;
  std::vector<std::shared_ptr<Subscription>> subscribers_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ndq
