// vm/warm_start after and around a VM's launch: loading a template's state
// and resuming (LoadTemplateState, RestoreState) through a scripted QEMU 7.2
// QMP peer failed at each step; CopyOverlayInto and PrepareWarmStart on real files.
#include "vm/warm_start.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/deadlines.h"
#include "../../support/files.h"
#include "../../support/scripted_clients.h"
#include "../../support/scripted_qmp.h"
#include "../../support/temp_dir.h"
#include "../../support/warm_spec.h"
#include "base/error_kind.h"
#include "image/image_probe.h"
#include "image/vm_template.h"

namespace ndq {
namespace {

using ::ndq::testing::ReadFile;

namespace fs = std::filesystem;
using ::ndq::testing::Concat;
using ::ndq::testing::Eof;
using ::ndq::testing::FromClient;
using ::ndq::testing::Handshake;
using ::ndq::testing::ScriptedPeer;
using ::ndq::testing::Step;
using ::ndq::testing::TempDir;
using ::ndq::testing::ToClient;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

using ::ndq::testing::kGenerous;
// A template key as TemplateIdentity::Key makes them: 64 hex.
const std::string kKey = "3f9a0c61d2b74e58a1c0ffee00112233445566778899aabbccddeeff00112233";

std::unique_ptr<QmpClient> AdoptOrDie(ScriptedPeer& peer) { return ::ndq::testing::AdoptQmpOrDie(peer, "restoring QEMU"); }

// The incoming migration of a template's state (QEMU's fd 23) and the resume, QMP ids from 2.
std::vector<Step> RestoreSteps() {
  return {
      FromClient(R"({"execute": "migrate-set-capabilities", "arguments": {"capabilities": )"
                 R"([{"capability": "x-ignore-shared", "state": true}]}, "id": 2})"),
      ToClient(R"({"return": {}, "id": 2})"),
      FromClient(R"({"execute": "migrate-incoming", "arguments": {"uri": "fd:23"}, "id": 3})"),
      ToClient(R"({"return": {}, "id": 3})"),
      FromClient(R"({"execute": "query-migrate", "id": 4})"),
      ToClient(R"({"return": {"blocked": false, "status": "active"}, "id": 4})"),
      FromClient(R"({"execute": "query-migrate", "id": 5})"),
      ToClient(R"({"return": {"blocked": false, "status": "completed"}, "id": 5})"),
      FromClient(R"({"execute": "cont", "id": 6})"),
      ToClient(R"({"timestamp": {"seconds": 1795315693, "microseconds": 333322}, "event": "RESUME"})"),
      ToClient(R"({"return": {}, "id": 6})"),
  };
}

// The steps up to the command at `request` (an index in RestoreSteps), which
// is answered with `reply` instead (empty: QEMU hangs up).
std::vector<Step> FailingAt(size_t request, const std::string& reply) {
  std::vector<Step> steps = RestoreSteps();
  steps.resize(request + 1);
  steps.push_back(reply.empty() ? Eof() : ToClient(reply));
  return Concat(Handshake(), steps);
}

// ---------------------------------------------------------------------------
// LoadTemplateState, RestoreState

TEST(LoadTemplateState, LoadsTheStateFromQemusFdAndLeavesTheGuestPaused) {
  std::vector<Step> script = Concat(Handshake(), RestoreSteps());
  script.resize(script.size() - 3);  // no cont
  ScriptedPeer peer(script);
  auto qmp = AdoptOrDie(peer);
  ASSERT_NE(qmp, nullptr);
  EXPECT_TRUE(LoadTemplateState(*qmp, 23).ok());
  EXPECT_TRUE(peer.WaitDone(kGenerous));
  EXPECT_THAT(peer.failures(), IsEmpty());
}

TEST(LoadTemplateState, AFailedMigrationSaysWhy) {
  ScriptedPeer peer(FailingAt(
      6, R"({"return": {"blocked": false, "status": "failed", "error-desc": "load of migration failed: Invalid argument"}, "id": 5})"));
  auto qmp = AdoptOrDie(peer);
  ASSERT_NE(qmp, nullptr);
  absl::Status loaded = LoadTemplateState(*qmp, 23);
  EXPECT_TRUE(absl::IsInternal(loaded)) << loaded;
  EXPECT_THAT(std::string(loaded.message()), HasSubstr("QEMU's migration failed: load of migration failed: Invalid argument"));
  EXPECT_THAT(peer.failures(), IsEmpty());
}

// A reply of the wrong shape is QEMU's mistake, not an exception in the plugin.
TEST(LoadTemplateState, AMigrationReplyOfTheWrongShapeIsAnError) {
  ScriptedPeer peer(FailingAt(6, R"({"return": {"status": "failed", "error-desc": 42}, "id": 5})"));
  auto qmp = AdoptOrDie(peer);
  ASSERT_NE(qmp, nullptr);
  absl::Status loaded = LoadTemplateState(*qmp, 23);
  EXPECT_TRUE(absl::IsInternal(loaded)) << loaded;
  EXPECT_THAT(std::string(loaded.message()), HasSubstr("QEMU's migration failed: no reason given"));
}

class Restore : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const std::string& key : {kKey, kOther}) {
      fs::create_directories(cache_ / ("tpl-" + key));
      std::ofstream(cache_ / ("tpl-" + key + "/state")) << "QEVM";
    }
    warm_.mode = WarmMode::kRestore;
    warm_.key = kKey;
    warm_.state_fd = 23;
  }

  absl::Status RunRestore(std::vector<Step> script) {
    ScriptedPeer peer(std::move(script));
    auto qmp = AdoptOrDie(peer);
    if (qmp == nullptr) return absl::InternalError("no QMP session");
    absl::Status status = RestoreState(*qmp, warm_, cache_.path(), [this](const std::string& message, const auto& fields) {
      events_.push_back(message);
      fields_ = std::map<std::string, std::string>(fields.begin(), fields.end());
    });
    EXPECT_TRUE(peer.WaitDone(kGenerous));
    EXPECT_THAT(peer.failures(), IsEmpty()) << "QEMU saw a command it should not have";
    return status;
  }

  const std::string kOther = "a7" + kKey.substr(2);
  TempDir cache_;
  WarmStart warm_;
  std::vector<std::string> events_;
  std::map<std::string, std::string> fields_;
};

