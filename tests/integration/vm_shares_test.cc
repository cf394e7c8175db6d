// Shares end to end: the real plugin, supervisor, QEMU (TCG, under its
// sandbox) and the test guest on Debian's generic kernel (it has 9p), which
// mounts every 9p tag at /mnt/<safe tag>, copies its hello.txt to a page and
// tries to write from-guest.txt (tests/fixtures/README.md, "9p shares").
#include <sys/stat.h>
#include <sys/xattr.h>
#include <pwd.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <set>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../support/guest_task.h"
#include "../support/plugin_harness.h"
#include "../support/temp_dir.h"
#include "../support/test_guest.h"
#include "absl/strings/str_cat.h"

namespace ndq {
namespace {

namespace fs = std::filesystem;
using ::ndq::testing::AddTaskPort;
using ::ndq::testing::FakeAlloc;
using ::ndq::testing::FreePort;
using ::ndq::testing::Guest;
using ::ndq::testing::Page;
using ::ndq::testing::kGuestBootTimeout;
using ::ndq::testing::PluginHarness;
using ::ndq::testing::ProcessesMentioning;
using ::ndq::testing::ReadFile;
using ::ndq::testing::TempDir;
using ::ndq::testing::TestGuestDir;
using ::ndq::testing::WaitForFileToContain;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using json = nlohmann::json;

constexpr char kGuestWrote[] = "written by the guest\n";

std::set<std::string> RecursiveListing(const std::string& dir) {
  std::set<std::string> names;
  std::error_code ignored;
  for (const auto& entry : fs::recursive_directory_iterator(dir, ignored)) names.insert(entry.path().string());
  return names;
}

void Write(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

void AddMount(driverpb::TaskConfig& task, const std::string& task_path, const std::string& host_path, bool readonly) {
  driverpb::Mount* mount = task.add_mounts();
  mount->set_task_path(task_path);
  mount->set_host_path(host_path);
  mount->set_readonly(readonly);
}

// QEMU runs as an unprivileged qemu_user under its sandbox, as in production.
class VmSharesTest : public ::testing::Test {
 protected:
  static constexpr char kUser[] = "ndq-qemu-test";
  void SetUp() override {
    if (::getpwnam(kUser) == nullptr) {
      auto added = RunCommand({"/usr/sbin/useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", kUser},
                              absl::Seconds(30));
      ASSERT_TRUE(added.ok() && added->exit_code == 0) << (added.ok() ? added->output : "");
    }
    ASSERT_TRUE(TestGuestDir().ok()) << TestGuestDir().status();
    json plugin_config = {{"image_paths", {*TestGuestDir()}}, {"qemu_user", kUser}};
    ::chmod(state_.path().c_str(), 0711);  // as /run is: QEMU's user may pass to its run/
    state_dir_ = state_.path() + "/s";
    harness_ = std::make_unique<PluginHarness>(state_dir_, plugin_config);
  }
  void TearDown() override {
    ::ndq::testing::KillVmsUnder(state_dir_);
    harness_.reset();
  }

  // The modes Nomad gives (client/allocdir): alloc/ 0755 root with data/
  // 0777 in it, the task dir, local/ and secrets/ (a tmpfs in Nomad; a plain
  // directory here) 0777; and a hello.txt in alloc/, local/ and secrets/.
  static void LayOut(FakeAlloc& alloc) {
    fs::create_directories(alloc.task_dir() + "/secrets");
    fs::create_directories(alloc.alloc_dir() + "/alloc/data");
    fs::permissions(alloc.alloc_dir() + "/alloc", fs::perms(0755));
    for (const std::string& dir : {alloc.alloc_dir() + "/alloc/data", alloc.task_dir(), alloc.task_dir() + "/local",
                                   alloc.task_dir() + "/secrets"}) {
      fs::permissions(dir, fs::perms(0777));
    }
    Write(alloc.alloc_dir() + "/alloc/hello.txt", "hello alloc\n");
    Write(alloc.task_dir() + "/local/hello.txt", "hello local\n");
    Write(alloc.task_dir() + "/secrets/hello.txt", "hello secrets\n");
  }

  static json Config() {
    return {{"image_path", "local/disk.qcow2"}, {"accelerator", "tcg"},  {"drive_interface", "virtio"},
            {"graceful_shutdown", true},        {"share_alloc_dirs", true}, {"port_map", {{{"http", 80}}}}};
  }

  TempDir state_;
  std::string state_dir_;
  std::unique_ptr<PluginHarness> harness_;
};

// One boot: alloc/, local/, secrets/ and two host volumes (one read-only) are
// mounted in the guest; it reads what the host wrote, its writes land on the
// host where allowed and are refused in secrets/ and the read-only volume.
// The roots sit in 0700 temp dirs QEMU's user cannot pass through: it gets
// each directory opened, never a path to walk.
TEST_F(VmSharesTest, AllocDirsAndVolumesReachTheGuest) {
  FakeAlloc alloc("shares");
  alloc.AddOverlay(Guest("guest-generic.qcow2"));
  LayOut(alloc);
  // The operator makes host volumes accessible to QEMU's user.
  TempDir ro_volume, rw_volume;
  fs::permissions(ro_volume.path(), fs::perms(0755));
  fs::permissions(rw_volume.path(), fs::perms(0777));
  Write(ro_volume.path() + "/hello.txt", "hello read-only volume\n");
  Write(rw_volume.path() + "/hello.txt", "hello volume\n");

  driverpb::TaskConfig task = alloc.Task(Config());
  AddMount(task, "/srv/data", ro_volume.path(), true);
  AddMount(task, "/srv/rw", rw_volume.path(), false);
  const int port = FreePort();
  AddTaskPort(&task, "http", port);
  driverpb::TaskHandle handle;
  const grpc::Status status = harness_->Start(task, &handle);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_TRUE(WaitForFileToContain(alloc.stdout_path(), "GUEST-READY", kGuestBootTimeout))
      << "serial console:\n" << ReadFile(alloc.stdout_path());

  const std::string shares = Page(port, "shares");
  for (const char* tag : {"alloc", "local", "secrets", "/srv/data", "/srv/rw"}) {
    EXPECT_THAT(shares, HasSubstr(absl::StrCat("tag=", tag, " mounted=yes"))) << shares;
  }
  EXPECT_EQ(Page(port, "share-alloc-hello"), "hello alloc\n");
  EXPECT_EQ(Page(port, "share-local-hello"), "hello local\n");
  EXPECT_EQ(Page(port, "share-secrets-hello"), "hello secrets\n");
  EXPECT_EQ(Page(port, "share-_srv_data-hello"), "hello read-only volume\n");
  EXPECT_EQ(Page(port, "share-_srv_rw-hello"), "hello volume\n");

  EXPECT_EQ(Page(port, "share-local-write"), "ok\n");
  EXPECT_EQ(Page(port, "share-_srv_rw-write"), "ok\n");
  EXPECT_EQ(ReadFile(alloc.task_dir() + "/local/from-guest.txt"), kGuestWrote);
  EXPECT_EQ(ReadFile(rw_volume.path() + "/from-guest.txt"), kGuestWrote);

  // mapped-xattr: the guest's owner and mode live in xattrs; the host file is
  // QEMU's user's, mode fmode, whatever the guest asked for.
  struct stat st {};
  ASSERT_EQ(::stat((alloc.task_dir() + "/local/from-guest.txt").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0644u);
  EXPECT_EQ(st.st_uid, ::getpwnam(kUser)->pw_uid);
  EXPECT_GT(::getxattr((alloc.task_dir() + "/local/from-guest.txt").c_str(), "user.virtfs.uid", nullptr, 0), 0);

  EXPECT_EQ(Page(port, "share-secrets-write"), "refused\n");
  EXPECT_EQ(Page(port, "share-_srv_data-write"), "refused\n");
  EXPECT_FALSE(fs::exists(alloc.task_dir() + "/secrets/from-guest.txt"));
  EXPECT_FALSE(fs::exists(ro_volume.path() + "/from-guest.txt"));
  // alloc/ itself is root's 0755, as Nomad makes it: shared, readable, and
  // QEMU's user may not write at its top (alloc/data is 0777).
  EXPECT_EQ(Page(port, "share-alloc-write"), "refused\n");
  EXPECT_FALSE(fs::exists(alloc.alloc_dir() + "/alloc/from-guest.txt"));

  ASSERT_TRUE(harness_->Stop(handle.config().id(), absl::Seconds(20)).ok());
  ASSERT_TRUE(harness_->Destroy(handle.config().id(), true).ok());
}

// Shares no one gave: each start fails with an error naming the option or
// mount, before anything is made (no QEMU, no state, no files).
TEST_F(VmSharesTest, HostileSharesAreRefusedAndLeaveNothing) {
  FakeAlloc alloc("hostile");
  LayOut(alloc);
  // The boot disk sits in the task dir itself, so local/ can be replaced.
  auto made = RunCommand({"/usr/bin/qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                          Guest("guest-generic.qcow2"), alloc.task_dir() + "/disk.qcow2"},
                         absl::Seconds(30));
  ASSERT_TRUE(made.ok() && made->exit_code == 0);
  TempDir outside;
  Write(outside.path() + "/hello.txt", "not the job's\n");
  Write(outside.path() + "/a-file", "x");

  struct Case {
    std::string name;
    json extra;                      // added to the job's config
    std::vector<std::string> mount;  // task_path, host_path of one mount; empty: none
    std::vector<std::string> expected;  // substrings of the error
  };
  const std::string missing = outside.path() + "/missing", file = outside.path() + "/a-file";
  const std::vector<Case> cases = {
      {"relative host path", json::object(), {"/srv/data", "srv/data"}, {"volume mount \"/srv/data\"", "not absolute"}},
      {"missing host path", json::object(), {"/srv/data", missing}, {"volume mount \"/srv/data\"", "does not exist"}},
      {"file as host path", json::object(), {"/srv/data", file}, {"volume mount \"/srv/data\"", "is not a directory"}},
      {"comma in the tag", json::object(), {"/srv/a,path=/etc", outside.path()},
       {"volume mount \"/srv/a,path=/etc\"", "9p mount tag"}},
      {"tag of an alloc dir", json::object(), {"secrets", outside.path()}, {"volume mount \"secrets\"", "already used"}},
      {"job names a share path", {{"share_paths", {"/etc"}}}, {}, {"\"share_paths\"", "is not a known option"}},
      {"root QEMU's user cannot read", json::object(), {"/srv/data", outside.path()},
       {"volume mount \"/srv/data\": QEMU's user \"ndq-qemu-test\" cannot read host path", "mode 0700"}},
  };
  const std::set<std::string> before = RecursiveListing(alloc.alloc_dir());
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    json config = Config();
    config["image_path"] = "disk.qcow2";
    config.erase("port_map");
    for (const auto& [key, value] : c.extra.items()) config[key] = value;
    driverpb::TaskConfig task = alloc.Task(config);
    if (!c.mount.empty()) AddMount(task, c.mount[0], c.mount[1], false);
    driverpb::TaskHandle handle;
    const grpc::Status status = harness_->Start(task, &handle);
    ASSERT_FALSE(status.ok());
    for (const std::string& part : c.expected) EXPECT_THAT(status.error_message(), HasSubstr(part));
    EXPECT_EQ(RecursiveListing(alloc.alloc_dir()), before);
    EXPECT_THAT(::ndq::testing::VmStateLeft(state_dir_), IsEmpty());
    EXPECT_THAT(ProcessesMentioning(state_dir_), IsEmpty());
    EXPECT_FALSE(fs::exists(outside.path() + "/from-guest.txt"));
  }

  // local/ replaced (by an artifact, a template, a prestart task) with a link
  // to a host directory outside the alloc.
  fs::remove_all(alloc.task_dir() + "/local");
  fs::create_directory_symlink(outside.path(), alloc.task_dir() + "/local");
  const std::set<std::string> linked = RecursiveListing(alloc.alloc_dir());
  json config = Config();
  config["image_path"] = "disk.qcow2";
  config.erase("port_map");
  driverpb::TaskHandle handle;
  const grpc::Status status = harness_->Start(alloc.Task(config), &handle);
  ASSERT_FALSE(status.ok());
  EXPECT_THAT(status.error_message(), HasSubstr("\"share_alloc_dirs\": the task's local/ is a symbolic link"));
  EXPECT_THAT(status.error_message(), Not(HasSubstr(outside.path())));
  EXPECT_EQ(RecursiveListing(alloc.alloc_dir()), linked);
  EXPECT_THAT(::ndq::testing::VmStateLeft(state_dir_), IsEmpty());
  EXPECT_THAT(ProcessesMentioning(state_dir_), IsEmpty());
  EXPECT_FALSE(fs::exists(outside.path() + "/from-guest.txt"));
}

}  // namespace
}  // namespace ndq
