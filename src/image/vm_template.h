// Warm-start templates in the image cache: a VM saved once its guest was
// ready (its RAM, QEMU's device state and its disk as a frozen qcow2 layer),
// stored as the directory <cache>/tpl-<key>, published atomically (rename),
// checked before use, counted and evicted with the images (image_cache.h).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/unique_fd.h"

namespace ndq {

// Everything that shapes the saved VM. The key is a hash of all of it; the
// parts are kept in the template's manifest so a miss can say what changed.
// A template carries whatever its guest did and made (files, host keys,
// tokens), so it never leaves the task it was saved from: the job (its
// namespace and ID), the task group and the task are part of the key.
struct TemplateOwner {
  std::string namespace_name;
  std::string job_id;
  std::string task_group;
  std::string task;
  bool operator==(const TemplateOwner& o) const {
    return namespace_name == o.namespace_name && job_id == o.job_id && task_group == o.task_group && task == o.task;
  }
  std::string Describe() const;  // "task \"web\" of job \"shop\" (group \"g\", namespace \"default\")"
};

struct TemplateIdentity {
  TemplateOwner owner;        // its earlier templates also explain a miss
  std::string image_digest;   // the boot image's content (ContentDigest of every layer)
  std::string config_digest;  // the planned VM: argv without per-task paths and ports, QEMU's user
  std::string qemu_version;
  std::string machine;
  int64_t memory_mb = 0;
  std::string Key() const;  // 64 hex
};

// The files of a template.
inline constexpr char kTemplateRam[] = "ram";            // the guest's RAM, mapped copy-on-write
inline constexpr char kTemplateState[] = "state";        // QEMU's migration stream (x-ignore-shared: no RAM)
inline constexpr char kTemplateDisk[] = "disk.qcow2";    // the boot disk's writes up to the save, read-only
inline constexpr char kTemplateOverlay[] = "overlay.qcow2";  // an empty overlay on disk.qcow2, copied per task
inline constexpr char kTemplatePrefix[] = "tpl-";

// A template checked and opened for one restore (files read-only).
struct OpenedTemplate {
  std::string key;
  std::string dir;
  UniqueFd ram, state, disk;
  int64_t ram_bytes = 0;
};

// xxh3-128 of an open file's whole content, hex. Remembered per file
// identity (device, inode, size, mtime, ctime) for the process's lifetime:
// any write changes the ctime, so a changed file is hashed again.
absl::StatusOr<std::string> ContentDigest(int fd);

// Keeps the digests of files of at least kKeptDigestMinBytes (images,
// template files) in `path` as well: loaded now, rewritten atomically when
// one is added. A newly launched plugin then hashes no unchanged image or
// template file again: the identity (with the ctime, which only the kernel
// sets) proves the file is the one that was hashed.
inline constexpr int64_t kKeptDigestMinBytes = 1 << 20;
void KeepDigestsIn(const std::string& path);

class TemplateStore {
 public:
  explicit TemplateStore(std::string cache_dir) : dir_(std::move(cache_dir)) {}

  std::string DirFor(const std::string& key) const { return dir_ + "/" + kTemplatePrefix + key; }

  // The template for `id`, every file checked against the manifest (size and
  // checksum). NotFound: none; the message says why, comparing with the
  // owner's latest template ("the image changed", ...). DataLoss: it failed
  // its check and was removed.
  absl::StatusOr<OpenedTemplate> Open(const TemplateIdentity& id) const;

  // Removes a template (a restore that failed on it).
  void Remove(const std::string& key) const;

  // Removes every template written in another format than this build's
  // (whose key does not hold what this build's key holds, e.g. the job);
  // returns how many. Such a template could never be found by its key, and
  // must never be taken by a start that computes an old key.
  int RemoveOtherFormats() const;

  // Builds one template in a staging directory; nothing is visible under
  // tpl-<key> until Publish. Dropped unpublished, the staging is removed.
  class Writer {
   public:
    Writer(const TemplateStore& store, TemplateIdentity id);
    ~Writer();
    Writer(const Writer&) = delete;
    Writer& operator=(const Writer&) = delete;

    absl::Status Begin();
    // Copies `bytes` of `fd` from offset 0 as `name` (holes for zero runs).
    absl::Status CopyFd(const std::string& name, int fd, int64_t bytes);
    // Makes the empty per-task overlay on the frozen disk (virtual size `disk_size`).
    absl::Status MakeOverlay(int64_t disk_size);
    // An unprivileged QEMU user must own the RAM file (see Publish).
    void GiveRamTo(uid_t uid, gid_t gid);
    // Writes the manifest and renames the staging into place. A template
    // published meanwhile by another start wins; this one is dropped.
    absl::Status Publish();
    int64_t bytes(const std::string& name) const;

   private:
    struct File {
      std::string name;
      int64_t bytes = 0;
      std::string digest;
    };
    const TemplateStore& store_;
    TemplateIdentity id_;
    std::string staging_;
    std::vector<File> files_;
    std::optional<std::pair<uid_t, gid_t>> ram_owner_;
    bool published_ = false;
  };

 private:
  // What changed since the owner's latest template, for a miss.
  std::string ExplainMiss(const TemplateIdentity& id) const;

  std::string dir_;
};

}  // namespace ndq
