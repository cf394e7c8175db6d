// The hardware planners (qemu/hardware_plan.h) called directly: drives, the
// boot order, direct kernel boot, the NIC and the firmware. PlanVm's own
// tests (vm_spec_test) cover the same options end to end; these check each
// planner's defaults, its boundaries and hostile values, and that every
// problem names its option.
#include "qemu/hardware_plan.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace ndq {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

// The spec as PlanVm hands it to the hardware planners: the boot image
// planned on the default IDE interface of x86_64. Each helper plans from a
// fresh copy of `before_` and returns the problems joined, as PlanVm reports
// them ("" when there are none).
class HardwarePlan : public ::testing::Test {
 protected:
  HardwarePlan() {
    before_.emulator = "x86_64";
    before_.image_path = "local/linux.img";
    before_.drive_interface = "ide";
    task_.identity.name = "web";
    task_.identity.alloc_id = "1f2e3d4c-0000-4000-8000-123456789abc";
  }

  std::string DriveProblems() {
    spec_ = before_;
    std::vector<std::string> problems;
    PlanDrives(config_, plugin_, spec_, problems);
    return absl::StrJoin(problems, "; ");
  }
  std::string KernelProblems() {
    spec_ = before_;
    std::vector<std::string> problems;
    PlanKernel(config_, spec_, problems);
    return absl::StrJoin(problems, "; ");
  }
  std::string NicProblems() {
    spec_ = before_;
    std::vector<std::string> problems;
    PlanNic(config_, task_, host_, spec_, problems);
    return absl::StrJoin(problems, "; ");
  }
  std::string FirmwareProblems() {
    spec_ = before_;
    std::vector<std::string> problems;
    PlanFirmware(config_, host_, spec_, problems);
    return absl::StrJoin(problems, "; ");
  }

  static DiskConfig Blank(const std::string& size) {
    DiskConfig disk;
    disk.size = size;
    return disk;
  }
  static DiskConfig File(const std::string& path) {
    DiskConfig disk;
    disk.image_path = path;
    return disk;
  }

  TaskConfig config_;
  PluginConfig plugin_;
  HostCapabilities host_;
  TaskRequest task_;
  VmSpec before_;
  VmSpec spec_;
};

// --- messages -------------------------------------------------------------

TEST(HardwarePlanQuoting, QuotedWrapsInDoubleQuotesAndListsAreCommaSeparated) {
  EXPECT_EQ(Quoted("e1000"), "\"e1000\"");
  EXPECT_EQ(Quoted(""), "\"\"") << "an empty value must still show in a message";
  EXPECT_EQ(QuotedList({}), "");
  EXPECT_EQ(QuotedList({"ide"}), "\"ide\"");
  EXPECT_EQ(QuotedList({"ide", "virtio", "nvme"}), "\"ide\", \"virtio\", \"nvme\"");
}

// --- what boots without an image ------------------------------------------------

TEST(HardwarePlanBootsWithoutImage, OnlyACdromOrAKernelBoots) {
  TaskConfig config;
  EXPECT_FALSE(BootsWithoutImage(config));
  // Neither an initrd nor a command line boots anything without a kernel,
  // and data disks and the seed are never boot devices.
  config.initrd = "local/initrd";
  config.kernel_cmdline = "quiet";
  config.disks = {DiskConfig{}};
  config.cloud_init = CloudInitConfig{};
  EXPECT_FALSE(BootsWithoutImage(config));
  for (auto set : {+[](TaskConfig& c) { c.cdrom = "local/a.iso"; },
                   +[](TaskConfig& c) { c.cdrom_source = "https://example.com/a.iso"; },
                   +[](TaskConfig& c) { c.kernel = "local/vmlinuz"; }}) {
    TaskConfig booting;
    set(booting);
    EXPECT_TRUE(BootsWithoutImage(booting));
  }
}

// --- the boot disk's tuning -------------------------------------------------------

// A plain job's command line stays as Nomad's: no extra drive, no bootindex.
TEST_F(HardwarePlan, ABootDiskAloneGetsNoDrivesAndNoBootIndex) {
  EXPECT_EQ(DriveProblems(), "");
  EXPECT_THAT(spec_.drives, IsEmpty());
  EXPECT_EQ(spec_.boot_index, 0);
  EXPECT_EQ(spec_.boot_cache, "");
  EXPECT_EQ(spec_.boot_discard, "");
}

TEST_F(HardwarePlan, TheBootDiskTakesEveryCacheAndDiscardMode) {
  for (const char* cache : {"writeback", "writethrough", "none", "unsafe", "directsync"}) {
    config_.disk_cache = cache;
    EXPECT_EQ(DriveProblems(), "") << cache;
    EXPECT_EQ(spec_.boot_cache, cache);
  }
  for (const char* discard : {"unmap", "ignore"}) {
    config_.disk_discard = discard;
    EXPECT_EQ(DriveProblems(), "") << discard;
    EXPECT_EQ(spec_.boot_discard, discard);
  }
}

