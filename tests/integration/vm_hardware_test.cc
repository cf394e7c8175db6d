// Cloud images and VM hardware end to end: the real plugin, supervisor, QEMU
// (TCG) and the test guest, which publishes over HTTP what it found (its
// kernel command line, disks and their serials, the cloud-init seed, the
// firmware, Secure Boot, the TPM); see tests/fixtures/README.md.
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <set>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../support/guest_task.h"
#include "../support/http_test_server.h"
#include "../support/plugin_harness.h"
#include "../support/temp_dir.h"
#include "../support/test_guest.h"
#include "absl/strings/str_cat.h"
#include "image/checksum.h"

namespace ndq {
namespace {

namespace fs = std::filesystem;
using ::ndq::testing::AddTaskPort;
using ::ndq::testing::FakeAlloc;
using ::ndq::testing::FreePort;
using ::ndq::testing::Guest;
using ::ndq::testing::Listing;
using ::ndq::testing::Page;
using ::ndq::testing::HttpTestServer;
using ::ndq::testing::Sha256Of;
using ::ndq::testing::kGuestBootTimeout;
using ::ndq::testing::PluginHarness;
using ::ndq::testing::ProcessesMentioning;
using ::ndq::testing::ReadFile;
using ::ndq::testing::TempDir;
using ::ndq::testing::TestGuestDir;
using ::ndq::testing::WaitForFileToContain;
using ::ndq::testing::WaitUntil;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using json = nlohmann::json;

void MakeImage(const std::string& path, const std::string& format, const std::string& size) {
  auto made = RunCommand({"/usr/bin/qemu-img", "create", "-q", "-f", format, path, size}, absl::Seconds(30));
  ASSERT_TRUE(made.ok() && made->exit_code == 0) << path;
}

class VmHardwareTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(TestGuestDir().ok()) << TestGuestDir().status();
    plugin_config_["image_paths"] = {*TestGuestDir()};
    plugin_config_["image_cache_dir"] = cache_.path();
    state_dir_ = state_.path() + "/s";
    harness_ = std::make_unique<PluginHarness>(state_dir_, plugin_config_);
  }
  void TearDown() override {
    ::ndq::testing::KillVmsUnder(state_dir_);
    harness_.reset();
  }

  // Starts `config` with port "http" on a fresh port; "" or the start's error.
  std::string Start(FakeAlloc& alloc, const json& config, driverpb::TaskHandle* handle, int* port,
                    int memory_mb = 256) {
    *port = FreePort();
    driverpb::TaskConfig task = alloc.Task(config, memory_mb);
    AddTaskPort(&task, "http", *port);
    const grpc::Status status = harness_->Start(task, handle);
    return status.ok() ? "" : status.error_message();
  }

  // Starts and waits for GUEST-READY on the serial console.
  void Boot(FakeAlloc& alloc, const json& config, driverpb::TaskHandle* handle, int* port, int memory_mb = 256) {
    ASSERT_EQ(Start(alloc, config, handle, port, memory_mb), "");
    ASSERT_TRUE(WaitForFileToContain(alloc.stdout_path(), "GUEST-READY", kGuestBootTimeout))
        << "serial console:\n"
        << ReadFile(alloc.stdout_path());
  }

  void StopAndDestroy(const driverpb::TaskHandle& handle) {
    ASSERT_TRUE(harness_->Stop(handle.config().id(), absl::Seconds(20)).ok());
    ASSERT_TRUE(harness_->Destroy(handle.config().id(), true).ok());
  }

  TempDir state_, cache_;
  std::string state_dir_;
  json plugin_config_ = json::object();
  std::unique_ptr<PluginHarness> harness_;
};

json BaseConfig() { return {{"accelerator", "tcg"}, {"graceful_shutdown", true}, {"port_map", {{{"http", 80}}}}}; }

