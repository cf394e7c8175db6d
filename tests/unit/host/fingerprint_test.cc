#include "host/fingerprint.h"

#include <sys/stat.h>
#include <sys/time.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <iostream>
#include <sstream>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/temp_dir.h"

namespace ndq {
namespace {

using ::ndq::testing::TempDir;
using ::testing::Contains;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kRealQemu[] = "/usr/bin/qemu-system-x86_64";
constexpr char kRealSwtpm[] = "/usr/bin/swtpm";

std::string StringAttr(const Fingerprint& fp, const std::string& name) {
  return std::get<std::string>(fp.attributes.at(name));
}

void WriteScript(const std::string& path, const std::string& body) {
  std::ofstream(path) << "#!/bin/sh\n" << body << "\n";
  ::chmod(path.c_str(), 0755);
}

TEST(ParseQemuVersion, ReadsTheVersionNumber) {
  EXPECT_EQ(ParseQemuVersion("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n"
                             "Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n"),
            "7.2.22");
  EXPECT_EQ(ParseQemuVersion("QEMU emulator version 9.0.0\n"), "9.0.0");
  EXPECT_EQ(ParseQemuVersion("qemu-system-x86_64: unknown option"), "");
}

TEST(ParseAcceleratorList, SkipsTheHeader) {
  EXPECT_EQ(ParseAcceleratorList("Accelerators supported in QEMU binary:\ntcg\nkvm\n"),
            (std::vector<std::string>{"kvm", "tcg"}));
  EXPECT_TRUE(ParseAcceleratorList("").empty());
}

// Excerpts of qemu-system-x86_64 7.2 (Debian 12) output.
constexpr char kMachineHelp[] =
    "Supported machines are:\n"
    "microvm              microvm (i386)\n"
    "pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\n"
    "pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)\n"
    "pc-i440fx-7.1        Standard PC (i440FX + PIIX, 1996)\n"
    "q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)\n"
    "pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)\n"
    "isapc                ISA-only PC\n"
    "none                 empty machine\n"
    "x-remote             Experimental remote machine\n";

constexpr char kDeviceHelp[] =
    "Storage devices:\n"
    "name \"virtio-blk-pci\", bus PCI, alias \"virtio-blk\"\n"
    "name \"nvme\", bus PCI, desc \"Non-Volatile Memory Express\"\n"
    "\n"
    "Network devices:\n"
    "name \"e1000\", bus PCI, alias \"e1000-82540em\", desc \"Intel Gigabit Ethernet\"\n"
    "name \"e1000e\", bus PCI, desc \"Intel 82574L GbE Controller\"\n"
    "name \"ne2k_isa\", bus ISA\n"
    "name \"rtl8139\", bus PCI\n"
    "name \"usb-net\", bus usb-bus\n"
    "name \"virtio-net-pci\", bus PCI, alias \"virtio-net\"\n"
    "name \"vmxnet3\", bus PCI, desc \"VMWare Paravirtualized Ethernet v3\"\n"
    "\n"
    "Input devices:\n"
    "name \"i8042\", bus ISA\n"
    "name \"virtio-keyboard-pci\", bus PCI, alias \"virtio-keyboard\"\n";

TEST(ParseMachineList, KeepsEveryNameAndAliasWithoutTheHeader) {
  EXPECT_THAT(ParseMachineList(kMachineHelp),
              ElementsAre("isapc", "microvm", "none", "pc", "pc-i440fx-7.1", "pc-i440fx-7.2", "pc-q35-7.2", "q35",
                          "x-remote"));
  EXPECT_TRUE(ParseMachineList("").empty());
  EXPECT_TRUE(ParseMachineList("Supported machines are:\n").empty());
}

TEST(ParseNetDeviceList, ReadsOnlyTheNetworkSectionWithAliases) {
  EXPECT_THAT(ParseNetDeviceList(kDeviceHelp),
              ElementsAre("e1000", "e1000-82540em", "e1000e", "ne2k_isa", "rtl8139", "usb-net", "virtio-net",
                          "virtio-net-pci", "vmxnet3"));
  EXPECT_TRUE(ParseNetDeviceList("").empty());
  EXPECT_TRUE(ParseNetDeviceList("Input devices:\nname \"i8042\", bus ISA\n").empty());
  // "alias" inside a description is not an alias.
  EXPECT_THAT(ParseNetDeviceList("Network devices:\nname \"x\", bus PCI, desc \"no alias \"y\"\"\n"),
              ElementsAre("x"));
}

TEST(ParseLists, RealQemuOutput) {
  if (::access(kRealQemu, X_OK) != 0) GTEST_SKIP() << kRealQemu << " not installed";
  std::string machines, devices;
  for (auto [args, out] : {std::pair{"-machine help", &machines}, std::pair{"-device help", &devices}}) {
    FILE* pipe = ::popen((std::string(kRealQemu) + " " + args).c_str(), "r");
    ASSERT_NE(pipe, nullptr);
    char buf[4096];
    for (size_t n; (n = std::fread(buf, 1, sizeof buf, pipe)) > 0;) out->append(buf, n);
    ASSERT_EQ(::pclose(pipe), 0);
  }
  const std::vector<std::string> machine_list = ParseMachineList(machines);
  for (const char* name : {"pc", "q35", "microvm", "none"}) EXPECT_THAT(machine_list, Contains(name));
  EXPECT_THAT(machine_list, Not(Contains("Supported")));
  const std::vector<std::string> nics = ParseNetDeviceList(devices);
  for (const char* name : {"e1000", "virtio-net-pci", "virtio-net", "rtl8139"}) EXPECT_THAT(nics, Contains(name));
  EXPECT_THAT(nics, Not(Contains("virtio-blk-pci")));
}

TEST(KvmUsable, FalseForMissingOrWrongDevice) {
  EXPECT_FALSE(KvmUsable("/nonexistent/kvm"));
  EXPECT_FALSE(KvmUsable("/dev/null"));
}

TEST(Fingerprinter, EmptyPathIsUndetected) {
  TempDir empty;
  Fingerprinter fingerprinter(empty.path(), "/dev/kvm");
  const Fingerprint fp = fingerprinter.Probe({});
  EXPECT_EQ(fp.health, Fingerprint::Health::kUndetected);
  EXPECT_THAT(fp.description, HasSubstr("no qemu-system-* binary found on PATH"));
  EXPECT_TRUE(fp.attributes.empty());
}

TEST(Fingerprinter, RealQemuGivesNomadsAttributes) {
  TempDir bin;
  std::filesystem::create_symlink(kRealQemu, bin / "qemu-system-x86_64");
  Fingerprinter fingerprinter(bin.path(), "/dev/kvm");
  const Fingerprint fp = fingerprinter.Probe({});
  ASSERT_EQ(fp.health, Fingerprint::Health::kHealthy) << fp.description;
  EXPECT_EQ(std::get<bool>(fp.attributes.at("driver.qemu")), true);
  EXPECT_THAT(StringAttr(fp, "driver.qemu.version"), ::testing::MatchesRegex("[0-9]+\\.[0-9]+\\.[0-9]+"));
  EXPECT_EQ(StringAttr(fp, "driver.qemu.emulators"), "x86_64");
  // TCG is compiled into every Debian QEMU; kvm only where /dev/kvm answers.
  const std::string accels = StringAttr(fp, "driver.qemu.accelerators");
  EXPECT_THAT(accels, HasSubstr("tcg"));
  EXPECT_EQ(accels.find("kvm") != std::string::npos, KvmUsable("/dev/kvm"));
  EXPECT_EQ(std::get<bool>(fp.attributes.at("driver.qemu.kvm")), KvmUsable("/dev/kvm"));
  const std::string machines = StringAttr(fp, "driver.qemu.machines");
  EXPECT_THAT(machines, HasSubstr(",pc,"));
  EXPECT_THAT(machines, HasSubstr(",q35,"));
}

TEST(Fingerprinter, NoKvmDeviceMeansTcgOnly) {
  TempDir bin;
  std::filesystem::create_symlink(kRealQemu, bin / "qemu-system-x86_64");
  Fingerprinter fingerprinter(bin.path(), bin / "no-kvm");
  const Fingerprint fp = fingerprinter.Probe({});
  EXPECT_EQ(StringAttr(fp, "driver.qemu.accelerators"), "tcg");
  EXPECT_EQ(std::get<bool>(fp.attributes.at("driver.qemu.kvm")), false);
}

TEST(Fingerprinter, DoesNotRerunAnUnchangedBinary) {
  TempDir bin;
  std::filesystem::copy_file(kRealQemu, bin / "qemu-system-x86_64");
  ::chmod((bin / "qemu-system-x86_64").c_str(), 0755);
  Fingerprinter fingerprinter(bin.path(), "/dev/kvm");
  const Fingerprint first = fingerprinter.Probe({});
  for (int i = 0; i < 5; ++i) EXPECT_EQ(fingerprinter.Probe({}), first);
  EXPECT_EQ(fingerprinter.binary_probes(), 1);

  // A package upgrade replaces the file: the next probe must look again.
  const timeval times[2] = {{1000000000, 0}, {1000000000, 0}};
  ASSERT_EQ(::utimes((bin / "qemu-system-x86_64").c_str(), times), 0);
  fingerprinter.Probe({});
  EXPECT_EQ(fingerprinter.binary_probes(), 2);
}

TEST(Fingerprinter, AllowlistFiltersEmulators) {
  TempDir bin;
  std::filesystem::create_symlink(kRealQemu, bin / "qemu-system-x86_64");
  std::filesystem::create_symlink(kRealQemu, bin / "qemu-system-i386");
  Fingerprinter fingerprinter(bin.path(), "/dev/kvm");
  EXPECT_EQ(StringAttr(fingerprinter.Probe({}), "driver.qemu.emulators"), "i386,x86_64");
  EXPECT_EQ(StringAttr(fingerprinter.Probe({"x86_64"}), "driver.qemu.emulators"), "x86_64");

  const Fingerprint none = fingerprinter.Probe({"aarch64"});
  EXPECT_EQ(none.health, Fingerprint::Health::kUndetected);
  EXPECT_THAT(none.description, HasSubstr("none is in emulators_allowlist (aarch64)"));
}

TEST(Fingerprinter, FirstMatchOnPathWinsAndNonExecutablesAreIgnored) {
  TempDir first, second;
  std::ofstream(first / "qemu-system-x86_64") << "not executable";
  WriteScript(first / "qemu-system-riscv64", "echo 'QEMU emulator version 8.1.0'");
  std::filesystem::create_symlink(kRealQemu, second / "qemu-system-x86_64");
  Fingerprinter fingerprinter(first.path() + ":" + second.path(), "/dev/kvm");
  const Fingerprint fp = fingerprinter.Probe({});
  EXPECT_EQ(StringAttr(fp, "driver.qemu.emulators"), "riscv64,x86_64");
  // The version reported is the host architecture's emulator, the real one.
  EXPECT_NE(StringAttr(fp, "driver.qemu.version"), "8.1.0");
}

TEST(Fingerprinter, UnparsableVersionIsUndetectedWithTheOutput) {
  TempDir bin;
  WriteScript(bin / "qemu-system-x86_64", "echo 'something else entirely'");
  Fingerprinter fingerprinter(bin.path(), "/dev/kvm");
  const Fingerprint fp = fingerprinter.Probe({});
  EXPECT_EQ(fp.health, Fingerprint::Health::kUndetected);
  EXPECT_THAT(fp.description, HasSubstr("cannot parse the QEMU version from: something else entirely"));
}

TEST(Fingerprinter, FailingBinaryIsUndetected) {
  TempDir bin;
  WriteScript(bin / "qemu-system-x86_64", "echo 'broken install' >&2; exit 3");
  Fingerprinter fingerprinter(bin.path(), "/dev/kvm");
  const Fingerprint fp = fingerprinter.Probe({});
  EXPECT_EQ(fp.health, Fingerprint::Health::kUndetected);
  EXPECT_THAT(fp.description, HasSubstr("--version failed: broken install"));
}

TEST(Fingerprinter, AHangingBinaryDoesNotHoldUpOtherCallers) {
  TempDir bin;
  // --version blocks until the test lets it go (a release file appears).
  const std::string release = bin / "release";
  WriteScript(bin / "qemu-system-x86_64",
              "touch '" + (bin / "probing") + "'\n"
              "while [ ! -e '" + release + "' ]; do sleep 0.05; done\n"
              "echo 'QEMU emulator version 7.2.22'");
  Fingerprinter fingerprinter(bin.path(), "/dev/kvm");
  std::thread prober([&] { fingerprinter.Probe({}); });
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (!std::filesystem::exists(bin / "probing") && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(10));
  ASSERT_TRUE(std::filesystem::exists(bin / "probing"));
  // While the probe's binary runs, the emulators are still listed at once.
  auto listed = std::async(std::launch::async, [&] { return fingerprinter.Emulators().count("x86_64"); });
  const bool prompt = listed.wait_for(std::chrono::seconds(5)) == std::future_status::ready;
  std::ofstream(release).put('\n');  // lets the probe (and a blocked lister) finish either way
  prober.join();
  EXPECT_TRUE(prompt) << "Emulators() waited for another caller's probe";
  EXPECT_EQ(listed.get(), 1u);
  EXPECT_EQ(fingerprinter.binary_probes(), 1);
}

// A fake qemu-system-x86_64 that prints the excerpts above and logs each run.
class FakeHostTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::ofstream(bin_ / "machine-help") << kMachineHelp;
    std::ofstream(bin_ / "device-help") << kDeviceHelp;
    WriteScript(bin_ / "qemu-system-x86_64",
                "echo \"$*\" >> '" + (bin_ / "runs") + "'\n"
                "case \"$1\" in\n"
                "  --version) echo 'QEMU emulator version 7.2.22' ;;\n"
                "  -accel) printf 'Accelerators supported in QEMU binary:\\ntcg\\n' ;;\n"
                "  -machine) cat '" + (bin_ / "machine-help") + "' ;;\n"
                "  -device) cat '" + (bin_ / "device-help") + "' ;;\n"
                "esac");
  }