// The values go into -blockdev options: anything else could add one.
TEST_F(HardwarePlan, HostileBootDiskTuningIsRefusedWithTheChoices) {
  config_.disk_cache = "none,aio=native";
  config_.disk_discard = "Unmap";
  const std::string problems = DriveProblems();
  EXPECT_THAT(problems, HasSubstr("task config \"disk_cache\": \"none,aio=native\" is not supported; use one of "
                                  "\"writeback\", \"writethrough\", \"none\", \"unsafe\", \"directsync\""));
  EXPECT_THAT(problems, HasSubstr("task config \"disk_discard\": \"Unmap\" is not supported; use one of \"unmap\", "
                                  "\"ignore\""));
  EXPECT_EQ(spec_.boot_cache, "") << "a refused value must not reach the command line";
  EXPECT_EQ(spec_.boot_discard, "");
}

TEST_F(HardwarePlan, BootDiskTuningWithoutABootDiskIsRefused) {
  before_.image_path.clear();  // a CD-ROM or kernel boot
  config_.cdrom = "local/install.iso";
  config_.disk_cache = "none";
  config_.disk_discard = "unmap";
  const std::string problems = DriveProblems();
  EXPECT_THAT(problems, HasSubstr("task config \"disk_cache\": the task has no boot disk"));
  EXPECT_THAT(problems, HasSubstr("task config \"disk_discard\": the task has no boot disk"));
}

// --- disk blocks -----------------------------------------------------------------

TEST_F(HardwarePlan, SixteenDiskBlocksAreTheLimit) {
  config_.disks.assign(16, Blank("1M"));
  ASSERT_EQ(DriveProblems(), "");
  ASSERT_EQ(spec_.drives.size(), 16u);
  EXPECT_EQ(spec_.drives.front().id, "disk1");
  EXPECT_EQ(spec_.drives.back().id, "disk16");
  config_.disks.assign(17, Blank("1M"));
  EXPECT_EQ(DriveProblems(), "task config \"disk\": at most 16 disk blocks, not 17");
  EXPECT_THAT(spec_.drives, IsEmpty());
}

// Every IDE device gets a slot of its own (pc: 4 less QEMU's default CD-ROM's,
// q35: 6 less it); one more is refused by planning, not by QEMU at start.
TEST_F(HardwarePlan, IdeDevicesMustFitTheMachinesSlots) {
  DiskConfig ide = Blank("1M");
  ide.interface = "ide";
  config_.disks = {ide, ide};  // with the IDE boot disk: 3 of pc's 3
  EXPECT_EQ(DriveProblems(), "");
  config_.cdrom = "local/install.iso";  // a 4th
  EXPECT_THAT(DriveProblems(), HasSubstr("4 IDE devices"));
  EXPECT_THAT(DriveProblems(), HasSubstr("machine \"pc\" has room for 3"));
  before_.drive_interface = "virtio";  // the boot disk leaves IDE: 3 again
  EXPECT_EQ(DriveProblems(), "");
  before_.drive_interface = "ide";
  before_.machine_type = "q35";  // 5 slots
  EXPECT_EQ(DriveProblems(), "");
  config_.disks = {ide, ide, ide, ide};  // 6 with the boot disk and the CD-ROM
  EXPECT_THAT(DriveProblems(), HasSubstr("machine \"q35\" has room for 5"));
  DiskConfig virtio = Blank("1M");
  config_.disks = {ide, ide, ide, virtio, virtio};  // virtio disks take no IDE slot
  EXPECT_EQ(DriveProblems(), "");
}

// A disk block sets only what the job asked for; QEMU's defaults hold otherwise.
TEST_F(HardwarePlan, ADiskBlockLeavesQemusDefaultsAndIsWritable) {
  config_.disks = {Blank("1G")};
  ASSERT_EQ(DriveProblems(), "");
  ASSERT_EQ(spec_.drives.size(), 1u);
  const Drive& disk = spec_.drives[0];
  EXPECT_EQ(disk.media, DriveMedia::kDisk);
  EXPECT_EQ(disk.cache, "");
  EXPECT_EQ(disk.discard, "");
  EXPECT_EQ(disk.serial, "") << "only NVMe gets a serial of its own";
  EXPECT_FALSE(disk.read_only);
  EXPECT_EQ(disk.boot_index, 0) << "a data disk is never a boot device";
  EXPECT_EQ(disk.source.field, "disk[0].size");
}

TEST_F(HardwarePlan, DiskSizeBoundaries) {
  for (const auto& [size, bytes] : std::vector<std::pair<std::string, int64_t>>{
           {"512", 512}, {"0.5K", 512}, {"1T", int64_t{1} << 40}, {"1.5G", int64_t{3} << 29}}) {
    config_.disks = {Blank(size)};
    EXPECT_EQ(DriveProblems(), "") << size;
    ASSERT_EQ(spec_.drives.size(), 1u);
    EXPECT_EQ(spec_.drives[0].source.size_bytes, bytes) << size;
  }
  // Less than one sector is no disk.
  for (const char* small : {"511", "0", "0.4K"}) {
    config_.disks = {Blank(small)};
    EXPECT_EQ(DriveProblems(), absl::StrCat("task config \"disk[0].size\": \"", small, "\" is too small for a disk"));
  }
  config_.disks = {Blank("-1G")};
  EXPECT_THAT(DriveProblems(), HasSubstr("task config \"disk[0].size\": \"-1G\" is not a size"));
  config_.disks = {Blank("1P")};
  EXPECT_THAT(DriveProblems(), HasSubstr("task config \"disk[0].size\": \"1P\" has an unknown size unit"));
  config_.disks = {Blank("9000000T")};  // past int64: must not wrap to a small or negative size
  EXPECT_THAT(DriveProblems(), HasSubstr("task config \"disk[0].size\": \"9000000T\" is too large"));
}

