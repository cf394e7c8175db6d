#include "vm/event_bus.h"

#include <algorithm>

namespace ndq {

std::optional<TaskEvent> EventBus::Subscription::Next(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !queue_.empty(); };
  if (!mu_.AwaitWithTimeout(absl::Condition(&ready), timeout)) return std::nullopt;
  TaskEvent event = std::move(queue_.front());
  queue_.pop_front();
  return event;
}

std::shared_ptr<EventBus::Subscription> EventBus::Subscribe() {
  auto subscription = std::make_shared<Subscription>();
  absl::MutexLock lock(&mu_);
  subscribers_.push_back(subscription);
  return subscription;
}

void EventBus::Unsubscribe(const std::shared_ptr<Subscription>& subscription) {
  absl::MutexLock lock(&mu_);
  subscribers_.erase(std::remove(subscribers_.begin(), subscribers_.end(), subscription), subscribers_.end());
}

void EventBus::Publish(TaskEvent event) {
  if (event.time == absl::Time()) event.time = absl::Now();
  absl::MutexLock lock(&mu_);
  for (const auto& subscriber : subscribers_) {
    absl::MutexLock sub_lock(&subscriber->mu_);
    if (subscriber->queue_.size() >= Subscription::kMaxQueued) subscriber->queue_.pop_front();
    subscriber->queue_.push_back(event);
  }
}

}  // namespace ndq
