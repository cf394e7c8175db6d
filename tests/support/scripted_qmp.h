// A fake QMP (or guest agent) connection for unit tests: the far end of a
// socketpair that plays a script. It sends what the real QEMU sent, checks
// that the client sends what was recorded, and maps the ids the client picks
// (QMP "id", guest-sync ids) onto the recorded ones. A script that ends early,
// or answers a command with an error, fails the client's conversation at
// exactly that step, so code after a VM's launch can be failed part-way
// without a QEMU. Transcripts recorded from QEMU 7.2 are in
// tests/unit/qemu/qmp_transcripts (LoadTranscript, Handshake).
#pragma once

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "nomadplugin/bounded_json.h"

namespace ndq::testing {

inline constexpr absl::Duration kScriptStepTimeout = absl::Seconds(10);  // a client's line must come by then

struct Step {
  enum Kind { kFromClient, kToClient, kEof } kind;
  std::string text;
};

inline Step FromClient(std::string text) { return {Step::kFromClient, std::move(text)}; }
inline Step ToClient(std::string text) { return {Step::kToClient, std::move(text)}; }
inline Step Eof() { return {Step::kEof, ""}; }

inline std::vector<Step> LoadTranscript(const std::string& name) {
  const std::string path = absl::StrCat(NDQ_SOURCE_DIR, "/tests/unit/qemu/qmp_transcripts/", name);
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  std::vector<Step> steps;
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    line = absl::StrReplaceAll(line, {{"\\xff", "\xff"}});
    if (line == "<-EOF") {
      steps.push_back(Eof());
    } else if (absl::StartsWith(line, "-> ")) {
      steps.push_back(FromClient(line.substr(3)));
    } else if (absl::StartsWith(line, "<- ")) {
      steps.push_back(ToClient(line.substr(3)));
    } else {
      ADD_FAILURE() << path << ": unparsable line: " << line;
    }
  }
  return steps;
}

// The greeting and qmp_capabilities exchange as QEMU 7.2 does them.
inline std::vector<Step> Handshake() {
  std::vector<Step> steps = LoadTranscript("status_cycle.qmp");
  steps.resize(3);
  EXPECT_EQ(steps[1].kind, Step::kFromClient);
  EXPECT_THAT(steps[1].text, ::testing::HasSubstr("qmp_capabilities"));
  return steps;
}

