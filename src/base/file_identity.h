// Which file, in which version: device, inode, size, mtime and ctime. Any
// write changes the ctime, which only the kernel sets, so an equal identity
// means the same unchanged file; what was learned from it (a digest, a
// binary's probed facts) still holds, also in a later process.
#pragma once

#include <sys/stat.h>

#include <cstdint>
#include <string>
#include <tuple>

namespace ndq {

struct FileIdentity {
  uint64_t device = 0, inode = 0, size = 0;
  int64_t mtime_ns = 0, ctime_ns = 0;

  static FileIdentity Of(const struct stat& st) {
    auto nanos = [](const timespec& t) { return static_cast<int64_t>(t.tv_sec) * 1000000000 + t.tv_nsec; };
    return FileIdentity{static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino),
                        static_cast<uint64_t>(st.st_size), nanos(st.st_mtim), nanos(st.st_ctim)};
  }
  // The identity of the file `path` names (links followed); all zero when it cannot be stat'ed.
  static FileIdentity OfPath(const std::string& path) {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0 ? Of(st) : FileIdentity{};
  }

  bool operator==(const FileIdentity& o) const { return Tied() == o.Tied(); }
  bool operator<(const FileIdentity& o) const { return Tied() < o.Tied(); }

 private:
  std::tuple<uint64_t, uint64_t, uint64_t, int64_t, int64_t> Tied() const {
    return {device, inode, size, mtime_ns, ctime_ns};
  }
};

}  // namespace ndq
