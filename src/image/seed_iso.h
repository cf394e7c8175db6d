// The cloud-init NoCloud seed: an ISO 9660 image labelled "cidata" holding
// user-data and meta-data (and network-config, vendor-data when given), which
// the VM sees as a read-only disk. cloud-init in the guest finds it by its
// label and reads the files by name, so the names must come through exactly:
// the image carries Rock Ridge and Joliet names beside the 8.3 ones.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ndq {

struct SeedFiles {
  std::string user_data;                      // "user-data", always written (may be empty)
  std::string meta_data;                      // "meta-data", always written
  std::optional<std::string> network_config;  // "network-config" when set
  std::optional<std::string> vendor_data;     // "vendor-data" when set
};

// Keys longer than this are refused (real ones are a few hundred bytes).
inline constexpr size_t kMaxSshKeyBytes = 16 * 1024;

// NoCloud meta-data for a job that gives none: instance-id and local-hostname,
// and `public-keys` (which cloud-init gives the default user) when keys are
// given. Every value is written as a JSON string, which is also a YAML
// double-quoted scalar, so no value can change the document's structure.
std::string DefaultMetaData(const std::string& instance_id, const std::string& hostname,
                            const std::vector<std::string>& ssh_keys);

// The job's own meta-data with a `public-keys` block appended (unchanged when
// `keys` is empty). InvalidArgument naming cloud_init.ssh_authorized_keys when
// the meta-data is JSON (starts with '{') or already has a top-level
// public-keys key: merging into either is not something text can do safely.
absl::StatusOr<std::string> AddSshKeys(const std::string& meta_data, const std::vector<std::string>& keys);

// One authorized key: a single line, no control characters, at most
// kMaxSshKeyBytes, starting with a known type ("ssh-", "ecdsa-", "sk-").
// InvalidArgument naming cloud_init.ssh_authorized_keys[index] otherwise.
absl::Status CheckSshKey(const std::string& key, size_t index);

// Writes the seed image to `path`, replacing any file there. The image is
// built in a temporary file beside `path` and renamed over it, so `path` is
// either the old file or the whole new image, and a failure leaves no
// temporary file behind. The image is the same bytes for the same files.
absl::Status WriteSeedIso(const SeedFiles& files, const std::string& path);

}  // namespace ndq
