#include "qemu/vm_spec.h"

#include "driver/task_proto.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "../../support/temp_dir.h"

namespace ndq {
namespace {

namespace driverpb = hashicorp::nomad::plugins::drivers::proto;
namespace fs = std::filesystem;
using ::ndq::testing::TempDir;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

// A task "web" in a real allocation directory with its image at
// local/linux.img, 256 MB and no network: the smallest valid start.
class PlanVmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(tmp_.path().empty());
    root_ = fs::canonical(tmp_.path()).string();
    alloc_ = root_ + "/alloc";
    image_ = alloc_ + "/web/local/linux.img";
    fs::create_directories(alloc_ + "/web/local");
    std::ofstream(image_) << "disk";
    task_.set_id("f00d/web/0123abcd");
    task_.set_name("web");
    task_.set_alloc_dir(alloc_);
    task_.mutable_resources()->mutable_allocated_resources()->mutable_memory()->set_memory_mb(256);
    config_.image_path = "local/linux.img";
  }

  absl::StatusOr<VmSpec> Plan() const { return ndq::PlanVm(config_, TaskRequestFromProto(task_), plugin_, host_); }

  // The error text of a plan expected to fail.
  std::string Problems() const {
    absl::StatusOr<VmSpec> spec = Plan();
    EXPECT_FALSE(spec.ok());
    if (spec.ok()) return "";
    EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
    return std::string(spec.status().message());
  }

  driverpb::NetworkResource* TaskNetwork(const std::string& ip) {
    driverpb::NetworkResource* network = task_.mutable_resources()->mutable_allocated_resources()->add_networks();
    network->set_ip(ip);
    return network;
  }
  void AddGroupPort(const std::string& label, int host_port, int to, const std::string& host_ip) {
    driverpb::PortMapping* mapping = task_.mutable_resources()->add_ports();
    mapping->set_label(label);
    mapping->set_value(host_port);
    mapping->set_to(to);
    mapping->set_host_ip(host_ip);
  }

  TempDir tmp_;
  std::string root_, alloc_, image_;
  TaskConfig config_;
  driverpb::TaskConfig task_;
  PluginConfig plugin_;
  HostCapabilities host_ = {{{"x86_64", "/usr/bin/qemu-system-x86_64"}, {"aarch64", "/opt/qemu/bin/qemu-system-aarch64"}}};
};

TEST_F(PlanVmTest, MinimalConfigGetsNomadsDefaults) {
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->emulator, "x86_64");
  EXPECT_EQ(spec->emulator_path, "/usr/bin/qemu-system-x86_64");
  EXPECT_EQ(spec->machine_type, "pc");
  EXPECT_EQ(spec->accelerator, "tcg");
  EXPECT_EQ(spec->drive_interface, "ide");
  EXPECT_EQ(spec->image_path, *config_.image_path);  // admitted and opened at start
  EXPECT_EQ(spec->image_format, "");
  EXPECT_EQ(spec->memory_mb, 256);
  EXPECT_EQ(spec->memory_max_mb, 0);
  EXPECT_EQ(spec->cpus, 0);
  EXPECT_EQ(spec->name, "web");
  EXPECT_FALSE(spec->graceful_shutdown);
  EXPECT_FALSE(spec->guest_agent);
  EXPECT_THAT(spec->args, IsEmpty());
  EXPECT_THAT(spec->port_forwards, IsEmpty());
  EXPECT_THAT(spec->dns_searches, IsEmpty());
  EXPECT_THAT(spec->ignored_dns_servers, IsEmpty());
}

TEST_F(PlanVmTest, EmptyStringsMeanDefaultsAsInNomad) {
  config_.emulator = "";
  config_.accelerator = "";
  config_.machine_type = "";
  config_.drive_interface = "";
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->emulator, "x86_64");
  EXPECT_EQ(spec->accelerator, "tcg");
  EXPECT_EQ(spec->machine_type, "pc");
  EXPECT_EQ(spec->drive_interface, "ide");
}

TEST_F(PlanVmTest, EveryOptionSet) {
  config_.emulator = "qemu-system-aarch64";  // the full name Nomad 1.11.1 wanted
  config_.machine_type = "virt";
  config_.accelerator = "kvm";
  config_.drive_interface = "virtio";
  config_.graceful_shutdown = true;
  config_.guest_agent = true;
  config_.args = {"-device", "virtio-rng-pci"};
  task_.mutable_resources()->mutable_allocated_resources()->mutable_memory()->set_memory_max_mb(1024);
  task_.mutable_resources()->mutable_linux_resources()->set_cpuset_cpus("2-3");
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->emulator, "aarch64");
  EXPECT_EQ(spec->emulator_path, "/opt/qemu/bin/qemu-system-aarch64");
  EXPECT_EQ(spec->machine_type, "virt");
  EXPECT_EQ(spec->accelerator, "kvm");
  EXPECT_EQ(spec->drive_interface, "virtio");
  EXPECT_TRUE(spec->graceful_shutdown);
  EXPECT_TRUE(spec->guest_agent);
  EXPECT_EQ(spec->args, config_.args);
  EXPECT_EQ(spec->memory_max_mb, 1024);
  EXPECT_EQ(spec->cpus, 2);
}