TEST_F(Restore, LoadsResumesAndSaysHowLongItTook) {
  ASSERT_TRUE(RunRestore(Concat(Handshake(), RestoreSteps())).ok());
  EXPECT_TRUE(fs::exists(cache_ / ("tpl-" + kKey + "/state")));
  ASSERT_EQ(events_.size(), 1u);
  EXPECT_THAT(events_[0], HasSubstr("Warm start: restored from template 3f9a0c61d2b7 in "));
  EXPECT_EQ(fields_["warm_start"], "restored");
  EXPECT_EQ(fields_["warm_template"], kKey);
  EXPECT_FALSE(fields_["warm_restore_ms"].empty());
}

// A cold or plain VM sends nothing: the next command QEMU sees is the test's own.
TEST_F(Restore, NothingToDoForAColdOrPlainVm) {
  ScriptedPeer peer(Concat(Handshake(), {FromClient(R"({"execute": "query-status", "id": 2})"),
                                         ToClient(R"({"return": {"status": "running", "singlestep": false, "running": true}, "id": 2})")}));
  auto qmp = AdoptOrDie(peer);
  ASSERT_NE(qmp, nullptr);
  for (WarmMode mode : {WarmMode::kOff, WarmMode::kCold}) {
    warm_.mode = mode;
    EXPECT_TRUE(RestoreState(*qmp, warm_, cache_.path(), [this](const std::string& m, const auto&) { events_.push_back(m); }).ok());
  }
  EXPECT_EQ(qmp->QueryStatus().value_or("error"), "running");
  EXPECT_THAT(peer.failures(), IsEmpty());
  EXPECT_THAT(events_, IsEmpty());
  EXPECT_TRUE(fs::exists(cache_ / ("tpl-" + kKey)));
}

