#include "host/fingerprint.h"

#include <sys/stat.h>
#include <sys/time.h>

#include <filesystem>
#include <fstream>
#include <future>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/temp_dir.h"

namespace ndq {
namespace {

using ::ndq::testing::TempDir;
using ::testing::HasSubstr;

constexpr char kRealQemu[] = "/usr/bin/qemu-system-x86_64";

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

}  // namespace
}  // namespace ndq
