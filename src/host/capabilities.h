// What this host can give a VM beyond an emulator binary: the machine types
// and NIC models each emulator offers, UEFI firmware files and swtpm. The
// fingerprinter fills it in (host/fingerprint); planning a VM checks a job's
// options against it, so a job asking for what the host lacks is refused
// with the list of what it has.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace ndq {

// One UEFI firmware flavour: the read-only code and the template of the
// NVRAM variables each task gets its own copy of.
struct FirmwareFiles {
  std::string code;
  std::string vars;
  bool operator==(const FirmwareFiles& o) const { return code == o.code && vars == o.vars; }
};

struct HostCapabilities {
  std::map<std::string, std::string> emulators = {};                // "x86_64" -> binary path
  std::map<std::string, std::vector<std::string>> machines = {};     // emulator -> machine type names
  std::map<std::string, std::vector<std::string>> net_devices = {};  // emulator -> NIC device models
  std::optional<FirmwareFiles> uefi = {};         // OVMF, no Secure Boot
  std::optional<FirmwareFiles> secure_boot = {};  // OVMF's secboot code, Microsoft keys enrolled
  std::string swtpm = {};                         // swtpm binary; empty: no TPM on this host
  std::map<std::string, std::string> versions = {};  // emulator -> QEMU's version ("7.2.22")
};

}  // namespace ndq
