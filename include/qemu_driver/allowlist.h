// What a job may point QEMU at: its disk image (inside the allocation or an
// operator-approved directory, after resolving symlinks), the options in its
// `args` (the plugin's args_allowlist) and its emulator (emulators_allowlist).
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ndq {

// The real path of the task's `image_path`: relative paths are taken from the
// task dir (QEMU's working directory), then every symlink and `..` is resolved.
// It must exist, be a regular file or block device, and lie inside `alloc_dir`
// or one of `allowed_dirs` (whole path components: /srv/images2 is not inside
// /srv/images). Errors name image_path, the given path and where it resolved.
absl::StatusOr<std::string> ResolveImagePath(const std::string& image_path, const std::string& task_dir,
                                             const std::string& alloc_dir,
                                             const std::vector<std::string>& allowed_dirs);

// With an empty allowlist everything passes (Nomad's behaviour). Otherwise
// every option (`-opt` or `--opt`; allowlist entries in either form) must be
// listed, the value after an option that takes one is skipped, and a bare
// argument in option position (QEMU would open it as a disk image) is refused.
absl::Status CheckArgsAllowed(const std::vector<std::string>& args, const std::vector<std::string>& allowlist);

// `emulator` and the entries may each be "x86_64" or "qemu-system-x86_64".
absl::Status CheckEmulatorAllowed(const std::string& emulator, const std::vector<std::string>& allowlist);

// Whether QEMU 7.2 reads the argument after option `name` (without dashes) as
// its value. Unknown names are assumed to take one.
bool QemuOptionTakesValue(const std::string& name);

// True when `args`, read as QEMU reads them, use option `name` (without
// dashes) as an option rather than as some other option's value.
bool ArgsUseOption(const std::vector<std::string>& args, const std::string& name);

}  // namespace ndq
