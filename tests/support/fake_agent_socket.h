// A guest agent on a unix socket, as QEMU serves qemu-ga's channel (one
// client at a time), for tests of code that connects to a task's agent by
// path. It ignores every command until `ready`; then it answers
// guest-sync-delimited itself and every other command through its `Answer`
// (by default {"return": {}}). An answer that is a discarded json hangs up
// the connection, as when the guest's end of the channel goes away; with
// `hang_up` set every connection is closed at once (QEMU going away).
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace ndq::testing {

class FakeAgentSocket {
 public:
  // The reply object for a command (called on the agent's thread).
  using Answer = std::function<nlohmann::json(const nlohmann::json& request)>;

  explicit FakeAgentSocket(const std::string& path, Answer answer = nullptr) : answer_(std::move(answer)) {
    listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(listen_fd_, 4) != 0) {
      std::abort();
    }
    if (::pipe2(stop_, O_CLOEXEC) != 0) std::abort();
    thread_ = std::thread([this] { Serve(); });
  }
  ~FakeAgentSocket() {
    ::close(stop_[1]);
    thread_.join();
    ::close(stop_[0]);
    ::close(listen_fd_);
  }
  FakeAgentSocket(const FakeAgentSocket&) = delete;
  FakeAgentSocket& operator=(const FakeAgentSocket&) = delete;

  static nlohmann::json HangUp() { return nlohmann::json(nlohmann::json::value_t::discarded); }

  std::atomic<bool> ready{false};
  std::atomic<bool> hang_up{false};
  std::atomic<int> unanswered{0};   // requests that came while not ready
  std::atomic<int> connections{0};  // clients accepted so far

  // The commands answered so far (not the syncs), in order.
  std::vector<nlohmann::json> requests() {
    absl::MutexLock lock(&mu_);
    return requests_;
  }

 private:
  void Serve() {
    for (;;) {
      pollfd p[2] = {{listen_fd_, POLLIN, 0}, {stop_[0], POLLIN, 0}};
      if (::poll(p, 2, -1) < 0 || p[1].revents != 0) return;
      const int conn = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (conn < 0) continue;
      ++connections;
      if (hang_up) {
        ::close(conn);
        continue;
      }
      const bool stopped = Talk(conn);
      ::close(conn);
      if (stopped) return;
    }
  }

  // Serves one connection; true when the agent is being destroyed.
  bool Talk(int conn) {
    std::string input;
    for (;;) {
      pollfd p[2] = {{conn, POLLIN, 0}, {stop_[0], POLLIN, 0}};
      if (::poll(p, 2, -1) < 0 || p[1].revents != 0) return true;
      char buf[4096];
      const ssize_t n = ::read(conn, buf, sizeof buf);
      if (n <= 0) return false;
      input.append(buf, static_cast<size_t>(n));
      for (size_t nl; (nl = input.find('\n')) != std::string::npos;) {
        std::string line = input.substr(0, nl);
        input.erase(0, nl + 1);
        line.erase(0, line.find_first_not_of('\xff'));
        if (!ready) {
          ++unanswered;
          continue;
        }
        const std::string reply = Reply(nlohmann::json::parse(line, nullptr, false));
        if (reply.empty()) return false;  // hang up
        if (::write(conn, reply.data(), reply.size()) < 0) return false;
      }
    }
  }

  // The line to send for `request`; empty to hang up.
  std::string Reply(const nlohmann::json& request) {
    if (!request.is_object()) return nlohmann::json{{"error", {{"class", "GenericError"}}}}.dump() + "\n";
    if (request.value("execute", "") == "guest-sync-delimited") {
      return "\xff" + nlohmann::json{{"return", request["arguments"]["id"]}}.dump() + "\n";
    }
    {
      absl::MutexLock lock(&mu_);
      requests_.push_back(request);
    }
    const nlohmann::json reply = answer_ ? answer_(request) : nlohmann::json{{"return", nlohmann::json::object()}};
    return reply.is_discarded() ? "" : reply.dump() + "\n";
  }

  const Answer answer_;
  int listen_fd_ = -1;
  int stop_[2] = {-1, -1};
  absl::Mutex mu_;
  std::vector<nlohmann::json> requests_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace ndq::testing