// The driver creates blank disks itself, with qemu-img's raw or qcow2.
TEST_F(HardwarePlan, ABlankDiskIsRawOrQcow2) {
  DiskConfig disk = Blank("1G");
  disk.format = "qcow2";
  config_.disks = {disk};
  ASSERT_EQ(DriveProblems(), "");
  EXPECT_EQ(spec_.drives[0].source.format, "qcow2");
  disk.format = "vmdk";
  config_.disks = {disk};
  EXPECT_EQ(DriveProblems(), "task config \"disk[0].format\": a blank disk is \"raw\" or \"qcow2\"");
}

TEST_F(HardwarePlan, AFileDiskTakesEveryImageFormatAndNothingElse) {
  for (const char* format : {"raw", "qcow2", "vmdk", "vdi", "vhdx", "vpc", "qed"}) {
    DiskConfig disk = File("local/data.img");
    disk.format = format;
    config_.disks = {disk};
    EXPECT_EQ(DriveProblems(), "") << format;
    EXPECT_EQ(spec_.drives[0].source.format, format);
  }
  for (const char* bad : {"RAW", "qcow2\n", "luks"}) {
    DiskConfig disk = File("local/data.img");
    disk.format = bad;
    config_.disks = {disk};
    EXPECT_THAT(DriveProblems(),
                HasSubstr(absl::StrCat("task config \"disk[0].format\": \"", bad, "\" is not supported")));
  }
}

// sd, floppy, pflash... are boot disk interfaces only: no -device attaches
// a disk block there.
TEST_F(HardwarePlan, DiskInterfacesAreTheFourTheDriverAttaches) {
  for (const char* iface : {"virtio", "scsi", "ide", "nvme"}) {
    DiskConfig disk = Blank("1G");
    disk.interface = iface;
    config_.disks = {disk};
    EXPECT_EQ(DriveProblems(), "") << iface;
    EXPECT_EQ(spec_.drives[0].interface, iface);
  }
  DiskConfig disk = Blank("1G");
  disk.interface = "sd";
  config_.disks = {disk};
  EXPECT_EQ(DriveProblems(),
            "task config \"disk[0].interface\": \"sd\" is not supported; use one of \"virtio\", "
            "\"scsi\", \"ide\", \"nvme\"");
}

TEST_F(HardwarePlan, AnNvmeDiskKeepsTheSerialTheJobGives) {
  DiskConfig disk = Blank("1G");
  disk.interface = "nvme";
  disk.serial = "db-volume";
  config_.disks = {disk};
  ASSERT_EQ(DriveProblems(), "");
  EXPECT_EQ(spec_.drives[0].serial, "db-volume");
}

// Linux would take two NVMe controllers with one serial for two paths to one
// namespace: a serial given twice, or one equal to another disk's default
// (its block's id), is refused naming both blocks.
TEST_F(HardwarePlan, NvmeSerialsAreUnique) {
  DiskConfig a = Blank("1G"), b = Blank("1G");
  a.interface = b.interface = "nvme";
  a.serial = b.serial = "db";
  config_.disks = {a, b};
  EXPECT_EQ(DriveProblems(), "task config \"disk[1].serial\": \"db\" is already disk[0]'s NVMe serial");
  a.serial.reset();  // its default serial is its id, "disk1"
  b.serial = "disk1";
  config_.disks = {a, b};
  EXPECT_EQ(DriveProblems(), "task config \"disk[1].serial\": \"disk1\" is already disk[0]'s NVMe serial");
  b.serial = "disk2";  // its own default: fine
  config_.disks = {a, b};
  EXPECT_EQ(DriveProblems(), "");
  b.interface = "virtio";  // another bus: no NVMe subsystem to confuse
  b.serial = "disk1";
  config_.disks = {a, b};
  EXPECT_EQ(DriveProblems(), "");
}

// An empty source would be planned as a download of the URL "".
TEST_F(HardwarePlan, EmptyDownloadSourcesAreRefused) {
  DiskConfig disk;
  disk.image_source = "";
  disk.checksum = "sha256:" + std::string(64, '0');
  config_.disks = {disk};
  EXPECT_EQ(DriveProblems(), "task config \"disk[0].image_source\": must not be empty");
  config_.disks.clear();
  config_.cdrom_source = "";
  config_.cdrom_checksum = "sha256:" + std::string(64, '0');
  EXPECT_EQ(DriveProblems(), "task config \"cdrom_source\": must not be empty");
}