TEST_F(PlanVmTest, EveryDriveInterfaceOfNomad) {
  for (const char* iface : {"ide", "scsi", "sd", "floppy", "pflash", "virtio", "none"}) {
    config_.drive_interface = iface;
    absl::StatusOr<VmSpec> spec = Plan();
    ASSERT_TRUE(spec.ok()) << iface << ": " << spec.status();
    EXPECT_EQ(spec->drive_interface, iface);
  }
  // Boards attach mtd by index only: it cannot take the opened image.
  config_.drive_interface = "mtd";
  EXPECT_THAT(Problems(), HasSubstr("\"drive_interface\": \"mtd\" cannot take the image the driver opens"));
}

// --- image ------------------------------------------------------------------

// Planning fetches nothing: an image_source's disk is the overlay the start
// will make in the task dir, whose format is probed when it is opened.
TEST_F(PlanVmTest, AnImageSourceBootsTheTasksOverlayWithoutAnyDownload) {
  config_.image_path.reset();
  config_.image_source = "https://example.com/linux.qcow2";
  config_.checksum = "sha256:00";
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->image_path, alloc_ + "/web/image-overlay.qcow2");
  EXPECT_EQ(spec->image_format, "");
}

TEST_F(PlanVmTest, ExactlyOneImageOption) {
  config_.image_source = "https://example.com/linux.qcow2";
  EXPECT_THAT(Problems(), HasSubstr("set exactly one of \"image_path\" and \"image_source\""));
  config_.image_path.reset();
  config_.image_source.reset();
  EXPECT_THAT(Problems(), HasSubstr("\"image_path\" must be set"));
}

TEST_F(PlanVmTest, ChecksumDoesNotApplyToImagePath) {
  config_.checksum = "sha256:00";
  EXPECT_THAT(Problems(), HasSubstr("\"checksum\": only checks image_source"));
}

// Planning opens no file: the path is admitted (AdmitFile, tested in
// allowlist_test and end to end in BadInputTest) when the start opens it.
TEST_F(PlanVmTest, PlanningTouchesNoFile) {
  for (const char* path : {"./local/current.img", "/etc/shadow", "local/missing.img"}) {
    config_.image_path = path;
    absl::StatusOr<VmSpec> spec = Plan();
    ASSERT_TRUE(spec.ok()) << spec.status();
    EXPECT_EQ(spec->image_path, path);  // a plan holds no descriptor: VmSpec has no field for one
  }
  config_.image_path = "";
  EXPECT_THAT(Problems(), HasSubstr("\"image_path\": must not be empty"));
}

TEST_F(PlanVmTest, EmulatorMustBeAllowed) {
  plugin_.emulators_allowlist = {"x86_64"};
  config_.emulator = "aarch64";
  EXPECT_THAT(Problems(), HasSubstr("\"emulator\": \"aarch64\" is not in the plugin's emulators_allowlist"));
  config_.emulator = "qemu-system-x86_64";
  EXPECT_TRUE(Plan().ok());
}

TEST_F(PlanVmTest, EmulatorMustBeInstalled) {
  config_.emulator = "riscv64";
  EXPECT_THAT(Problems(), AllOf(HasSubstr("\"emulator\": \"riscv64\" (qemu-system-riscv64) was not found"),
                                HasSubstr("available: \"aarch64\", \"x86_64\"")));
  host_.emulators.clear();
  config_.emulator.reset();
  EXPECT_THAT(Problems(), HasSubstr("no qemu-system-* binary was found"));
}

TEST_F(PlanVmTest, AcceleratorMustBeKnown) {
  config_.accelerator = "hvf";
  EXPECT_THAT(Problems(), HasSubstr("task config \"accelerator\": \"hvf\" is not supported; use one of tcg, kvm"));
}

TEST_F(PlanVmTest, DriveInterfaceMustBeKnown) {
  config_.drive_interface = "nvme";
  EXPECT_THAT(Problems(), HasSubstr("task config \"drive_interface\": \"nvme\" is not supported; use one of ide, "
                                    "scsi, sd, mtd, floppy, pflash, virtio, none"));
}

TEST_F(PlanVmTest, MachineTypeIsANameOnly) {
  config_.machine_type = "pc,accel=kvm";
  EXPECT_THAT(Problems(), HasSubstr("\"machine_type\": \"pc,accel=kvm\" must be a machine name only (no commas)"));
  config_.machine_type = "  ";
  EXPECT_THAT(Problems(), HasSubstr("\"machine_type\" must not be blank"));
  config_.machine_type = "q35";
  EXPECT_TRUE(Plan().ok());
}

