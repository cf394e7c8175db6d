// What this host offers for running VMs: which qemu-system emulators are on
// PATH, their version, accelerators, machine types and NIC models, whether
// /dev/kvm is usable, UEFI firmware and swtpm. These become the node
// attributes job constraints match on (driver.qemu.*) and the
// HostCapabilities that planning checks a job against.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <variant>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "base/file_identity.h"
#include "host/capabilities.h"

namespace ndq {

using AttributeValue = std::variant<bool, int64_t, std::string>;

struct Fingerprint {
  enum class Health { kUndetected, kUnhealthy, kHealthy };
  Health health = Health::kUndetected;
  std::string description;
  std::map<std::string, AttributeValue> attributes;

  bool operator==(const Fingerprint& other) const {
    return health == other.health && description == other.description && attributes == other.attributes;
  }
  bool operator!=(const Fingerprint& other) const { return !(*this == other); }
};

// "QEMU emulator version 7.2.22 (Debian ...)" -> "7.2.22"; empty when absent.
std::string ParseQemuVersion(absl::string_view version_output);

// Names listed by `qemu-system-* -accel help`, e.g. {"kvm", "tcg"}.
std::vector<std::string> ParseAcceleratorList(absl::string_view accel_help_output);

// Machine type names from `qemu-system-* -machine help`: the first column of
// each row, aliases ("pc", "q35") included, sorted.
std::vector<std::string> ParseMachineList(absl::string_view machine_help_output);

// NIC models from the "Network devices:" section of `qemu-system-* -device
// help`: each device's name and its alias when it has one (both are valid
// -device values, e.g. "virtio-net-pci" and "virtio-net"), sorted.
std::vector<std::string> ParseNetDeviceList(absl::string_view device_help_output);

// True when `device` opens read-write and answers the KVM API version ioctl.
bool KvmUsable(const std::string& device);

// Where UEFI firmware is looked for. The defaults are Debian 12's ovmf package
// (4 MiB builds); a flavour counts when both its files are regular files.
struct FirmwarePaths {
  FirmwareFiles uefi = {"/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"};
  FirmwareFiles secure_boot = {"/usr/share/OVMF/OVMF_CODE_4M.secboot.fd", "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"};
};

class Fingerprinter {
 public:
  // `path_env` is searched like PATH (for emulators and swtpm); `kvm_device`
  // is normally /dev/kvm.
  Fingerprinter(std::string path_env, std::string kvm_device, FirmwarePaths firmware = {});

  // Safe to call often: a binary is executed again only when its file changed.
  Fingerprint Probe(const std::vector<std::string>& emulators_allowlist);

  // Every qemu-system-* on PATH: emulator name ("x86_64") -> binary path.
  std::map<std::string, std::string> Emulators();

  // The emulators in `emulators_allowlist` (all when it is empty) with their
  // machine types and NIC models, firmware and swtpm. Emulators whose probe
  // failed are listed without machines or NIC models. Binaries are run only
  // when they changed, as for Probe.
  HostCapabilities Capabilities(const std::vector<std::string>& emulators_allowlist);

  // What one start needs, without running every emulator on PATH: all
  // emulators are listed, but only `emulator` ("x86_64") is probed when its
  // facts are not known yet; the others carry facts only when already known.
  HostCapabilities CapabilitiesFor(const std::string& emulator);

  // Probes what is not known yet: the primary emulator first (the one the
  // fingerprint reports), then the others and swtpm. Run in the background at
  // launch, so neither the first Fingerprint nor a StartTask waits for it.
  void WarmUp(const std::vector<std::string>& emulators_allowlist);

  // Keeps what probing found in `path` (JSON, written atomically), keyed by
  // each binary's path and identity, and loads what is there now: a newly
  // launched plugin runs a binary again only when it changed.
  void KeepFactsIn(const std::string& path);

  // How many times a binary was probed (an emulator: run with --version,
  // -accel help, -machine help and -device help; swtpm: with --version).
  int binary_probes() const;

 private:
  struct BinaryFacts {
    FileIdentity identity;
    std::string version;  // empty when it could not be read
    std::string error;    // why, for the health description
    std::vector<std::string> accelerators;
    std::vector<std::string> machines;
    std::vector<std::string> net_devices;
  };
  struct SwtpmFacts {
    std::string path;
    FileIdentity identity;
    bool runs = false;  // `swtpm --version` succeeded
  };

  // emulator name ("x86_64") -> binary path, first match on PATH wins.
  std::map<std::string, std::string> FindEmulators() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // qemu-system-* names in one directory, listed again only when its mtime changes.
  const std::vector<std::string>& EmulatorNamesIn(const std::string& dir) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Cached per binary identity; the binary runs only on a miss, without mu_,
  // and once however many callers miss at the same time.
  BinaryFacts FactsFor(const std::string& path) ABSL_LOCKS_EXCLUDED(mu_);
  // The cached facts of `path` if its binary is unchanged since.
  std::optional<BinaryFacts> KnownFacts(const std::string& path) ABSL_LOCKS_EXCLUDED(mu_);
  // The facts of one emulator (name, binary path) for CapabilitiesOf; nullopt: list it without them.
  using FactsSource = std::function<std::optional<BinaryFacts>(const std::string&, const std::string&)>;
  // `emulators` with the facts `facts_of` gives, firmware and swtpm.
  HostCapabilities CapabilitiesOf(const std::map<std::string, std::string>& emulators, const FactsSource& facts_of)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Writes facts_ and swtpm_ to facts_file_ (when set).
  void SaveFacts() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void LoadFacts(const std::string& text) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static BinaryFacts RunProbes(const std::string& path);
  // The swtpm binary on PATH when it runs; empty otherwise. Run once per change.
  std::string UsableSwtpm() ABSL_LOCKS_EXCLUDED(mu_);

  const std::vector<std::string> path_dirs_;
  const std::string kvm_device_;
  const FirmwarePaths firmware_;
  mutable absl::Mutex mu_;
  std::map<std::string, BinaryFacts> facts_ ABSL_GUARDED_BY(mu_);
  std::set<std::string> probing_ ABSL_GUARDED_BY(mu_);  // binaries being run right now
  std::string facts_file_ ABSL_GUARDED_BY(mu_);
  struct DirListing {
    int64_t mtime_ns = -1;
    std::vector<std::string> names;
  };
  std::map<std::string, DirListing> listings_ ABSL_GUARDED_BY(mu_);
  SwtpmFacts swtpm_ ABSL_GUARDED_BY(mu_);
  int probes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace ndq