// virtio-blk and ATA carry 20 bytes of serial; the value is also a -device
// option, so only plain characters pass.
TEST_F(HardwarePlan, SerialBoundaries) {
  DiskConfig disk = Blank("1G");
  disk.serial = std::string(20, 's');
  config_.disks = {disk};
  ASSERT_EQ(DriveProblems(), "");
  EXPECT_EQ(spec_.drives[0].serial, std::string(20, 's'));
  disk.serial = "Az09._-";
  config_.disks = {disk};
  ASSERT_EQ(DriveProblems(), "");
  EXPECT_EQ(spec_.drives[0].serial, "Az09._-");
  for (const std::string& bad : {std::string(21, 's'), std::string(), std::string("a b"), std::string("a\nb"),
                                 std::string("a/b"), std::string("d\xc3\xa9j\xc3\xa0")}) {
    disk.serial = bad;
    config_.disks = {disk};
    EXPECT_EQ(DriveProblems(), absl::StrCat("task config \"disk[0].serial\": \"", bad,
                                            "\" must be 1 to 20 letters, digits, '.', '_' or '-'"));
    EXPECT_EQ(spec_.drives[0].serial, "") << "a refused serial must not reach the command line";
  }
}

// Paths are admitted and opened by the driver at start and reach QEMU as fds,
// so planning keeps them exactly as written, whatever they hold.
TEST_F(HardwarePlan, DiskSourcesAreRecordedWithTheFieldTheyCameFrom) {
  DiskConfig file = File("../../etc/shadow,file.locking=off");
  file.size = "20G";  // grows an overlay on the file
  DiskConfig download;
  download.image_source = "https://example.com/data.qcow2";
  download.checksum = "sha256:0123";
  config_.disks = {file, download, Blank("1G")};
  ASSERT_EQ(DriveProblems(), "");
  ASSERT_EQ(spec_.drives.size(), 3u);
  EXPECT_EQ(spec_.drives[0].source.origin, DriveOrigin::kJobFile);
  EXPECT_EQ(spec_.drives[0].source.field, "disk[0].image_path");
  EXPECT_EQ(spec_.drives[0].source.path, "../../etc/shadow,file.locking=off");
  EXPECT_EQ(spec_.drives[0].source.size_bytes, int64_t{20} << 30);
  EXPECT_EQ(spec_.drives[1].source.origin, DriveOrigin::kDownload);
  EXPECT_EQ(spec_.drives[1].source.field, "disk[1].image_source");
  EXPECT_THAT(spec_.drives[1].source.urls, ElementsAre("https://example.com/data.qcow2"));
  EXPECT_EQ(spec_.drives[1].source.checksum, "sha256:0123");
  EXPECT_EQ(spec_.drives[2].source.origin, DriveOrigin::kBlank);
  EXPECT_EQ(spec_.drives[2].source.field, "disk[2].size");
}

TEST_F(HardwarePlan, AnEmptyDiskImagePathIsRefused) {
  config_.disks = {File("")};
  EXPECT_EQ(DriveProblems(), "task config \"disk[0].image_path\": must not be empty");
}

TEST_F(HardwarePlan, ADiskChecksumOnlyChecksADownload) {
  DiskConfig file = File("local/data.img");
  file.checksum = "sha256:0123";
  DiskConfig blank = Blank("1G");
  blank.checksum = "sha256:0123";
  config_.disks = {file, blank};
  const std::string problems = DriveProblems();
  EXPECT_THAT(problems, HasSubstr("task config \"disk[0].checksum\": only checks an image_source download"));
  EXPECT_THAT(problems, HasSubstr("task config \"disk[1].checksum\": only checks an image_source download"));
}

// --- the CD-ROM --------------------------------------------------------------

TEST_F(HardwarePlan, ACdromIsAReadOnlyRawIdeDrive) {
  config_.cdrom = "../isos/install,media=disk.iso";  // opened by the driver: carried as written
  ASSERT_EQ(DriveProblems(), "");
  ASSERT_EQ(spec_.drives.size(), 1u);
  const Drive& cdrom = spec_.drives[0];
  EXPECT_EQ(cdrom.id, "cdrom0");
  EXPECT_EQ(cdrom.media, DriveMedia::kCdrom);
  EXPECT_EQ(cdrom.interface, "ide");
  EXPECT_TRUE(cdrom.read_only);
  EXPECT_EQ(cdrom.source.origin, DriveOrigin::kJobFile);
  EXPECT_EQ(cdrom.source.field, "cdrom");
  EXPECT_EQ(cdrom.source.path, "../isos/install,media=disk.iso");
  EXPECT_EQ(cdrom.source.format, "raw") << "an ISO is never probed as a disk image";
}