  void AddSwtpm(const std::string& body = "echo 'TPM emulator version 0.7.1, Copyright (c) 2014-2021 IBM Corp.'") {
    WriteScript(bin_ / "swtpm", "echo \"swtpm $*\" >> '" + (bin_ / "runs") + "'\n" + body);
  }
  void AddFirmware(const std::string& name) { std::ofstream(fw_ / name) << "firmware"; }
  FirmwarePaths Firmware() const {
    return FirmwarePaths{{fw_ / "CODE.fd", fw_ / "VARS.fd"}, {fw_ / "CODE.secboot.fd", fw_ / "VARS.ms.fd"}};
  }
  std::vector<std::string> Runs() const {
    std::ifstream in(bin_ / "runs");
    std::vector<std::string> lines;
    for (std::string line; std::getline(in, line);) lines.push_back(line);
    return lines;
  }

  TempDir bin_, fw_;
};

TEST_F(FakeHostTest, MachinesAndNicModelsBecomeAttributesAndCapabilities) {
  Fingerprinter fingerprinter(bin_.path(), bin_ / "no-kvm", Firmware());
  const Fingerprint fp = fingerprinter.Probe({});
  ASSERT_EQ(fp.health, Fingerprint::Health::kHealthy) << fp.description;
  EXPECT_EQ(StringAttr(fp, "driver.qemu.machines"),
            "isapc,microvm,none,pc,pc-i440fx-7.1,pc-i440fx-7.2,pc-q35-7.2,q35,x-remote");
  // Nothing to offer: these are absent, not false.
  for (const char* name : {"driver.qemu.firmware.uefi", "driver.qemu.firmware.secure_boot", "driver.qemu.tpm"}) {
    EXPECT_EQ(fp.attributes.count(name), 0u) << name;
  }

  const HostCapabilities caps = fingerprinter.Capabilities({});
  EXPECT_EQ(caps.emulators, (std::map<std::string, std::string>{{"x86_64", bin_ / "qemu-system-x86_64"}}));
  EXPECT_EQ(caps.machines.at("x86_64"), ParseMachineList(kMachineHelp));
  EXPECT_EQ(caps.net_devices.at("x86_64"), ParseNetDeviceList(kDeviceHelp));
  EXPECT_FALSE(caps.uefi.has_value());
  EXPECT_FALSE(caps.secure_boot.has_value());
  EXPECT_EQ(caps.swtpm, "");
  EXPECT_TRUE(fingerprinter.Capabilities({"aarch64"}).emulators.empty());
}

