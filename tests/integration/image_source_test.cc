// Tasks started from image_source: a real HTTP server on loopback, the shared
// cache, per-task overlays, and real QEMU booting what was downloaded.
#include <signal.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <atomic>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../support/event_recorder.h"
#include "../support/http_test_server.h"
#include "../support/plugin_harness.h"
#include "../support/temp_dir.h"
#include "../support/test_guest.h"
#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "image/checksum.h"

namespace ndq {
namespace {

using ::ndq::testing::AddTaskPort;
using ::ndq::testing::EventRecorder;
using ::ndq::testing::FakeAlloc;
using ::ndq::testing::FreePort;
using ::ndq::testing::HttpTestServer;
using ::ndq::testing::Sha256Of;
using ::ndq::testing::kGuestBootTimeout;
using ::ndq::testing::PluginHarness;
using ::ndq::testing::StartIsRecoverable;
using ::ndq::testing::ReadFile;
using ::ndq::testing::TempDir;
using ::ndq::testing::TestGuestDir;
using ::ndq::testing::WaitForFileToContain;
using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;
namespace driverpb = hashicorp::nomad::plugins::drivers::proto;

std::string HttpGet(const std::string& url) {
  auto out = RunCommand({"/usr/bin/curl", "-s", "--max-time", "5", url}, absl::Seconds(10));
  return out.ok() && out->exit_code == 0 ? out->output : "";
}

class ImageSourceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(TestGuestDir().ok()) << TestGuestDir().status();
    fs::copy_file(*TestGuestDir() + "/guest.qcow2", served_ / "guest.qcow2");
    fs::copy_file(*TestGuestDir() + "/guest-noacpi.qcow2", served_ / "other.qcow2");
    digest_ = Sha256Of(served_ / "guest.qcow2");
    std::ofstream(served_ / "SHA256SUMS") << digest_ << "  guest.qcow2\n"
                                          << Sha256Of(served_ / "other.qcow2") << "  other.qcow2\n";
    ASSERT_TRUE(server_.Start({"--root", served_.path()}));
    base_ = absl::StrCat("http://127.0.0.1:", server_.port());
    plugin_config_ = {{"image_cache_dir", cache_.path()}};
    Launch();
  }
  void TearDown() override {
    // VMs a test left running must not outlive it.
    ::ndq::testing::KillVmsUnder(state_.path());
    harness_.reset();
    server_.Stop();
  }
  void Launch() { harness_ = std::make_unique<PluginHarness>(state_.path() + "/s", plugin_config_); }

  nlohmann::json Config(nlohmann::json extra) {
    nlohmann::json config = {{"drive_interface", "virtio"}, {"graceful_shutdown", true}};
    for (const auto& [k, v] : extra.items()) config[k] = v;
    return config;
  }

  int FullGets(const std::string& path) {
    int n = 0;
    for (absl::string_view line : absl::StrSplit(HttpGet(base_ + "/_log"), '\n', absl::SkipEmpty())) {
      const nlohmann::json entry = nlohmann::json::parse(std::string(line));
      if (entry["method"] == "GET" && entry["path"] == path && entry.value("range", "").empty()) ++n;
    }
    return n;
  }

  void ExpectRefused(const nlohmann::json& config, const std::string& message) {
    FakeAlloc alloc("bad");
    const grpc::Status status = harness_->Start(alloc.Task(config), nullptr);
    EXPECT_FALSE(status.ok());
    EXPECT_THAT(status.error_message(), HasSubstr(message));
    EXPECT_FALSE(fs::exists(alloc.task_dir() + "/image-overlay.qcow2"));
  }

  TempDir served_, cache_, state_;
  HttpTestServer server_;
  std::string base_, digest_;
  nlohmann::json plugin_config_;
  std::unique_ptr<PluginHarness> harness_;
};