TEST_F(HardwarePlan, ACdromDownloadCarriesItsChecksum) {
  config_.cdrom_source = "https://example.com/install.iso";
  config_.cdrom_checksum = "sha256:0123";
  ASSERT_EQ(DriveProblems(), "");
  ASSERT_EQ(spec_.drives.size(), 1u);
  EXPECT_EQ(spec_.drives[0].source.origin, DriveOrigin::kDownload);
  EXPECT_EQ(spec_.drives[0].source.field, "cdrom_source");
  EXPECT_THAT(spec_.drives[0].source.urls, ElementsAre("https://example.com/install.iso"));
  EXPECT_EQ(spec_.drives[0].source.checksum, "sha256:0123");
  // Unverified only when the operator says so.
  config_.cdrom_checksum.reset();
  plugin_.allow_unverified_images = true;
  ASSERT_EQ(DriveProblems(), "");
  EXPECT_EQ(spec_.drives[0].source.checksum, "");
}

TEST_F(HardwarePlan, CdromProblemsNameTheirField) {
  config_.cdrom = "";
  EXPECT_EQ(DriveProblems(), "task config \"cdrom\": must not be empty");
  config_.cdrom = "local/install.iso";
  config_.cdrom_checksum = "sha256:0123";
  EXPECT_EQ(DriveProblems(), "task config \"cdrom_checksum\": only checks a cdrom_source download");
  config_.cdrom.reset();
  EXPECT_EQ(DriveProblems(), "task config \"cdrom_checksum\": only checks a cdrom_source download");
  EXPECT_THAT(spec_.drives, IsEmpty()) << "a checksum alone makes no CD-ROM";
}

// --- the cloud-init seed ---------------------------------------------------------

TEST_F(HardwarePlan, DrivesComeInOrderDisksThenCdromThenSeed) {
  config_.disks = {Blank("1G"), File("local/data.img")};
  config_.cdrom = "local/install.iso";
  config_.cloud_init = CloudInitConfig{};
  ASSERT_EQ(DriveProblems(), "");
  std::vector<std::string> ids;
  for (const Drive& drive : spec_.drives) ids.push_back(drive.id);
  EXPECT_THAT(ids, ElementsAre("disk1", "disk2", "cdrom0", "seed0"));
  // Cloud images look for the NoCloud seed on a read-only virtio disk.
  const Drive& seed = spec_.drives.back();
  EXPECT_EQ(seed.interface, "virtio");
  EXPECT_EQ(seed.source.format, "raw");
  EXPECT_EQ(seed.source.field, "cloud_init");
}

TEST_F(HardwarePlan, EveryCloudInitDocumentIsGivenOnce) {
  config_.cloud_init = CloudInitConfig{};
  CloudInitConfig& c = *config_.cloud_init;
  c.network_config = "version: 2";
  c.network_config_file = "local/network-config";
  c.vendor_data = "#cloud-config";
  c.vendor_data_file = "local/vendor-data";
  std::string problems = DriveProblems();
  EXPECT_THAT(problems, HasSubstr("task config \"cloud_init.network_config\": set at most one of \"network_config\" "
                                  "and \"network_config_file\""));
  EXPECT_THAT(problems, HasSubstr("task config \"cloud_init.vendor_data\": set at most one of \"vendor_data\" and "
                                  "\"vendor_data_file\""));
  c = CloudInitConfig{};
  c.user_data_file = "";
  c.network_config_file = "";
  c.vendor_data_file = "";
  problems = DriveProblems();
  for (const char* field : {"user_data_file", "network_config_file", "vendor_data_file"}) {
    EXPECT_THAT(problems, HasSubstr(absl::StrCat("task config \"cloud_init.", field, "\": must not be empty")));
  }
  // An empty inline document is a valid (empty) document.
  c = CloudInitConfig{};
  c.user_data = "";
  c.meta_data = "";
  EXPECT_EQ(DriveProblems(), "");
}

// --- boot order ---------------------------------------------------------------

// SeaBIOS would try a blank data disk first and stop there, so with any
// other drive the boot disk boots first explicitly.
TEST_F(HardwarePlan, TheBootDiskIsPinnedFirstOnEveryInterfaceThatTakesABootIndex) {
  config_.disks = {Blank("1G")};
  for (const char* iface : {"ide", "virtio", "scsi"}) {
    before_.drive_interface = iface;
    ASSERT_EQ(DriveProblems(), "") << iface;
    EXPECT_EQ(spec_.boot_index, 1) << iface;
    EXPECT_EQ(spec_.drives[0].boot_index, 0) << iface;
  }
}

TEST_F(HardwarePlan, ASeedAloneStillPinsTheBootDisk) {
  config_.cloud_init = CloudInitConfig{};
  ASSERT_EQ(DriveProblems(), "");
  EXPECT_EQ(spec_.boot_index, 1);
  EXPECT_EQ(spec_.drives[0].boot_index, 0);
}

// The kernel is loaded by QEMU itself: no drive is a boot device then.
TEST_F(HardwarePlan, KernelBootGivesNoDriveABootIndex) {
  before_.kernel.kernel = "local/vmlinuz";
  config_.kernel = "local/vmlinuz";
  config_.cdrom = "local/install.iso";
  config_.disks = {Blank("1G")};
  ASSERT_EQ(DriveProblems(), "");
  EXPECT_EQ(spec_.boot_index, 0);
  for (const Drive& drive : spec_.drives) EXPECT_EQ(drive.boot_index, 0) << drive.id;
}