TEST_F(FakeHostTest, EachBinaryRunsOncePerChangeForProbeAndCapabilities) {
  AddSwtpm();
  Fingerprinter fingerprinter(bin_.path(), bin_ / "no-kvm", Firmware());
  const Fingerprint first = fingerprinter.Probe({});
  const HostCapabilities caps = fingerprinter.Capabilities({});
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(fingerprinter.Probe({}), first);
    fingerprinter.Capabilities({});
  }
  EXPECT_THAT(Runs(), ElementsAre("--version", "-accel help", "-machine help", "-device help", "swtpm --version"));
  EXPECT_EQ(fingerprinter.binary_probes(), 2);

  // An upgraded swtpm is looked at again; the unchanged emulator is not.
  const timeval times[2] = {{1000000000, 0}, {1000000000, 0}};
  ASSERT_EQ(::utimes((bin_ / "swtpm").c_str(), times), 0);
  EXPECT_EQ(fingerprinter.Probe({}), first);
  EXPECT_EQ(Runs().size(), 6u);
  EXPECT_EQ(fingerprinter.binary_probes(), 3);
}

TEST_F(FakeHostTest, AStartProbesItsOwnEmulatorOnlyAndOnlyOnce) {
  // A second emulator that logs its runs elsewhere.
  WriteScript(bin_ / "qemu-system-i386", "echo \"$*\" >> '" + (bin_ / "i386-runs") + "'\n"
                                         "echo 'QEMU emulator version 7.2.22'");
  Fingerprinter fingerprinter(bin_.path(), bin_ / "no-kvm", Firmware());
  HostCapabilities caps = fingerprinter.CapabilitiesFor("x86_64");
  // Both are listed (a wrong emulator's error names what the host has) ...
  EXPECT_EQ(caps.emulators.size(), 2u);
  EXPECT_EQ(caps.machines.at("x86_64"), ParseMachineList(kMachineHelp));
  EXPECT_EQ(caps.versions.at("x86_64"), "7.2.22");
  // ... but the other one was not run.
  EXPECT_EQ(caps.machines.count("i386"), 0u);
  EXPECT_FALSE(std::filesystem::exists(bin_ / "i386-runs"));
  EXPECT_EQ(Runs().size(), 4u);
  fingerprinter.CapabilitiesFor("x86_64");
  EXPECT_EQ(Runs().size(), 4u);

  // Once the background warm-up has probed it, a start sees its facts.
  fingerprinter.WarmUp({});
  EXPECT_TRUE(std::filesystem::exists(bin_ / "i386-runs"));
  EXPECT_EQ(fingerprinter.CapabilitiesFor("x86_64").versions.count("i386"), 1u);
  EXPECT_EQ(Runs().size(), 4u);
}