// --- resources ------------------------------------------------------------

TEST_F(PlanVmTest, MemoryBoundsOfNomad) {
  auto* memory = task_.mutable_resources()->mutable_allocated_resources()->mutable_memory();
  for (int64_t ok : {128, 4000000}) {
    memory->set_memory_mb(ok);
    absl::StatusOr<VmSpec> spec = Plan();
    ASSERT_TRUE(spec.ok()) << ok;
    EXPECT_EQ(spec->memory_mb, ok);
  }
  for (int64_t bad : {0, 127, 4000001}) {
    memory->set_memory_mb(bad);
    EXPECT_THAT(Problems(), HasSubstr(absl::StrCat("\"memory\": ", bad,
                                                   " MB is out of range; a VM needs 128 to "
                                                   "4000000 MB")));
  }
}

TEST_F(PlanVmTest, CpusFromTheCpuset) {
  task_.mutable_resources()->mutable_linux_resources()->set_cpuset_cpus("0-3,8,10-11");
  EXPECT_EQ(Plan()->cpus, 7);
  task_.mutable_resources()->mutable_linux_resources()->set_cpuset_cpus("0-");
  EXPECT_THAT(Problems(), HasSubstr("task resources \"cpuset_cpus\": \"0-\" in \"0-\" is not a CPU number"));
}

TEST(VmSpecCpuset, Counts) {
  EXPECT_EQ(CountCpuset("").value(), 0);
  EXPECT_EQ(CountCpuset("5").value(), 1);
  EXPECT_EQ(CountCpuset("0-3").value(), 4);
  EXPECT_EQ(CountCpuset("0-3,8,10-11").value(), 7);
  EXPECT_EQ(CountCpuset("3,1,2").value(), 3);
  EXPECT_EQ(CountCpuset("0-3,2").value(), 4);
  EXPECT_EQ(CountCpuset("1,1").value(), 1);
  EXPECT_EQ(CountCpuset("0-5,2-8").value(), 9);
  EXPECT_EQ(CountCpuset(" 0-1, 4 ").value(), 3);
  EXPECT_EQ(CountCpuset("7-7").value(), 1);
}

TEST(VmSpecCpuset, RejectsWhatIsNotACpuList) {
  for (const char* bad : {"a", "3-1", "-1", "1-", ",", "1,,2", "+1", "1 -2", "0-99999", "1-2-3", "0x1"}) {
    absl::StatusOr<int> count = CountCpuset(bad);
    EXPECT_FALSE(count.ok()) << bad << " counted " << count.value_or(-1);
  }
}

// --- args -------------------------------------------------------------------

TEST_F(PlanVmTest, ArgsAreCheckedAgainstTheAllowlist) {
  config_.args = {"-smp", "2", "/etc/shadow"};
  plugin_.args_allowlist = {"-smp"};
  EXPECT_THAT(Problems(), AllOf(HasSubstr("task config \"args\""), HasSubstr("\"/etc/shadow\" is not an option")));
  config_.args = {"-smp", "2"};
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok());
  EXPECT_EQ(spec->args, config_.args);
}

// --- ports ------------------------------------------------------------------

TEST_F(PlanVmTest, PortMapFromTheTaskNetwork) {
  driverpb::NetworkResource* network = TaskNetwork("10.0.0.5");
  auto* ssh = network->add_reserved_ports();
  ssh->set_label("ssh");
  ssh->set_value(22000);
  auto* http = network->add_dynamic_ports();
  http->set_label("http");
  http->set_value(25000);
  config_.port_map = {{"ssh", 22}, {"http", 80}};
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_THAT(
      spec->port_forwards,
      ElementsAre(PortForward{"http", "tcp", "10.0.0.5", 25000, 80}, PortForward{"http", "udp", "10.0.0.5", 25000, 80},
                  PortForward{"ssh", "tcp", "10.0.0.5", 22000, 22}, PortForward{"ssh", "udp", "10.0.0.5", 22000, 22}));
}

// Nomad's own driver finds no ports here and fails with "Unknown port label".
TEST_F(PlanVmTest, PortMapFromGroupNetworkPorts) {
  AddGroupPort("http", 25001, 80, "192.168.1.2");
  config_.port_map = {{"http", 8080}};
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_THAT(spec->port_forwards, ElementsAre(PortForward{"http", "tcp", "192.168.1.2", 25001, 8080},
                                               PortForward{"http", "udp", "192.168.1.2", 25001, 8080}));
}

// Bridge mode: QEMU runs inside the allocation's namespace, where Nomad's
// port mapping delivers traffic to the port's `to` on the namespace's address.
TEST_F(PlanVmTest, InTheGroupNamespacePortsListenOnTheirTo) {
  AddGroupPort("http", 25001, 8080, "192.168.1.2");
  AddGroupPort("dns", 25002, 0, "192.168.1.2");
  task_.mutable_network_isolation_spec()->set_mode(driverpb::NetworkIsolationSpec::GROUP);
  task_.mutable_network_isolation_spec()->set_path("/var/run/netns/alloc");
  config_.port_map = {{"http", 80}, {"dns", 53}};
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_THAT(spec->port_forwards,
              ElementsAre(PortForward{"dns", "tcp", "", 25002, 53}, PortForward{"dns", "udp", "", 25002, 53},
                          PortForward{"http", "tcp", "", 8080, 80}, PortForward{"http", "udp", "", 8080, 80}));
}