TEST_F(HardwarePlan, ABootOrderNamingAMissingDeviceIsRefused) {
  before_.image_path.clear();
  config_.cdrom = "local/install.iso";
  config_.boot_order = "disk";
  EXPECT_EQ(DriveProblems(), "task config \"boot_order\": \"disk\" needs image_path or image_source");
  // A kernel boot has no boot disk either.
  config_.cdrom.reset();
  before_.kernel.kernel = "local/vmlinuz";
  config_.kernel = "local/vmlinuz";
  EXPECT_EQ(DriveProblems(), "task config \"boot_order\": \"disk\" needs image_path or image_source");
}

// sd, floppy, pflash and none boot disks take no boot index; an indexed
// CD-ROM would then boot first, whatever boot_order says.
TEST_F(HardwarePlan, ADiskFirstBootOrderTheInterfaceCannotHonourIsRefused) {
  config_.cdrom = "local/install.iso";
  for (const char* iface : {"sd", "floppy", "pflash", "none"}) {
    before_.drive_interface = iface;
    config_.boot_order = "disk";
    EXPECT_EQ(DriveProblems(), absl::StrCat("task config \"boot_order\": \"disk\" cannot come before the CD-ROM with "
                                            "drive_interface \"", iface,
                                            "\" (only ide, virtio and scsi boot disks take a boot index)"));
    // Unset: no device gets an index, the firmware's own order decides.
    config_.boot_order.reset();
    EXPECT_EQ(DriveProblems(), "") << iface;
    for (const Drive& drive : spec_.drives) EXPECT_EQ(drive.boot_index, 0) << iface << " " << drive.id;
    // "cdrom" stays possible: the CD-ROM alone is indexed.
    config_.boot_order = "cdrom";
    EXPECT_EQ(DriveProblems(), "") << iface;
    EXPECT_EQ(spec_.drives[0].boot_index, 1) << iface;
  }
}

TEST_F(HardwarePlan, BootOrderIsExactlyDiskOrCdrom) {
  config_.cdrom = "local/install.iso";
  for (const char* bad : {"CDROM", "disk ", "cdrom,disk", "network", "cdrom\n"}) {
    config_.boot_order = bad;
    EXPECT_EQ(DriveProblems(),
              absl::StrCat("task config \"boot_order\": \"", bad, "\" is not supported; use \"disk\" or \"cdrom\""));
    EXPECT_EQ(spec_.drives[0].boot_index, 0) << "a refused order sets no boot index";
  }
}

// --- direct kernel boot -----------------------------------------------------------

TEST_F(HardwarePlan, NoKernelLeavesTheFirmwareToBoot) {
  EXPECT_EQ(KernelProblems(), "");
  EXPECT_EQ(spec_.kernel.kernel, "");
  EXPECT_EQ(spec_.kernel.initrd, "");
  EXPECT_EQ(spec_.kernel.cmdline, "");
}

TEST_F(HardwarePlan, AKernelCmdlineNeedsAKernel) {
  config_.kernel_cmdline = "console=ttyS0";
  EXPECT_EQ(KernelProblems(), "task config \"kernel_cmdline\": needs kernel");
  EXPECT_EQ(spec_.kernel.cmdline, "");
}

TEST_F(HardwarePlan, EmptyKernelFilesAreRefused) {
  config_.kernel = "";
  config_.initrd = "";
  const std::string problems = KernelProblems();
  EXPECT_THAT(problems, HasSubstr("task config \"kernel\": must not be empty"));
  EXPECT_THAT(problems, HasSubstr("task config \"initrd\": must not be empty"));
}

// The driver opens the kernel and initrd; QEMU reads them through
// /proc/self/fd, so the job's paths are carried as written.
TEST_F(HardwarePlan, KernelFilesAreCarriedAsWritten) {
  config_.kernel = "../boot/vmlinuz,readonly=on";
  config_.initrd = "local/initrd=1";
  EXPECT_EQ(KernelProblems(), "");
  EXPECT_EQ(spec_.kernel.kernel, "../boot/vmlinuz,readonly=on");
  EXPECT_EQ(spec_.kernel.initrd, "local/initrd=1");
  EXPECT_EQ(spec_.kernel.cmdline, "") << "no kernel_cmdline: an empty one";
}

// -append takes its value whole, so commas and '=' are the kernel's own.
TEST_F(HardwarePlan, AKernelCmdlineIsOneLineOfPrintableBytes) {
  config_.kernel = "local/vmlinuz";
  config_.kernel_cmdline = "console=ttyS0,115200n8 root=/dev/vda1 init=/sbin/init -- a=b";
  EXPECT_EQ(KernelProblems(), "");
  EXPECT_EQ(spec_.kernel.cmdline, *config_.kernel_cmdline);
  config_.kernel_cmdline = std::string(2047, 'a');  // x86's COMMAND_LINE_SIZE, less its NUL
  EXPECT_EQ(KernelProblems(), "");
  EXPECT_EQ(spec_.kernel.cmdline.size(), 2047u);
  for (const std::string& bad : {std::string(2048, 'a'), std::string(2049, 'a'), std::string("quiet\tsplash"), std::string("quiet\r"),
                                 std::string("quiet\x7f"), std::string("quiet\0init=/bin/sh", 18)}) {
    config_.kernel_cmdline = bad;
    EXPECT_EQ(KernelProblems(),
              "task config \"kernel_cmdline\": must be one line of printable characters, at most 2047 "
              "bytes");
    EXPECT_EQ(spec_.kernel.cmdline, "") << "a refused line must not reach QEMU, not even cut";
  }
}