TEST_F(ImageSourceTest, BootsFromAVerifiedDownloadThroughAnOverlay) {
  EventRecorder events(harness_->client());
  FakeAlloc alloc("web");
  const int port = FreePort();
  driverpb::TaskConfig task = alloc.Task(Config({{"image_source", base_ + "/guest.qcow2"},
                                                 {"checksum", "sha256:" + digest_},
                                                 {"disk_size", "1G"},
                                                 {"port_map", {{{"http", 80}}}}}));
  AddTaskPort(&task, "http", port);
  const grpc::Status started = harness_->Start(task, nullptr);
  ASSERT_TRUE(started.ok()) << started.error_message();
  ASSERT_TRUE(WaitForFileToContain(alloc.stdout_path(), "GUEST-READY", kGuestBootTimeout));
  EXPECT_THAT(HttpGet("http://127.0.0.1:" + std::to_string(port) + "/"), HasSubstr("test guest"));

  // The cached image is shared and read-only; the task writes to its overlay, grown to disk_size.
  const std::string cached = cache_ / ("sha256-" + digest_);
  struct stat st;
  ASSERT_EQ(::stat(cached.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0222, 0u);
  EXPECT_EQ(Sha256Of(cached), digest_);
  const std::string overlay = alloc.task_dir() + "/image-overlay.qcow2";
  auto info = RunCommand({"/usr/bin/qemu-img", "info", "-U", "--output=json", overlay}, absl::Seconds(10));
  ASSERT_TRUE(info.ok());
  const nlohmann::json overlay_info = nlohmann::json::parse(info->output);
  EXPECT_EQ(overlay_info["virtual-size"], 1024ll * 1024 * 1024);
  EXPECT_EQ(overlay_info["full-backing-filename"], cached);

  for (const char* milestone : {"Downloading image", "Image downloaded and verified", "Task disk created",
                                "Started QEMU"}) {
    EXPECT_TRUE(events.WaitFor(milestone, absl::Seconds(5))) << milestone << " not in:\n" << events.All();
  }
  ASSERT_TRUE(harness_->Stop(task.id(), absl::Seconds(20)).ok());
  EXPECT_TRUE(events.WaitFor("Sent ACPI powerdown", absl::Seconds(5))) << events.All();
  EXPECT_TRUE(events.WaitFor("VM powered off", absl::Seconds(5))) << events.All();
}

TEST_F(ImageSourceTest, WrongChecksumLeavesNothingBehind) {
  const std::string wrong(64, 'a');
  ExpectRefused(Config({{"image_source", base_ + "/guest.qcow2"}, {"checksum", "sha256:" + wrong}}), wrong);
  FakeAlloc alloc("bad2");
  const grpc::Status status = harness_->Start(
      alloc.Task(Config({{"image_source", base_ + "/guest.qcow2"}, {"checksum", "sha256:" + wrong}})), nullptr);
  // Neither the actual digest nor the size is told (the two-step digest attack).
  EXPECT_THAT(status.error_message(), Not(HasSubstr(digest_)));
  EXPECT_THAT(status.error_message(), Not(HasSubstr("bytes")));
  for (const auto& entry : fs::directory_iterator(cache_.path())) {
    EXPECT_EQ(entry.path().filename().string()[0], '.') << "left in the cache: " << entry.path();
  }
}

// Booting from a download is shown above; here the five VMs stay paused (-S),
// so the test measures sharing, not how fast a loaded host boots five guests.
TEST_F(ImageSourceTest, FiveTasksAtOnceShareOneDownload) {
  std::vector<std::unique_ptr<FakeAlloc>> allocs;
  std::vector<driverpb::TaskConfig> tasks;
  for (int i = 0; i < 5; ++i) {
    allocs.push_back(std::make_unique<FakeAlloc>("vm" + std::to_string(i)));
    tasks.push_back(allocs.back()->Task(Config(
        {{"image_source", base_ + "/guest.qcow2"}, {"checksum_url", base_ + "/SHA256SUMS"}, {"args", {"-S"}}})));
  }
  std::vector<std::thread> threads;
  std::vector<grpc::Status> results(5);
  for (int i = 0; i < 5; ++i) threads.emplace_back([&, i] { results[i] = harness_->Start(tasks[i], nullptr); });
  for (auto& t : threads) t.join();
  for (const auto& status : results) ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(FullGets("/guest.qcow2"), 1);
  // Each VM runs on an overlay of its own over the one cached image.
  const std::string cached = cache_ / ("sha256-" + digest_);
  for (const auto& alloc : allocs) {
    const std::string overlay = alloc->task_dir() + "/image-overlay.qcow2";
    auto info = RunCommand({"/usr/bin/qemu-img", "info", "-U", "--output=json", overlay}, absl::Seconds(10));
    ASSERT_TRUE(info.ok() && info->exit_code == 0) << overlay;
    EXPECT_EQ(nlohmann::json::parse(info->output)["full-backing-filename"], cached) << overlay;
  }
  for (const auto& task : tasks) EXPECT_TRUE(harness_->Destroy(task.id(), true).ok());
}

TEST_F(ImageSourceTest, EvictionSparesImagesInUse) {
  plugin_config_["image_cache_max_size"] = "1K";
  ASSERT_NO_FATAL_FAILURE(Launch());
  FakeAlloc a("a"), b("b"), c("c");
  const auto task_a = a.Task(Config({{"image_source", base_ + "/guest.qcow2"}, {"checksum", digest_}}));
  const auto task_b = b.Task(Config({{"image_source", base_ + "/other.qcow2"}, {"checksum_url", base_ + "/SHA256SUMS"}}));
  ASSERT_TRUE(harness_->Start(task_a, nullptr).ok());
  ASSERT_TRUE(harness_->Start(task_b, nullptr).ok());
  const std::string image_a = cache_ / ("sha256-" + digest_);
  EXPECT_TRUE(fs::exists(image_a)) << "over the limit, but in use";
  ASSERT_TRUE(harness_->Stop(task_a.id(), absl::Seconds(1), "SIGKILL").ok());
  ASSERT_TRUE(harness_->Destroy(task_a.id(), false).ok());
  // The next start evicts what no running task uses.
  ASSERT_TRUE(harness_->Start(c.Task(Config({{"image_source", base_ + "/other.qcow2"},
                                             {"checksum_url", base_ + "/SHA256SUMS"}})),
                              nullptr)
                  .ok());
  EXPECT_FALSE(fs::exists(image_a));
}

TEST_F(ImageSourceTest, AfterAPluginRestartEvictionAndConcurrentRecoversKeepTheVm) {
  plugin_config_["image_cache_max_size"] = "1K";
  ASSERT_NO_FATAL_FAILURE(Launch());
  FakeAlloc a("a"), c("c");
  driverpb::TaskHandle handle;
  ASSERT_TRUE(harness_->Start(a.Task(Config({{"image_source", base_ + "/guest.qcow2"}, {"checksum", digest_}})),
                              &handle)
                  .ok());
  const std::string image_a = cache_ / ("sha256-" + digest_);
  ASSERT_NO_FATAL_FAILURE(harness_->Restart());
  // The new plugin knows no task yet; a start that evicts must still spare a's image.
  ASSERT_TRUE(harness_->Start(c.Task(Config({{"image_source", base_ + "/other.qcow2"},
                                             {"checksum_url", base_ + "/SHA256SUMS"}})),
                              nullptr)
                  .ok());
  EXPECT_TRUE(fs::exists(image_a)) << "evicted while its VM was still to be recovered";
  // Nomad may retry RecoverTask while an earlier call is still running.
  EventRecorder events(harness_->client());
  std::vector<std::thread> recovers;
  std::atomic<int> recovered{0};
  for (int i = 0; i < 3; ++i) {
    recovers.emplace_back([&] { recovered += harness_->Recover(handle).ok() ? 1 : 0; });
  }
  for (std::thread& t : recovers) t.join();
  EXPECT_EQ(recovered.load(), 3);
  ASSERT_TRUE(harness_->Stop(handle.config().id(), absl::Seconds(1), "SIGKILL").ok());
  driverpb::WaitTaskResponse wait;
  ASSERT_TRUE(harness_->Wait(handle.config().id(), &wait, absl::Seconds(10)).ok());
  ASSERT_TRUE(events.WaitFor(handle.config().id(), "VM exited", absl::Seconds(10))) << events.All();
  // One watcher per VM: its exit is reported once, not once per RecoverTask.
  EXPECT_FALSE(events.WaitForCount(handle.config().id(), "VM exited", 2, absl::Seconds(2))) << events.All();
  ASSERT_TRUE(harness_->Destroy(handle.config().id(), false).ok());
  for (const auto& file : fs::directory_iterator(cache_.path())) {
    EXPECT_FALSE(absl::StartsWith(file.path().filename().string(), ".lease-sha256-" + digest_))
        << "destroy ends the recovered task's lease: " << file.path();
  }
}

TEST_F(ImageSourceTest, LocalFilesGoThroughTheCacheToo) {
  // A local source passes the same admission as image_path.
  plugin_config_["image_paths"] = {served_.path()};
  Launch();
  FakeAlloc a("a"), b("b");
  const nlohmann::json config =
      Config({{"image_source", "file://" + (served_ / "guest.qcow2")}, {"checksum", digest_}, {"args", {"-S"}}});
  const auto task_a = a.Task(config);
  const auto task_b = b.Task(config);
  ASSERT_TRUE(harness_->Start(task_a, nullptr).ok());
  EventRecorder events(harness_->client());
  ASSERT_TRUE(harness_->Start(task_b, nullptr).ok());
  EXPECT_TRUE(fs::exists(cache_ / ("sha256-" + digest_)));
  EXPECT_TRUE(events.WaitFor("Image cache hit", absl::Seconds(5))) << events.All();
  for (const auto* task : {&task_a, &task_b}) ASSERT_TRUE(harness_->Destroy(task->id(), true).ok());
}

// The hole this closes: a local image_source (a path or file://) or a local
// checksum_url used to be copied into the cache from anywhere root can read,
// and a wrong checksum's answer carried the file's real digest, so a second
// start could boot it. Now it passes image_path's admission before a byte is
// read, and the answer says nothing about the file.
TEST_F(ImageSourceTest, LocalSourcesOutsideTheAllowlistsAreRefusedUnread) {
  const std::string secret = (served_ / "guest.qcow2");  // root-readable, not allowed
  const std::string wrong = "sha256:" + std::string(64, 'a');
  for (const std::string& source : {secret, "file://" + secret, std::string("/etc/shadow"),
                                    std::string("file:///etc/shadow"), (served_ / "missing")}) {
    FakeAlloc alloc("bad");
    const grpc::Status status = harness_->Start(alloc.Task(Config({{"image_source", source}, {"checksum", wrong}})), nullptr);
    EXPECT_EQ(StartIsRecoverable(status), false) << source << ": a refusal does not heal on retry";
    EXPECT_THAT(status.error_message(), HasSubstr("is not an existing file inside")) << source;
    EXPECT_THAT(status.error_message(), Not(HasSubstr(digest_))) << source;
    EXPECT_THAT(status.error_message(), Not(HasSubstr("mismatch"))) << source;
    // And with the right digest it is refused just the same.
    const grpc::Status second = harness_->Start(
        alloc.Task(Config({{"image_source", source}, {"checksum", "sha256:" + digest_}})), nullptr);
    EXPECT_THAT(second.error_message(), HasSubstr("is not an existing file inside")) << source;
  }
  // A local checksum file outside the allowlists is refused the same way.
  FakeAlloc alloc("bad-sums");
  const grpc::Status sums = harness_->Start(
      alloc.Task(Config({{"image_source", base_ + "/guest.qcow2"}, {"checksum_url", "file://" + (served_ / "SHA256SUMS")}})),
      nullptr);
  EXPECT_EQ(StartIsRecoverable(sums), false);
  EXPECT_THAT(sums.error_message(), HasSubstr("task config \"checksum_url\": \"")) << "one field prefix, not two";
  EXPECT_THAT(sums.error_message(), HasSubstr("is not an existing file inside"));
  EXPECT_FALSE(fs::exists(cache_ / ("sha256-" + digest_))) << "nothing was copied into the cache";
}

// Nomad gives up on a start (its context ends) in the middle of a slow
// download: the download stops, nothing is left, and a later start works.
TEST_F(ImageSourceTest, CancelledStartMidDownloadLeavesNothing) {
  FakeAlloc alloc("slow");
  const driverpb::TaskConfig task =
      alloc.Task(Config({{"image_source", base_ + "/guest.qcow2?rate=200000"}, {"checksum", "sha256:" + digest_}}));
  auto context = harness_->client().NewContext(absl::Seconds(3));
  driverpb::StartTaskRequest request;
  *request.mutable_task() = task;
  driverpb::StartTaskResponse response;
  const grpc::Status status = harness_->driver().StartTask(context.get(), request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << status.error_message();
  // The plugin notices within a moment: no partial download, lock holder,
  // state or process stays.
  auto leftovers = [&] {
    std::vector<std::string> found;
    std::error_code ignored;
    for (const auto& entry : fs::directory_iterator(cache_.path(), ignored)) {
      const std::string name = entry.path().filename().string();
      if (name.find(".part") != std::string::npos || name.rfind(".lease-", 0) == 0 || name.rfind("sha256-", 0) == 0) {
        found.push_back(name);
      }
    }
    for (const auto& entry : fs::directory_iterator(state_.path() + "/s", ignored)) {
      if (entry.path().filename() != "host-facts.json") found.push_back(entry.path());
    }
    if (fs::exists(alloc.task_dir() + "/image-overlay.qcow2")) found.push_back("overlay");
    return found;
  };
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (!leftovers().empty() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(50));
  EXPECT_THAT(leftovers(), ::testing::IsEmpty());
  EXPECT_TRUE(::ndq::testing::ProcessesMentioning(state_.path()).empty());
  // The same task starts fine afterwards, at full speed.
  FakeAlloc again("again");
  const driverpb::TaskConfig full = again.Task(Config({{"image_source", base_ + "/guest.qcow2"}, {"checksum", "sha256:" + digest_}}));
  const grpc::Status started = harness_->Start(full, nullptr);
  ASSERT_TRUE(started.ok()) << started.error_message();
  ASSERT_TRUE(harness_->Destroy(full.id(), true).ok());
}

TEST_F(ImageSourceTest, BadImageOptionsAreRefusedClearly) {
  const std::string url = base_ + "/guest.qcow2";
  ExpectRefused(Config({{"image_source", url}, {"checksum", "crc32:1234"}}), "unknown checksum type \"crc32\"");
  ExpectRefused(Config({{"image_source", url}, {"checksum", "sha256:xyz"}}), "hexadecimal");
  ExpectRefused(Config({{"image_source", url}, {"image_path", "local/a.img"}, {"checksum", digest_}}),
                "exactly one of \"image_path\" and \"image_source\"");
  ExpectRefused(Config({{"image_source", "ftp://example.com/a.img"}, {"checksum", digest_}}), "unsupported URL");
  ExpectRefused(Config({{"image_source", url}, {"checksum", digest_}, {"disk_size", "20 apples"}}), "disk_size");
  ExpectRefused(Config({{"image_source", url}}), "allow_unverified_images");
  ExpectRefused(Config({{"image_source", base_ + "/missing.qcow2"}, {"checksum", digest_}}), "404");
}

// The VM is planned before its image is fetched: a job that can never start
// (an emulator the operator did not allow, a port_map label with no port, a
// warm_start its VM cannot have) is refused without a byte downloaded, and
// Nomad is told not to retry.
TEST_F(ImageSourceTest, AJobThatCannotRunIsRefusedBeforeItsImageIsFetched) {
  const nlohmann::json source = {{"image_source", base_ + "/guest.qcow2"}, {"checksum", "sha256:" + digest_}};
  const std::vector<std::pair<nlohmann::json, std::string>> cases = {
      {{{"emulator", "aarch64"}}, "emulator"},
      {{{"port_map", {{{"nosuchlabel", 80}}}}}, "nosuchlabel"},
      {{{"warm_start", {{"ready_port", "nosuchlabel"}}}}, "warm_start"},
  };
  const int gets_before = FullGets("/guest.qcow2");
  for (const auto& [extra, message] : cases) {
    SCOPED_TRACE(extra.dump());
    nlohmann::json config = Config(source);
    for (const auto& [k, v] : extra.items()) config[k] = v;
    FakeAlloc alloc("early");
    const grpc::Status status = harness_->Start(alloc.Task(config), nullptr);
    ASSERT_FALSE(status.ok());
    EXPECT_THAT(status.error_message(), HasSubstr(message));
    EXPECT_EQ(StartIsRecoverable(status), std::optional<bool>(false));
    EXPECT_FALSE(fs::exists(alloc.task_dir() + "/image-overlay.qcow2"));
  }
  EXPECT_EQ(FullGets("/guest.qcow2"), gets_before) << "nothing was fetched";
  EXPECT_FALSE(fs::exists(cache_ / ("sha256-" + digest_)));
}

TEST_F(ImageSourceTest, AllowlistHoldsSourcesChecksumFilesAndRedirects) {
  plugin_config_["image_source_allowlist"] = {base_ + "/"};
  Launch();
  // Allowed, through a redirect that stays inside the allowlist.
  FakeAlloc ok("ok");
  const auto task = ok.Task(Config({{"image_source", base_ + "/redirect/guest.qcow2"},
                                    {"checksum_url", base_ + "/SHA256SUMS"},
                                    {"args", {"-S"}}}));
  const grpc::Status started = harness_->Start(task, nullptr);
  ASSERT_TRUE(started.ok()) << started.error_message();
  ASSERT_TRUE(harness_->Destroy(task.id(), true).ok());

  const std::string outside = "http://localhost:" + std::to_string(server_.port());  // same server, other name
  const int requests_before = FullGets("/guest.qcow2") + FullGets("/SHA256SUMS");
  ExpectRefused(Config({{"image_source", outside + "/guest.qcow2"}, {"checksum", digest_}}),
                "task config \"image_source\": \"" + outside + "/guest.qcow2\" matches no prefix in the plugin "
                "config's image_source_allowlist");
  ExpectRefused(Config({{"image_source", base_ + "/guest.qcow2"}, {"checksum_url", outside + "/SHA256SUMS"}}),
                "task config \"checksum_url\"");
  ExpectRefused(Config({{"image_source", base_ + "/guest.qcow2"},
                        {"image_sources", {base_ + "/other.qcow2", outside + "/other.qcow2"}},
                        {"checksum", digest_}}),
                "task config \"image_sources[1]\"");
  EXPECT_EQ(FullGets("/guest.qcow2") + FullGets("/SHA256SUMS"), requests_before) << "refused before any request";
  // A redirect out of the allowlist is refused when the download meets it (an image not cached yet).
  ExpectRefused(Config({{"image_source", base_ + "/redirect-to?url=" + outside + "/other.qcow2"},
                        {"checksum", Sha256Of(served_ / "other.qcow2")}}),
                "refused to follow a redirect");
  EXPECT_EQ(FullGets("/other.qcow2"), 0);
}

}  // namespace
}  // namespace ndq
