// Warm starts (issue 13) end to end: the real plugin, supervisor, QEMU (TCG)
// and the test guest. The first start of a config boots cold and, once the
// guest is ready, leaves a template (RAM, device state, a frozen disk layer)
// in the image cache; later starts of the same config restore from it, each
// with its own port forwards and its own disk overlay. A template that does
// not fit (image, config, QEMU) or fails its check is never used.
//
// Wall time: every test of the suite that needs a template takes it through
// SharedTemplate(), once per process (ctest runs each test in a process of
// its own, so each of those takes it once; run the binary alone to share it).
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../support/event_recorder.h"
#include "../support/guest_task.h"
#include "../support/plugin_harness.h"
#include "../support/temp_dir.h"
#include "../support/test_guest.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "qemu_driver/supervisor_protocol.h"
#include "image/vm_template.h"
#include "vm/vm_task.h"

namespace ndq {
namespace {

namespace fs = std::filesystem;
using ::ndq::testing::AddTaskPort;
using ::ndq::testing::EventRecorder;
using ::ndq::testing::ExecOnce;
using ::ndq::testing::ExecOutcome;
using ::ndq::testing::FakeAlloc;
using ::ndq::testing::FreePort;
using ::ndq::testing::Guest;
using ::ndq::testing::HttpGet;
using ::ndq::testing::kGuestBootTimeout;
using ::ndq::testing::Listing;
using ::ndq::testing::Page;
using ::ndq::testing::PluginHarness;
using ::ndq::testing::ProcessAlive;
using ::ndq::testing::ProcessesMentioning;
using ::ndq::testing::ReadFile;
using ::ndq::testing::RecordedEvent;
using ::ndq::testing::RecordOf;
using ::ndq::testing::TempDir;
using ::ndq::testing::TestGuestDir;
using ::ndq::testing::WaitForFileToContain;
using ::ndq::testing::WaitUntil;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using json = nlohmann::json;

constexpr char kPage[] = "hello from the nomad-driver-qemu test guest";
// A template is saved once the guest is ready: a cold boot plus the save.
const absl::Duration kTemplateTimeout = kGuestBootTimeout + absl::Seconds(60);
// A restored guest answers within a second on an idle machine; generous for
// ten at once under a sanitizer on two cores.
constexpr absl::Duration kRestoredPageTimeout = absl::Seconds(90);
// The marker a restored VM writes to its disk: one sector of 'M' (0x4d) at 36 MiB,
// past what the guest's boot reads (it runs from its initramfs after boot).
constexpr int kMarkerSector = 73728;
// A restored guest's clock is checked against a template at least this old.
constexpr absl::Duration kTemplateAgeForClock = absl::Seconds(6);
constexpr char kMarkerOffset[] = "36M";

// The first event of task `id` whose message contains `needle`.
std::optional<RecordedEvent> EventOf(EventRecorder& events, const std::string& id, const std::string& needle) {
  for (RecordedEvent& e : events.Events()) {
    if (e.task_id == id && e.message.find(needle) != std::string::npos) return e;
  }
  return std::nullopt;
}

std::string AnnotationOf(const std::optional<RecordedEvent>& e, const std::string& key) {
  if (!e || e->annotations.count(key) == 0) return "<no annotation " + key + ">";
  return e->annotations.at(key);
}

bool IsHexKey(const std::string& key) {
  return key.size() == 64 && key.find_first_not_of("0123456789abcdef") == std::string::npos;
}

bool IsCount(const std::string& s) {
  uint64_t n = 0;
  return absl::SimpleAtoi(s, &n);
}

std::string Sha256(const std::string& path) {
  auto out = RunCommand({"/usr/bin/sha256sum", path}, absl::Seconds(60));
  return out.ok() && out->exit_code == 0 ? out->output.substr(0, 64) : "sha256sum failed: " + path;
}

// qemu-io on `image` (read-only, sharing QEMU's locks); its output.
std::string QemuIoRead(const std::string& image, const std::string& command) {
  auto out = RunCommand({"/usr/bin/qemu-io", "-r", "-U", "-f", "qcow2", "-c", command, image}, absl::Seconds(60));
  return out.ok() ? absl::StrCat("exit ", out->exit_code, ": ", out->output) : std::string(out.status().message());
}

// Whether `image` holds the marker sector.
bool HoldsMarker(const std::string& image) {
  const std::string out = QemuIoRead(image, absl::StrCat("read -P 0x4d ", kMarkerOffset, " 512"));
  return out.rfind("exit 0: ", 0) == 0 && out.find("Pattern verification failed") == std::string::npos &&
         out.find("read 512/512 bytes") != std::string::npos;
}

// Whether `pid` holds the listening TCP socket on 127.0.0.1:`port`.
bool ListensOn(pid_t pid, int port) {
  std::set<std::string> inodes;
  std::istringstream table(ReadFile("/proc/" + std::to_string(pid) + "/net/tcp"));
  std::string line;
  char wanted[16];
  std::snprintf(wanted, sizeof wanted, ":%04X", port);
  while (std::getline(table, line)) {
    std::vector<std::string> f = absl::StrSplit(line, ' ', absl::SkipEmpty());
    // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
    if (f.size() > 9 && absl::EndsWith(f[1], wanted) && f[3] == "0A") inodes.insert(f[9]);
  }
  std::error_code ec;
  for (fs::directory_iterator it("/proc/" + std::to_string(pid) + "/fd", ec), end; !ec && it != end; it.increment(ec)) {
    std::error_code ignored;
    const std::string target = fs::read_symlink(it->path(), ignored).string();
    for (const std::string& inode : inodes) {
      if (target == "socket:[" + inode + "]") return true;
    }
  }
  return false;
}

// Whether `pid` has ended: gone, or a zombie (a supervisor whose plugin was
// killed belongs to init, which may reap it late or, in a container, never).
bool Ended(pid_t pid) {
  if (!ProcessAlive(pid)) return true;
  const std::string stat = ReadFile("/proc/" + std::to_string(pid) + "/stat");
  const size_t close = stat.rfind(')');
  return close != std::string::npos && close + 2 < stat.size() && stat[close + 2] == 'Z';
}



std::map<std::string, std::string> DriverAttributes(PluginHarness& harness, const std::string& id) {
  driverpb::InspectTaskResponse inspect;
  const grpc::Status status = harness.Inspect(id, &inspect);
  EXPECT_TRUE(status.ok()) << status.error_message();
  const auto& attrs = inspect.driver().attributes();
  return {attrs.begin(), attrs.end()};
}

std::string AttributeOf(const std::map<std::string, std::string>& attrs, const std::string& key) {
  auto it = attrs.find(key);
  return it == attrs.end() ? "<no attribute " + key + ">" : it->second;
}

// One plugin, one image cache and one copy of the guest image for the whole
// suite; the template of the warm config is taken once (SharedTemplate()).
class WarmStartTest : public ::testing::Test {
 protected:
  struct Suite {
    TempDir state, cache, images;
    std::string state_dir;
    std::string image;  // our copy of guest-qga.qcow2, never written
    std::string image_sha256;
    std::unique_ptr<PluginHarness> harness;
    std::unique_ptr<EventRecorder> events;
    // The shared template: its key, or why it could not be taken.
    bool template_tried = false;
    std::string key, template_problem;
    int template_port = 0;
    std::string template_boot_id;  // what the template's guest made at boot
    absl::Time template_saved_at;
  };
  static Suite* suite_;

