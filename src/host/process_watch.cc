#include "host/process_watch.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "base/small_file.h"

namespace ndq {

std::optional<std::vector<std::string>> ReadProcStat(pid_t pid) {
  const std::string stat = ReadSmallFile("/proc/" + std::to_string(pid) + "/stat").value_or("");
  // The command name (field 2) may contain spaces and parentheses: skip past the last ')'.
  const size_t close = stat.rfind(')');
  if (close == std::string::npos) return std::nullopt;
  const size_t open = stat.find('(');
  if (open == std::string::npos || open > close) return std::nullopt;
  std::vector<std::string> fields = {"", std::to_string(pid), stat.substr(open, close - open + 1)};
  std::istringstream rest(stat.substr(close + 2));
  for (std::string field; rest >> field;) fields.push_back(field);
  return fields;
}

std::optional<uint64_t> ProcessStartTicks(pid_t pid) {
  std::optional<std::vector<std::string>> fields = ReadProcStat(pid);
  if (!fields || fields->size() <= 22) return std::nullopt;
  return std::stoull((*fields)[22]);
}

absl::StatusOr<int> OpenVerifiedPidfd(pid_t pid, uint64_t start_ticks) {
  if (pid <= 0) return absl::InvalidArgumentError(absl::StrCat("invalid pid ", pid));
  const int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (fd < 0) {
    if (errno == ESRCH) return absl::NotFoundError(absl::StrCat("process ", pid, " has exited"));
    return absl::InternalError(absl::StrCat("pidfd_open(", pid, "): ", std::strerror(errno)));
  }
  // Checked after opening: from here on the pidfd pins this very process.
  if (start_ticks != 0 && ProcessStartTicks(pid) != start_ticks) {
    ::close(fd);
    return absl::NotFoundError(absl::StrCat("process ", pid, " has exited (its pid now belongs to another process)"));
  }
  return fd;
}

absl::Status SignalPidfd(int pidfd, int signal) {
  if (::syscall(SYS_pidfd_send_signal, pidfd, signal, nullptr, 0) != 0) {
    if (errno == ESRCH) return absl::NotFoundError("process has exited");
    return absl::InternalError(absl::StrCat("pidfd_send_signal: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

bool PidfdExited(int pidfd) {
  pollfd pfd = {pidfd, POLLIN, 0};
  return ::poll(&pfd, 1, 0) == 1;
}

absl::Status WaitForPathOrExit(const std::string& dir, const std::string& name, int pidfd, absl::Time deadline) {
  // Already there (a pid file written long before QEMU answers): no inotify
  // instance, whose close waits for the kernel's SRCU grace period (~0.8 ms).
  if (::access((dir + "/" + name).c_str(), F_OK) == 0) return absl::OkStatus();
  const int inotify = ::inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
  if (inotify < 0) return absl::InternalError(absl::StrCat("inotify_init1: ", std::strerror(errno)));
  const std::string path = dir + "/" + name;
  absl::Status result = absl::DeadlineExceededError(absl::StrCat(path, " did not appear in time"));
  // Watch first, then look: a file created in between is still seen.
  if (::inotify_add_watch(inotify, dir.c_str(), IN_CREATE | IN_MOVED_TO) < 0) {
    result = absl::InternalError(absl::StrCat("inotify_add_watch ", dir, ": ", std::strerror(errno)));
  } else {
    while (true) {
      if (::access(path.c_str(), F_OK) == 0) {
        result = absl::OkStatus();
        break;
      }
      const absl::Duration left = deadline - absl::Now();
      if (left <= absl::ZeroDuration()) break;
      pollfd fds[2] = {{inotify, POLLIN, 0}, {pidfd, POLLIN, 0}};
      const int ready = ::poll(fds, 2, static_cast<int>(absl::ToInt64Milliseconds(left)) + 1);
      if (ready < 0 && errno != EINTR) break;
      if (fds[1].revents != 0 && ::access(path.c_str(), F_OK) != 0) {
        result = absl::FailedPreconditionError("the process exited first");
        break;
      }
      char events[4096];
      while (::read(inotify, events, sizeof events) > 0) {
      }
    }
  }
  ::close(inotify);
  return result;
}

ExitWatcher::ExitWatcher() {
  epoll_fd_ = ::epoll_create1(EPOLL_CLOEXEC);
  wake_fd_ = ::eventfd(0, EFD_CLOEXEC);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = 0;  // key 0 is the wake-up
  ::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, wake_fd_, &ev);
  thread_ = std::thread([this] { Loop(); });
}

ExitWatcher::~ExitWatcher() {
  const uint64_t one = 1;
  (void)!::write(wake_fd_, &one, sizeof one);
  thread_.join();
  absl::MutexLock lock(&mu_);
  for (auto& [key, entry] : entries_) ::close(entry.fd);
  ::close(epoll_fd_);
  ::close(wake_fd_);
}

absl::Status ExitWatcher::Watch(int pidfd, std::function<void()> on_exit) {
  const int fd = ::fcntl(pidfd, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("dup pidfd: ", std::strerror(errno)));
  absl::MutexLock lock(&mu_);
  const uint64_t key = next_key_++;
  entries_[key] = Entry{fd, std::move(on_exit)};
  epoll_event ev{};
  ev.events = EPOLLIN;  // a pidfd becomes readable when its process exits
  ev.data.u64 = key;
  if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) {
    ::close(fd);
    entries_.erase(key);
    return absl::InternalError(absl::StrCat("epoll_ctl: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

void ExitWatcher::Loop() {
  epoll_event events[16];
  while (true) {
    const int n = ::epoll_wait(epoll_fd_, events, 16, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;
    }
    for (int i = 0; i < n; ++i) {
      const uint64_t key = events[i].data.u64;
      if (key == 0) return;
      std::function<void()> on_exit;
      {
        absl::MutexLock lock(&mu_);
        auto it = entries_.find(key);
        if (it == entries_.end()) continue;
        ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, it->second.fd, nullptr);
        ::close(it->second.fd);
        on_exit = std::move(it->second.on_exit);
        entries_.erase(it);
      }
      on_exit();
    }
  }
}

}  // namespace ndq