// Each step fails in turn: the error names the template and QEMU's reason,
// the template is removed (the next start boots cold), other templates stay.
TEST_F(Restore, AFailedStepRemovesTheTemplate) {
  const struct {
    size_t request;
    std::string reply, want;
  } cases[] = {
      {0, R"({"id": 2, "error": {"class": "GenericError", "desc": "There's a migration process in progress"}})",
       "QEMU rejected migrate-set-capabilities: There's a migration process in progress"},
      {2, R"({"id": 3, "error": {"class": "GenericError", "desc": "'-incoming' was not specified on the command line"}})",
       "QEMU rejected migrate-incoming: '-incoming' was not specified on the command line"},
      {4, R"({"return": {"blocked": false, "status": "failed", "error-desc": "load of migration failed: Input/output error"}, "id": 4})",
       "QEMU's migration failed: load of migration failed: Input/output error"},
      {6, "", "QMP command query-migrate got no reply: restoring QEMU: QEMU closed the connection"},
      {8, R"({"id": 6, "error": {"class": "GenericError", "desc": "Resetting the Virtual Machine is required"}})",
       "QEMU rejected cont: Resetting the Virtual Machine is required"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.want);
    fs::create_directories(cache_ / ("tpl-" + kKey));
    absl::Status status = RunRestore(FailingAt(c.request, c.reply));
    EXPECT_TRUE(absl::IsFailedPrecondition(status)) << status;
    EXPECT_EQ(KindOf(status), ErrorKind::kQemuFailed);
    EXPECT_THAT(std::string(status.message()), HasSubstr("task config \"warm_start\": restoring template 3f9a0c61d2b7 failed: "));
    EXPECT_THAT(std::string(status.message()), HasSubstr(c.want));
    EXPECT_THAT(std::string(status.message()), HasSubstr("the template was removed, so the next start boots cold"));
    EXPECT_FALSE(fs::exists(cache_ / ("tpl-" + kKey)));
    std::vector<std::string> left;
    for (const auto& entry : fs::directory_iterator(cache_.path())) left.push_back(entry.path().filename().string());
    EXPECT_EQ(left, std::vector<std::string>{"tpl-" + kOther}) << "nothing but the other template is left";
  }
  EXPECT_THAT(events_, IsEmpty());
}

// ---------------------------------------------------------------------------
// CopyOverlayInto

class CopyOverlay : public ::testing::Test {
 protected:
  void SetUp() override {
    // More than the copy's 64 KiB buffer, no two chunks alike.
    for (int i = 0; content_.size() < (200 << 10); ++i) content_ += "overlay block " + std::to_string(i) + "\n";
    std::ofstream(dir_ / "overlay.qcow2") << content_;
    fs::create_directories(dir_ / "task");
  }
  TempDir dir_;
  std::string content_;
};

TEST_F(CopyOverlay, CopiesTheWholeFileAndReturnsItOpenForWriting) {
  absl::StatusOr<UniqueFd> copy = CopyOverlayInto(dir_ / "overlay.qcow2", dir_ / "task", kWarmDiskName);
  ASSERT_TRUE(copy.ok()) << copy.status();
  const std::string path = dir_ / "task/warm-disk.qcow2";
  EXPECT_EQ(ReadFile(path), content_);
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ASSERT_EQ(::pwrite(copy->get(), "QFI", 3, 0), 3);
  EXPECT_EQ(ReadFile(path).substr(0, 17), "QFIrlay block 0\no");
  EXPECT_EQ(ReadFile(dir_ / "overlay.qcow2"), content_) << "the template's overlay is untouched";
}

// A job could have left a link at the name: it is replaced, never followed.
TEST_F(CopyOverlay, ReplacesWhatIsThereWithoutFollowingIt) {
  std::ofstream(dir_ / "victim") << "precious";
  fs::create_symlink(dir_ / "victim", dir_ / "task/warm-disk.qcow2");
  ASSERT_TRUE(CopyOverlayInto(dir_ / "overlay.qcow2", dir_ / "task", kWarmDiskName).ok());
  EXPECT_EQ(ReadFile(dir_ / "victim"), "precious");
  EXPECT_FALSE(fs::is_symlink(dir_ / "task/warm-disk.qcow2"));
  EXPECT_EQ(ReadFile(dir_ / "task/warm-disk.qcow2"), content_);
}

TEST_F(CopyOverlay, ErrorsNameTheFile) {
  absl::StatusOr<UniqueFd> copy = CopyOverlayInto(dir_ / "missing.qcow2", dir_ / "task", kWarmDiskName);
  EXPECT_THAT(std::string(copy.status().message()), HasSubstr("cannot open " + dir_ / "missing.qcow2"));
  fs::create_symlink(dir_ / "overlay.qcow2", dir_ / "link.qcow2");
  copy = CopyOverlayInto(dir_ / "link.qcow2", dir_ / "task", kWarmDiskName);
  EXPECT_THAT(std::string(copy.status().message()), HasSubstr("cannot open " + dir_ / "link.qcow2"));
  copy = CopyOverlayInto(dir_ / "overlay.qcow2", dir_ / "no-task", kWarmDiskName);
  EXPECT_THAT(std::string(copy.status().message()), HasSubstr("cannot open task dir " + dir_ / "no-task"));
  EXPECT_TRUE(fs::is_empty(dir_ / "task")) << "nothing was made";
}

// ---------------------------------------------------------------------------
// PrepareWarmStart