// A cloud image's shape: a seed the guest acts on (the page it serves came
// from user-data), a blank data disk whose content survives a restart of the
// task, the job's own qcow2 disk and a read-only one, each found by serial.
TEST_F(VmHardwareTest, CloudInitSeedAndDataDisksReachTheGuest) {
  FakeAlloc alloc("cloud");
  alloc.AddOverlay(Guest("guest.qcow2"));
  MakeImage(alloc.task_dir() + "/local/data2.qcow2", "qcow2", "64M");
  MakeImage(alloc.task_dir() + "/local/ro.img", "raw", "16M");
  json config = BaseConfig();
  config["image_path"] = "local/disk.qcow2";
  config["drive_interface"] = "virtio";
  config["cloud_init"] = {{"user_data", "#cloud-config\nndq-page: page-from-user-data\n"},
                          {"ssh_authorized_keys", {"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHRlc3Q ops@example"}}};
  config["disk"] = {{{"size", "1GiB"}, {"serial", "data1"}},
                    {{"image_path", "local/data2.qcow2"}, {"serial", "data2"}, {"cache", "none"}},
                    {{"image_path", "local/ro.img"}, {"serial", "ro1"}, {"readonly", true}}};
  driverpb::TaskHandle handle;
  int port = 0;
  Boot(alloc, config, &handle, &port);
  EXPECT_EQ(Page(port, ""), "page-from-user-data\n");
  EXPECT_THAT(Page(port, "meta-data"), HasSubstr(handle.config().alloc_id())) << "instance-id is the alloc ID";
  EXPECT_THAT(Page(port, "meta-data"), HasSubstr("ops@example"));
  const std::string disks = Page(port, "disks");
  EXPECT_THAT(disks, HasSubstr("serial=data1 sectors=2097152 ro=0"));
  EXPECT_THAT(disks, HasSubstr("serial=data2 sectors=131072 ro=0"));
  EXPECT_THAT(disks, HasSubstr("serial=ro1 sectors=32768 ro=1"));
  EXPECT_EQ(Page(port, "disk-data1"), "count=1\n");
  EXPECT_EQ(Page(port, "disk-data2"), "count=1\n") << disks;
  EXPECT_EQ(Page(port, "disk-ro1"), "write=refused\n");
  struct stat st;
  ASSERT_EQ(::stat((alloc.task_dir() + "/disk1.raw").c_str(), &st), 0);
  EXPECT_LT(st.st_blocks * 512, 64 << 20) << "the blank disk is sparse";
  StopAndDestroy(handle);

  // The same alloc's task again: the blank disk kept what the guest wrote.
  fs::remove(alloc.stdout_path());  // so GUEST-READY is this boot's
  Boot(alloc, config, &handle, &port);
  EXPECT_EQ(Page(port, "disk-data1"), "count=2\n");
  EXPECT_EQ(Page(port, "disk-data2"), "count=2\n");
  StopAndDestroy(handle);
}

// The guest's own kernel and initrd, booted directly; kernel_cmdline reaches
// /proc/cmdline and sets the page.
TEST_F(VmHardwareTest, DirectKernelBoot) {
  FakeAlloc alloc("kernel");
  fs::copy_file(Guest("guest-initrd.gz"), alloc.task_dir() + "/local/initrd.gz");
  json config = BaseConfig();
  config["kernel"] = Guest("guest-vmlinuz");  // from image_paths
  config["initrd"] = "local/initrd.gz";       // from the task dir
  config["kernel_cmdline"] = "console=ttyS0 quiet guest.page=booted-by-kernel";
  driverpb::TaskHandle handle;
  int port = 0;
  Boot(alloc, config, &handle, &port);
  EXPECT_THAT(Page(port, ""), HasSubstr("booted-by-kernel"));
  EXPECT_THAT(Page(port, "cmdline"), HasSubstr("console=ttyS0 quiet guest.page=booted-by-kernel"));
  StopAndDestroy(handle);
}