TEST_F(PlanVmTest, PortMapFromBothPlacesTaskNetworkFirst) {
  auto* ssh = TaskNetwork("10.0.0.5")->add_reserved_ports();
  ssh->set_label("ssh");
  ssh->set_value(22000);
  AddGroupPort("ssh", 23000, 22, "10.0.0.9");
  AddGroupPort("db", 26000, 5432, "10.0.0.9");
  config_.port_map = {{"ssh", 22}, {"db", 5432}};
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_THAT(
      spec->port_forwards,
      ElementsAre(PortForward{"db", "tcp", "10.0.0.9", 26000, 5432}, PortForward{"db", "udp", "10.0.0.9", 26000, 5432},
                  PortForward{"ssh", "tcp", "10.0.0.5", 22000, 22}, PortForward{"ssh", "udp", "10.0.0.5", 22000, 22}));
}

TEST_F(PlanVmTest, PortWithoutHostAddressBindsAll) {
  AddGroupPort("http", 25001, 0, "");
  config_.port_map = {{"http", 80}};
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->port_forwards[0].host_ip, "");
}

TEST_F(PlanVmTest, UnknownPortLabelListsTheKnownOnes) {
  auto* ssh = TaskNetwork("10.0.0.5")->add_reserved_ports();
  ssh->set_label("ssh");
  ssh->set_value(22000);
  AddGroupPort("http", 25001, 80, "10.0.0.5");
  config_.port_map = {{"web", 80}};
  EXPECT_THAT(Problems(), HasSubstr("task config \"port_map\": unknown port label \"web\"; the task's ports are "
                                    "\"http\", \"ssh\""));
}

TEST_F(PlanVmTest, PortMapWithoutAnyPorts) {
  config_.port_map = {{"web", 80}};
  EXPECT_THAT(Problems(), HasSubstr("unknown port label \"web\"; the task has no ports"));
}

TEST_F(PlanVmTest, GuestPortMustBeAPort) {
  AddGroupPort("http", 25001, 80, "10.0.0.5");
  for (int64_t bad : {0, -1, 65536, 70000}) {
    config_.port_map = {{"http", bad}};
    EXPECT_THAT(Problems(),
                HasSubstr(absl::StrCat("port \"http\" maps to guest port ", bad, ", which is not in 1..65535")));
  }
  config_.port_map = {{"http", 65535}};
  EXPECT_TRUE(Plan().ok());
}

TEST_F(PlanVmTest, Ipv6HostAddressIsRefused) {
  AddGroupPort("http", 25001, 80, "fd00::5");
  config_.port_map = {{"http", 80}};
  EXPECT_THAT(Problems(), AllOf(HasSubstr("port \"http\" is allocated on \"fd00::5\""), HasSubstr("IPv4 only")));
}

// --- dns ------------------------------------------------------------------

TEST_F(PlanVmTest, DnsSearchesAreKeptServersReportedAsIgnored) {
  task_.mutable_dns()->add_servers("8.8.8.8");
  task_.mutable_dns()->add_servers("1.1.1.1");
  task_.mutable_dns()->add_searches("service.consul");
  task_.mutable_dns()->add_searches("example.com");
  task_.mutable_dns()->add_options("ndots:2");
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_THAT(spec->dns_searches, ElementsAre("service.consul", "example.com"));
  EXPECT_THAT(spec->ignored_dns_servers, ElementsAre("8.8.8.8", "1.1.1.1"));
}

TEST_F(PlanVmTest, DnsSearchMustBeADomainName) {
  task_.mutable_dns()->add_searches("a.example,hostfwd=tcp::22-:22");
  EXPECT_THAT(Problems(), HasSubstr("task dns \"searches\": \"a.example,hostfwd=tcp::22-:22\" is not a domain name"));
  task_.mutable_dns()->set_searches(0, "");
  EXPECT_THAT(Problems(), HasSubstr("\"\" is not a domain name"));
}

// --- all together -----------------------------------------------------------

