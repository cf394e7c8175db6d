// The files one start hands to QEMU, open, in the order QEMU receives them:
// the n-th file added is descriptor supervisor::kFirstPassedFd + n in QEMU's
// process. The start owns one table; each stage adds the files it opens and
// keeps their numbers in its own output (qemu/cmdline.h's QemuFiles), so no
// stage edits what another made.
#pragma once

#include <cstddef>
#include <utility>
#include <vector>

#include "base/unique_fd.h"
#include "qemu_driver/supervisor_protocol.h"

namespace ndq {

class FdTable {
 public:
  // Takes `fd`; returns its number in QEMU's process.
  int Add(UniqueFd fd) {
    fds_.push_back(std::move(fd));
    return supervisor::kFirstPassedFd + static_cast<int>(fds_.size()) - 1;
  }

  // The driver's own descriptor behind a number in QEMU's process; -1 for a
  // number this table did not hand out.
  int Local(int in_qemu) const {
    const int i = in_qemu - supervisor::kFirstPassedFd;
    return i >= 0 && i < static_cast<int>(fds_.size()) ? fds_[i].get() : -1;
  }

  // Whether `more` files still fit in what the supervisor can pass on.
  bool Fits(size_t more) const { return fds_.size() + more <= static_cast<size_t>(supervisor::kMaxPassedFds); }

  size_t size() const { return fds_.size(); }

  // Every descriptor in order, for the spawn that hands them over.
  std::vector<int> Locals() const {
    std::vector<int> out;
    for (const UniqueFd& fd : fds_) out.push_back(fd.get());
    return out;
  }

  // Once QEMU holds them, ours would only keep the files open.
  void Close() { fds_.clear(); }

 private:
  std::vector<UniqueFd> fds_;
};

}  // namespace ndq
