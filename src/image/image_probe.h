// What a disk image is before QEMU opens it: its format, and every file it
// makes QEMU open besides itself (its backing chain), so those can be held to
// the same allowlist as image_path.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "policy/allowlist.h"
#include "base/unique_fd.h"

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

// The format of a downloaded image, which must stand alone: a job controls
// its content, so a backing file it names (read as root before any admission)
// or an external data file is refused, and nothing but the file is opened.
absl::StatusOr<std::string> ProbeStandaloneFormat(const std::string& path);

// The size the guest sees of the open image `fd` in `format`: raw is the
// file; qcow2 says it in its header; anything else asks qemu-img about the
// open file (never the backing chain).
absl::StatusOr<int64_t> ImageVirtualSize(int fd, const std::string& format);

// One file of a disk: the image itself or one of its backing files, open.
struct DiskLayer {
  std::string path;    // real path, for messages and the driver state
  std::string format;  // QEMU block driver: "qcow2", "raw", ...
  UniqueFd fd;
  bool writable = false;  // only the top layer is ever written
};

// The disk QEMU gets: `top` (admitted for `field`) and every backing file it
// names, each admitted through the same scope and opened, nearest first. The
// chain is read from the open files, so nothing is probed by path twice.
// `top_format` overrides the probed format of the top layer (image_format);
// a raw top has no backing chain. Backing files are opened read-only.
absl::StatusOr<std::vector<DiskLayer>> OpenImageChain(AdmittedFile top, const std::string& top_format,
                                                      const std::string& field, const AdmissionScope& scope);

}  // namespace ndq