TEST_F(PlanVmTest, EveryProblemInOneError) {
  config_.image_path = "";
  config_.emulator = "mips";
  config_.accelerator = "xen";
  config_.machine_type = "pc,x=y";
  config_.drive_interface = "nvme";
  config_.args = {"/etc/shadow"};
  config_.port_map = {{"web", 80}};
  plugin_.args_allowlist = {"-smp"};
  task_.mutable_resources()->mutable_allocated_resources()->mutable_memory()->set_memory_mb(64);
  task_.mutable_resources()->mutable_linux_resources()->set_cpuset_cpus("x");
  task_.mutable_dns()->add_searches("bad,search");
  const std::string problems = Problems();
  for (const char* option :
       {"\"image_path\"", "\"emulator\"", "\"accelerator\"", "\"machine_type\"", "\"drive_interface\"", "\"args\"",
        "\"port_map\"", "\"memory\"", "\"cpuset_cpus\"", "\"searches\""}) {
    EXPECT_THAT(problems, HasSubstr(option));
  }
  EXPECT_THAT(problems, Not(HasSubstr("\"image_source\"")));
}

TEST_F(PlanVmTest, CpusOverridesTheReservedCores) {
  task_.mutable_resources()->mutable_linux_resources()->set_cpuset_cpus("0-3");
  config_.cpus = 2;
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->cpus, 2);
}

TEST_F(PlanVmTest, CpusMustBePositive) {
  config_.cpus = 0;
  EXPECT_THAT(Problems(), HasSubstr("\"cpus\": 0 is out of range"));
  config_.cpus = -3;
  EXPECT_THAT(Problems(), HasSubstr("\"cpus\": -3 is out of range"));
}

TEST_F(PlanVmTest, InstanceTypeSizesTheVmWithinTheReservation) {
  task_.mutable_resources()->mutable_allocated_resources()->mutable_memory()->set_memory_mb(2048);
  config_.instance_type = "c2m1024";
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->cpus, 2);
  EXPECT_EQ(spec->memory_mb, 1024);

  config_.instance_type = "c2m4096";
  EXPECT_THAT(Problems(), HasSubstr("at most the task's reserved memory (2048 MB)"));
}

TEST_F(PlanVmTest, MalformedInstanceTypesAreRefused) {
  for (const char* bad : {"c2", "m1024", "2c1024m", "cXm1024", "c2m", "c0m1024"}) {
    config_.instance_type = bad;
    EXPECT_THAT(Problems(), HasSubstr("\"instance_type\"")) << bad;
  }
  config_.instance_type = "c1m512";
  config_.cpus = 1;
  EXPECT_THAT(Problems(), HasSubstr("one of \"cpus\" and \"instance_type\""));
}

}  // namespace
}  // namespace ndq

namespace ndq {
namespace {

// --- hardware beyond the boot image (hardware_plan) ----------------------------

TEST_F(PlanVmTest, DiskBlocksArePlannedInOrderWithDefaults) {
  DiskConfig blank;
  blank.size = "1GiB";
  blank.serial = "data1";
  DiskConfig file;
  file.image_path = "local/data.qcow2";
  file.interface = "nvme";
  file.readonly = true;
  file.cache = "none";
  file.discard = "unmap";
  config_.disks = {blank, file};
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  ASSERT_EQ(spec->drives.size(), 2u);
  EXPECT_EQ(spec->drives[0].id, "disk1");
  EXPECT_EQ(spec->drives[0].interface, "virtio");
  EXPECT_EQ(spec->drives[0].source.origin, DriveOrigin::kBlank);
  EXPECT_EQ(spec->drives[0].source.size_bytes, int64_t{1} << 30);
  EXPECT_EQ(spec->drives[0].source.format, "raw");
  EXPECT_EQ(spec->drives[1].source.origin, DriveOrigin::kJobFile);
  EXPECT_EQ(spec->drives[1].serial, "disk2") << "NVMe needs a serial; the drive's name is the default";
  EXPECT_TRUE(spec->drives[1].read_only);
  EXPECT_EQ(spec->drives[1].cache, "none");
  EXPECT_EQ(spec->boot_index, 1) << "with more drives the boot disk must boot first";
}

TEST_F(PlanVmTest, HostileDriveValuesAreRefusedByName) {
  DiskConfig disk;
  disk.size = "lots";
  disk.interface = "virtio,drive=x";
  disk.cache = "none,file=/etc/shadow";
  disk.discard = "trim";
  disk.serial = "a,b=c";
  disk.format = "raw,x=y";
  config_.disks = {disk, DiskConfig{}};
  config_.disk_cache = "fast";
  const std::string problems = Problems();
  EXPECT_THAT(problems, HasSubstr("\"disk[0].size\": \"lots\" is not a size"));
  EXPECT_THAT(problems, HasSubstr("\"disk[0].interface\": \"virtio,drive=x\" is not supported"));
  EXPECT_THAT(problems, HasSubstr("\"disk[0].cache\": \"none,file=/etc/shadow\" is not supported"));
  EXPECT_THAT(problems, HasSubstr("\"disk[0].discard\": \"trim\" is not supported"));
  EXPECT_THAT(problems, HasSubstr("\"disk[0].serial\": \"a,b=c\" must be 1 to 20"));
  EXPECT_THAT(problems, HasSubstr("\"disk[0].format\": \"raw,x=y\" is not supported"));
  EXPECT_THAT(problems, HasSubstr("\"disk[1]\": set image_path, image_source, or size"));
  EXPECT_THAT(problems, HasSubstr("\"disk_cache\": \"fast\" is not supported"));
}

TEST_F(PlanVmTest, DiskSourcesAreExclusiveAndDownloadsNeedAChecksum) {
  DiskConfig both;
  both.image_path = "local/a.img";
  both.image_source = "https://example.com/a.img";
  DiskConfig unverified;
  unverified.image_source = "https://example.com/b.img";
  config_.disks = {both, unverified};
  const std::string problems = Problems();
  EXPECT_THAT(problems, HasSubstr("\"disk[0]\": set at most one of \"image_path\" and \"image_source\""));
  EXPECT_THAT(problems, HasSubstr("\"disk[1].checksum\": required for image_source"));
  plugin_.allow_unverified_images = true;
  config_.disks = {unverified};
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->drives[0].source.origin, DriveOrigin::kDownload);
}

TEST_F(PlanVmTest, CdromOrKernelBootsWithoutAnImage) {
  config_.image_path.reset();
  EXPECT_THAT(Problems(), HasSubstr("\"image_path\" must be set (or boot from cdrom, cdrom_source or kernel)"));
  config_.cdrom = "local/install.iso";
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  ASSERT_EQ(spec->drives.size(), 1u);
  EXPECT_EQ(spec->drives[0].media, DriveMedia::kCdrom);
  EXPECT_TRUE(spec->drives[0].read_only);
  EXPECT_EQ(spec->drives[0].boot_index, 1);
  config_.cdrom.reset();
  config_.kernel = "local/vmlinuz";
  config_.initrd = "local/initrd";
  config_.kernel_cmdline = "console=ttyS0 quiet";
  spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->kernel.kernel, "local/vmlinuz");
  EXPECT_EQ(spec->kernel.cmdline, "console=ttyS0 quiet");
  EXPECT_TRUE(spec->drives.empty());
}

