// Records the plugin's TaskEvents stream, as Nomad's client reads it.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "nomad/driver.grpc.pb.h"
#include "nomadplugin/driver_client.h"

namespace ndq::testing {

struct RecordedEvent {
  std::string task_id;
  std::string message;
  std::map<std::string, std::string> annotations;
};

// Collects every TaskEvents message the plugin sends on one stream. The
// constructor returns once the plugin has subscribed the stream (it sends the
// stream's headers right after subscribing), so every event published after
// that reaches this recorder.
class EventRecorder {
 public:
  explicit EventRecorder(nomadplugin::DriverClient& client)
      : context_(client.NewContext(absl::InfiniteDuration())),
        reader_(Subscribe(client, context_.get())),
        thread_([this] {
          hashicorp::nomad::plugins::drivers::proto::DriverTaskEvent event;
          while (reader_->Read(&event)) {
            RecordedEvent recorded{event.task_id(), event.message(),
                                   {event.annotations().begin(), event.annotations().end()}};
            absl::MutexLock lock(&mu_);
            events_.push_back(std::move(recorded));
          }
        }) {}
  ~EventRecorder() {
    context_->TryCancel();
    thread_.join();
  }
  EventRecorder(const EventRecorder&) = delete;
  EventRecorder& operator=(const EventRecorder&) = delete;

  // Waits until some event's "task_id: message" contains `needle`.
  bool WaitFor(const std::string& needle, absl::Duration timeout) {
    return WaitUntil(
        [&](const RecordedEvent& e) { return absl::StrCat(e.task_id, ": ", e.message).find(needle) != std::string::npos; },
        timeout);
  }
  // Waits until an event of task `task_id` has a message containing `needle`.
  bool WaitFor(const std::string& task_id, const std::string& needle, absl::Duration timeout) {
    return WaitForCount(task_id, needle, 1, timeout);
  }
  // Waits until `count` events of task `task_id` have messages containing `needle`.
  bool WaitForCount(const std::string& task_id, const std::string& needle, int count, absl::Duration timeout) {
    return WaitUntil(
        [&](const RecordedEvent& e) { return e.task_id == task_id && e.message.find(needle) != std::string::npos; },
        timeout, count);
  }

  // Every event so far, in arrival order.
  std::vector<RecordedEvent> Events() {
    absl::MutexLock lock(&mu_);
    return events_;
  }
  // The messages of one task so far, in arrival order.
  std::vector<std::string> Messages(const std::string& task_id) {
    std::vector<std::string> out;
    absl::MutexLock lock(&mu_);
    for (const RecordedEvent& e : events_) {
      if (e.task_id == task_id) out.push_back(e.message);
    }
    return out;
  }
  // Every event so far as "task_id: message" lines, for failure messages.
  std::string All() {
    std::vector<std::string> lines;
    absl::MutexLock lock(&mu_);
    for (const RecordedEvent& e : events_) lines.push_back(absl::StrCat(e.task_id, ": ", e.message));
    return absl::StrJoin(lines, "\n");
  }

 private:
  using Reader = grpc::ClientReader<hashicorp::nomad::plugins::drivers::proto::DriverTaskEvent>;
  static std::unique_ptr<Reader> Subscribe(nomadplugin::DriverClient& client, grpc::ClientContext* context) {
    std::unique_ptr<Reader> reader = client.driver().TaskEvents(context, {});
    reader->WaitForInitialMetadata();  // returns early too if the call fails
    return reader;
  }

  bool WaitUntil(const std::function<bool(const RecordedEvent&)>& match, absl::Duration timeout, int count = 1) {
    absl::MutexLock lock(&mu_);
    auto seen = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      int n = 0;
      for (const RecordedEvent& e : events_) {
        if (match(e) && ++n >= count) return true;
      }
      return false;
    };
    return mu_.AwaitWithTimeout(absl::Condition(&seen), timeout);
  }

  std::unique_ptr<grpc::ClientContext> context_;
  std::unique_ptr<Reader> reader_;
  absl::Mutex mu_;
  std::vector<RecordedEvent> events_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

// Nothing when each of `needles` is a substring of one of `messages`, in this
// order (other messages may come between); else what is missing, for a test
// failure message.
inline std::string CheckInOrder(const std::vector<std::string>& messages, const std::vector<std::string>& needles) {
  size_t at = 0;
  for (const std::string& needle : needles) {
    while (at < messages.size() && messages[at].find(needle) == std::string::npos) ++at;
    if (at == messages.size()) {
      return absl::StrCat("no \"", needle, "\" after the events before it, in:\n  ", absl::StrJoin(messages, "\n  "));
    }
    ++at;
  }
  return "";
}

}  // namespace ndq::testing
