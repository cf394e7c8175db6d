#include "vm/event_bus.h"

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "../../support/deadlines.h"

namespace ndq {
namespace {

using ::testing::ElementsAre;
using ::testing::Pair;

using ::ndq::testing::kGenerous;
constexpr absl::Duration kBrief = absl::Milliseconds(20);  // for what must not

TaskEvent Event(const std::string& message, const std::string& task_id = "t1") {
  TaskEvent event;
  event.task_id = task_id;
  event.alloc_id = "a1";
  event.task_name = "vm";
  event.message = message;
  return event;
}

// Every message still queued for `sub`, oldest first.
std::vector<std::string> Drain(EventBus::Subscription& sub) {
  std::vector<std::string> messages;
  while (std::optional<TaskEvent> event = sub.Next(absl::ZeroDuration())) messages.push_back(event->message);
  return messages;
}

TEST(EventBus, ASubscriberGetsEventsInPublishOrderWithEveryField) {
  EventBus bus;
  std::shared_ptr<EventBus::Subscription> sub = bus.Subscribe();
  TaskEvent first = Event("Downloading image", "task-a");
  first.annotations = {{"source", "https://example.test/a.img"}, {"bytes", "1024"}};
  bus.Publish(first);
  bus.Publish(Event("Started QEMU", "task-b"));

  std::optional<TaskEvent> got = sub->Next(kGenerous);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->task_id, "task-a");
  EXPECT_EQ(got->alloc_id, "a1");
  EXPECT_EQ(got->task_name, "vm");
  EXPECT_EQ(got->message, "Downloading image");
  EXPECT_THAT(got->annotations, ElementsAre(Pair("bytes", "1024"), Pair("source", "https://example.test/a.img")));
  got = sub->Next(kGenerous);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->task_id, "task-b");
  EXPECT_EQ(got->message, "Started QEMU");
  EXPECT_FALSE(sub->Next(kBrief).has_value()) << "each event is delivered once";
}

TEST(EventBus, EverySubscriberGetsEveryEvent) {
  EventBus bus;
  std::vector<std::shared_ptr<EventBus::Subscription>> subs = {bus.Subscribe(), bus.Subscribe(), bus.Subscribe()};
  for (int i = 0; i < 5; ++i) bus.Publish(Event(absl::StrCat("e", i)));
  for (auto& sub : subs) EXPECT_THAT(Drain(*sub), ElementsAre("e0", "e1", "e2", "e3", "e4"));
}

TEST(EventBus, ASubscriberSeesOnlyWhatWasPublishedAfterItSubscribed) {
  EventBus bus;
  bus.Publish(Event("before anyone listened"));
  std::shared_ptr<EventBus::Subscription> early = bus.Subscribe();
  bus.Publish(Event("one"));
  std::shared_ptr<EventBus::Subscription> late = bus.Subscribe();
  bus.Publish(Event("two"));
  EXPECT_THAT(Drain(*early), ElementsAre("one", "two"));
  EXPECT_THAT(Drain(*late), ElementsAre("two"));
}

TEST(EventBus, AnUnsubscribedStreamGetsNothingMoreAndTheOthersCarryOn) {
  EventBus bus;
  std::shared_ptr<EventBus::Subscription> leaving = bus.Subscribe();
  std::shared_ptr<EventBus::Subscription> staying = bus.Subscribe();
  bus.Publish(Event("one"));
  bus.Unsubscribe(leaving);
  bus.Publish(Event("two"));
  // What was queued before unsubscribing is still there to read.
  EXPECT_THAT(Drain(*leaving), ElementsAre("one"));
  EXPECT_THAT(Drain(*staying), ElementsAre("one", "two"));
  EXPECT_FALSE(leaving->Next(kBrief).has_value());
}

TEST(EventBus, UnsubscribingTwiceOrAStrangerIsHarmless) {
  EventBus bus;
  EventBus other;
  std::shared_ptr<EventBus::Subscription> sub = bus.Subscribe();
  std::shared_ptr<EventBus::Subscription> stranger = other.Subscribe();
  bus.Unsubscribe(stranger);
  bus.Unsubscribe(nullptr);
  bus.Publish(Event("still here"));
  EXPECT_THAT(Drain(*sub), ElementsAre("still here"));
  bus.Unsubscribe(sub);
  bus.Unsubscribe(sub);
  bus.Publish(Event("gone"));
  EXPECT_FALSE(sub->Next(kBrief).has_value());
}