// An ISO downloaded over HTTP, verified and cached, boots from the CD-ROM.
TEST_F(VmHardwareTest, IsoBootFromAVerifiedDownload) {
  TempDir served;
  fs::copy_file(Guest("guest.iso"), served.path() + "/guest.iso");
  HttpTestServer server;
  ASSERT_TRUE(server.Start({"--root", served.path()}));
  FakeAlloc alloc("iso");
  json config = BaseConfig();
  config["cdrom_source"] = absl::StrCat("http://127.0.0.1:", server.port(), "/guest.iso");
  config["cdrom_checksum"] = "sha256:" + Sha256Of(served.path() + "/guest.iso");
  driverpb::TaskHandle handle;
  int port = 0;
  Boot(alloc, config, &handle, &port);
  EXPECT_THAT(Page(port, ""), HasSubstr("nomad-driver-qemu test guest"));
  StopAndDestroy(handle);
  // A wrong checksum never boots, and leaves nothing in the cache's place.
  config["cdrom_checksum"] = "sha256:" + std::string(64, '0');
  FakeAlloc other("iso2");
  const std::string error = Start(other, config, &handle, &port);
  EXPECT_THAT(error, HasSubstr("cdrom_source"));
  EXPECT_THAT(error, HasSubstr("checksum"));
}

// UEFI with a TPM: OVMF boots the guest's unified kernel image; the guest
// sees /dev/tpm0; swtpm is gone with the VM; the NVRAM copy stays.
TEST_F(VmHardwareTest, UefiWithTpm) {
  FakeAlloc alloc("uefi");
  alloc.AddOverlay(Guest("guest-uefi.qcow2"));
  json config = BaseConfig();
  config["image_path"] = "local/disk.qcow2";
  config["drive_interface"] = "virtio";
  config["firmware"] = "uefi";
  config["tpm"] = true;
  driverpb::TaskHandle handle;
  int port = 0;
  Boot(alloc, config, &handle, &port);
  EXPECT_EQ(Page(port, "firmware"), "uefi\n");
  EXPECT_EQ(Page(port, "tpm"), "present\n");
  EXPECT_TRUE(fs::exists(alloc.task_dir() + "/uefi-vars.fd"));
  EXPECT_TRUE(fs::is_directory(alloc.task_dir() + "/tpm"));
  const std::string socket_dir = ::ndq::testing::RecordOf(handle).state_dir;
  EXPECT_THAT(ProcessesMentioning(alloc.task_dir() + "/tpm"), Not(IsEmpty())) << "swtpm runs beside QEMU";
  StopAndDestroy(handle);
  EXPECT_TRUE(WaitUntil([&] { return ProcessesMentioning(alloc.task_dir() + "/tpm").empty(); }, absl::Seconds(10)))
      << "no swtpm is left after stop";
  EXPECT_FALSE(fs::exists(socket_dir));
}

// Secure Boot: a guest signed through Debian's shim, GRUB and kernel boots
// with Secure Boot on; the unsigned unified kernel image is refused by the
// firmware, which says so on the task's console.
TEST_F(VmHardwareTest, SecureBootBootsSignedAndRefusesUnsigned) {
  FakeAlloc signed_alloc("secboot");
  signed_alloc.AddOverlay(Guest("guest-secboot.qcow2"));
  json config = BaseConfig();
  config["image_path"] = "local/disk.qcow2";
  config["drive_interface"] = "virtio";
  config["firmware"] = "uefi";
  config["secure_boot"] = true;
  driverpb::TaskHandle handle;
  int port = 0;
  Boot(signed_alloc, config, &handle, &port, /*memory_mb=*/512);  // 256 MB resets under Secure Boot (fixtures README)
  EXPECT_EQ(Page(port, "secureboot"), "1\n");
  StopAndDestroy(handle);

  FakeAlloc unsigned_alloc("unsigned");
  unsigned_alloc.AddOverlay(Guest("guest-uefi.qcow2"));
  ASSERT_EQ(Start(unsigned_alloc, config, &handle, &port, 512), "");
  EXPECT_TRUE(WaitForFileToContain(unsigned_alloc.stdout_path(), "Access Denied", kGuestBootTimeout))
      << ReadFile(unsigned_alloc.stdout_path());
  EXPECT_THAT(ReadFile(unsigned_alloc.stdout_path()), Not(HasSubstr("GUEST-READY")));
  StopAndDestroy(handle);
}