TEST_F(FakeHostTest, ANewlyLaunchedPluginRunsNoUnchangedBinaryAgain) {
  AddSwtpm();
  const std::string facts = bin_ / "host-facts.json";
  Fingerprint first;
  {
    Fingerprinter fingerprinter(bin_.path(), bin_ / "no-kvm", Firmware());
    fingerprinter.KeepFactsIn(facts);
    fingerprinter.WarmUp({});
    first = fingerprinter.Probe({});
    EXPECT_EQ(fingerprinter.binary_probes(), 2);
  }
  const size_t runs = Runs().size();
  {
    // The next launch: the same answers, no binary run.
    Fingerprinter fingerprinter(bin_.path(), bin_ / "no-kvm", Firmware());
    fingerprinter.KeepFactsIn(facts);
    EXPECT_EQ(fingerprinter.Probe({}), first);
    EXPECT_EQ(fingerprinter.CapabilitiesFor("x86_64").swtpm, bin_ / "swtpm");
    EXPECT_EQ(fingerprinter.binary_probes(), 0);
    EXPECT_EQ(Runs().size(), runs);
  }
  {
    // An upgraded emulator (same size, new file) is run again.
    std::filesystem::copy_file(bin_ / "qemu-system-x86_64", bin_ / "new", std::filesystem::copy_options::overwrite_existing);
    std::filesystem::rename(bin_ / "new", bin_ / "qemu-system-x86_64");
    Fingerprinter fingerprinter(bin_.path(), bin_ / "no-kvm", Firmware());
    fingerprinter.KeepFactsIn(facts);
    EXPECT_EQ(fingerprinter.Probe({}), first);
    EXPECT_EQ(fingerprinter.binary_probes(), 1);
  }
  {
    // A damaged facts file is only a cache miss.
    std::ofstream(facts) << "{\"format\": 1, \"emulators\": {\"" << (bin_ / "qemu-system-x86_64")
                         << "\": {\"identity\": \"nonsense\"}}}";
    Fingerprinter fingerprinter(bin_.path(), bin_ / "no-kvm", Firmware());
    fingerprinter.KeepFactsIn(facts);
    EXPECT_EQ(fingerprinter.Probe({}), first);
    EXPECT_EQ(fingerprinter.binary_probes(), 2);
  }
}

