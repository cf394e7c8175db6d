#include "qemu/share_plan.h"

#include <algorithm>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "qemu/hardware_plan.h"

namespace ndq {
namespace {

constexpr char kAllocDirsField[] = "task config \"share_alloc_dirs\"";

std::string MountField(const VolumeMount& mount) { return absl::StrCat("volume mount ", Quoted(mount.task_path)); }

// A tag is what the guest types after `mount -t 9p`: kept to the characters
// of a path (Nomad's destinations are paths) so it needs no quoting in the
// guest's fstab, /proc/mounts or a shell, and holds nothing QEMU's option
// parser treats specially even before the builder doubles commas.
bool IsShareTag(const std::string& tag) {
  return !tag.empty() && std::all_of(tag.begin(), tag.end(), [](char c) {
    return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '/' || c == '.' || c == '_' || c == '-';
  });
}

void CheckTag(const std::string& field, const std::string& tag, std::set<std::string>& seen,
              std::vector<std::string>& problems) {
  if (!IsShareTag(tag)) {
    problems.push_back(absl::StrCat(field, ": the destination is the guest's 9p mount tag, which may hold only "
                                           "letters, digits and / . _ - (and must not be empty)"));
  } else if (tag.size() > kMaxShareTagBytes) {
    problems.push_back(absl::StrCat(field, ": the destination is the guest's 9p mount tag, at most ",
                                    kMaxShareTagBytes, " bytes in QEMU; this one has ", tag.size()));
  } else if (!seen.insert(tag).second) {
    problems.push_back(absl::StrCat(field, ": mount tag ", Quoted(tag),
                                    " is already used by another share (alloc, local, secrets or another volume)"));
  }
}

// A task name is one path component under the alloc dir (Nomad's rule too).
bool IsOneComponent(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos;
}

void PlanAllocDirs(const TaskRequest& task, std::set<std::string>& seen, VmSpec& spec,
                   std::vector<std::string>& problems) {
  if (task.alloc_dir.empty() || task.alloc_dir[0] != '/') {
    problems.push_back(absl::StrCat(kAllocDirsField, ": Nomad gave no absolute alloc dir"));
    return;
  }
  if (!IsOneComponent(task.identity.name)) {
    problems.push_back(absl::StrCat(kAllocDirsField, ": the task name ", Quoted(task.identity.name),
                                    " is not a directory name"));
    return;
  }
  const std::string& name = task.identity.name;
  // secrets/ is read-only: the guest reads what Nomad rendered there and
  // cannot change what other consumers of the task's secrets see.
  for (const Share& share : {Share{"alloc", ShareOrigin::kAllocDir, "alloc", false},
                             Share{"local", ShareOrigin::kAllocDir, name + "/local", false},
                             Share{"secrets", ShareOrigin::kAllocDir, name + "/secrets", true}}) {
    seen.insert(share.tag);
    spec.shares.push_back(share);
  }
}

void PlanVolume(const VolumeMount& mount, std::set<std::string>& seen, VmSpec& spec,
                std::vector<std::string>& problems) {
  const std::string field = MountField(mount);
  const size_t before = problems.size();
  CheckTag(field, mount.task_path, seen, problems);
  if (mount.host_path.empty() || mount.host_path[0] != '/') {
    problems.push_back(absl::StrCat(field, ": the host path Nomad gave is not absolute"));
  }
  if (problems.size() != before) return;
  spec.shares.push_back(Share{mount.task_path, ShareOrigin::kVolume, mount.host_path, mount.readonly});
}

}  // namespace

void PlanShares(const TaskConfig& config, const TaskRequest& task, VmSpec& spec, std::vector<std::string>& problems) {
  std::set<std::string> seen;
  if (config.share_alloc_dirs) PlanAllocDirs(task, seen, spec, problems);
  for (const VolumeMount& mount : task.mounts) PlanVolume(mount, seen, spec, problems);
}

}  // namespace ndq