TEST_F(PlanVmTest, CdromAndKernelOptionsAreChecked) {
  config_.cdrom = "local/a.iso";
  config_.cdrom_source = "https://example.com/a.iso";
  config_.initrd = "local/initrd";
  config_.boot_order = "network";
  const std::string problems = Problems();
  EXPECT_THAT(problems, HasSubstr("set at most one of \"cdrom\" and \"cdrom_source\""));
  EXPECT_THAT(problems, HasSubstr("\"initrd\": needs kernel"));
  EXPECT_THAT(problems, HasSubstr("\"boot_order\": \"network\" is not supported"));
  config_ = TaskConfig{};
  config_.image_path = "local/linux.img";
  config_.kernel = "local/vmlinuz";
  config_.kernel_cmdline = "console=ttyS0\ninit=/bin/sh";
  EXPECT_THAT(Problems(), HasSubstr("\"kernel_cmdline\": must be one line of printable characters"));
  config_.kernel_cmdline.reset();
  config_.boot_order = "cdrom";
  EXPECT_THAT(Problems(), HasSubstr("\"boot_order\": \"cdrom\" needs cdrom or cdrom_source"));
  config_.boot_order.reset();
  config_.cdrom_source = "https://example.com/a.iso";
  EXPECT_THAT(Problems(), HasSubstr("\"cdrom_checksum\": required for cdrom_source"));
}

TEST_F(PlanVmTest, CdromBootOrderSetsBootIndexes) {
  config_.cdrom = "local/install.iso";
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->boot_index, 1);
  EXPECT_EQ(spec->drives[0].boot_index, 2);
  config_.boot_order = "cdrom";
  spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->boot_index, 2);
  EXPECT_EQ(spec->drives[0].boot_index, 1);
}

TEST_F(PlanVmTest, MacAddressDefaultsToAStableLocalOne) {
  task_.set_alloc_id("1f2e3d4c-0000-4000-8000-123456789abc");
  config_.port_map = {};
  config_.net_device = "e1000";
  absl::StatusOr<VmSpec> first = Plan();
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_TRUE(first->own_nic) << "net_device asks for the driver's NIC";
  EXPECT_EQ(first->mac_address, StableMacAddress("1f2e3d4c-0000-4000-8000-123456789abc", "web"));
  const int octet = std::stoi(first->mac_address.substr(0, 2), nullptr, 16);
  EXPECT_EQ(octet & 0x03, 0x02) << "locally administered, unicast: " << first->mac_address;
  absl::StatusOr<VmSpec> again = Plan();
  EXPECT_EQ(again->mac_address, first->mac_address) << "a restarted task keeps its MAC";
  EXPECT_NE(StableMacAddress("other-alloc", "web"), first->mac_address);
  EXPECT_NE(StableMacAddress("1f2e3d4c-0000-4000-8000-123456789abc", "db"), first->mac_address);
}

TEST_F(PlanVmTest, NoNetworkOptionsLeaveQemusDefaultNic) {
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_FALSE(spec->own_nic);
}

