// tests/support/http_test_server.py as a child process on 127.0.0.1, killed
// and reaped when the object goes away.
#pragma once

#include <fstream>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/numbers.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "host/run_command.h"
#include "image/checksum.h"

namespace ndq::testing {

// The sha256 of a file the tests serve, as hex.
inline std::string Sha256Of(const std::string& path) {
  absl::StatusOr<Hasher> hasher = Hasher::Create("sha256");
  std::ifstream in(path, std::ios::binary);
  std::vector<char> buf(1 << 20);
  while (in.read(buf.data(), static_cast<std::streamsize>(buf.size())) || in.gcount() > 0) {
    hasher->Update(buf.data(), static_cast<size_t>(in.gcount()));
  }
  return hasher->FinalHex();
}

const char kServerScript[] = NDQ_SOURCE_DIR "/tests/support/http_test_server.py";

// The test server as a child process; killed (and reaped) by the destructor.
class HttpTestServer {
 public:
  ~HttpTestServer() { Stop(); }

  ::testing::AssertionResult Start(const std::vector<std::string>& args) {
    int out[2];
    if (::pipe2(out, O_CLOEXEC) != 0) return ::testing::AssertionFailure() << "pipe failed";
    std::vector<std::string> argv = {"/usr/bin/python3", kServerScript};
    argv.insert(argv.end(), args.begin(), args.end());
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
    absl::StatusOr<pid_t> pid = SpawnWithDefaultSignals(argv, &actions);
    posix_spawn_file_actions_destroy(&actions);
    ::close(out[1]);
    if (!pid.ok()) {
      ::close(out[0]);
      return ::testing::AssertionFailure() << pid.status();
    }
    pid_ = *pid;
    // The first stdout line is the port; wait for it with a deadline.
    std::string line;
    const absl::Time deadline = absl::Now() + absl::Seconds(20);
    while (line.find('\n') == std::string::npos) {
      const int64_t left = absl::ToInt64Milliseconds(deadline - absl::Now());
      if (left <= 0) break;
      pollfd pfd = {out[0], POLLIN, 0};
      if (::poll(&pfd, 1, static_cast<int>(left)) <= 0) continue;
      char buf[64];
      const ssize_t n = ::read(out[0], buf, sizeof buf);
      if (n <= 0) break;
      line.append(buf, static_cast<size_t>(n));
    }
    ::close(out[0]);
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(line), &port_) || port_ <= 0) {
      return ::testing::AssertionFailure() << "test server printed no port: \"" << line << "\"";
    }
    return ::testing::AssertionSuccess();
  }

  void Stop() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
  }

  int port() const { return port_; }

 private:
  pid_t pid_ = -1;
  int port_ = 0;
};

}  // namespace ndq::testing