class PrepareWarm : public ::testing::Test {
 protected:
  void SetUp() override {
    fs::create_directories(root_ / "images");
    fs::create_directories(root_ / "alloc/web");
    std::ofstream(root_ / "images/base.img") << "a raw boot image";
    fs::resize_file(root_ / "images/base.img", 1 << 20);
    task_.identity = TaskIdentity{};
    task_.identity.name = "web";
    task_.identity.alloc_id = "alloc-1";
    task_.identity.job_id = "shop";
    task_.alloc_dir = root_ / "alloc";
    spec_ = ::ndq::testing::WarmTaskSpec("web", 25123);
    spec_.image_path = root_ / "images/base.img";
    spec_.memory_mb = 16;
    boot_ = {DiskNode{"raw", false, Pass(UniqueFd(::open(spec_.image_path.c_str(), O_RDWR | O_CLOEXEC)))}};
  }

  // Hands an fd to the would-be QEMU: its number there is 100 + its index.
  int Pass(UniqueFd fd) {
    passed_.push_back(std::move(fd));
    return 99 + static_cast<int>(passed_.size());
  }
  int Local(int qemu_fd) { return passed_.at(static_cast<size_t>(qemu_fd - 100)).get(); }

  WarmContext Context() { return Context(boot_); }
  WarmContext Context(const std::vector<DiskNode>& boot) {
    return WarmContext{task_, spec_, boot, "7.2.22", "", &cache_, "task-key",
                       [this](const std::string& m, const std::map<std::string, std::string>& f) {
                         events_.push_back(m);
                         fields_ = f;
                       },
                       [this](UniqueFd fd) { return Pass(std::move(fd)); }, [this](int fd) { return Local(fd); },
                       owned_,
                       /*pool=*/nullptr,
                       /*supervisor_path=*/"",
                       /*poolable=*/false};
  }

  std::vector<std::string> LeaseFiles() const {
    std::vector<std::string> leases;
    for (const auto& entry : fs::directory_iterator(cache_.dir())) {
      if (entry.path().filename().string().rfind(".lease-", 0) == 0) leases.push_back(entry.path().filename().string());
    }
    return leases;
  }

  // Saves a cold start's capture as its template (what SaveTemplate copies once the guest is ready).
  void SaveAsTemplate(WarmCapture& capture) {
    TemplateStore store(capture.cache_dir);
    TemplateStore::Writer writer(store, capture.identity);
    ASSERT_TRUE(writer.Begin().ok());
    struct stat st;
    ASSERT_EQ(::fstat(capture.disk.get(), &st), 0);
    ASSERT_EQ(::pwrite(capture.state.get(), "QEVM", 4, 0), 4);
    ASSERT_TRUE(writer.CopyFd(kTemplateRam, capture.ram.get(), capture.ram_bytes).ok());
    ASSERT_TRUE(writer.CopyFd(kTemplateState, capture.state.get(), 4).ok());
    ASSERT_TRUE(writer.CopyFd(kTemplateDisk, capture.disk.get(), st.st_size).ok());
    ASSERT_TRUE(writer.MakeOverlay(capture.disk_size).ok());
    ASSERT_TRUE(writer.Publish().ok());
  }

  TempDir root_;
  ImageCache cache_{root_ / "cache"};
  TaskRequest task_;
  VmSpec spec_;
  std::vector<UniqueFd> passed_;
  std::vector<DiskNode> boot_;
  VmResources owned_;
  std::vector<std::string> events_;
  std::map<std::string, std::string> fields_;
};

TEST_F(PrepareWarm, WithoutWarmStartNothingHappens) {
  spec_.warm.enabled = false;
  Rollback rollback;
  absl::StatusOr<WarmStart> warm = PrepareWarmStart(Context(), rollback);
  ASSERT_TRUE(warm.ok()) << warm.status();
  EXPECT_EQ(warm->mode, WarmMode::kOff);
  EXPECT_TRUE(fs::is_empty(root_ / "alloc/web"));
  EXPECT_THAT(events_, IsEmpty());
}

TEST_F(PrepareWarm, RefusesWhatItCannotSave) {
  Rollback rollback;
  const std::vector<DiskNode> none;
  EXPECT_THAT(std::string(PrepareWarmStart(Context(none), rollback).status().message()),
              HasSubstr("task config \"warm_start\": the VM has no boot disk"));
  boot_[0].format = "vmdk";
  absl::Status vmdk = PrepareWarmStart(Context(), rollback).status();
  EXPECT_TRUE(absl::IsInvalidArgument(vmdk)) << vmdk;
  EXPECT_THAT(std::string(vmdk.message()), HasSubstr("the boot image is vmdk; warm starts take qcow2 or raw images"));
  EXPECT_TRUE(fs::is_empty(root_ / "alloc/web"));
}