TEST_F(FakeHostTest, CallersThatMissTogetherShareOneProbe) {
  Fingerprinter fingerprinter(bin_.path(), bin_ / "no-kvm", Firmware());
  std::vector<std::thread> callers;
  for (int i = 0; i < 4; ++i) callers.emplace_back([&] { fingerprinter.CapabilitiesFor("x86_64"); });
  for (std::thread& t : callers) t.join();
  EXPECT_EQ(fingerprinter.binary_probes(), 1);
  EXPECT_EQ(Runs().size(), 4u);
}

TEST_F(FakeHostTest, FirmwareNeedsBothFilesOfAFlavour) {
  Fingerprinter fingerprinter(bin_.path(), bin_ / "no-kvm", Firmware());
  AddFirmware("CODE.fd");                                           // no VARS.fd yet
  std::filesystem::create_directory(fw_ / "VARS.ms.fd");            // not a regular file
  AddFirmware("CODE.secboot.fd");
  Fingerprint fp = fingerprinter.Probe({});
  EXPECT_EQ(fp.attributes.count("driver.qemu.firmware.uefi"), 0u);
  EXPECT_EQ(fp.attributes.count("driver.qemu.firmware.secure_boot"), 0u);
  EXPECT_FALSE(fingerprinter.Capabilities({}).uefi.has_value());

  AddFirmware("VARS.fd");
  fp = fingerprinter.Probe({});
  EXPECT_EQ(std::get<bool>(fp.attributes.at("driver.qemu.firmware.uefi")), true);
  EXPECT_EQ(fp.attributes.count("driver.qemu.firmware.secure_boot"), 0u);
  HostCapabilities caps = fingerprinter.Capabilities({});
  EXPECT_EQ(caps.uefi, (FirmwareFiles{fw_ / "CODE.fd", fw_ / "VARS.fd"}));
  EXPECT_FALSE(caps.secure_boot.has_value());

  std::filesystem::remove(fw_ / "VARS.ms.fd");
  AddFirmware("VARS.ms.fd");
  fp = fingerprinter.Probe({});
  EXPECT_EQ(std::get<bool>(fp.attributes.at("driver.qemu.firmware.secure_boot")), true);
  caps = fingerprinter.Capabilities({});
  EXPECT_EQ(caps.secure_boot, (FirmwareFiles{fw_ / "CODE.secboot.fd", fw_ / "VARS.ms.fd"}));
}

