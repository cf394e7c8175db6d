// The far end of a socketpair playing QEMU (or qemu-ga) from a fuzz input, so
// the real QmpClient / GuestAgentClient parse what it sends.
//
// The input is split at NUL bytes into at most kMaxChunks chunks (the clients
// make fewer requests; later NULs stay in the last chunk). Chunk 0 is sent at once (the
// greeting); each further chunk is sent after the client's next request line
// arrives, or once the client is idle: it has read everything sent so far and
// all its threads sleep, twice in a row kIdleCheck apart (it waits for a reply
// this input does not hold; waiting out its timeout would make such inputs slow). "$ID" in a chunk becomes
// the "id" of the latest request (the guest agent's sync ids are random).
// After the last chunk the peer closes its sending side (EOF) and drains what
// the client still writes until the client closes.
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

namespace ndqfuzz {

constexpr size_t kMaxChunks = 12;
constexpr auto kIdleCheck = std::chrono::microseconds(200);
constexpr auto kMaxStep = std::chrono::milliseconds(500);  // bound on any one step
constexpr int kDrainWaitMs = 5000;

// Whether every thread of this process but `self` is asleep (state S).
inline bool OthersAsleep(pid_t self) {
  DIR* dir = ::opendir("/proc/self/task");
  if (dir == nullptr) return true;
  bool asleep = true;
  while (dirent* entry = ::readdir(dir)) {
    const long tid = std::strtol(entry->d_name, nullptr, 10);
    if (tid <= 0 || tid == self) continue;
    const std::string path = std::string("/proc/self/task/") + entry->d_name + "/stat";
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;  // exited meanwhile
    char buf[512];
    const ssize_t n = ::read(fd, buf, sizeof buf - 1);
    ::close(fd);
    if (n <= 0) continue;
    buf[n] = '\0';
    // "tid (comm) S ...": comm may hold anything, so look after the last ')'.
    const char* paren = std::strrchr(buf, ')');
    if (paren != nullptr && paren[1] == ' ' && paren[2] != 'S') {
      asleep = false;
      break;
    }
  }
  ::closedir(dir);
  return asleep;
}

inline std::vector<std::string> SplitChunks(const uint8_t* data, size_t size) {
  std::vector<std::string> chunks(1);
  for (size_t i = 0; i < size; ++i) {
    if (data[i] == 0 && chunks.size() < kMaxChunks) {
      chunks.emplace_back();
    } else {
      chunks.back().push_back(static_cast<char>(data[i]));
    }
  }
  return chunks;
}

inline void SendAll(int fd, const std::string& data) {
  size_t off = 0;
  while (off < data.size()) {
    const ssize_t n = ::send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return;  // the client is gone
    off += static_cast<size_t>(n);
  }
}

// The "id" of a request line ({"execute": ..., "arguments": {"id": N}} for
// guest-sync-delimited, {"execute": ..., "id": N} for QMP); empty when none.
inline std::string RequestId(std::string_view line) {
  const size_t brace = line.find('{');
  if (brace == std::string_view::npos) return "";
  const nlohmann::json request = nlohmann::json::parse(line.substr(brace), nullptr, false);
  if (!request.is_object()) return "";
  auto id = request.find("id");
  if (id != request.end()) return id->dump();
  auto args = request.find("arguments");
  if (args != request.end() && args->is_object()) {
    auto aid = args->find("id");
    if (aid != args->end()) return aid->dump();
  }
  return "";
}

inline std::string Substitute(std::string chunk, const std::string& id) {
  if (id.empty()) return chunk;
  for (size_t pos; (pos = chunk.find("$ID")) != std::string::npos;) chunk.replace(pos, 3, id);
  return chunk;
}

// Runs on its own thread; owns `fd`.
inline void ServePeer(int fd, std::vector<std::string> chunks) {
  std::string input;
  bool eof = false;
  // Waits for one request line and returns its id ("" for none), or gives up
  // when the client sits idle (see above).
  const pid_t self = ::gettid();
  auto next_request = [&]() -> std::string {
    int idle = 0;
    const auto deadline = std::chrono::steady_clock::now() + kMaxStep;
    while (std::chrono::steady_clock::now() < deadline) {
      const size_t nl = input.find('\n');
      if (nl != std::string::npos) {
        std::string line = input.substr(0, nl);
        input.erase(0, nl + 1);
        return RequestId(line);
      }
      if (eof) return "";
      pollfd pfd{fd, POLLIN, 0};
      const timespec wait{0, std::chrono::nanoseconds(kIdleCheck).count()};
      if (::ppoll(&pfd, 1, &wait, nullptr) > 0) {
        char buf[4096];
        const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
        if (n <= 0) {
          eof = true;
          return "";
        }
        input.append(buf, static_cast<size_t>(n));
        idle = 0;
        continue;
      }
      // Bytes we sent that the client has not read yet (unix sockets count
      // them against the sender until the receiver consumes them).
      int unread = 0;
      if (::ioctl(fd, SIOCOUTQ, &unread) != 0) unread = 0;
      idle = unread == 0 && OthersAsleep(self) ? idle + 1 : 0;
      if (idle >= 2) return "";
    }
    return "";
  };
  SendAll(fd, chunks[0]);
  std::string id;
  for (size_t i = 1; i < chunks.size(); ++i) {
    if (std::string next = next_request(); !next.empty()) id = next;
    SendAll(fd, Substitute(chunks[i], id));
  }
  ::shutdown(fd, SHUT_WR);
  // Keep reading so the client's writes never fail for want of a reader; the
  // client closing its end ends this.
  while (!eof) {
    pollfd pfd{fd, POLLIN, 0};
    if (::poll(&pfd, 1, kDrainWaitMs) <= 0) break;
    char buf[4096];
    if (::recv(fd, buf, sizeof buf, 0) <= 0) break;
  }
  ::close(fd);
}

// A connected pair: [0] for the client under test, [1] served by ServePeer.
inline void MakePair(int fds[2]) {
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) std::abort();
}

}  // namespace ndqfuzz
