// GuestExec's pacing and reply handling against a fake agent on a socketpair
// (tests/integration/guest_exec_test.cc runs it against the real qemu-ga).
#include "qemu/guest_exec.h"

#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/escaping.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"

namespace ndq {
namespace {

using nlohmann::json;

// Answers like qemu-ga: the command "runs" for `runtime` after guest-exec,
// then one status reports its exit with `output` on stdout and forgets it.
class FakeAgent {
 public:
  FakeAgent(absl::Duration runtime, std::string output) : runtime_(runtime), output_(std::move(output)) {
    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) std::abort();
    client_fd_ = fds[0];
    fd_ = fds[1];
    thread_ = std::thread([this] { Serve(); });
  }
  ~FakeAgent() {
    ::shutdown(fd_, SHUT_RDWR);
    thread_.join();
    ::close(fd_);
  }
  int client_fd() const { return client_fd_; }
  std::vector<absl::Time> status_times() {
    absl::MutexLock lock(&mu_);
    return status_times_;
  }

 private:
  void Serve() {
    std::string input;
    char buf[65536];
    while (true) {
      size_t nl;
      while ((nl = input.find('\n')) == std::string::npos) {
        const ssize_t n = ::read(fd_, buf, sizeof buf);
        if (n <= 0) return;
        input.append(buf, static_cast<size_t>(n));
      }
      std::string line = input.substr(0, nl);
      input.erase(0, nl + 1);
      line.erase(0, line.find_first_not_of('\xff'));
      const std::string reply = Answer(json::parse(line));
      if (::write(fd_, reply.data(), reply.size()) != static_cast<ssize_t>(reply.size())) return;
    }
  }
  std::string Answer(const json& request) {
    const std::string command = request.at("execute").get<std::string>();
    if (command == "guest-sync-delimited") {
      return "\xff" + json{{"return", request.at("arguments").at("id")}}.dump() + "\n";
    }
    if (command == "guest-exec") {
      started_ = absl::Now();
      return json{{"return", {{"pid", 42}}}}.dump() + "\n";
    }
    if (command != "guest-exec-status" || forgotten_) {
      return json{{"error", {{"class", "GenericError"}, {"desc", "Invalid parameter 'pid'"}}}}.dump() + "\n";
    }
    const absl::Time now = absl::Now();
    {
      absl::MutexLock lock(&mu_);
      status_times_.push_back(now);
    }
    if (now - started_ < runtime_) return json{{"return", {{"exited", false}}}}.dump() + "\n";
    forgotten_ = true;
    return json{{"return",
                 {{"exited", true}, {"exitcode", 0}, {"out-data", absl::Base64Escape(output_)}, {"out-truncated", false}}}}
               .dump() +
           "\n";
  }

  const absl::Duration runtime_;
  const std::string output_;
  int fd_ = -1;
  int client_fd_ = -1;
  absl::Time started_;
  bool forgotten_ = false;
  absl::Mutex mu_;
  std::vector<absl::Time> status_times_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

GuestExecRequest Command(std::vector<std::string> argv) {
  GuestExecRequest request;
  request.argv = std::move(argv);
  return request;
}

TEST(guest_exec, PollingBacksOff) {
  FakeAgent fake(absl::Milliseconds(500), "done\n");
  auto agent = GuestAgentClient::Adopt(fake.client_fd(), "fake agent", absl::Seconds(5));
  ASSERT_TRUE(agent.ok()) << agent.status();
  auto exec = GuestExec::Start(**agent, Command({"/bin/sleep", "0.5"}));
  ASSERT_TRUE(exec.ok()) << exec.status();
  const absl::Time started = absl::Now();
  auto result = exec->Wait(absl::Now() + absl::Seconds(10));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->output.stdout_data, "done\n");

  const std::vector<absl::Time> times = fake.status_times();
  ASSERT_FALSE(times.empty());
  EXPECT_EQ(exec->status_calls(), static_cast<int>(times.size()));
  // 5, 10, 20, ... 200 ms apart: about 8 calls, where a 1 ms spin makes ~500.
  EXPECT_GE(times.size(), 4u);
  EXPECT_LE(times.size(), 20u);
  // The first question is asked at once, not after a fixed sleep.
  EXPECT_LT(times.front() - started, absl::Milliseconds(100));
  // No gap exceeds the cap by much.
  for (size_t i = 1; i < times.size(); ++i) EXPECT_LT(times[i] - times[i - 1], absl::Milliseconds(400));
}

TEST(guest_exec, AQuickCommandIsAnsweredByTheFirstPoll) {
  FakeAgent fake(absl::ZeroDuration(), "");
  auto agent = GuestAgentClient::Adopt(fake.client_fd(), "fake agent", absl::Seconds(5));
  ASSERT_TRUE(agent.ok()) << agent.status();
  auto exec = GuestExec::Start(**agent, Command({"/bin/true"}));
  ASSERT_TRUE(exec.ok()) << exec.status();
  ASSERT_TRUE(exec->Wait(absl::Now() + absl::Seconds(10)).ok());
  EXPECT_EQ(exec->status_calls(), 1);
}

// A reply far over the agent client's usual 1 MiB bound: the whole output.
TEST(guest_exec, LargeOutputFitsTheStatusReply) {
  const std::string output(3 << 20, 'x');
  FakeAgent fake(absl::ZeroDuration(), output);
  auto agent = GuestAgentClient::Adopt(fake.client_fd(), "fake agent", absl::Seconds(5));
  ASSERT_TRUE(agent.ok()) << agent.status();
  auto exec = GuestExec::Start(**agent, Command({"/bin/big"}));
  ASSERT_TRUE(exec.ok()) << exec.status();
  auto result = exec->Wait(absl::Now() + absl::Seconds(10));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->output.stdout_data, output);
}

// Only the status call GuestExec makes gets the larger bound; other calls keep
// refusing a reply over 1 MiB, and the client resynchronizes after it.
TEST(guest_exec, OtherCallsKeepTheOneMebibyteBound) {
  FakeAgent fake(absl::ZeroDuration(), std::string(2 << 20, 'x'));
  auto agent = GuestAgentClient::Adopt(fake.client_fd(), "fake agent", absl::Seconds(5));
  ASSERT_TRUE(agent.ok()) << agent.status();
  ASSERT_TRUE((*agent)->Execute("guest-exec", {{"path", "/bin/big"}}).ok());
  auto reply = (*agent)->Execute("guest-exec-status", {{"pid", 42}});
  EXPECT_TRUE(absl::IsDataLoss(reply.status())) << reply.status();
  EXPECT_TRUE((*agent)->Execute("guest-exec", {{"path", "/bin/true"}}).ok());
}

TEST(guest_exec, ACommandTheAgentForgotIsNotFound) {
  FakeAgent fake(absl::ZeroDuration(), "");
  auto agent = GuestAgentClient::Adopt(fake.client_fd(), "fake agent", absl::Seconds(5));
  ASSERT_TRUE(agent.ok()) << agent.status();
  auto exec = GuestExec::Start(**agent, Command({"/bin/true"}));
  ASSERT_TRUE(exec.ok()) << exec.status();
  // Someone else collected the exit (or the agent restarted).
  ASSERT_TRUE((*agent)->Execute("guest-exec-status", {{"pid", 42}}).ok());
  auto result = exec->Wait(absl::Now() + absl::Seconds(10));
  EXPECT_TRUE(absl::IsNotFound(result.status())) << result.status();
}

}  // namespace
}  // namespace ndq
