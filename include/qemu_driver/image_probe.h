// What a disk image is before QEMU opens it: its format, and every file it
// makes QEMU open besides itself (its backing chain), so those can be held to
// the same allowlist as image_path.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace ndq {

struct ImageInfo {
  std::string format;                  // "qcow2", "raw", "vmdk", ...
  std::vector<std::string> backing;    // backing files, nearest first, absolute
};

// qcow2 images (the common case) are read from their header directly, in
// microseconds; any other image is described by `qemu-img info`. Backing files
// given as protocols ("json:", "nbd://") and qcow2 external data files are
// refused: they would let an image reach outside the allowed directories.
absl::StatusOr<ImageInfo> ProbeImage(const std::string& path);

}  // namespace ndq