  static void SetUpTestSuite() {
    suite_ = new Suite;
    ASSERT_TRUE(TestGuestDir().ok()) << TestGuestDir().status();
    suite_->state_dir = suite_->state.path() + "/s";
    suite_->image = suite_->images / "guest-qga.qcow2";
    fs::copy_file(Guest("guest-qga.qcow2"), suite_->image);
    suite_->image_sha256 = Sha256(suite_->image);
    suite_->harness = std::make_unique<PluginHarness>(
        suite_->state_dir,
        json{{"image_paths", {suite_->images.path(), *TestGuestDir()}}, {"image_cache_dir", suite_->cache.path()}});
    suite_->events = std::make_unique<EventRecorder>(suite_->harness->client());
  }
  static void TearDownTestSuite() {
    if (suite_ == nullptr) return;
    ::ndq::testing::KillVmsUnder(suite_->state_dir);
    suite_->events.reset();
    suite_->harness.reset();
    delete suite_;
    suite_ = nullptr;
  }
  void SetUp() override { ASSERT_TRUE(suite_ != nullptr && suite_->harness != nullptr); }

  PluginHarness& harness() { return *suite_->harness; }
  EventRecorder& events() { return *suite_->events; }
  const std::string& state_dir() { return suite_->state_dir; }
  std::string TemplateDir(const std::string& key) { return suite_->cache.path() + "/tpl-" + key; }

  // The plugin is killed and started again; the event stream with it.
  void RestartPlugin() {
    suite_->events.reset();
    ASSERT_NO_FATAL_FAILURE(suite_->harness->Restart());
    suite_->events = std::make_unique<EventRecorder>(suite_->harness->client());
  }

  // The warm config: the suite's image (read-only with warm_start), the real
  // qemu-ga (exec), graceful stops, port "http" to the guest's web server,
  // ready when that port answers.
  json WarmConfig(const json& extra = json::object()) {
    json config = {{"image_path", suite_->image},
                   {"accelerator", "tcg"},
                   {"drive_interface", "virtio"},
                   {"graceful_shutdown", true},
                   {"guest_agent", true},
                   {"port_map", {{{"http", 80}}}},
                   {"warm_start", {{"ready_port", "http"}}}};
    for (const auto& [key, value] : extra.items()) config[key] = value;
    return config;
  }

  // Starts `config` in `alloc` with port "http" on `port`; "" or the error.
  std::string Start(FakeAlloc& alloc, const json& config, int port, driverpb::TaskHandle* handle,
                    int memory_mb = 256) {
    driverpb::TaskConfig task = alloc.Task(config, memory_mb);
    AddTaskPort(&task, "http", port);
    const grpc::Status status = harness().Start(task, handle);
    return status.ok() ? "" : status.error_message();
  }

  // The page on `port` within `timeout`; "" if it never came.
  std::string WaitForPage(int port, absl::Duration timeout) {
    std::string page;
    WaitUntil(
        [&] {
          page = HttpGet(port, 3);
          return page.find(kPage) != std::string::npos;
        },
        timeout);
    return page;
  }

  // Waits for the template-saved event of task `id`; false at the deadline or
  // at once when the driver says no template was saved.
  bool WaitForTemplate(const std::string& id, absl::Duration timeout) {
    bool saved = false;
    WaitUntil(
        [&] {
          for (const std::string& message : events().Messages(id)) {
            if (message.rfind("Warm start: template ", 0) == 0) saved = true;
            if (saved || message.rfind("Warm start: no template saved", 0) == 0) return true;
          }
          return false;
        },
        timeout);
    return saved;
  }

  // Starts a VM that must restore from the shared template; checks the event,
  // its annotations and InspectTask. Returns its handle (empty on failure).
  driverpb::TaskHandle StartRestored(FakeAlloc& alloc, int port) {
    driverpb::TaskHandle handle;
    const std::string error = Start(alloc, WarmConfig(), port, &handle);
    EXPECT_EQ(error, "");
    if (!error.empty()) return {};
    const std::string id = handle.config().id();
    const std::string key = suite_->key;
    EXPECT_TRUE(events().WaitFor(id, "Warm start: restored from template " + key.substr(0, 12) + " in ",
                                 absl::Seconds(10)))
        << events().All();
    const auto restored = EventOf(events(), id, "Warm start: restored from template");
    EXPECT_EQ(AnnotationOf(restored, "warm_start"), "restored");
    EXPECT_EQ(AnnotationOf(restored, "warm_template"), key);
    EXPECT_FALSE(EventOf(events(), id, "Warm start: booting cold").has_value()) << events().All();
    const auto attrs = DriverAttributes(harness(), id);
    EXPECT_EQ(AttributeOf(attrs, "warm_start"), "restored");
    EXPECT_EQ(AttributeOf(attrs, "warm_template"), key);
    return handle;
  }

  // The template of WarmConfig(), taken once: the first start of task "web"
  // boots cold (event, annotations, InspectTask), the guest becomes ready,
  // the template is saved (event, annotations, files) and the cold VM goes
  // on running without a reboot; then it is stopped and destroyed (restores
  // must not depend on it). Returns false (with a failure) when there is none.
  bool SharedTemplate() {
    if (suite_->template_tried) {
      if (suite_->key.empty()) ADD_FAILURE() << "no shared template: " << suite_->template_problem;
      return !suite_->key.empty();
    }
    suite_->template_tried = true;
    suite_->template_problem = "taking it failed (see the first test's failures)";
    FakeAlloc alloc("web");
    const int port = FreePort();
    driverpb::TaskHandle handle;
    const absl::Time started = absl::Now();
    const std::string error = Start(alloc, WarmConfig(), port, &handle);
    EXPECT_EQ(error, "");
    if (!error.empty()) return false;
    const std::string id = handle.config().id();

    EXPECT_TRUE(events().WaitFor(id, "Warm start: booting cold (no template yet)", absl::Seconds(10)))
        << events().All();
    const auto cold = EventOf(events(), id, "Warm start: booting cold");
    EXPECT_EQ(AnnotationOf(cold, "warm_start"), "cold");
    EXPECT_EQ(AnnotationOf(cold, "warm_reason"), "no template yet");
    const auto attrs = DriverAttributes(harness(), id);
    EXPECT_EQ(AttributeOf(attrs, "warm_start"), "cold");

    const bool saved = WaitForTemplate(id, kTemplateTimeout);
    EXPECT_TRUE(saved) << "no template saved within " << kTemplateTimeout << "; events:\n"
                       << events().All() << "\nserial console:\n"
                       << ReadFile(alloc.stdout_path());
    if (!saved) return false;
    std::cerr << "template saved " << absl::Now() - started << " after StartTask\n";
    const auto save = EventOf(events(), id, "Warm start: template ");
    const std::string key = AnnotationOf(save, "warm_template");
    EXPECT_TRUE(IsHexKey(key)) << key;
    if (!IsHexKey(key)) return false;
    EXPECT_THAT(save->message, HasSubstr("Warm start: template " + key.substr(0, 12) + " saved")) << save->message;
    for (const char* count : {"warm_template_ms", "warm_pause_ms", "warm_ram_bytes", "warm_state_bytes",
                              "warm_disk_bytes"}) {
      EXPECT_TRUE(IsCount(AnnotationOf(save, count))) << count << " = " << AnnotationOf(save, count);
    }
    uint64_t ram_bytes = 0;
    EXPECT_TRUE(absl::SimpleAtoi(AnnotationOf(save, "warm_ram_bytes"), &ram_bytes));
    EXPECT_GT(ram_bytes, 0u);
    std::cerr << "template: " << AnnotationOf(save, "warm_template_ms") << " ms in all, paused "
              << AnnotationOf(save, "warm_pause_ms") << " ms; ram " << AnnotationOf(save, "warm_ram_bytes")
              << " B, state " << AnnotationOf(save, "warm_state_bytes") << " B, disk "
              << AnnotationOf(save, "warm_disk_bytes") << " B\n";

    // The files of the template, in the image cache.
    const std::string dir = TemplateDir(key);
    const std::set<std::string> files = Listing(dir);
    for (const char* name : {"disk.qcow2", "manifest.json", "overlay.qcow2", "ram", "state"}) {
      EXPECT_EQ(files.count(name), 1u) << name << " missing from " << dir << ": " << absl::StrJoin(files, " ")
                                       << "; cache: " << absl::StrJoin(Listing(suite_->cache.path()), " ");
    }
    std::error_code ec;
    EXPECT_GT(fs::file_size(dir + "/state", ec), 0u) << dir;
    EXPECT_TRUE(json::accept(ReadFile(dir + "/manifest.json"))) << ReadFile(dir + "/manifest.json");

    // The cold VM was paused, not restarted: it still serves, booted once.
    EXPECT_THAT(WaitForPage(port, absl::Seconds(30)), HasSubstr(kPage));
    suite_->template_boot_id = Page(port, "boot-id");
    suite_->template_saved_at = absl::Now();
    EXPECT_EQ(suite_->template_boot_id.size(), 37u) << suite_->template_boot_id;
    // (The page may answer a moment before /init prints GUEST-READY.)
    EXPECT_TRUE(WaitForFileToContain(alloc.stdout_path(), "GUEST-READY", absl::Seconds(30)));
    const std::string console = ReadFile(alloc.stdout_path());
    EXPECT_EQ(console.find("SeaBIOS"), console.rfind("SeaBIOS")) << console;
    EXPECT_EQ(console.find("GUEST-READY"), console.rfind("GUEST-READY")) << console;
    EXPECT_TRUE(ProcessAlive(RecordOf(handle).qemu_pid));

    // Stopped as any cold VM, the template outliving it.
    const grpc::Status stopped = harness().Stop(id, absl::Seconds(30));
    EXPECT_TRUE(stopped.ok()) << stopped.error_message();
    driverpb::WaitTaskResponse wait;
    EXPECT_TRUE(harness().Wait(id, &wait, absl::Seconds(10)).ok());
    EXPECT_EQ(wait.result().exit_code(), 0) << wait.err();
    EXPECT_TRUE(harness().Destroy(id, false).ok());
    EXPECT_TRUE(fs::is_directory(dir)) << "the template outlives the VM it was taken from";
    if (::testing::Test::HasFailure()) return false;
    suite_->key = key;
    suite_->template_port = port;
    suite_->template_problem.clear();
    return true;
  }

