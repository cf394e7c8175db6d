#include "vm/share_dirs.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "base/error_kind.h"
#include "qemu/hardware_plan.h"

namespace ndq {
namespace {

constexpr char kAllocDirsField[] = "task config \"share_alloc_dirs\"";

// Opens `relative` (components separated by '/') under `root` without
// following a symbolic link at any step; each step must be a directory.
absl::StatusOr<UniqueFd> OpenBelow(int root, const std::string& relative, const std::string& what) {
  UniqueFd dir(::fcntl(root, F_DUPFD_CLOEXEC, 0));
  if (!dir.valid()) return ErrnoError("cannot open the alloc dir", errno);
  for (absl::string_view part : absl::StrSplit(relative, '/')) {
    const std::string component(part);
    UniqueFd next(::openat(dir.get(), component.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (!next.valid()) {
      const int err = errno;
      struct stat st;
      if (::fstatat(dir.get(), component.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(st.st_mode)) {
        return absl::InvalidArgumentError(absl::StrCat(kAllocDirsField, ": ", what,
                                                       " is a symbolic link, not the directory Nomad made; "
                                                       "refusing to share it"));
      }
      if (err == ENOENT) {
        return absl::InvalidArgumentError(absl::StrCat(kAllocDirsField, ": ", what, " does not exist"));
      }
      if (err == ENOTDIR) {
        return absl::InvalidArgumentError(absl::StrCat(kAllocDirsField, ": ", what, " is not a directory"));
      }
      return ErrnoError(absl::StrCat(kAllocDirsField, ": cannot open ", what), err);
    }
    dir = std::move(next);
  }
  return dir;
}

// Nomad's path, links and all (an operator's host volume may well be a link),
// opened in one step so what is checked is what QEMU gets; it must be a
// directory.
absl::StatusOr<UniqueFd> OpenVolume(const Share& share) {
  const std::string field = absl::StrCat("volume mount ", Quoted(share.tag));
  UniqueFd dir(::open(share.host_path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir.valid()) return dir;
  const int err = errno;
  if (err == ENOENT) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": host path ", Quoted(share.host_path), " does not exist"));
  }
  if (err == ENOTDIR) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": host path ", Quoted(share.host_path), " is not a directory"));
  }
  return ErrnoError(absl::StrCat(field, ": cannot open host path ", Quoted(share.host_path)), err);
}

// What the guest is told about a share in messages.
std::string ShareField(const Share& share) {
  if (share.origin == ShareOrigin::kVolume) return absl::StrCat("volume mount ", Quoted(share.tag));
  return kAllocDirsField;
}
std::string ShareWhat(const Share& share) {
  if (share.origin == ShareOrigin::kVolume) return absl::StrCat("host path ", Quoted(share.host_path));
  return share.tag == "alloc" ? "the alloc's alloc/" : absl::StrCat("the task's ", share.tag, "/");
}

// POSIX permission bits for `uid` in `groups`: owner, else group, else other.
bool MayReadAndSearch(const struct stat& st, uid_t uid, const std::vector<gid_t>& groups) {
  mode_t bits = st.st_mode & 07;
  if (st.st_uid == uid) {
    bits = (st.st_mode >> 6) & 07;
  } else if (std::find(groups.begin(), groups.end(), st.st_gid) != groups.end()) {
    bits = (st.st_mode >> 3) & 07;
  }
  return (bits & 05) == 05;
}

}  // namespace

absl::Status CheckSharesReadable(const std::vector<Share>& shares, const std::vector<int>& dirs,
                                 const std::string& user_name) {
  if (user_name.empty() || shares.empty()) return absl::OkStatus();
  const passwd* pw = ::getpwnam(user_name.c_str());
  if (pw == nullptr) return absl::InvalidArgumentError(absl::StrCat("QEMU's user ", Quoted(user_name), " does not exist"));
  const uid_t uid = pw->pw_uid;
  int count = 64;
  std::vector<gid_t> groups(static_cast<size_t>(count));
  if (::getgrouplist(pw->pw_name, pw->pw_gid, groups.data(), &count) < 0) {
    groups.resize(static_cast<size_t>(count));
    ::getgrouplist(pw->pw_name, pw->pw_gid, groups.data(), &count);
  }
  groups.resize(static_cast<size_t>(std::max(count, 0)));
  for (size_t i = 0; i < shares.size() && i < dirs.size(); ++i) {
    struct stat st;
    if (::fstat(dirs[i], &st) != 0) return ErrnoError(absl::StrCat(ShareField(shares[i]), ": cannot stat"), errno);
    if (uid == 0 || MayReadAndSearch(st, uid, groups)) continue;
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return ConfigError(absl::StrCat(ShareField(shares[i]), ": QEMU's user ", Quoted(user_name), " cannot read ",
                                    ShareWhat(shares[i]), " (mode ", mode, ", owner uid ", st.st_uid,
                                    "); it needs r-x there"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<UniqueFd>> OpenShareDirs(const std::vector<Share>& shares, const std::string& alloc_dir) {
  std::vector<UniqueFd> dirs;
  if (shares.empty()) return dirs;
  UniqueFd alloc;
  for (const Share& share : shares) {
    if (share.origin == ShareOrigin::kVolume) {
      absl::StatusOr<UniqueFd> dir = OpenVolume(share);
      if (!dir.ok()) return dir.status();
      dirs.push_back(*std::move(dir));
      continue;
    }
    if (!alloc.valid()) {
      // The alloc dir itself is Nomad's (client data_dir), links and all.
      alloc.reset(::open(alloc_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
      if (!alloc.valid()) return ErrnoError(absl::StrCat(kAllocDirsField, ": cannot open the alloc dir"), errno);
    }
    const std::string what = share.tag == "alloc" ? "the alloc's alloc/" : absl::StrCat("the task's ", share.tag, "/");
    absl::StatusOr<UniqueFd> dir = OpenBelow(alloc.get(), share.host_path, what);
    if (!dir.ok()) return dir.status();
    dirs.push_back(*std::move(dir));
  }
  return dirs;
}

}  // namespace ndq
