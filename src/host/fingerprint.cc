#include "host/fingerprint.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>

#include "base/timeouts.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "host/run_command.h"

namespace ndq {
namespace {

constexpr absl::string_view kEmulatorPrefix = "qemu-system-";
constexpr absl::Duration kProbeTimeout = timeouts::kFingerprintProbe;

bool IsExecutableFile(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(path.c_str(), X_OK) == 0;
}

// The emulator whose version we report: the host's own architecture when it is
// there, so the attribute means what an operator expects on a mixed install.
std::string PrimaryEmulator(const std::vector<std::string>& names) {
  for (const char* preferred : {"x86_64", "aarch64"}) {
    if (std::find(names.begin(), names.end(), preferred) != names.end()) return preferred;
  }
  return names.front();
}

}  // namespace

std::string ParseQemuVersion(absl::string_view version_output) {
  // The first "version " followed by dotted numbers, e.g. "version 7.2.22 (Debian ...)".
  for (size_t at = version_output.find("version "); at != absl::string_view::npos;
       at = version_output.find("version ", at + 1)) {
    absl::string_view rest = version_output.substr(at + 8);
    const size_t end = rest.find_first_not_of("0123456789.");
    absl::string_view number = absl::StripSuffix(rest.substr(0, end), ".");
    if (!number.empty() && absl::ascii_isdigit(number[0]) && absl::StrContains(number, '.')) {
      return std::string(number);
    }
  }
  return "";
}

std::vector<std::string> ParseAcceleratorList(absl::string_view accel_help_output) {
  std::vector<std::string> out;
  for (absl::string_view line : absl::StrSplit(accel_help_output, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    // The first line is a header ("Accelerators supported in QEMU binary:").
    if (line.empty() || absl::StrContains(line, ' ') || absl::EndsWith(line, ":")) continue;
    out.emplace_back(line);
  }
  std::sort(out.begin(), out.end());
  return out;
}

bool KvmUsable(const std::string& device) {
  const int fd = ::open(device.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return false;
  const int version = ::ioctl(fd, KVM_GET_API_VERSION, 0);
  ::close(fd);
  return version == KVM_API_VERSION;
}

Fingerprinter::Fingerprinter(std::string path_env, std::string kvm_device)
    : path_dirs_(absl::StrSplit(path_env, ':', absl::SkipEmpty())), kvm_device_(std::move(kvm_device)) {}

const std::vector<std::string>& Fingerprinter::EmulatorNamesIn(const std::string& dir) {
  DirListing& listing = listings_[dir];
  struct stat st {};
  const int64_t mtime_ns =
      ::stat(dir.c_str(), &st) == 0 ? static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec : -2;
  if (mtime_ns == listing.mtime_ns) return listing.names;
  listing.mtime_ns = mtime_ns;
  listing.names.clear();
  if (DIR* d = ::opendir(dir.c_str())) {
    while (const dirent* entry = ::readdir(d)) {
      absl::string_view name(entry->d_name);
      if (absl::StartsWith(name, kEmulatorPrefix) && name.size() > kEmulatorPrefix.size()) {
        listing.names.emplace_back(name);
      }
    }
    ::closedir(d);
  }
  return listing.names;
}

std::map<std::string, std::string> Fingerprinter::FindEmulators() {
  std::map<std::string, std::string> found;
  for (const std::string& dir : path_dirs_) {
    for (const std::string& name : EmulatorNamesIn(dir)) {
      const std::string emulator = name.substr(kEmulatorPrefix.size());
      const std::string path = dir + "/" + name;
      // Checked every time: a chmod does not change the directory's mtime.
      if (found.count(emulator) == 0 && IsExecutableFile(path)) found[emulator] = path;
    }
  }
  return found;
}

Fingerprinter::BinaryFacts Fingerprinter::FactsFor(const std::string& path) {
  struct stat st {};
  ::stat(path.c_str(), &st);
  const BinaryIdentity identity{static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino),
                                static_cast<uint64_t>(st.st_size),
                                static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec};
  {
    absl::MutexLock lock(&mu_);
    if (auto it = facts_.find(path); it != facts_.end() && it->second.identity == identity) {
      return it->second;
    }
    ++probes_;
  }
  // Run without the lock: a hung binary must not hold up every other caller
  // for kProbeTimeout per command.
  BinaryFacts facts = RunProbes(path);
  facts.identity = identity;
  absl::MutexLock lock(&mu_);
  facts_[path] = facts;
  return facts;
}

Fingerprinter::BinaryFacts Fingerprinter::RunProbes(const std::string& path) {
  BinaryFacts facts;
  absl::StatusOr<CommandResult> version = RunCommand({path, "--version"}, kProbeTimeout);
  if (!version.ok()) {
    facts.error = std::string(version.status().message());
  } else if (version->exit_code != 0) {
    facts.error = path + " --version failed: " + std::string(absl::StripAsciiWhitespace(version->output));
  } else {
    facts.version = ParseQemuVersion(version->output);
    if (facts.version.empty()) {
      facts.error = "cannot parse the QEMU version from: " +
                    std::string(absl::StripAsciiWhitespace(version->output));
    }
  }
  if (facts.error.empty()) {
    absl::StatusOr<CommandResult> accels = RunCommand({path, "-accel", "help"}, kProbeTimeout);
    if (accels.ok() && accels->exit_code == 0) facts.accelerators = ParseAcceleratorList(accels->output);
  }
  return facts;
}

Fingerprint Fingerprinter::Probe(const std::vector<std::string>& emulators_allowlist) {
  Fingerprint fp;
  std::map<std::string, std::string> found;
  {
    absl::MutexLock lock(&mu_);
    found = FindEmulators();
  }
  if (found.empty()) {
    fp.description = "no qemu-system-* binary found on PATH (" + absl::StrJoin(path_dirs_, ":") + ")";
    return fp;
  }
  std::vector<std::string> allowed;
  for (const auto& [name, path] : found) {
    if (emulators_allowlist.empty() ||
        std::find(emulators_allowlist.begin(), emulators_allowlist.end(), name) != emulators_allowlist.end()) {
      allowed.push_back(name);
    }
  }
  if (allowed.empty()) {
    std::vector<std::string> names;
    for (const auto& [name, path] : found) names.push_back(name);
    fp.description = "found emulators " + absl::StrJoin(names, ",") +
                     " but none is in emulators_allowlist (" + absl::StrJoin(emulators_allowlist, ",") + ")";
    return fp;
  }

  const BinaryFacts facts = FactsFor(found.at(PrimaryEmulator(allowed)));
  if (!facts.error.empty()) {
    fp.description = facts.error;
    return fp;
  }

  const bool kvm = KvmUsable(kvm_device_);
  std::vector<std::string> accelerators;
  for (const std::string& accel : facts.accelerators) {
    // Only what this host can really run: kvm needs a usable /dev/kvm, and
    // hypervisor-specific ones (xen, hax, whpx ...) are not offered on Linux hosts we support.
    if (accel == "tcg" || (accel == "kvm" && kvm)) accelerators.push_back(accel);
  }

  fp.health = Fingerprint::Health::kHealthy;
  fp.description = "Healthy";
  fp.attributes["driver.qemu"] = true;
  fp.attributes["driver.qemu.version"] = facts.version;
  fp.attributes["driver.qemu.emulators"] = absl::StrJoin(allowed, ",");
  fp.attributes["driver.qemu.accelerators"] = absl::StrJoin(accelerators, ",");
  fp.attributes["driver.qemu.kvm"] = kvm;
  return fp;
}

std::map<std::string, std::string> Fingerprinter::Emulators() {
  absl::MutexLock lock(&mu_);
  return FindEmulators();
}

int Fingerprinter::binary_probes() const {
  absl::MutexLock lock(&mu_);
  return probes_;
}

}  // namespace ndq