// Hostile options: each is refused with the field named, and the task dir,
// state dir and process table are as before.
TEST_F(VmHardwareTest, HostileOptionsAreRefusedAndLeaveNothing) {
  FakeAlloc alloc("hostile");
  alloc.AddOverlay(Guest("guest.qcow2"));
  MakeImage(alloc.task_dir() + "/local/data.qcow2", "qcow2", "64M");
  {
    std::ofstream big(alloc.task_dir() + "/local/huge-user-data");
    big << "#cloud-config\n" << std::string(17 << 20, 'x');
  }
  ::symlink("/etc/shadow", (alloc.task_dir() + "/local/shadow-link").c_str());
  const std::set<std::string> before = Listing(alloc.task_dir());
  const std::vector<std::pair<json, std::string>> cases = {
      {{{"kernel", "/etc/passwd"}}, "\"kernel\""},
      {{{"kernel", "local/shadow-link"}}, "\"kernel\""},
      {{{"kernel", Guest("guest-vmlinuz")}, {"initrd", "/etc/shadow"}}, "\"initrd\""},
      {{{"cdrom", "/etc/shadow"}}, "\"cdrom\""},
      {{{"cdrom_source", "file:///etc/shadow"}, {"cdrom_checksum", "sha256:" + std::string(64, 'a')}},
       "\"cdrom_source\""},
      {{{"disk", {{{"image_source", "/etc/shadow"}, {"checksum", "sha256:" + std::string(64, 'a')}}}}},
       "\"disk[0].image_source\""},
      {{{"disk", {{{"image_path", "/etc/shadow"}}}}}, "\"disk[0].image_path\""},
      {{{"disk", {{{"image_path", "local/data.qcow2"}, {"size", "1M"}}}}}, "\"disk[0].size\""},
      {{{"disk", {{{"size", "1G"}, {"serial", "x,file=/etc/shadow"}}}}}, "\"disk[0].serial\""},
      {{{"disk", {{{"size", "1G"}, {"interface", "usb"}}}}}, "\"disk[0].interface\""},
      {{{"disk", {{{"size", "1G"}, {"cache", "none,x=y"}}}}}, "\"disk[0].cache\""},
      {{{"disk", {{{"size", "1G"}, {"discard", "on"}}}}}, "\"disk[0].discard\""},
      {{{"cloud_init", {{"user_data_file", "/etc/shadow"}}}}, "\"cloud_init.user_data_file\""},
      {{{"cloud_init", {{"user_data_file", "local/missing"}}}}, "\"cloud_init.user_data_file\""},
      {{{"cloud_init", {{"user_data_file", "local/huge-user-data"}}}}, "at most 16 MiB"},
      {{{"cloud_init", {{"ssh_authorized_keys", {"ssh-ed25519 AAAA\nruncmd: [rm]"}}}}},
       "cloud_init.ssh_authorized_keys[0]"},
      {{{"net_device", "ne2k_isa_nonexistent"}}, "\"net_device\""},
      {{{"net_device", "e1000,romfile=/etc/shadow"}}, "\"net_device\""},
      {{{"mac_address", "01:00:5e:00:00:01"}}, "multicast"},
      {{{"mac_address", "02:00:00:00:00:01,x=y"}}, "\"mac_address\""},
      {{{"secure_boot", true}}, "needs firmware = \"uefi\""},
      {{{"kernel_cmdline", "quiet"}}, "\"kernel_cmdline\": needs kernel"},
  };
  for (const auto& [extra, expected] : cases) {
    SCOPED_TRACE(extra.dump());
    json config = BaseConfig();
    config["image_path"] = "local/disk.qcow2";
    for (const auto& [key, value] : extra.items()) config[key] = value;
    driverpb::TaskHandle handle;
    int port = 0;
    const std::string error = Start(alloc, config, &handle, &port);
    EXPECT_THAT(error, HasSubstr(expected));
    EXPECT_THAT(error, Not(HasSubstr("root:"))) << "no file content in errors";
    EXPECT_EQ(Listing(alloc.task_dir()), before);
    EXPECT_THAT(::ndq::testing::VmStateLeft(state_dir_), IsEmpty());
    EXPECT_THAT(ProcessesMentioning(state_dir_), IsEmpty());
  }
}

}  // namespace
}  // namespace ndq