inline std::vector<Step> Concat(std::vector<Step> a, const std::vector<Step>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

inline size_t LeadingSentinels(const std::string& s) { return std::min(s.find_first_not_of('\xff'), s.size()); }

// Plays one side of a recorded conversation: sends what the real QEMU sent,
// and checks that the client sends what was recorded. Ids the client picks
// (QMP "id", guest-sync ids) are mapped onto the recorded ones.
class ScriptedPeer {
 public:
  explicit ScriptedPeer(std::vector<Step> steps) : steps_(std::move(steps)) {
    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) std::abort();
    fd_ = fds[0];
    client_fd_ = fds[1];
    thread_ = std::thread([this] { Run(); });
  }
  // Plays the script on an already connected socket, which it then owns.
  ScriptedPeer(int fd, std::vector<Step> steps) : steps_(std::move(steps)), fd_(fd) {
    thread_ = std::thread([this] { Run(); });
  }

  ~ScriptedPeer() {
    ::shutdown(fd_, SHUT_RDWR);
    thread_.join();
    ::close(fd_);
  }

  // The client's end; the client takes ownership.
  int client_fd() const { return client_fd_; }

  // True once every step has been played.
  bool WaitDone(absl::Duration timeout) {
    absl::MutexLock lock(&mu_);
    return mu_.AwaitWithTimeout(absl::Condition(&done_), timeout);
  }

  // True once the client has sent `n` lines.
  bool WaitReceived(size_t n, absl::Duration timeout) {
    absl::MutexLock lock(&mu_);
    auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return received_.size() >= n || done_; };
    mu_.AwaitWithTimeout(absl::Condition(&ready), timeout);
    return received_.size() >= n;
  }

  std::vector<std::string> failures() {
    absl::MutexLock lock(&mu_);
    return failures_;
  }

 private:
  void Fail(const std::string& why) {
    absl::MutexLock lock(&mu_);
    failures_.push_back(why);
  }

  bool ReadLine(std::string* line) {
    const absl::Time deadline = absl::Now() + kScriptStepTimeout;
    size_t nl;
    while ((nl = buffer_.find('\n')) == std::string::npos) {
      pollfd pfd{fd_, POLLIN, 0};
      const int left = static_cast<int>(absl::ToInt64Milliseconds(deadline - absl::Now()));
      if (left <= 0 || ::poll(&pfd, 1, left) <= 0) return false;
      char chunk[4096];
      const ssize_t n = ::recv(fd_, chunk, sizeof chunk, 0);
      if (n <= 0) return false;
      buffer_.append(chunk, static_cast<size_t>(n));
    }
    *line = buffer_.substr(0, nl);
    buffer_.erase(0, nl + 1);
    return true;
  }

  static bool IsSync(const nlohmann::json& j) {
    return j.is_object() && j.value("execute", "").rfind("guest-sync", 0) == 0 && j.contains("arguments") &&
           j["arguments"].is_object() && j["arguments"].contains("id");
  }

  // Compares a client line with the recorded one and learns the id mapping.
  bool Matches(const std::string& want_raw, const std::string& got_raw) {
    const size_t want_ff = LeadingSentinels(want_raw), got_ff = LeadingSentinels(got_raw);
    nlohmann::json want = nlohmann::json::parse(want_raw.substr(want_ff), nullptr, false);
    nlohmann::json got = nlohmann::json::parse(got_raw.substr(got_ff), nullptr, false);
    if (want_ff != got_ff || got.is_discarded() || !got.is_object()) return false;
    if (want.contains("id") != got.contains("id")) return false;
    if (want.contains("id")) ids_[want["id"].get<int64_t>()] = got["id"];
    want.erase("id");
    got.erase("id");
    if (IsSync(want) && IsSync(got)) {
      ids_[want["arguments"]["id"].get<int64_t>()] = got["arguments"]["id"];
      want["arguments"].erase("id");
      got["arguments"].erase("id");
    }
    return want == got;
  }

  std::string Rewrite(const std::string& raw) {
    const size_t ff = LeadingSentinels(raw);
    // Bounded: hostile lines nested too deep to dump are sent as they are.
    nlohmann::json j = nomadplugin::ParseJsonBounded(raw.substr(ff));
    if (j.is_discarded() || !j.is_object()) return raw;
    bool changed = false;
    for (const char* key : {"id", "return"}) {
      auto it = j.find(key);
      if (it != j.end() && it->is_number_integer() && ids_.count(it->get<int64_t>())) {
        *it = ids_[it->get<int64_t>()];
        changed = true;
      }
    }
    return changed ? raw.substr(0, ff) + j.dump() : raw;
  }

  void Run() {
    for (const Step& step : steps_) {
      if (step.kind == Step::kEof) {
        ::shutdown(fd_, SHUT_RDWR);
        break;
      }
      if (step.kind == Step::kToClient) {
        const std::string out = Rewrite(step.text) + "\n";
        if (::send(fd_, out.data(), out.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(out.size())) {
          Fail("could not send " + step.text);
          break;
        }
        continue;
      }
      std::string line;
      if (!ReadLine(&line)) {
        Fail("client never sent " + step.text);
        break;
      }
      {
        absl::MutexLock lock(&mu_);
        received_.push_back(line);
      }
      if (!Matches(step.text, line)) {
        Fail(absl::StrCat("client sent ", line, "\n  where the transcript has ", step.text));
        break;
      }
    }
    absl::MutexLock lock(&mu_);
    done_ = true;
  }

  std::vector<Step> steps_;
  int fd_ = -1;
  int client_fd_ = -1;
  std::string buffer_;                // peer thread only
  std::map<int64_t, nlohmann::json> ids_;       // peer thread only
  std::thread thread_;
  absl::Mutex mu_;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::string> received_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> failures_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ndq::testing