TEST_F(FakeHostTest, SwtpmMustBeOnPathExecutableAndRunnable) {
  {
    std::ofstream(bin_ / "swtpm") << "not executable";
    Fingerprinter fingerprinter(bin_.path(), bin_ / "no-kvm", Firmware());
    EXPECT_EQ(fingerprinter.Probe({}).attributes.count("driver.qemu.tpm"), 0u);
    EXPECT_EQ(fingerprinter.Capabilities({}).swtpm, "");
  }
  {
    AddSwtpm("echo 'error while loading shared libraries: libtpms.so.0' >&2; exit 127");
    Fingerprinter fingerprinter(bin_.path(), bin_ / "no-kvm", Firmware());
    EXPECT_EQ(fingerprinter.Probe({}).attributes.count("driver.qemu.tpm"), 0u);
    EXPECT_EQ(fingerprinter.Capabilities({}).swtpm, "");
  }
  {
    AddSwtpm();
    Fingerprinter fingerprinter(bin_.path(), bin_ / "no-kvm", Firmware());
    EXPECT_EQ(std::get<bool>(fingerprinter.Probe({}).attributes.at("driver.qemu.tpm")), true);
    EXPECT_EQ(fingerprinter.Capabilities({}).swtpm, bin_ / "swtpm");
  }
}

