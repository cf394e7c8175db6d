// Undo steps for a multi-step operation (starting a VM): each step that makes
// something pushes how to unmake it; unless the operation commits, they run in
// reverse order when the Rollback goes out of scope, on every error path.
#pragma once

#include <functional>
#include <utility>
#include <vector>

namespace ndq {

class Rollback {
 public:
  Rollback() = default;
  Rollback(const Rollback&) = delete;
  Rollback& operator=(const Rollback&) = delete;
  ~Rollback() { RunNow(); }

  void Push(std::function<void()> undo) { undo_.push_back(std::move(undo)); }
  // The operation succeeded: keep everything it made.
  void Commit() { undo_.clear(); }
  // Undo everything so far, newest first (also what the destructor does).
  void RunNow() {
    while (!undo_.empty()) {
      std::function<void()> undo = std::move(undo_.back());
      undo_.pop_back();
      undo();
    }
  }

 private:
  std::vector<std::function<void()>> undo_;
};

}  // namespace ndq