  // The restored VM's guest clock was set to the host's time: the event,
  // and the guest's own `date` within a few seconds of the host's although
  // the template was saved long enough ago to tell.
  void ExpectClockSet(const std::string& id) {
    std::string outcome;
    WaitUntil(
        [&] {
          const auto clock = EventOf(events(), id, "Warm start: the guest's clock ");
          if (clock) outcome = clock->message;
          return clock.has_value();
        },
        absl::Seconds(90));
    ASSERT_EQ(outcome, "Warm start: the guest's clock was set to the host's time") << events().All();
    const absl::Duration age = absl::Now() - suite_->template_saved_at;
    EXPECT_GE(age, kTemplateAgeForClock) << "the template is too young to tell a set clock from a restored one";
    const ExecOutcome date = ExecOnce(harness(), id, {"/bin/date", "+%s"});
    ASSERT_TRUE(date.status.ok()) << date.status.error_message();
    int64_t guest_seconds = 0;
    ASSERT_TRUE(absl::SimpleAtoi(absl::StripAsciiWhitespace(date.out), &guest_seconds)) << date.out << date.err;
    EXPECT_LE(std::abs(guest_seconds - absl::ToUnixSeconds(absl::Now())), 2)
        << "guest time " << guest_seconds << "; the template was saved " << age << " ago";
  }

  // The warm pool's slots whose manifest says they are ready, by slot name.
  std::map<std::string, json> ReadySlots() {
    std::map<std::string, json> ready;
    for (const std::string& slot : ::ndq::testing::PoolSlots(state_dir())) {
      const json m = json::parse(ReadFile(state_dir() + "/pool/" + slot + "/slot.json"), nullptr, false);
      if (m.is_object() && m.value("ready", false)) ready[slot] = m;
    }
    return ready;
  }
  // Waits for a ready slot of template `key` other than `not_this`; its name
  // and manifest.
  std::pair<std::string, json> AwaitReadySlot(const std::string& key, const std::string& not_this = "") {
    std::pair<std::string, json> found;
    WaitUntil(
        [&] {
          for (auto& [slot, manifest] : ReadySlots()) {
            if (slot != not_this && manifest.value("key", "") == key) found = {slot, manifest};
          }
          return !found.first.empty();
        },
        absl::Seconds(90));
    return found;
  }

  // A restore of the shared template (destroyed at once) starts its pool;
  // the ready slot's name and manifest, or an empty name.
  std::pair<std::string, json> PoolAfterARestore() {
    FakeAlloc first("web");
    const driverpb::TaskHandle handle = StartRestored(first, FreePort());
    if (handle.config().id().empty()) return {};
    EXPECT_TRUE(harness().Destroy(handle.config().id(), true).ok());
    return AwaitReadySlot(suite_->key);
  }