TEST_F(PlanVmTest, BadMacAddressesAreRefused) {
  for (const char* mac : {"02:00:00:00:00", "02:00:00:00:00:0g", "02-00-00-00-00-01", "02:00:00:00:00:01,x=y"}) {
    config_.mac_address = mac;
    EXPECT_THAT(Problems(), HasSubstr("is not a MAC address")) << mac;
  }
  config_.mac_address = "01:00:5e:00:00:01";
  EXPECT_THAT(Problems(), HasSubstr("is a multicast address"));
  config_.mac_address = "00:00:00:00:00:00";
  EXPECT_THAT(Problems(), HasSubstr("all-zero"));
  config_.mac_address = "52:54:00:AB:cd:01";
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->mac_address, "52:54:00:ab:cd:01");
}

TEST_F(PlanVmTest, NetDeviceMustBeOneTheEmulatorHas) {
  host_.net_devices["x86_64"] = {"e1000", "rtl8139", "virtio-net-pci"};
  config_.net_device = "ne2k_isa";
  EXPECT_THAT(Problems(), HasSubstr("\"net_device\": \"ne2k_isa\" is not a NIC model of qemu-system-x86_64; it has "
                                    "\"e1000\", \"rtl8139\", \"virtio-net-pci\""));
  config_.net_device = "e1000,romfile=/etc/shadow";
  EXPECT_THAT(Problems(), HasSubstr("is not a device name"));
  config_.net_device = "rtl8139";
  EXPECT_TRUE(Plan().ok());
}

TEST_F(PlanVmTest, FirmwareNeedsWhatTheHostHas) {
  config_.firmware = "uefi";
  EXPECT_THAT(Problems(), HasSubstr("\"firmware\": this client has no UEFI firmware (Debian package ovmf)"));
  host_.uefi = FirmwareFiles{"/ovmf/code.fd", "/ovmf/vars.fd"};
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_TRUE(spec->firmware.uefi);
  EXPECT_EQ(spec->firmware.files.code, "/ovmf/code.fd");
  EXPECT_EQ(spec->machine_type, "pc");
  config_.secure_boot = true;
  EXPECT_THAT(Problems(), HasSubstr("\"secure_boot\": this client has no Secure Boot UEFI firmware"));
  host_.secure_boot = FirmwareFiles{"/ovmf/secboot.fd", "/ovmf/vars.ms.fd"};
  spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->machine_type, "q35") << "Secure Boot needs SMM, which q35 has";
  EXPECT_EQ(spec->firmware.files.code, "/ovmf/secboot.fd");
  config_.machine_type = "pc";
  EXPECT_THAT(Problems(), HasSubstr("\"secure_boot\": needs a q35 machine (for SMM); machine_type is \"pc\""));
  config_.machine_type.reset();
  config_.firmware = "bios";
  EXPECT_THAT(Problems(), HasSubstr("\"secure_boot\": needs firmware = \"uefi\""));
  config_.firmware = "coreboot";
  EXPECT_THAT(Problems(), HasSubstr("\"firmware\": \"coreboot\" is not supported"));
}

TEST_F(PlanVmTest, TpmNeedsSwtpm) {
  config_.tpm = true;
  EXPECT_THAT(Problems(), HasSubstr("\"tpm\": swtpm is not installed on this client"));
  host_.swtpm = "/usr/bin/swtpm";
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_TRUE(spec->tpm);
}

TEST_F(PlanVmTest, MachineMustBeOneTheEmulatorOffers) {
  host_.machines["x86_64"] = {"pc", "pc-i440fx-7.2", "q35"};
  config_.machine_type = "virt";
  EXPECT_THAT(Problems(), HasSubstr("\"machine_type\": \"virt\" is not a machine of qemu-system-x86_64"));
  config_.machine_type = "q35";
  EXPECT_TRUE(Plan().ok());
}

TEST_F(PlanVmTest, CloudInitDocumentsAreGivenOnce) {
  config_.cloud_init = CloudInitConfig{};
  config_.cloud_init->user_data = "#cloud-config";
  config_.cloud_init->user_data_file = "local/user-data";
  config_.cloud_init->meta_data_file = "";
  const std::string problems = Problems();
  EXPECT_THAT(problems, HasSubstr("\"cloud_init.user_data\": set at most one of \"user_data\" and \"user_data_file\""));
  EXPECT_THAT(problems, HasSubstr("\"cloud_init.meta_data_file\": must not be empty"));
  config_.cloud_init->user_data_file.reset();
  config_.cloud_init->meta_data_file.reset();
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  ASSERT_EQ(spec->drives.size(), 1u);
  EXPECT_EQ(spec->drives[0].id, "seed0");
  EXPECT_EQ(spec->drives[0].source.origin, DriveOrigin::kSeed);
  EXPECT_TRUE(spec->drives[0].read_only);
}