TEST(EventBus, NextWaitsAboutTheTimeoutWhenNothingComes) {
  EventBus bus;
  std::shared_ptr<EventBus::Subscription> sub = bus.Subscribe();
  const absl::Time start = absl::Now();
  EXPECT_FALSE(sub->Next(absl::Milliseconds(100)).has_value());
  const absl::Duration waited = absl::Now() - start;
  EXPECT_GE(waited, absl::Milliseconds(90));
  EXPECT_LT(waited, absl::Seconds(5));
}

TEST(EventBus, AWaitingReaderWakesAsSoonAsAnEventIsPublished) {
  EventBus bus;
  std::shared_ptr<EventBus::Subscription> sub = bus.Subscribe();
  std::optional<TaskEvent> got;
  absl::Duration waited;
  std::thread reader([&] {
    const absl::Time start = absl::Now();
    got = sub->Next(absl::Seconds(30));
    waited = absl::Now() - start;
  });
  bus.Publish(Event("wake up"));
  reader.join();
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->message, "wake up");
  EXPECT_LT(waited, absl::Seconds(10)) << "woken by the event, not by the timeout";
}

TEST(EventBus, PublishStampsTheTimeOnlyWhenTheEventHasNone) {
  EventBus bus;
  std::shared_ptr<EventBus::Subscription> sub = bus.Subscribe();
  const absl::Time before = absl::Now();
  bus.Publish(Event("unstamped"));
  const absl::Time after = absl::Now();
  TaskEvent stamped = Event("stamped");
  stamped.time = absl::FromUnixSeconds(1700000000);
  bus.Publish(stamped);

  std::optional<TaskEvent> got = sub->Next(kGenerous);
  ASSERT_TRUE(got.has_value());
  EXPECT_GE(got->time, before);
  EXPECT_LE(got->time, after);
  got = sub->Next(kGenerous);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->time, absl::FromUnixSeconds(1700000000));
}

// A stream nobody reads must not grow without bound; it keeps the newest.
TEST(EventBus, AStuckReaderLosesTheOldestEventsNotTheNewest) {
  EventBus bus;
  std::shared_ptr<EventBus::Subscription> stuck = bus.Subscribe();
  constexpr int kPublished = 10000;
  for (int i = 0; i < kPublished; ++i) bus.Publish(Event(absl::StrCat(i)));
  const std::vector<std::string> kept = Drain(*stuck);
  ASSERT_FALSE(kept.empty());
  EXPECT_LT(kept.size(), static_cast<size_t>(kPublished));
  EXPECT_GE(kept.size(), 100u) << "a short burst must not be trimmed";
  // What is kept is an unbroken run that ends with the last event.
  int first = -1;
  ASSERT_TRUE(absl::SimpleAtoi(kept.front(), &first));
  for (size_t i = 0; i < kept.size(); ++i) ASSERT_EQ(kept[i], absl::StrCat(first + static_cast<int>(i)));
  EXPECT_EQ(kept.back(), absl::StrCat(kPublished - 1));
}

TEST(EventBus, AStreamKeepsItsQueuedEventsWhenTheBusIsGone) {
  std::shared_ptr<EventBus::Subscription> sub;
  {
    EventBus bus;
    sub = bus.Subscribe();
    bus.Publish(Event("last words"));
  }
  EXPECT_THAT(Drain(*sub), ElementsAre("last words"));
}

// Publishers on several threads: no event is lost, each publisher's events
// stay in its order, and all subscribers see one and the same sequence.
TEST(EventBus, ConcurrentPublishersGiveEverySubscriberTheSameOrder) {
  EventBus bus;
  std::vector<std::shared_ptr<EventBus::Subscription>> subs = {bus.Subscribe(), bus.Subscribe(), bus.Subscribe()};
  constexpr int kThreads = 4;
  constexpr int kEach = 250;
  std::vector<std::thread> publishers;
  for (int t = 0; t < kThreads; ++t) {
    publishers.emplace_back([&bus, t] {
      for (int i = 0; i < kEach; ++i) bus.Publish(Event(absl::StrCat(t, ":", i), absl::StrCat("task", t)));
    });
  }
  for (auto& p : publishers) p.join();

  const std::vector<std::string> reference = Drain(*subs[0]);
  ASSERT_EQ(reference.size(), static_cast<size_t>(kThreads * kEach));
  std::map<std::string, int> next_by_thread;
  for (const std::string& message : reference) {
    const std::string thread = message.substr(0, message.find(':'));
    EXPECT_EQ(message, absl::StrCat(thread, ":", next_by_thread[thread]++));
  }
  EXPECT_EQ(Drain(*subs[1]), reference);
  EXPECT_EQ(Drain(*subs[2]), reference);
}

}  // namespace
}  // namespace ndq
