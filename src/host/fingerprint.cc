#include "host/fingerprint.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <functional>
#include <optional>
#include <utility>

#include "base/timeouts.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "base/small_file.h"
#include "host/run_command.h"
#include "nlohmann/json.hpp"
#include "nomadplugin/hclog.h"

namespace ndq {
namespace {

constexpr absl::string_view kEmulatorPrefix = "qemu-system-";
constexpr absl::Duration kProbeTimeout = timeouts::kFingerprintProbe;

// The facts file holds a few emulators' machine and device lists.
constexpr size_t kMaxFactsFileBytes = 4 << 20;

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

// The names of `found` that `allowlist` admits (all when it is empty).
std::vector<std::string> AllowedEmulators(const std::map<std::string, std::string>& found,
                                          const std::vector<std::string>& allowlist) {
  std::vector<std::string> allowed;
  for (const auto& [name, path] : found) {
    if (allowlist.empty() || std::find(allowlist.begin(), allowlist.end(), name) != allowlist.end()) {
      allowed.push_back(name);
    }
  }
  return allowed;
}

bool IsRegularFile(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::optional<FirmwareFiles> PresentFirmware(const FirmwareFiles& files) {
  if (IsRegularFile(files.code) && IsRegularFile(files.vars)) return files;
  return std::nullopt;
}

// `args` run on `path`, its output when it exits 0; empty otherwise (a probe
// that fails only leaves that list empty).
std::string ProbeOutput(const std::string& path, const std::vector<std::string>& args) {
  std::vector<std::string> argv = {path};
  argv.insert(argv.end(), args.begin(), args.end());
  absl::StatusOr<CommandResult> result = RunCommand(argv, kProbeTimeout);
  return result.ok() && result->exit_code == 0 ? std::move(result->output) : std::string();
}

std::vector<std::string> SortedUnique(std::vector<std::string> names) {
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  return names;
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

std::vector<std::string> ParseMachineList(absl::string_view machine_help_output) {
  std::vector<std::string> out;
  for (absl::string_view line : absl::StrSplit(machine_help_output, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    // The header ("Supported machines are:") is the one line ending in a colon.
    if (line.empty() || absl::EndsWith(line, ":")) continue;
    out.emplace_back(line.substr(0, line.find_first_of(" \t")));
  }
  return SortedUnique(std::move(out));
}

std::vector<std::string> ParseNetDeviceList(absl::string_view device_help_output) {
  std::vector<std::string> out;
  bool in_section = false;
  for (absl::string_view line : absl::StrSplit(device_help_output, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (absl::EndsWith(line, ":") && !absl::StartsWith(line, "name ")) {
      in_section = line == "Network devices:";  // each section starts with such a title
      continue;
    }
    if (!in_section) continue;
    // name "e1000", bus PCI, alias "e1000-82540em", desc "Intel Gigabit Ethernet"
    for (absl::string_view key : {"name \"", "alias \""}) {
      const size_t at = line.find(key);
      // A field of its own: at the start or after ", ", not inside a description.
      const bool field = at == 0 || (at != absl::string_view::npos && at >= 2 && line.substr(at - 2, 2) == ", ");
      if (!field) continue;
      absl::string_view value = line.substr(at + key.size());
      const size_t end = value.find('"');
      if (end != absl::string_view::npos && end > 0) out.emplace_back(value.substr(0, end));
    }
  }
  return SortedUnique(std::move(out));
}

bool KvmUsable(const std::string& device) {
  const int fd = ::open(device.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return false;
  const int version = ::ioctl(fd, KVM_GET_API_VERSION, 0);
  ::close(fd);
  return version == KVM_API_VERSION;
}

Fingerprinter::Fingerprinter(std::string path_env, std::string kvm_device, FirmwarePaths firmware)
    : path_dirs_(absl::StrSplit(path_env, ':', absl::SkipEmpty())),
      kvm_device_(std::move(kvm_device)),
      firmware_(std::move(firmware)) {}

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

std::optional<Fingerprinter::BinaryFacts> Fingerprinter::KnownFacts(const std::string& path) {
  const FileIdentity identity = FileIdentity::OfPath(path);
  absl::MutexLock lock(&mu_);
  if (auto it = facts_.find(path); it != facts_.end() && it->second.identity == identity) return it->second;
  return std::nullopt;
}

Fingerprinter::BinaryFacts Fingerprinter::FactsFor(const std::string& path) {
  const FileIdentity identity = FileIdentity::OfPath(path);
  {
    absl::MutexLock lock(&mu_);
    // Another caller probing this binary: its answer is ours too.
    auto not_probing = [this, &path]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return probing_.count(path) == 0; };
    mu_.Await(absl::Condition(&not_probing));
    if (auto it = facts_.find(path); it != facts_.end() && it->second.identity == identity) {
      return it->second;
    }
    ++probes_;
    probing_.insert(path);
  }
  // Run without the lock: a hung binary must not hold up every other caller
  // for kProbeTimeout per command.
  BinaryFacts facts = RunProbes(path);
  facts.identity = identity;
  absl::MutexLock lock(&mu_);
  probing_.erase(path);
  facts_[path] = facts;
  SaveFacts();
  return facts;
}

void Fingerprinter::KeepFactsIn(const std::string& path) {
  std::optional<std::string> text = ReadSmallFile(path, nullptr, kMaxFactsFileBytes);
  absl::MutexLock lock(&mu_);
  facts_file_ = path;
  if (text) LoadFacts(*text);
}

namespace {

nlohmann::json IdentityJson(const FileIdentity& id) {
  return nlohmann::json::array({id.device, id.inode, id.size, id.mtime_ns, id.ctime_ns});
}

}  // namespace

void Fingerprinter::SaveFacts() {
  if (facts_file_.empty()) return;
  nlohmann::json emulators = nlohmann::json::object();
  for (const auto& [path, f] : facts_) {
    if (!f.error.empty()) continue;  // a failure is worth trying again next launch
    emulators[path] = {{"identity", IdentityJson(f.identity)},
                       {"version", f.version},
                       {"accelerators", f.accelerators},
                       {"machines", f.machines},
                       {"net_devices", f.net_devices}};
  }
  nlohmann::json doc = {{"format", 1}, {"emulators", emulators}};
  if (!swtpm_.path.empty()) {
    doc["swtpm"] = {{"path", swtpm_.path},
                    {"identity", IdentityJson(swtpm_.identity)},
                    {"runs", swtpm_.runs}};
  }
  if (absl::Status written = WriteSmallFileAtomically(facts_file_, doc.dump()); !written.ok()) {
    nomadplugin::hclog::Warn("cannot keep the host's probed facts", {{"error", std::string(written.message())}});
  }
}

void Fingerprinter::LoadFacts(const std::string& text) {
  const nlohmann::json doc = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!doc.is_object() || doc.value("format", 0) != 1) return;
  auto identity_of = [](const nlohmann::json& j, FileIdentity* out) {
    if (!j.is_array() || j.size() != 5) return false;
    for (const nlohmann::json& part : j) {
      if (!part.is_number_integer()) return false;
    }
    *out = FileIdentity{j[0].get<uint64_t>(), j[1].get<uint64_t>(), j[2].get<uint64_t>(), j[3].get<int64_t>(),
                          j[4].get<int64_t>()};
    return true;
  };
  auto strings = [](const nlohmann::json& j, std::vector<std::string>* out) {
    if (!j.is_array()) return false;
    for (const nlohmann::json& item : j) {
      if (!item.is_string()) return false;
      out->push_back(item.get<std::string>());
    }
    return true;
  };
  const nlohmann::json emulators = doc.value("emulators", nlohmann::json::object());
  for (const auto& [path, entry] : emulators.items()) {
    BinaryFacts f;
    if (!entry.is_object() || !identity_of(entry.value("identity", nlohmann::json()), &f.identity) ||
        !entry.value("version", nlohmann::json()).is_string() ||
        !strings(entry.value("accelerators", nlohmann::json()), &f.accelerators) ||
        !strings(entry.value("machines", nlohmann::json()), &f.machines) ||
        !strings(entry.value("net_devices", nlohmann::json()), &f.net_devices)) {
      continue;
    }
    f.version = entry["version"].get<std::string>();
    // Kept only while the binary is the one probed; else probed again when asked.
    if (FileIdentity::OfPath(path) == f.identity) facts_[path] = std::move(f);
  }
  const nlohmann::json swtpm = doc.value("swtpm", nlohmann::json());
  SwtpmFacts t;
  if (swtpm.is_object() && swtpm.value("path", nlohmann::json()).is_string() &&
      swtpm.value("runs", nlohmann::json()).is_boolean() &&
      identity_of(swtpm.value("identity", nlohmann::json()), &t.identity)) {
    t.path = swtpm["path"].get<std::string>();
    t.runs = swtpm["runs"].get<bool>();
    if (FileIdentity::OfPath(t.path) == t.identity) swtpm_ = t;
  }
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
    facts.accelerators = ParseAcceleratorList(ProbeOutput(path, {"-accel", "help"}));
    facts.machines = ParseMachineList(ProbeOutput(path, {"-machine", "help"}));
    facts.net_devices = ParseNetDeviceList(ProbeOutput(path, {"-device", "help"}));
  }
  return facts;
}

std::string Fingerprinter::UsableSwtpm() {
  std::string path;
  for (const std::string& dir : path_dirs_) {
    if (IsExecutableFile(dir + "/swtpm")) {
      path = dir + "/swtpm";
      break;
    }
  }
  if (path.empty()) return "";
  const FileIdentity identity = FileIdentity::OfPath(path);
  {
    absl::MutexLock lock(&mu_);
    if (swtpm_.path == path && swtpm_.identity == identity) return swtpm_.runs ? path : "";
    ++probes_;
  }
  // A binary that cannot even print its version (a broken libtpms, say) would
  // fail every TPM job's start; better not to advertise it.
  const bool runs = absl::StrContains(ProbeOutput(path, {"--version"}), "TPM emulator");
  absl::MutexLock lock(&mu_);
  swtpm_ = SwtpmFacts{path, identity, runs};
  SaveFacts();
  return runs ? path : "";
}

Fingerprint Fingerprinter::Probe(const std::vector<std::string>& emulators_allowlist) {
  Fingerprint fp;
  const std::map<std::string, std::string> found = Emulators();
  if (found.empty()) {
    fp.description = "no qemu-system-* binary found on PATH (" + absl::StrJoin(path_dirs_, ":") + ")";
    return fp;
  }
  const std::vector<std::string> allowed = AllowedEmulators(found, emulators_allowlist);
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
  fp.attributes["driver.qemu.machines"] = absl::StrJoin(facts.machines, ",");
  // Set only when present, so a constraint on `true` is the whole test.
  if (PresentFirmware(firmware_.uefi)) fp.attributes["driver.qemu.firmware.uefi"] = true;
  if (PresentFirmware(firmware_.secure_boot)) fp.attributes["driver.qemu.firmware.secure_boot"] = true;
  if (!UsableSwtpm().empty()) fp.attributes["driver.qemu.tpm"] = true;
  return fp;
}

HostCapabilities Fingerprinter::CapabilitiesOf(const std::map<std::string, std::string>& emulators,
                                               const FactsSource& facts_of) {
  HostCapabilities caps;
  for (const auto& [name, path] : emulators) {
    caps.emulators[name] = path;
    const std::optional<BinaryFacts> facts = facts_of(name, path);
    if (!facts || !facts->error.empty()) continue;
    caps.machines[name] = facts->machines;
    caps.net_devices[name] = facts->net_devices;
    caps.versions[name] = facts->version;
  }
  caps.uefi = PresentFirmware(firmware_.uefi);
  caps.secure_boot = PresentFirmware(firmware_.secure_boot);
  caps.swtpm = UsableSwtpm();
  return caps;
}

HostCapabilities Fingerprinter::Capabilities(const std::vector<std::string>& emulators_allowlist) {
  const std::map<std::string, std::string> found = Emulators();
  std::map<std::string, std::string> allowed;
  for (const std::string& name : AllowedEmulators(found, emulators_allowlist)) allowed[name] = found.at(name);
  return CapabilitiesOf(allowed, [this](const std::string&, const std::string& path) {
    return std::optional<BinaryFacts>(FactsFor(path));
  });
}

HostCapabilities Fingerprinter::CapabilitiesFor(const std::string& emulator) {
  return CapabilitiesOf(Emulators(), [this, &emulator](const std::string& name, const std::string& path) {
    return name == emulator ? std::optional<BinaryFacts>(FactsFor(path)) : KnownFacts(path);
  });
}

void Fingerprinter::WarmUp(const std::vector<std::string>& emulators_allowlist) {
  const std::map<std::string, std::string> found = Emulators();
  const std::vector<std::string> allowed = AllowedEmulators(found, emulators_allowlist);
  if (!allowed.empty()) FactsFor(found.at(PrimaryEmulator(allowed)));
  UsableSwtpm();
  for (const auto& [name, path] : found) FactsFor(path);
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