TEST_F(PlanVmTest, DiskInterfaceIsDriveInterfacesNewName) {
  config_.disk_interface = "virtio";
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->drive_interface, "virtio");
  config_.drive_interface = "ide";
  EXPECT_THAT(Problems(), HasSubstr("\"disk_interface\" and its alias \"drive_interface\" disagree"));
}

// --- console and boot watch (issue 11) --------------------------------------------

TEST_F(PlanVmTest, ConsoleSocketsGoInTheTaskDir) {
  config_.console = true;
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_TRUE(spec->console.enabled);
  EXPECT_EQ(spec->console.dir, alloc_ + "/web/console");
  EXPECT_EQ(spec->console.serial_socket, alloc_ + "/web/console/serial.sock");
  EXPECT_EQ(spec->console.vnc_socket, alloc_ + "/web/console/vnc.sock");
  EXPECT_EQ(spec->boot_watch.timeout, absl::ZeroDuration());
}

TEST_F(PlanVmTest, NoConsoleByDefault) {
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_FALSE(spec->console.enabled);
  EXPECT_TRUE(spec->console.serial_socket.empty());
}

TEST_F(PlanVmTest, ConsoleSocketPathOverTheLimitIsRefused) {
  const std::string name(120 - alloc_.size(), 'n');
  task_.set_name(name);
  config_.console = true;
  EXPECT_THAT(Problems(), AllOf(HasSubstr("task config \"console\": the console socket"),
                                HasSubstr("over the unix socket limit of 107")));
}

TEST_F(PlanVmTest, ConsolePathWithAnEqualsSignBeforeAnyCommaIsRefused) {
  task_.set_name("a=b");
  config_.console = true;
  EXPECT_THAT(Problems(), HasSubstr("holds an '=', which QEMU's -vnc cannot take"));
  task_.set_name("a,b=c");  // after the doubled comma QEMU reads it as part of the path
  config_.console = true;
  EXPECT_TRUE(Plan().ok());
}

TEST_F(PlanVmTest, BootTimeoutWithTheGuestAgent) {
  config_.guest_agent = true;
  config_.boot_timeout = "1m30s";
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->boot_watch.timeout, absl::Seconds(90));
  EXPECT_TRUE(spec->boot_watch.guest_agent);
  EXPECT_TRUE(spec->boot_watch.port_label.empty());
}

TEST_F(PlanVmTest, BootTimeoutWithAReadyPort) {
  AddGroupPort("http", 25001, 80, "127.0.0.1");
  config_.port_map = {{"http", 8080}};
  config_.boot_timeout = "20s";
  config_.boot_ready_port = "http";
  absl::StatusOr<VmSpec> spec = Plan();
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->boot_watch.timeout, absl::Seconds(20));
  EXPECT_FALSE(spec->boot_watch.guest_agent);
  EXPECT_EQ(spec->boot_watch.port_label, "http");
  EXPECT_EQ(spec->boot_watch.host_ip, "127.0.0.1");
  EXPECT_EQ(spec->boot_watch.host_port, 25001);
  EXPECT_EQ(spec->boot_watch.guest_port, 8080);
}

TEST_F(PlanVmTest, BootTimeoutMustBeASaneDuration) {
  config_.guest_agent = true;
  for (const auto& [value, expected] : std::vector<std::pair<std::string, std::string>>{
           {"soon", "is not a duration"},
           {"90", "is not a duration"},
           {"", "is not a duration"},
           {"inf", "is not a duration"},
           {"-5s", "is out of range; use 1s to 24h"},
           {"0s", "is out of range"},
           {"500ms", "is out of range"},
           {"25h", "is out of range"},
           {"9999999999h", "is out of range"}}) {
    SCOPED_TRACE(value);
    config_.boot_timeout = value;
    EXPECT_THAT(Problems(), HasSubstr("task config \"boot_timeout\": \"" + value + "\" " + expected));
  }
}

TEST_F(PlanVmTest, BootTimeoutNeedsSomethingToWaitFor) {
  config_.boot_timeout = "30s";
  EXPECT_THAT(Problems(), HasSubstr("task config \"boot_timeout\": needs something that answers"));
}

TEST_F(PlanVmTest, BootReadyPortMustBeAPortMapLabelAndNeedsBootTimeout) {
  AddGroupPort("http", 25001, 80, "127.0.0.1");
  config_.port_map = {{"http", 80}};
  config_.boot_ready_port = "http";
  EXPECT_THAT(Problems(), HasSubstr("task config \"boot_ready_port\": needs boot_timeout"));
  config_.boot_timeout = "30s";
  config_.boot_ready_port = "ssh";
  EXPECT_THAT(Problems(), HasSubstr("task config \"boot_ready_port\": \"ssh\" is not a port_map label; port_map has \"http\""));
  config_.port_map.clear();
  EXPECT_THAT(Problems(), HasSubstr("the task config has no port_map"));
}

}  // namespace
}  // namespace ndq