// --- the NIC ---------------------------------------------------------------------

TEST_F(HardwarePlan, WithoutNetworkOptionsTheNicIsVirtioWithAStableMac) {
  EXPECT_EQ(NicProblems(), "");
  EXPECT_FALSE(spec_.own_nic);
  EXPECT_EQ(spec_.net_device, "virtio-net");
  EXPECT_EQ(spec_.mac_address, StableMacAddress(task_.identity.alloc_id, "web"));
}

// Forwards and DNS searches are options of the NIC's user network, which the
// driver must then attach itself.
TEST_F(HardwarePlan, ForwardsDnsOrAMacAskForTheDriversNic) {
  before_.port_forwards = {PortForward{"ssh", "tcp", "", 22000, 22}};
  EXPECT_EQ(NicProblems(), "");
  EXPECT_TRUE(spec_.own_nic);
  before_.port_forwards.clear();
  before_.dns_searches = {"service.consul"};
  EXPECT_EQ(NicProblems(), "");
  EXPECT_TRUE(spec_.own_nic);
  before_.dns_searches.clear();
  config_.mac_address = "02:00:00:00:00:01";
  EXPECT_EQ(NicProblems(), "");
  EXPECT_TRUE(spec_.own_nic);
}

// "virtio-net" is QEMU's alias for the bus's virtio NIC, which no model list
// spells that way.
TEST_F(HardwarePlan, VirtioNetPassesWhateverModelsTheHostLists) {
  host_.net_devices["x86_64"] = {"e1000", "virtio-net-pci"};
  config_.net_device = "virtio-net";
  EXPECT_EQ(NicProblems(), "");
  EXPECT_EQ(spec_.net_device, "virtio-net");
}

// A host whose emulator listed no models cannot refuse one.
TEST_F(HardwarePlan, AnyPlainModelPassesWhenTheHostListsNone) {
  host_.net_devices["aarch64"] = {"virtio-net-device"};
  config_.net_device = "e1000e";
  EXPECT_EQ(NicProblems(), "");
  EXPECT_EQ(spec_.net_device, "e1000e");
  host_.net_devices["x86_64"] = {};
  EXPECT_EQ(NicProblems(), "");
}

// net_device becomes a -device driver name: nothing else may ride along.
TEST_F(HardwarePlan, HostileNetDevicesAreRefused) {
  for (const std::string& bad : {std::string(), std::string("e1000 "), std::string("e1000\n"), std::string("../e1000"),
                                 std::string("virtio-net-pci=x")}) {
    config_.net_device = bad;
    EXPECT_EQ(NicProblems(), absl::StrCat("task config \"net_device\": \"", bad, "\" is not a device name"));
  }
}

TEST_F(HardwarePlan, MacAddressBoundaries) {
  // The first byte's low bit is the group bit: even is unicast.
  for (const char* mac : {"fe:ff:ff:ff:ff:ff", "00:00:00:00:00:01", "02:00:00:00:00:00"}) {
    config_.mac_address = mac;
    EXPECT_EQ(NicProblems(), "") << mac;
    EXPECT_EQ(spec_.mac_address, mac);
  }
  for (const char* multicast : {"ff:ff:ff:ff:ff:ff", "03:00:00:00:00:01"}) {
    config_.mac_address = multicast;
    EXPECT_EQ(NicProblems(), absl::StrCat("task config \"mac_address\": \"", multicast,
                                          "\" is a multicast address; a NIC needs a unicast one (first byte even)"));
  }
}

// mac_address becomes a -device option: only the exact form passes.
TEST_F(HardwarePlan, HostileMacAddressesAreRefused) {
  for (const std::string& bad :
       {std::string(), std::string(" 02:00:00:00:00:01"), std::string("02:00:00:00:00:01\n"),
        std::string("2:0:0:0:0:1"), std::string("02:00:00:00:00:01:02"), std::string("0200.0000.0001"),
        std::string("02:00:00:00:00:+1"), absl::StrJoin(std::vector<std::string>(4096, "02"), ":")}) {
    config_.mac_address = bad;
    EXPECT_THAT(NicProblems(), AllOf(HasSubstr("task config \"mac_address\": "),
                                     HasSubstr(" is not a MAC address like 02:00:00:12:34:56")))
        << bad.substr(0, 40);
  }
}

// --- firmware and TPM --------------------------------------------------------------