TEST(Fingerprinter, RealQemuSwtpmAndOvmf) {
  if (::access(kRealQemu, X_OK) != 0 || ::access(kRealSwtpm, X_OK) != 0) {
    GTEST_SKIP() << "needs qemu-system-x86 and swtpm installed";
  }
  TempDir bin;
  std::filesystem::create_symlink(kRealQemu, bin / "qemu-system-x86_64");
  std::filesystem::create_symlink(kRealSwtpm, bin / "swtpm");
  Fingerprinter fingerprinter(bin.path(), "/dev/kvm");
  const auto start = std::chrono::steady_clock::now();
  const Fingerprint fp = fingerprinter.Probe({});
  const auto probed = std::chrono::steady_clock::now();
  fingerprinter.Probe({});
  const auto cached = std::chrono::steady_clock::now();
  using Ms = std::chrono::milliseconds;
  std::cout << "[ MEASURE  ] first Probe (5 binary runs) "
            << std::chrono::duration_cast<Ms>(probed - start).count() << " ms, cached Probe "
            << std::chrono::duration_cast<std::chrono::microseconds>(cached - probed).count() << " us" << std::endl;
  ASSERT_EQ(fp.health, Fingerprint::Health::kHealthy) << fp.description;
  EXPECT_EQ(std::get<bool>(fp.attributes.at("driver.qemu.tpm")), true);
  const HostCapabilities caps = fingerprinter.Capabilities({});
  EXPECT_THAT(caps.machines.at("x86_64"), Contains("q35"));
  EXPECT_THAT(caps.net_devices.at("x86_64"), Contains("virtio-net-pci"));
  EXPECT_EQ(caps.swtpm, bin / "swtpm");
  EXPECT_EQ(fingerprinter.binary_probes(), 2);
  // Debian's ovmf package, where installed, at the default paths.
  const FirmwarePaths defaults;
  if (std::filesystem::exists(defaults.uefi.code)) {
    EXPECT_EQ(std::get<bool>(fp.attributes.at("driver.qemu.firmware.uefi")), true);
    EXPECT_EQ(caps.uefi, defaults.uefi);
  }
  if (std::filesystem::exists(defaults.secure_boot.code)) {
    EXPECT_EQ(std::get<bool>(fp.attributes.at("driver.qemu.firmware.secure_boot")), true);
    EXPECT_EQ(caps.secure_boot, defaults.secure_boot);
  }
}

}  // namespace
}  // namespace ndq
