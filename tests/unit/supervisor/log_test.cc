// The supervisor's log line. Its stderr is pointed at one end of a datagram
// socket pair: every write(2) arrives as exactly one datagram, so the tests
// see how many writes a line took, not only the bytes.
#include "../../../src/supervisor/log.h"

#include <limits.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <regex>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "supervisor_test_util.h"

namespace ndq::supervisor {
namespace {

using ::testing::EndsWith;
using namespace ::ndq::supervisor::test_util;

class LogLine : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, fds_), 0) << std::strerror(errno);
  }
  void TearDown() override {
    ::close(fds_[0]);
    ::close(fds_[1]);
  }

  // The writes Log made while `log` ran, one string per write(2).
  template <typename F>
  std::vector<std::string> WritesOf(F log) {
    {
      ScopedStderr to_socket(fds_[1]);
      log();
    }
    std::vector<std::string> writes;
    std::vector<char> buf(64 * 1024);
    for (;;) {
      const ssize_t n = ::recv(fds_[0], buf.data(), buf.size(), MSG_DONTWAIT);
      if (n < 0) break;
      writes.emplace_back(buf.data(), static_cast<size_t>(n));
    }
    return writes;
  }

  int fds_[2] = {-1, -1};
};

int64_t SystemClockMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

TEST(LogClock, NowUnixMsIsTheWallClockInMilliseconds) {
  const int64_t before = SystemClockMs();
  const int64_t now = NowUnixMs();
  const int64_t after = SystemClockMs();
  EXPECT_LE(before, now);
  EXPECT_LE(now, after);
}

// One write(2) per line (so lines from concurrent writers never interleave),
// stamped with the UTC time to the millisecond and the writer's pid.
TEST_F(LogLine, WritesOneTimestampedLineInOneWrite) {
  int64_t before = 0, after = 0;
  const std::vector<std::string> writes = WritesOf([&] {
    before = NowUnixMs();
    ndq::supervisor::Log("QEMU running as pid %d after %s", 4242, "1 ms");
    after = NowUnixMs();
  });
  ASSERT_EQ(writes.size(), 1u);
  const std::regex line(
      R"(^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})\.(\d{3})Z nomad-qemu-supervisor\[(\d+)\]: (.*)\n$)");
  std::smatch m;
  ASSERT_TRUE(std::regex_match(writes[0], m, line)) << writes[0];
  EXPECT_EQ(m[9].str(), "QEMU running as pid 4242 after 1 ms");
  EXPECT_EQ(m[8].str(), std::to_string(::getpid()));

  tm utc{};
  utc.tm_year = std::stoi(m[1]) - 1900;
  utc.tm_mon = std::stoi(m[2]) - 1;
  utc.tm_mday = std::stoi(m[3]);
  utc.tm_hour = std::stoi(m[4]);
  utc.tm_min = std::stoi(m[5]);
  utc.tm_sec = std::stoi(m[6]);
  const int64_t stamped = static_cast<int64_t>(::timegm(&utc)) * 1000 + std::stoi(m[7]);
  EXPECT_LE(before, stamped) << writes[0];
  EXPECT_LE(stamped, after) << writes[0];
}

// A message longer than the line buffer is cut, but is still one line in one
// write, ending in a newline, and short enough for an atomic pipe write.
TEST_F(LogLine, AnOverlongMessageIsCutToOneLineInOneWrite) {
  const std::string message(5 * PIPE_BUF, 'm');
  const std::vector<std::string> writes = WritesOf([&] { ndq::supervisor::Log("%s", message.c_str()); });
  ASSERT_EQ(writes.size(), 1u);
  const std::string& written = writes[0];
  EXPECT_LE(written.size(), static_cast<size_t>(PIPE_BUF));
  EXPECT_THAT(written, EndsWith("m\n"));
  EXPECT_EQ(std::count(written.begin(), written.end(), '\n'), 1);
  const size_t body = written.find("]: ");
  ASSERT_NE(body, std::string::npos);
  const std::string kept = written.substr(body + 3, written.size() - body - 4);
  EXPECT_EQ(kept, message.substr(0, kept.size()));
  EXPECT_GE(kept.size(), 1024u) << "cut far shorter than needed";
}

// Each call is its own line; formatting directives in arguments are data.
TEST_F(LogLine, EachCallIsOneLineAndArgumentsAreNotFormatStrings) {
  const std::vector<std::string> writes = WritesOf([&] {
    ndq::supervisor::Log("path %s", "/alloc/%s%n/stdout");
    ndq::supervisor::Log("second");
  });
  ASSERT_EQ(writes.size(), 2u);
  EXPECT_THAT(writes[0], EndsWith("]: path /alloc/%s%n/stdout\n"));
  EXPECT_THAT(writes[1], EndsWith("]: second\n"));
}

}  // namespace
}  // namespace ndq::supervisor