  // Nothing of the suite's VMs left: no process, no state directory.
  void ExpectNothingLeft() {
    EXPECT_TRUE(WaitUntil([&] { return ::ndq::testing::VmProcessesLeft(state_dir()).empty(); }, absl::Seconds(10)))
        << ::ndq::testing::VmProcessesLeft(state_dir()).size() << " processes left";
    EXPECT_THAT(::ndq::testing::VmStateLeft(state_dir()), IsEmpty());
    EXPECT_THAT(::ndq::testing::CgroupsUnder(harness().cgroup_parent()), IsEmpty());
  }
};

WarmStartTest::Suite* WarmStartTest::suite_ = nullptr;

// 1. The first start boots cold and leaves a template; the second restores
// and serves through its own port_map port; what it writes to its disk
// stays its own: a third restored VM does not see it, nor the template.
TEST_F(WarmStartTest, ColdStartLeavesATemplateAndRestoresKeepTheirOwnPortsAndDisks) {
  ASSERT_TRUE(SharedTemplate());
  const std::string key = suite_->key;

  // Old enough that a guest clock left at the template's time would be
  // seconds behind (ExpectClockSet): a set-up, not a wait for a condition.
  absl::SleepFor(suite_->template_saved_at + kTemplateAgeForClock - absl::Now());
  FakeAlloc b_alloc("web");
  const int b_port = FreePort();
  const absl::Time started = absl::Now();
  const driverpb::TaskHandle b = StartRestored(b_alloc, b_port);
  ASSERT_FALSE(b.config().id().empty());
  const std::string b_id = b.config().id();
  ASSERT_THAT(WaitForPage(b_port, kRestoredPageTimeout), HasSubstr(kPage))
      << "restored VM's page through its own port; events:\n" << events().All();
  std::cerr << "restored VM served its page " << absl::Now() - started << " after StartTask\n";
  const DriverStateRecord b_record = RecordOf(b);
  EXPECT_TRUE(ListensOn(b_record.qemu_pid, b_port)) << "its QEMU forwards its own port";
  EXPECT_FALSE(ListensOn(b_record.qemu_pid, suite_->template_port)) << "not the template's port";
  EXPECT_EQ(HttpGet(suite_->template_port, 2), "") << "nothing serves the port of the VM the template came from";
  EXPECT_THAT(ReadFile(b_alloc.stdout_path()), Not(HasSubstr("SeaBIOS"))) << "restored, not booted";
  // Within one job, restored VMs carry the template's boot (documented in
  // docs/warm-start.md); the clock is the host's once the agent answers.
  EXPECT_EQ(Page(b_port, "boot-id"), suite_->template_boot_id);
  ExpectClockSet(b_id);
  const std::string b_disk = b_alloc.task_dir() + "/warm-disk.qcow2";
  ASSERT_TRUE(fs::exists(b_disk)) << "the task's disk is its own overlay; task dir: "
                                  << absl::StrJoin(Listing(b_alloc.task_dir()), " ");

  // B writes the marker sector to its disk, through the real qemu-ga.
  ASSERT_FALSE(HoldsMarker(suite_->image)) << "the image must not hold the marker to begin with";
  const std::string write = absl::StrCat("head -c 512 /dev/zero | tr '\\000' M | dd of=/dev/vda bs=512 seek=",
                                         kMarkerSector, " count=1 conv=fsync 2>&1");
  const ExecOutcome wrote = ExecOnce(harness(), b_id, {"/bin/sh", "-c", write});
  ASSERT_TRUE(wrote.status.ok()) << wrote.status.error_message();
  ASSERT_EQ(wrote.exit_code, 0) << wrote.out << wrote.err;
  const std::string count_marker = absl::StrCat("dd if=/dev/vda bs=512 skip=", kMarkerSector,
                                                " count=1 2>/dev/null | tr -dc M | wc -c");
  const ExecOutcome b_reads = ExecOnce(harness(), b_id, {"/bin/sh", "-c", count_marker});
  ASSERT_TRUE(b_reads.status.ok()) << b_reads.status.error_message();
  EXPECT_EQ(absl::StripAsciiWhitespace(b_reads.out), "512") << b_reads.err;
  EXPECT_TRUE(HoldsMarker(b_disk)) << "the write reached B's own overlay: "
                                   << QemuIoRead(b_disk, absl::StrCat("read -v ", kMarkerOffset, " 32"));

  // C, restored while B runs: neither the marker nor B's port.
  FakeAlloc c_alloc("web");
  const int c_port = FreePort();
  const driverpb::TaskHandle c = StartRestored(c_alloc, c_port);
  ASSERT_FALSE(c.config().id().empty());
  const std::string c_id = c.config().id();
  ASSERT_THAT(WaitForPage(c_port, kRestoredPageTimeout), HasSubstr(kPage));
  EXPECT_THAT(HttpGet(b_port), HasSubstr(kPage)) << "B still serves beside C";
  const pid_t c_qemu = RecordOf(c).qemu_pid;
  EXPECT_NE(c_qemu, b_record.qemu_pid);
  EXPECT_TRUE(ListensOn(c_qemu, c_port));
  EXPECT_FALSE(ListensOn(c_qemu, b_port));
  const ExecOutcome c_reads = ExecOnce(harness(), c_id, {"/bin/sh", "-c", count_marker});
  ASSERT_TRUE(c_reads.status.ok()) << c_reads.status.error_message();
  EXPECT_EQ(absl::StripAsciiWhitespace(c_reads.out), "0") << "C sees B's write";
  EXPECT_FALSE(HoldsMarker(c_alloc.task_dir() + "/warm-disk.qcow2"));
  EXPECT_FALSE(HoldsMarker(TemplateDir(key) + "/disk.qcow2")) << "the template's frozen layer was written";
  EXPECT_FALSE(HoldsMarker(TemplateDir(key) + "/overlay.qcow2"));

  for (const std::string& id : {b_id, c_id}) {
    EXPECT_TRUE(harness().Stop(id, absl::Seconds(30)).ok());
    EXPECT_TRUE(harness().Destroy(id, true).ok());
  }
  EXPECT_EQ(Sha256(suite_->image), suite_->image_sha256) << "the job's image is opened read-only";
  ExpectNothingLeft();
}

// 1b. A template never crosses jobs: the same config in another namespace
// and job boots cold and leaves a template of its own; its VMs carry its own
// boot, never the first job's (the attack: one tenant's guest state, keys
// and seeds handed to another's VM). The same job started again restores.
TEST_F(WarmStartTest, AnotherJobNeverRestoresThisJobsTemplate) {
  ASSERT_TRUE(SharedTemplate());
  FakeAlloc other("web");
  other.SetJob("tenant-b", "team-b");
  const int port = FreePort();
  driverpb::TaskHandle handle;
  ASSERT_EQ(Start(other, WarmConfig(), port, &handle), "");
  const std::string id = handle.config().id();
  ASSERT_TRUE(events().WaitFor(id, "Warm start: booting cold (no template yet)", absl::Seconds(10))) << events().All();
  EXPECT_FALSE(EventOf(events(), id, "Warm start: restored").has_value()) << events().All();
  ASSERT_THAT(WaitForPage(port, kTemplateTimeout), HasSubstr(kPage));
  const std::string own_boot = Page(port, "boot-id");
  EXPECT_EQ(own_boot.size(), 37u);
  EXPECT_NE(own_boot, suite_->template_boot_id) << "job B's VM carries job A's boot";
  ASSERT_TRUE(WaitForTemplate(id, kTemplateTimeout)) << events().All();
  const std::string key = AnnotationOf(EventOf(events(), id, "Warm start: template "), "warm_template");
  EXPECT_TRUE(IsHexKey(key));
  EXPECT_NE(key, suite_->key) << "one template for two jobs";
  const json manifest = json::parse(ReadFile(TemplateDir(key) + "/manifest.json"), nullptr, false);
  EXPECT_EQ(manifest["identity"]["owner"],
            (json{{"namespace", "tenant-b"}, {"job_id", "team-b"}, {"task_group", "group"}, {"task", "web"}}));
  EXPECT_TRUE(harness().Stop(id, absl::Seconds(30)).ok());
  EXPECT_TRUE(harness().Destroy(id, true).ok());

  // Job B's next VM restores from job B's template.
  FakeAlloc again("web");
  again.SetJob("tenant-b", "team-b");
  const int again_port = FreePort();
  driverpb::TaskHandle again_handle;
  ASSERT_EQ(Start(again, WarmConfig(), again_port, &again_handle), "");
  const std::string again_id = again_handle.config().id();
  EXPECT_TRUE(events().WaitFor(again_id, "Warm start: restored from template " + key.substr(0, 12), absl::Seconds(10)))
      << events().All();
  ASSERT_THAT(WaitForPage(again_port, kRestoredPageTimeout), HasSubstr(kPage));
  EXPECT_EQ(Page(again_port, "boot-id"), own_boot);
  EXPECT_TRUE(harness().Stop(again_id, absl::Seconds(30)).ok());
  EXPECT_TRUE(harness().Destroy(again_id, true).ok());
  ExpectNothingLeft();
}

// 2. Ten VMs restored from one template at once, started concurrently; each
// serves its page on its own port, from its own QEMU.
TEST_F(WarmStartTest, TenRestoredVmsRunAtOnceEachOnItsOwnPort) {
  ASSERT_TRUE(SharedTemplate());
  constexpr int kVms = 10;
  std::vector<std::unique_ptr<FakeAlloc>> allocs;
  std::vector<int> ports;
  std::vector<driverpb::TaskHandle> handles(kVms);
  std::vector<std::string> errors(kVms);
  for (int i = 0; i < kVms; ++i) {
    allocs.push_back(std::make_unique<FakeAlloc>("web"));
    ports.push_back(FreePort());
  }
  // FakeAlloc::Task is not thread-safe (a static counter): build the tasks first.
  std::vector<driverpb::TaskConfig> tasks;
  for (int i = 0; i < kVms; ++i) {
    tasks.push_back(allocs[i]->Task(WarmConfig()));
    AddTaskPort(&tasks.back(), "http", ports[i]);
  }
  const absl::Time started = absl::Now();
  {
    std::vector<std::thread> starters;
    for (int i = 0; i < kVms; ++i) {
      starters.emplace_back([&, i] {
        const grpc::Status status = harness().Start(tasks[i], &handles[i]);
        if (!status.ok()) errors[i] = status.error_message();
      });
    }
    for (std::thread& t : starters) t.join();
  }
  const absl::Duration start_calls = absl::Now() - started;
  for (int i = 0; i < kVms; ++i) ASSERT_EQ(errors[i], "") << "VM " << i;
  std::set<pid_t> qemus;
  for (int i = 0; i < kVms; ++i) {
    SCOPED_TRACE(absl::StrCat("VM ", i));
    const std::string id = handles[i].config().id();
    EXPECT_TRUE(events().WaitFor(id, "Warm start: restored from template " + suite_->key.substr(0, 12),
                                 absl::Seconds(10)))
        << events().All();
    EXPECT_EQ(AttributeOf(DriverAttributes(harness(), id), "warm_start"), "restored");
    qemus.insert(RecordOf(handles[i]).qemu_pid);
  }
  EXPECT_EQ(qemus.size(), size_t{kVms}) << "ten QEMUs";
  for (int i = 0; i < kVms; ++i) {
    SCOPED_TRACE(absl::StrCat("VM ", i, " on port ", ports[i]));
    EXPECT_THAT(WaitForPage(ports[i], kRestoredPageTimeout), HasSubstr(kPage));
    EXPECT_TRUE(ListensOn(RecordOf(handles[i]).qemu_pid, ports[i]));
    EXPECT_TRUE(fs::exists(allocs[i]->task_dir() + "/warm-disk.qcow2"));
  }
  std::cerr << "10 StartTask calls at once returned after " << start_calls << ", all 10 pages served after "
            << absl::Now() - started << "\n";
  // All ten still serve, at the same time.
  for (int i = 0; i < kVms; ++i) EXPECT_THAT(HttpGet(ports[i]), HasSubstr(kPage)) << "VM " << i;
  for (int i = 0; i < kVms; ++i) EXPECT_TRUE(harness().Destroy(handles[i].config().id(), true).ok());
  ExpectNothingLeft();
}

// 3. Stop, destroy, and a plugin killed and recovered behave for restored VMs
// as for cold ones; nothing is left behind.
TEST_F(WarmStartTest, RestoredVmsStopDestroyAndSurviveAPluginCrash) {
  ASSERT_TRUE(SharedTemplate());
  const std::string key = suite_->key;
  FakeAlloc a_alloc("web"), b_alloc("web"), c_alloc("web"), d_alloc("web");
  const int a_port = FreePort(), b_port = FreePort(), c_port = FreePort(), d_port = FreePort();
  const driverpb::TaskHandle a = StartRestored(a_alloc, a_port);
  const driverpb::TaskHandle b = StartRestored(b_alloc, b_port);
  const driverpb::TaskHandle c = StartRestored(c_alloc, c_port);
  const driverpb::TaskHandle d = StartRestored(d_alloc, d_port);
  for (const auto* h : {&a, &b, &c, &d}) ASSERT_FALSE(h->config().id().empty());
  for (int port : {a_port, b_port, c_port, d_port}) {
    ASSERT_THAT(WaitForPage(port, kRestoredPageTimeout), HasSubstr(kPage)) << "port " << port;
  }

  // A: graceful stop (through the guest agent): exit 0; destroy removes its state.
  const DriverStateRecord ar = RecordOf(a);
  const grpc::Status stopped = harness().Stop(a.config().id(), absl::Seconds(30));
  ASSERT_TRUE(stopped.ok()) << stopped.error_message();
  driverpb::WaitTaskResponse wait;
  ASSERT_TRUE(harness().Wait(a.config().id(), &wait, absl::Seconds(10)).ok());
  EXPECT_EQ(wait.result().exit_code(), 0) << wait.err();
  EXPECT_EQ(wait.result().signal(), 0);
  EXPECT_EQ(wait.err(), "");
  driverpb::InspectTaskResponse inspect;
  ASSERT_TRUE(harness().Inspect(a.config().id(), &inspect).ok());
  EXPECT_EQ(inspect.task().state(), driverpb::EXITED);
  EXPECT_TRUE(harness().Stop(a.config().id(), absl::Seconds(5)).ok()) << "StopTask is idempotent";
  ASSERT_TRUE(harness().Destroy(a.config().id(), false).ok());
  EXPECT_FALSE(fs::exists(ar.state_dir));
  EXPECT_FALSE(ProcessAlive(ar.qemu_pid));
  EXPECT_FALSE(ProcessAlive(ar.supervisor_pid));
  EXPECT_TRUE(fs::is_directory(TemplateDir(key))) << "the template stays";

  // B: destroy without force refused while it runs; forced, it is killed at once.
  const DriverStateRecord br = RecordOf(b);
  const grpc::Status refused = harness().Destroy(b.config().id(), false);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(refused.error_message(), HasSubstr("still running"));
  const absl::Time destroying = absl::Now();
  ASSERT_TRUE(harness().Destroy(b.config().id(), true).ok());
  EXPECT_LT(absl::Now() - destroying, absl::Seconds(2));
  EXPECT_FALSE(ProcessAlive(br.qemu_pid));
  EXPECT_FALSE(fs::exists(br.state_dir));

  // C and D outlive the plugin; D's QEMU is killed while the plugin is down.
  harness().process().Signal(SIGKILL);
  ASSERT_TRUE(harness().process().WaitExit(absl::Seconds(5)).ok());
  const DriverStateRecord cr = RecordOf(c), dr = RecordOf(d);
  EXPECT_TRUE(ProcessAlive(cr.qemu_pid));
  ::kill(dr.qemu_pid, SIGKILL);
  ASSERT_TRUE(WaitUntil([&] { return fs::exists(dr.state_dir + "/" + supervisor::kExitFile); }, absl::Seconds(30)));
  ASSERT_NO_FATAL_FAILURE(RestartPlugin());
  for (const auto* h : {&c, &d}) {
    const grpc::Status recovered = harness().Recover(*h);
    ASSERT_TRUE(recovered.ok()) << recovered.error_message();
  }
  const auto c_attrs = DriverAttributes(harness(), c.config().id());
  EXPECT_EQ(AttributeOf(c_attrs, "warm_start"), "restored") << "still known as restored after recovery";
  EXPECT_EQ(AttributeOf(c_attrs, "warm_template"), key);
  driverpb::WaitTaskResponse d_wait;
  ASSERT_TRUE(harness().Wait(d.config().id(), &d_wait, absl::Seconds(10)).ok());
  EXPECT_EQ(d_wait.result().signal(), SIGKILL);
  EXPECT_EQ(d_wait.result().exit_code(), 128 + SIGKILL);
  EXPECT_THAT(d_wait.err(), HasSubstr("killed by SIGKILL"));
  EXPECT_THAT(HttpGet(c_port), HasSubstr(kPage)) << "C serves on after the plugin restart";
  ASSERT_TRUE(harness().Stop(c.config().id(), absl::Seconds(30)).ok());
  driverpb::WaitTaskResponse c_wait;
  ASSERT_TRUE(harness().Wait(c.config().id(), &c_wait, absl::Seconds(10)).ok());
  EXPECT_EQ(c_wait.result().exit_code(), 0) << c_wait.err();
  for (const auto* h : {&c, &d}) EXPECT_TRUE(harness().Destroy(h->config().id(), false).ok());
  EXPECT_FALSE(ProcessAlive(cr.qemu_pid));
  EXPECT_TRUE(WaitUntil([&] { return Ended(cr.supervisor_pid) && Ended(dr.supervisor_pid); }, absl::Seconds(10)));
  EXPECT_TRUE(fs::is_directory(TemplateDir(key)));
  ExpectNothingLeft();
}

// 3b. The warm pool (warm_pool, default 1): a restore leaves a QEMU started
// ahead for the template, its state loaded and the guest paused; the next
// restore takes it and gets its own port forward, disk overlay (in its task
// dir), cgroup and log, and the pool is refilled.
TEST_F(WarmStartTest, ARestoreTakesAPooledQemuWithItsOwnPortDiskCgroupAndLog) {
  ASSERT_TRUE(SharedTemplate());
  const std::string key = suite_->key;
  FakeAlloc first("web");
  const driverpb::TaskHandle first_handle = StartRestored(first, FreePort());
  ASSERT_FALSE(first_handle.config().id().empty());
  const auto [slot, manifest] = AwaitReadySlot(suite_->key);
  ASSERT_FALSE(slot.empty()) << "no pooled QEMU after a restore; events:\n" << events().All();
  EXPECT_EQ(manifest.value("key", ""), key);
  const pid_t pooled_qemu = manifest.value("qemu_pid", -1);
  ASSERT_TRUE(ProcessAlive(pooled_qemu));
  ASSERT_TRUE(harness().Destroy(first_handle.config().id(), true).ok());

  FakeAlloc alloc("web");
  const int port = FreePort();
  const absl::Time started = absl::Now();
  const driverpb::TaskHandle handle = StartRestored(alloc, port);
  ASSERT_FALSE(handle.config().id().empty());
  const std::string id = handle.config().id();
  const auto restored = EventOf(events(), id, "Warm start: restored from template");
  ASSERT_TRUE(restored.has_value());
  EXPECT_THAT(restored->message, HasSubstr("(a pooled QEMU)"));
  EXPECT_EQ(AnnotationOf(restored, "warm_pool"), "taken");
  ASSERT_THAT(WaitForPage(port, kRestoredPageTimeout), HasSubstr(kPage)) << events().All();
  std::cerr << "pooled VM served its page " << absl::Now() - started << " after StartTask\n";
  const DriverStateRecord record = RecordOf(handle);
  EXPECT_EQ(record.qemu_pid, pooled_qemu) << "the pooled QEMU became the task's";
  EXPECT_FALSE(fs::exists(state_dir() + "/pool/" + slot)) << "the slot became the task's state dir";
  EXPECT_TRUE(fs::exists(record.state_dir + "/" + supervisor::kPidFile)) << record.state_dir;
  EXPECT_TRUE(ListensOn(pooled_qemu, port)) << "its forward was added at handover";
  if (record.cgroup.version != CgroupVersion::kNone) {
    EXPECT_THAT(ReadFile("/proc/" + std::to_string(pooled_qemu) + "/cgroup"), HasSubstr(harness().cgroup_parent()))
        << "QEMU moved into the task's cgroup";
  }
  // What the task's guest writes goes to the task's overlay in its task dir.
  const std::string disk = alloc.task_dir() + "/warm-disk.qcow2";
  const std::string write = absl::StrCat("head -c 512 /dev/zero | tr '\\000' M | dd of=/dev/vda bs=512 seek=",
                                         kMarkerSector, " count=1 conv=fsync 2>&1; echo pooled-log-check > /dev/console");
  const ExecOutcome wrote = ExecOnce(harness(), id, {"/bin/sh", "-c", write});
  ASSERT_TRUE(wrote.status.ok()) << wrote.status.error_message();
  ASSERT_EQ(wrote.exit_code, 0) << wrote.out << wrote.err;
  EXPECT_TRUE(HoldsMarker(disk)) << QemuIoRead(disk, absl::StrCat("read -v ", kMarkerOffset, " 32"));
  EXPECT_FALSE(HoldsMarker(record.state_dir + "/" + "overlay.qcow2")) << "the slot's own overlay stays as it was";
  EXPECT_FALSE(HoldsMarker(TemplateDir(key) + "/disk.qcow2"));
  // The guest's console reaches the task's log after the handover.
  EXPECT_TRUE(WaitForFileToContain(alloc.stdout_path(), "pooled-log-check", absl::Seconds(30)))
      << ReadFile(alloc.stdout_path());

  // The pool is refilled, with another QEMU.
  const auto [next_slot, next_manifest] = AwaitReadySlot(suite_->key, slot);
  EXPECT_FALSE(next_slot.empty()) << "the pool was not refilled";
  EXPECT_NE(next_manifest.value("qemu_pid", -1), pooled_qemu);

  ASSERT_TRUE(harness().Stop(id, absl::Seconds(30)).ok());
  driverpb::WaitTaskResponse wait;
  ASSERT_TRUE(harness().Wait(id, &wait, absl::Seconds(10)).ok());
  EXPECT_EQ(wait.result().exit_code(), 0) << wait.err();
  ASSERT_TRUE(harness().Destroy(id, false).ok());
  EXPECT_FALSE(fs::exists(record.state_dir));
  ExpectNothingLeft();
}

// 3c. A pooled QEMU that dies before any task takes it is removed with its
// slot (no process, no directory) and replaced; restores go on.
TEST_F(WarmStartTest, APooledQemuThatDiesIsRemovedAndReplaced) {
  ASSERT_TRUE(SharedTemplate());
  const auto [slot, manifest] = PoolAfterARestore();
  ASSERT_FALSE(slot.empty()) << events().All();
  const pid_t qemu = manifest.value("qemu_pid", -1), supervisor_pid = manifest.value("supervisor_pid", -1);
  ASSERT_EQ(::kill(qemu, SIGKILL), 0);
  const std::string slot_dir = state_dir() + "/pool/" + slot;
  EXPECT_TRUE(WaitUntil([&] { return !fs::exists(slot_dir) && Ended(qemu) && Ended(supervisor_pid); },
                        absl::Seconds(30)))
      << "the dead slot is left: " << absl::StrJoin(Listing(slot_dir), " ");
  EXPECT_THAT(ProcessesMentioning(slot_dir), IsEmpty());
  const auto [replacement, replacement_manifest] = AwaitReadySlot(suite_->key, slot);
  EXPECT_FALSE(replacement.empty()) << "the dead slot was not replaced";

  FakeAlloc alloc("web");
  const int port = FreePort();
  const driverpb::TaskHandle handle = StartRestored(alloc, port);
  ASSERT_FALSE(handle.config().id().empty());
  EXPECT_THAT(WaitForPage(port, kRestoredPageTimeout), HasSubstr(kPage));
  EXPECT_NE(RecordOf(handle).qemu_pid, qemu);
  ASSERT_TRUE(harness().Destroy(handle.config().id(), true).ok());
  ExpectNothingLeft();
}

// 3d. Pooled QEMUs outlive the plugin: killed and launched again, the plugin
// adopts them, and its first restore takes the same QEMU.
TEST_F(WarmStartTest, ANewPluginAdoptsThePoolAndItsFirstRestoreTakesIt) {
  ASSERT_TRUE(SharedTemplate());
  const auto [slot, manifest] = PoolAfterARestore();
  ASSERT_FALSE(slot.empty()) << events().All();
  const pid_t qemu = manifest.value("qemu_pid", -1);

  harness().process().Signal(SIGKILL);
  ASSERT_TRUE(harness().process().WaitExit(absl::Seconds(5)).ok());
  ASSERT_TRUE(ProcessAlive(qemu)) << "a pooled QEMU died with the plugin";
  ASSERT_NO_FATAL_FAILURE(RestartPlugin());

  FakeAlloc alloc("web");
  const int port = FreePort();
  const driverpb::TaskHandle handle = StartRestored(alloc, port);
  ASSERT_FALSE(handle.config().id().empty());
  EXPECT_THAT(AnnotationOf(EventOf(events(), handle.config().id(), "Warm start: restored"), "warm_pool"), "taken")
      << events().All();
  EXPECT_EQ(RecordOf(handle).qemu_pid, qemu) << "the adopted QEMU";
  EXPECT_THAT(WaitForPage(port, kRestoredPageTimeout), HasSubstr(kPage));
  ASSERT_TRUE(harness().Stop(handle.config().id(), absl::Seconds(30)).ok());
  driverpb::WaitTaskResponse wait;
  ASSERT_TRUE(harness().Wait(handle.config().id(), &wait, absl::Seconds(10)).ok());
  EXPECT_EQ(wait.result().exit_code(), 0) << wait.err();
  ASSERT_TRUE(harness().Destroy(handle.config().id(), false).ok());
  ExpectNothingLeft();
}

// 3e. A template evicted while its pool waits takes the pool with it: the
// cache is given a bound the template exceeds (SetConfig again), the next
// start evicts it, and no pooled process or slot is left.
TEST_F(WarmStartTest, ATemplateEvictedWhileItsPoolWaitsTakesThePoolWithIt) {
  ASSERT_TRUE(SharedTemplate());
  const std::string key = suite_->key;
  const auto [slot, manifest] = PoolAfterARestore();  // the restored VM destroyed: its lease on the template ends
  ASSERT_FALSE(slot.empty()) << events().All();
  const pid_t qemu = manifest.value("qemu_pid", -1), supervisor_pid = manifest.value("supervisor_pid", -1);

  const json bounded = {{"state_dir", state_dir()},
                        {"cgroup_parent", harness().cgroup_parent()},
                        {"image_paths", {suite_->images.path(), *TestGuestDir()}},
                        {"image_cache_dir", suite_->cache.path()},
                        {"image_cache_max_size", "1K"}};
  ASSERT_TRUE(harness().client().SetConfig(bounded).ok());
  suite_->key.clear();
  suite_->template_problem = "evicted by ATemplateEvictedWhileItsPoolWaitsTakesThePoolWithIt";
  // Any start evicts once it is registered: a plain VM of the guest image.
  FakeAlloc plain("plain");
  plain.AddOverlay(Guest("guest.qcow2"));
  driverpb::TaskConfig task = plain.Task(::ndq::testing::GuestConfig());
  AddTaskPort(&task, "http", FreePort());
  driverpb::TaskHandle handle;
  const grpc::Status started = harness().Start(task, &handle);
  ASSERT_TRUE(started.ok()) << started.error_message();
  EXPECT_TRUE(WaitUntil([&] { return !fs::exists(TemplateDir(key)); }, absl::Seconds(30))) << "the template was not evicted";
  EXPECT_TRUE(WaitUntil(
      [&] { return ::ndq::testing::PoolSlots(state_dir()).empty() && Ended(qemu) && Ended(supervisor_pid); },
      absl::Seconds(30)))
      << "left: " << absl::StrJoin(::ndq::testing::PoolSlots(state_dir()), " ");
  EXPECT_TRUE(harness().Destroy(handle.config().id(), true).ok());
  json unbounded = bounded;
  unbounded.erase("image_cache_max_size");
  EXPECT_TRUE(harness().client().SetConfig(unbounded).ok());
  ExpectNothingLeft();
}

// 4. A template that does not fit is never used: a changed image, changed
// args, a changed memory size each boot cold with the reason in the event;
// a truncated template file fails its check and is removed. Its own image
// copy and template (ready through the guest agent this time).
TEST_F(WarmStartTest, ChangedImageArgsMemoryAndABrokenTemplateBootCold) {
  const std::string image = suite_->images / "inv.qcow2";
  fs::copy_file(Guest("guest.qcow2"), image, fs::copy_options::overwrite_existing);
  // Without a pool: a pooled QEMU holds the image open read-only, and QEMU's
  // image locking then refuses the in-place write below (a pool's cost,
  // docs/warm-start.md).
  auto config = [&](const std::string& page) {
    return WarmConfig({{"image_path", image},
                       {"args", {"-fw_cfg", "name=opt/guest/page,string=" + page}},
                       {"warm_start", {{"ready_agent", true}, {"warm_pool", 0}}}});
  };
  // Starts `cfg` as task "inv"; expects a cold boot whose reason contains
  // `reason`; destroys it before the guest is ready (so it saves nothing).
  // With `keep`, the VM runs on (into `kept`) and its id is returned.
  std::unique_ptr<FakeAlloc> kept;
  auto expect_cold = [&](const json& cfg, int memory_mb, const std::string& reason, bool keep = false) -> std::string {
    SCOPED_TRACE(reason);
    auto owned = std::make_unique<FakeAlloc>("inv");
    FakeAlloc& alloc = *owned;
    driverpb::TaskHandle handle;
    const std::string error = Start(alloc, cfg, FreePort(), &handle, memory_mb);
    EXPECT_EQ(error, "");
    if (!error.empty()) return "";
    const std::string id = handle.config().id();
    EXPECT_TRUE(events().WaitFor(id, "Warm start: booting cold (", absl::Seconds(10))) << events().All();
    const auto cold = EventOf(events(), id, "Warm start: booting cold (");
    EXPECT_THAT(cold ? cold->message : "", HasSubstr(reason));
    std::cerr << (cold ? cold->message : "no cold-boot event") << "\n";
    EXPECT_EQ(AnnotationOf(cold, "warm_start"), "cold");
    EXPECT_THAT(AnnotationOf(cold, "warm_reason"), HasSubstr(reason));
    EXPECT_EQ(AttributeOf(DriverAttributes(harness(), id), "warm_start"), "cold");
    EXPECT_FALSE(EventOf(events(), id, "Warm start: restored").has_value());
    if (keep) {
      kept = std::move(owned);
      return id;
    }
    EXPECT_TRUE(harness().Destroy(id, true).ok());
    return "";
  };

  // The template of config("warm-a").
  FakeAlloc first("inv");
  const int first_port = FreePort();
  driverpb::TaskHandle first_handle;
  ASSERT_EQ(Start(first, config("warm-a"), first_port, &first_handle), "");
  const std::string first_id = first_handle.config().id();
  EXPECT_TRUE(events().WaitFor(first_id, "Warm start: booting cold (no template yet)", absl::Seconds(10)))
      << events().All();
  ASSERT_TRUE(WaitForTemplate(first_id, kTemplateTimeout))
      << events().All() << "\nserial console:\n" << ReadFile(first.stdout_path());
  const std::string key = AnnotationOf(EventOf(events(), first_id, "Warm start: template "), "warm_template");
  ASSERT_TRUE(IsHexKey(key)) << key;
  ASSERT_TRUE(fs::exists(TemplateDir(key) + "/ram"));
  ASSERT_TRUE(harness().Destroy(first_id, true).ok());

  expect_cold(config("warm-b"), 256, "the VM's configuration changed");
  expect_cold(config("warm-a"), 320, "the VM's configuration changed");

  // The config it was taken with still restores (the cold boots above saved
  // nothing and spoiled nothing), with the page of that config.
  {
    FakeAlloc alloc("inv");
    const int port = FreePort();
    driverpb::TaskHandle handle;
    ASSERT_EQ(Start(alloc, config("warm-a"), port, &handle), "");
    const std::string id = handle.config().id();
    EXPECT_TRUE(events().WaitFor(id, "Warm start: restored from template " + key.substr(0, 12), absl::Seconds(10)))
        << events().All();
    EXPECT_EQ(AttributeOf(DriverAttributes(harness(), id), "warm_template"), key);
    std::string page;
    EXPECT_TRUE(WaitUntil(
        [&] {
          page = HttpGet(port, 3);
          return !page.empty();
        },
        kRestoredPageTimeout));
    EXPECT_EQ(page, "warm-a (mode=normal)\n");
    EXPECT_TRUE(harness().Destroy(id, true).ok());
  }

  // A changed image: written by qemu-io; then the original put back.
  const std::string saved = suite_->images / "inv.qcow2.orig";
  fs::copy_file(image, saved, fs::copy_options::overwrite_existing);
  auto changed = RunCommand({"/usr/bin/qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 30M 4k", image}, absl::Seconds(60));
  ASSERT_TRUE(changed.ok() && changed->exit_code == 0) << (changed.ok() ? changed->output : "");
  expect_cold(config("warm-a"), 256, "the image changed");
  fs::rename(saved, image);

  // A truncated RAM file: fails its check, and the template is removed.
  const std::string ram = TemplateDir(key) + "/ram";
  ASSERT_TRUE(fs::exists(ram)) << "the template is still there";
  fs::resize_file(ram, fs::file_size(ram) / 2);
  const std::string again = expect_cold(config("warm-a"), 256, "failed its check", /*keep=*/true);
  ASSERT_FALSE(again.empty());
  EXPECT_FALSE(fs::exists(TemplateDir(key))) << "the broken template is removed before the cold boot: "
                                             << absl::StrJoin(Listing(TemplateDir(key)), " ");

  // That cold boot takes the template again (same key); then its device
  // state is corrupted in place, same size: the checksum catches it.
  ASSERT_TRUE(WaitForTemplate(again, kTemplateTimeout)) << events().All();
  EXPECT_EQ(AnnotationOf(EventOf(events(), again, "Warm start: template "), "warm_template"), key);
  ASSERT_TRUE(harness().Destroy(again, true).ok());
  const std::string state = TemplateDir(key) + "/state";
  const uintmax_t state_size = fs::file_size(state);
  {
    std::fstream corrupt(state, std::ios::in | std::ios::out | std::ios::binary);
    corrupt.seekp(static_cast<std::streamoff>(state_size / 2));
    corrupt.write("\x5a\x5a\x5a\x5a\xa5\xa5\xa5\xa5", 8);
  }
  ASSERT_EQ(fs::file_size(state), state_size);
  expect_cold(config("warm-a"), 256, "failed its check");
  EXPECT_FALSE(fs::exists(TemplateDir(key))) << "the corrupt template is removed";
  ExpectNothingLeft();
}

// A template that passes its check but that QEMU refuses to load (its
// device state rewritten, the manifest updated to match): the start fails
// with the reason, leaves no VM half-started, and removes the template, so
// the next start boots cold.
TEST_F(WarmStartTest, ATemplateQemuRejectsFailsTheStartAndIsRemoved) {
  ASSERT_TRUE(SharedTemplate());
  const std::string dir = TemplateDir(suite_->key);
  const std::string state = dir + "/state";
  std::string bytes = ReadFile(state);
  ASSERT_GT(bytes.size(), 64u);
  // QEMU's stream magic and version kept, every section after them garbage.
  for (size_t i = 8; i < bytes.size(); ++i) bytes[i] = static_cast<char>(0xa5 ^ (i & 0xff));
  ::chmod(state.c_str(), 0600);
  {
    std::ofstream out(state, std::ios::binary | std::ios::trunc);
    out << bytes;
  }
  json manifest = json::parse(ReadFile(dir + "/manifest.json"));
  {
    UniqueFd fd(::open(state.c_str(), O_RDONLY | O_CLOEXEC));
    absl::StatusOr<std::string> digest = ContentDigest(fd.get());
    ASSERT_TRUE(digest.ok()) << digest.status();
    manifest["files"]["state"]["xxh3"] = *digest;
  }
  std::ofstream(dir + "/manifest.json", std::ios::trunc) << manifest.dump(2);

  FakeAlloc alloc("web");
  driverpb::TaskHandle handle;
  const std::string error = Start(alloc, WarmConfig(), FreePort(), &handle);
  EXPECT_THAT(error, HasSubstr("task config \"warm_start\": restoring template " + suite_->key.substr(0, 12) +
                               " failed"));
  EXPECT_THAT(error, HasSubstr("the template was removed, so the next start boots cold"));
  EXPECT_FALSE(fs::exists(dir));
  ExpectNothingLeft();
  EXPECT_THAT(Listing(alloc.task_dir()), ::testing::Not(::testing::Contains("warm-disk.qcow2")));

  FakeAlloc next("web");
  ASSERT_EQ(Start(next, WarmConfig(), FreePort(), &handle), "");
  const std::string id = handle.config().id();
  EXPECT_TRUE(events().WaitFor(id, "Warm start: booting cold (no template yet)", absl::Seconds(10))) << events().All();
  EXPECT_TRUE(harness().Destroy(id, true).ok());
  ExpectNothingLeft();
  suite_->key.clear();  // the shared template is gone
  suite_->template_problem = "removed by ATemplateQemuRejectsFailsTheStartAndIsRemoved";
}

// 5. Combinations warm_start cannot restore are refused at StartTask, naming
// warm_start and the other option in one problem; nothing is left behind.
TEST_F(WarmStartTest, RefusedCombinationsNameWarmStart) {
  FakeAlloc alloc("refused");
  const std::set<std::string> before = Listing(alloc.task_dir());
  const std::set<std::string> cache_before = Listing(suite_->cache.path());
  const std::vector<std::pair<json, std::vector<std::string>>> cases = {
      {{{"network_mode", "bridge"}, {"bridge", "br0"}}, {"network_mode"}},
      {{{"tpm", true}}, {"tpm"}},
      {{{"firmware", "uefi"}}, {"firmware"}},
      {{{"disk", {{{"size", "64M"}}}}}, {"disk"}},
      {{{"cdrom", "local/x.iso"}}, {"cdrom"}},
      {{{"cdrom_source", "https://example.com/x.iso"}, {"cdrom_checksum", "sha256:" + std::string(64, '0')}},
       {"cdrom"}},
      {{{"cloud_init", {{"user_data", "#cloud-config\n"}}}}, {"cloud_init"}},
      {{{"share_alloc_dirs", true}}, {"share_alloc_dirs"}},
      {{{"warm_start", {{"ready_port", "ssh"}}}}, {"ready_port", "ssh"}},
      {{{"warm_start", {{"ready_agent", true}}}, {"guest_agent", false}}, {"ready_agent", "guest_agent"}},
      {{{"warm_start", {{"ready_port", "http"}, {"ready_agent", true}}}}, {"ready_port", "ready_agent"}},
      {{{"warm_start", json::object()}}, {"ready_port", "ready_agent"}},
      {{{"warm_start", {{"ready_port", "http"}, {"warm_pool", -1}}}}, {"warm_pool", "-1"}},
      {{{"warm_start", {{"ready_port", "http"}, {"warm_pool", 1000000}}}}, {"warm_pool", "from 0 to 8"}},
      {{{"warm_start", {{"ready_port", "http"}, {"warm_pool", "many"}}}}, {"warm_pool"}},
  };
  for (const auto& [extra, names] : cases) {
    SCOPED_TRACE(extra.dump());
    driverpb::TaskConfig task = alloc.Task(WarmConfig(extra));
    AddTaskPort(&task, "http", FreePort());
    const grpc::Status status = harness().Start(task, nullptr);
    // A bad config (InvalidArgument inside): a start failure Nomad must not retry.
    EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << status.error_message();
    EXPECT_EQ(::ndq::testing::StartIsRecoverable(status), std::optional<bool>(false)) << status.error_message();
    // One problem (they are joined by "; ") names warm_start and the rest.
    bool named = false;
    for (absl::string_view problem : absl::StrSplit(status.error_message(), "; ")) {
      bool all = problem.find("warm_start") != absl::string_view::npos;
      for (const std::string& name : names) all = all && problem.find(name) != absl::string_view::npos;
      named = named || all;
    }
    EXPECT_TRUE(named) << "no problem names warm_start and " << absl::StrJoin(names, ", ") << ": "
                       << status.error_message();
    EXPECT_EQ(Listing(alloc.task_dir()), before);
  }
  EXPECT_EQ(Listing(suite_->cache.path()), cache_before) << "no template for a refused start";
  ExpectNothingLeft();
}

}  // namespace
}  // namespace ndq
