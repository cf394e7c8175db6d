// The start's half of shares (qemu/share_plan plans them): each share's
// directory opened for QEMU, which gets it as /proc/self/fd/N (the 9p "local"
// backend opens its root once by name and resolves everything below it
// relative to that fd, so what was checked is what the guest sees).
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/unique_fd.h"
#include "qemu/vm_spec.h"

namespace ndq {

// One open directory per share, in order. An alloc dir must be the directory
// Nomad made: each component below `alloc_dir` is opened without following
// symbolic links, so a local/ that an artifact or template replaced with a
// link elsewhere is refused. A volume's host_path (Nomad's) is opened
// following links and must be a directory. Errors name the option or mount, never a link's target.
absl::StatusOr<std::vector<UniqueFd>> OpenShareDirs(const std::vector<Share>& shares, const std::string& alloc_dir);

// Whether QEMU's user (`user_name`; empty: root, nothing to check) may open
// each share's root, `dirs[i]` the driver's open fd of shares[i]: QEMU
// reopens it as that user and needs read and search (r-x), judged by the mode
// bits against the user's uid and groups (ACLs are not read). Without this a
// share it cannot open fails QEMU's start naming only /proc/self/fd/N.
// Write permission is not required: a root the user cannot write (Nomad's
// alloc/ is 0755 root) is shared, and the guest's writes there fail.
absl::Status CheckSharesReadable(const std::vector<Share>& shares, const std::vector<int>& dirs,
                                 const std::string& user_name);

}  // namespace ndq
