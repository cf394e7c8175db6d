// What a job may point QEMU at: its disk image (inside the allocation or an
// operator-approved directory, after resolving symlinks), the options in its
// `args` (the plugin's args_allowlist) and its emulator (emulators_allowlist).
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "base/unique_fd.h"

namespace ndq {

// Where a task's files may come from: its task dir (relative paths are taken
// from there, QEMU's working directory), its allocation dir, and the
// operator's directories (image_paths).
struct AdmissionScope {
  std::string task_dir;
  std::string alloc_dir;
  std::vector<std::string> allowed_dirs;
};

// A file a task may use, opened by the driver. QEMU gets `fd` rather than the
// path, so what was checked is what it reads.
struct AdmittedFile {
  std::string path;  // real path: no symlinks, no ".."
  UniqueFd fd;       // O_CLOEXEC; read-write when asked and possible
  bool writable = false;
};

enum class FileAccess { kReadOnly, kReadWriteIfPossible };

// The one admission path for every file a task config names (`field` is its
// option name, for messages). The path is resolved (symlinks, "..") and must
// lie inside the scope (whole path components: /srv/images2 is not inside
// /srv/images; an allowed entry may also name one file); only then is it
// opened, without following any symlink, so a swap between check and open
// fails instead of escaping; the open file's own path is checked again. It
// must be a regular file or block device. A path that is missing, loops, or
// resolves outside gets one and the same answer, which reveals nothing about
// files outside the scope.
absl::StatusOr<AdmittedFile> AdmitFile(const std::string& field, const std::string& path, const AdmissionScope& scope,
                                       FileAccess access);

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