// No template yet: the VM boots cold on an overlay of its own, its RAM in a
// memfd kept for the save; the lease taken to look is given back.
TEST_F(PrepareWarm, NoTemplateBootsColdOnItsOwnOverlay) {
  Rollback rollback;
  absl::StatusOr<WarmStart> warm = PrepareWarmStart(Context(), rollback);
  ASSERT_TRUE(warm.ok()) << warm.status();
  EXPECT_EQ(warm->mode, WarmMode::kCold);
  ASSERT_EQ(events_.size(), 1u);
  EXPECT_THAT(events_[0], HasSubstr("Warm start: booting cold ("));
  EXPECT_EQ(fields_["warm_start"], "cold");
  EXPECT_EQ(fields_["warm_template"], warm->key);
  EXPECT_FALSE(fields_["warm_reason"].empty());
  ASSERT_EQ(warm->boot.size(), 2u);
  EXPECT_EQ(warm->boot[0].format, "qcow2");
  EXPECT_FALSE(warm->boot[0].read_only);
  EXPECT_TRUE(warm->boot[1].read_only) << "the image under the overlay is only read";
  EXPECT_EQ(ImageVirtualSize(Local(warm->boot[0].fd), "qcow2").value_or(-1), 1 << 20);
  EXPECT_EQ(::fcntl(Local(warm->boot[1].fd), F_GETFL) & O_ACCMODE, O_RDONLY);
  ASSERT_NE(warm->capture, nullptr);
  EXPECT_EQ(warm->capture->ram_bytes, 16 << 20);
  EXPECT_EQ(warm->capture->disk_size, 1 << 20);
  struct stat st;
  ASSERT_EQ(::fstat(Local(warm->memory_fd), &st), 0);
  EXPECT_EQ(st.st_size, 16 << 20);
  EXPECT_THAT(LeaseFiles(), IsEmpty());
  EXPECT_THAT(owned_.leases, IsEmpty());
  EXPECT_TRUE(fs::exists(root_ / "alloc/web/warm-disk.qcow2"));
  rollback.RunNow();
  EXPECT_FALSE(fs::exists(root_ / "alloc/web/warm-disk.qcow2"));
}

// The template a cold start saved is restored by the next start: the task's
// overlay on its frozen disk, its RAM and state handed to QEMU, the template
// leased; a restore that then fails in QEMU removes it.
TEST_F(PrepareWarm, TheSavedTemplateIsRestoredThenRemovedWhenQemuFails) {
  Rollback cold_rollback;
  absl::StatusOr<WarmStart> cold = PrepareWarmStart(Context(), cold_rollback);
  ASSERT_TRUE(cold.ok()) << cold.status();
  SaveAsTemplate(*cold->capture);
  const std::string template_dir = TemplateStore(cache_.dir()).DirFor(cold->key);
  Rollback rollback;
  absl::StatusOr<WarmStart> warm = PrepareWarmStart(Context(), rollback);
  ASSERT_TRUE(warm.ok()) << warm.status();
  EXPECT_EQ(warm->mode, WarmMode::kRestore);
  EXPECT_EQ(warm->key, cold->key);
  EXPECT_EQ(warm->template_dir, template_dir);
  ASSERT_EQ(warm->boot.size(), 3u);
  EXPECT_FALSE(warm->boot[0].read_only);
  EXPECT_TRUE(warm->boot[1].read_only && warm->boot[2].read_only);
  EXPECT_EQ(ReadFile(root_ / "alloc/web/warm-disk.qcow2"), ReadFile(template_dir + "/overlay.qcow2"));
  EXPECT_EQ(ReadFile(absl::StrCat("/proc/self/fd/", Local(warm->state_fd))), "QEVM");
  EXPECT_EQ(owned_.leases, std::vector<std::string>{template_dir});
  EXPECT_EQ(LeaseFiles().size(), 1u);

  warm->state_fd = 23;  // its number in the QEMU the script plays
  ScriptedPeer peer(FailingAt(2, R"({"id": 3, "error": {"class": "GenericError", "desc": "'-incoming' was not specified on the command line"}})"));
  auto qmp = AdoptOrDie(peer);
  ASSERT_NE(qmp, nullptr);
  absl::Status restored = RestoreState(*qmp, *warm, cache_.dir(), Context().emit);
  EXPECT_THAT(std::string(restored.message()), HasSubstr("the template was removed"));
  EXPECT_FALSE(fs::exists(template_dir));
  rollback.RunNow();
  EXPECT_FALSE(fs::exists(root_ / "alloc/web/warm-disk.qcow2"));
}

}  // namespace
}  // namespace ndq