TEST_F(HardwarePlan, BiosIsTheDefaultAndNeedsNothingFromTheHost) {
  EXPECT_EQ(FirmwareProblems(), "");
  EXPECT_FALSE(spec_.firmware.uefi);
  EXPECT_FALSE(spec_.firmware.secure_boot);
  EXPECT_EQ(spec_.firmware.files, FirmwareFiles{});
  EXPECT_FALSE(spec_.tpm);
  EXPECT_EQ(spec_.machine_type, "") << "only Secure Boot changes the machine's default";
  config_.firmware = "bios";
  EXPECT_EQ(FirmwareProblems(), "");
  EXPECT_FALSE(spec_.firmware.uefi);
}

TEST_F(HardwarePlan, FirmwareNamesAreExact) {
  host_.uefi = FirmwareFiles{"/ovmf/code.fd", "/ovmf/vars.fd"};
  for (const char* bad : {"UEFI", "", "efi", "uefi,secure=on"}) {
    config_.firmware = bad;
    EXPECT_EQ(FirmwareProblems(),
              absl::StrCat("task config \"firmware\": \"", bad, "\" is not supported; use \"bios\" or \"uefi\""));
    EXPECT_FALSE(spec_.firmware.uefi);
  }
}

// The Secure Boot code refuses unsigned loaders: plain UEFI must not get it.
TEST_F(HardwarePlan, PlainUefiTakesTheFilesWithoutSecureBoot) {
  host_.uefi = FirmwareFiles{"/ovmf/code.fd", "/ovmf/vars.fd"};
  host_.secure_boot = FirmwareFiles{"/ovmf/secboot.fd", "/ovmf/vars.ms.fd"};
  config_.firmware = "uefi";
  EXPECT_EQ(FirmwareProblems(), "");
  EXPECT_TRUE(spec_.firmware.uefi);
  EXPECT_FALSE(spec_.firmware.secure_boot);
  EXPECT_EQ(spec_.firmware.files, (FirmwareFiles{"/ovmf/code.fd", "/ovmf/vars.fd"}));
  EXPECT_EQ(spec_.machine_type, "");
  config_.secure_boot = true;
  EXPECT_EQ(FirmwareProblems(), "");
  EXPECT_TRUE(spec_.firmware.secure_boot);
  EXPECT_EQ(spec_.firmware.files, (FirmwareFiles{"/ovmf/secboot.fd", "/ovmf/vars.ms.fd"}));
}

TEST_F(HardwarePlan, SecureBootNeedsUefiNamed) {
  host_.secure_boot = FirmwareFiles{"/ovmf/secboot.fd", "/ovmf/vars.ms.fd"};
  config_.secure_boot = true;
  EXPECT_EQ(FirmwareProblems(), "task config \"secure_boot\": needs firmware = \"uefi\"");
  EXPECT_FALSE(spec_.firmware.uefi);
}

// SMM is q35's: its versioned machines pass, and the job's choice stands.
TEST_F(HardwarePlan, SecureBootTakesEveryQ35Machine) {
  host_.secure_boot = FirmwareFiles{"/ovmf/secboot.fd", "/ovmf/vars.ms.fd"};
  config_.firmware = "uefi";
  config_.secure_boot = true;
  for (const char* machine : {"q35", "pc-q35-7.2"}) {
    config_.machine_type = machine;
    EXPECT_EQ(FirmwareProblems(), "") << machine;
    EXPECT_EQ(spec_.machine_type, "") << "the machine check plans the job's own machine_type";
  }
  for (const char* machine : {"pc-i440fx-7.2", "Q35", "q35 ", "microvm", "pc-q35"}) {
    config_.machine_type = machine;
    EXPECT_EQ(
        FirmwareProblems(),
        absl::StrCat("task config \"secure_boot\": needs a q35 machine (for SMM); machine_type is \"", machine, "\""));
  }
}

TEST_F(HardwarePlan, ATpmIsPlannedOnlyWhenAsked) {
  EXPECT_EQ(FirmwareProblems(), "") << "no swtpm is needed without tpm";
  EXPECT_FALSE(spec_.tpm);
  config_.tpm = true;
  host_.swtpm = "/usr/bin/swtpm";
  EXPECT_EQ(FirmwareProblems(), "");
  EXPECT_TRUE(spec_.tpm);
}

// Every problem at once, each named, so a job is fixed in one round.
TEST_F(HardwarePlan, EveryFirmwareProblemIsReportedTogether) {
  config_.firmware = "coreboot";
  config_.secure_boot = true;
  config_.machine_type = "pc";
  config_.tpm = true;
  const std::string problems = FirmwareProblems();
  EXPECT_THAT(problems, HasSubstr("task config \"firmware\": \"coreboot\" is not supported"));
  EXPECT_THAT(problems, HasSubstr("task config \"secure_boot\": needs firmware = \"uefi\""));
  EXPECT_THAT(problems, HasSubstr("task config \"secure_boot\": needs a q35 machine"));
  EXPECT_THAT(problems, HasSubstr("task config \"tpm\": swtpm is not installed on this client"));
  EXPECT_THAT(problems, Not(HasSubstr("UEFI firmware (Debian package ovmf)")))
      << "no firmware files are looked for when the firmware itself is refused";
}

}  // namespace
}  // namespace ndq
