// FetchVerified against a real HTTP(S) server on 127.0.0.1
// (tests/support/http_test_server.py) with injected faults.
#include "qemu_driver/fetcher.h"

#include <curl/curl.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <netinet/in.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "qemu_driver/run_command.h"
#include "../support/http_test_server.h"
#include "../support/temp_dir.h"
#include "../support/test_guest.h"

namespace ndq {
namespace {

using ::ndq::testing::ReadFile;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

using TestServer = ::ndq::testing::HttpTestServer;

size_t AppendToString(char* data, size_t size, size_t n, void* user) {
  static_cast<std::string*>(user)->append(data, size * n);
  return size * n;
}

std::string HttpGet(const std::string& url) {
  std::string body;
  CURL* c = curl_easy_init();
  curl_easy_setopt(c, CURLOPT_URL, url.c_str());
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(c, CURLOPT_TIMEOUT, 10L);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, AppendToString);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &body);
  curl_easy_perform(c);
  curl_easy_cleanup(c);
  return body;
}

void WriteFile(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << data;
}

std::string Digest(const std::string& type, const std::string& data) {
  absl::StatusOr<Hasher> h = Hasher::Create(type);
  h->Update(data.data(), data.size());
  return h->FinalHex();
}

struct LogEntry {
  std::string method, path, range;
};

class FetcherTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // 3 MiB + a bit of deterministic noise: several chunks, not a round size.
    std::mt19937_64 rng(42);
    data_.resize(3 * 1024 * 1024 + 12345);
    for (size_t i = 0; i < data_.size(); i += 8) {
      const uint64_t v = rng();
      for (size_t j = 0; j < 8 && i + j < data_.size(); ++j) data_[i + j] = static_cast<char>(v >> (8 * j));
    }
    WriteFile(root_ / "img.bin", data_);
    ASSERT_TRUE(server_.Start({"--root", root_.path()}));
    base_ = absl::StrCat("http://127.0.0.1:", server_.port());
    dest_ = out_ / "image.qcow2";
    options_.initial_backoff = absl::Milliseconds(10);
  }
  void TearDown() override { server_.Stop(); }

  std::vector<LogEntry> Log() {
    std::vector<LogEntry> out;
    for (absl::string_view line : absl::StrSplit(HttpGet(base_ + "/_log"), '\n', absl::SkipEmpty())) {
      nlohmann::json j = nlohmann::json::parse(std::string(line));
      out.push_back({j["method"], j["path"], j["range"]});
    }
    return out;
  }

  Checksum Sha256() const { return {"sha256", Digest("sha256", data_)}; }

  void ExpectNoFiles() {
    EXPECT_FALSE(fs::exists(dest_)) << dest_;
    EXPECT_FALSE(fs::exists(dest_ + ".part")) << dest_ << ".part";
  }

  void ExpectFetched(const absl::StatusOr<FetchResult>& r) {
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->bytes, static_cast<int64_t>(data_.size()));
    EXPECT_TRUE(ReadFile(dest_) == data_) << "content differs";
    EXPECT_FALSE(fs::exists(dest_ + ".part"));
  }

  testing::TempDir root_;
  testing::TempDir out_;
  TestServer server_;
  std::string base_;
  std::string dest_;
  std::string data_;
  FetchOptions options_;
};

TEST_F(FetcherTest, GoodSha256) {
  std::vector<int64_t> reports;
  options_.progress = [&](int64_t done, int64_t total, double rate) {
    reports.push_back(done);
    EXPECT_EQ(total, static_cast<int64_t>(data_.size()));
    EXPECT_GE(rate, 0.0);
  };
  options_.progress_interval = absl::Hours(1);  // only the final report
  absl::StatusOr<FetchResult> r = FetchVerified(base_ + "/img.bin", Sha256(), dest_, options_);
  ExpectFetched(r);
  EXPECT_EQ(r->hex_digest, Sha256().hex);
  EXPECT_EQ(r->attempts, 1);
  EXPECT_FALSE(r->resumed);
  EXPECT_EQ(reports, std::vector<int64_t>{static_cast<int64_t>(data_.size())});
  EXPECT_EQ(Log().size(), 1u);
}

TEST_F(FetcherTest, NoExpectedChecksumReportsSha256) {
  absl::StatusOr<FetchResult> r = FetchVerified(base_ + "/img.bin", std::nullopt, dest_, options_);
  ExpectFetched(r);
  EXPECT_EQ(r->hex_digest, Sha256().hex);
}

TEST_F(FetcherTest, OtherDigestTypes) {
  for (const std::string type : {"md5", "sha1", "sha512"}) {
    const Checksum want{type, Digest(type, data_)};
    absl::StatusOr<FetchResult> r = FetchVerified(base_ + "/img.bin", want, dest_, options_);
    ExpectFetched(r);
    EXPECT_EQ(r->hex_digest, want.hex) << type;
    fs::remove(dest_);
  }
}

TEST_F(FetcherTest, WrongChecksumLeavesNothing) {
  const Checksum wrong{"sha256", std::string(64, 'a')};
  absl::StatusOr<FetchResult> r = FetchVerified(base_ + "/img.bin", wrong, dest_, options_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(r.status().message(), HasSubstr("sha256:" + wrong.hex));
  EXPECT_THAT(r.status().message(), HasSubstr("sha256:" + Sha256().hex));
  ExpectNoFiles();
}

TEST_F(FetcherTest, NotFoundIsNotRetried) {
  options_.retries = 3;
  const std::string url = base_ + "/missing.bin";
  absl::StatusOr<FetchResult> r = FetchVerified(url, Sha256(), dest_, options_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr(url));
  EXPECT_THAT(r.status().message(), HasSubstr("404"));
  EXPECT_EQ(Log().size(), 1u);
  ExpectNoFiles();
}

TEST_F(FetcherTest, ForbiddenIsNotRetried) {
  absl::StatusOr<FetchResult> r = FetchVerified(base_ + "/status/403/img.bin", Sha256(), dest_, options_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("HTTP 403"));
  EXPECT_EQ(Log().size(), 1u);
}

TEST_F(FetcherTest, ServerErrorsAreRetried) {
  options_.retries = 3;
  absl::StatusOr<FetchResult> r =
      FetchVerified(base_ + "/status/500-then-200/img.bin?times=2", Sha256(), dest_, options_);
  ExpectFetched(r);
  EXPECT_EQ(r->attempts, 3);
  EXPECT_EQ(Log().size(), 3u);

  fs::remove(dest_);
  r = FetchVerified(base_ + "/status/429-then-200/img.bin?times=1", Sha256(), dest_, options_);
  ExpectFetched(r);
  EXPECT_EQ(r->attempts, 2);
}

TEST_F(FetcherTest, RetriesRunOut) {
  options_.retries = 1;
  absl::StatusOr<FetchResult> r = FetchVerified(base_ + "/status/503/img.bin", Sha256(), dest_, options_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(r.status().message(), HasSubstr("HTTP 503"));
  EXPECT_THAT(r.status().message(), HasSubstr("after 2 attempts"));
  EXPECT_EQ(Log().size(), 2u);
  ExpectNoFiles();
}

TEST_F(FetcherTest, DroppedConnectionIsResumedWithRange) {
  absl::StatusOr<FetchResult> r = FetchVerified(base_ + "/drop/img.bin", Sha256(), dest_, options_);
  ExpectFetched(r);
  EXPECT_EQ(r->hex_digest, Sha256().hex);
  EXPECT_TRUE(r->resumed);
  EXPECT_EQ(r->attempts, 2);
  std::vector<LogEntry> log = Log();
  ASSERT_EQ(log.size(), 2u);
  EXPECT_EQ(log[0].range, "");
  int64_t from = 0;
  ASSERT_TRUE(absl::StartsWith(log[1].range, "bytes=")) << log[1].range;
  ASSERT_TRUE(absl::SimpleAtoi(absl::StripSuffix(absl::StripPrefix(log[1].range, "bytes="), "-"), &from))
      << log[1].range;
  EXPECT_GT(from, 0);
  EXPECT_LE(from, static_cast<int64_t>(data_.size()) / 2);
}

TEST_F(FetcherTest, RangeIgnoredRestartsWithFreshHash) {
  absl::StatusOr<FetchResult> r = FetchVerified(base_ + "/drop/img.bin?norange=1", Sha256(), dest_, options_);
  ExpectFetched(r);
  EXPECT_FALSE(r->resumed);
  EXPECT_EQ(r->attempts, 2);
  std::vector<LogEntry> log = Log();
  ASSERT_EQ(log.size(), 2u);
  EXPECT_THAT(log[1].range, HasSubstr("bytes="));  // asked, but got the whole file
}

TEST_F(FetcherTest, PartFromEarlierProcessIsRehashedAndResumed) {
  WriteFile(dest_ + ".part", data_.substr(0, 1 << 20));
  absl::StatusOr<FetchResult> r = FetchVerified(base_ + "/img.bin", Sha256(), dest_, options_);
  ExpectFetched(r);
  EXPECT_TRUE(r->resumed);
  std::vector<LogEntry> log = Log();
  ASSERT_EQ(log.size(), 1u);
  EXPECT_EQ(log[0].range, "bytes=1048576-");
}

TEST_F(FetcherTest, StallHitsLowSpeedTimeout) {
  options_.low_speed_bytes_per_sec = 1024;
  options_.low_speed_time = absl::Seconds(2);
  options_.retries = 0;
  const absl::Time start = absl::Now();
  absl::StatusOr<FetchResult> r = FetchVerified(base_ + "/stall/img.bin", Sha256(), dest_, options_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded) << r.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(15));
  EXPECT_GE(absl::Now() - start, absl::Seconds(1));
  ExpectNoFiles();
}

TEST_F(FetcherTest, LargerThanMaxBytes) {
  options_.max_bytes = static_cast<int64_t>(data_.size()) - 1;
  absl::StatusOr<FetchResult> r = FetchVerified(base_ + "/img.bin", Sha256(), dest_, options_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(r.status().message(), HasSubstr(absl::StrCat(options_.max_bytes)));
  ExpectNoFiles();
  // Same for a local file.
  r = FetchVerified(root_ / "img.bin", Sha256(), dest_, options_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  ExpectNoFiles();
}

TEST_F(FetcherTest, MaxBytesEnforcedWhileStreaming) {
  // Chunked: no Content-Length to refuse up front.
  absl::StatusOr<FetchResult> r = FetchVerified(base_ + "/img.bin?chunked=1", Sha256(), dest_, options_);
  ExpectFetched(r);
  fs::remove(dest_);
  options_.max_bytes = 1 << 20;
  r = FetchVerified(base_ + "/img.bin?chunked=1", Sha256(), dest_, options_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  EXPECT_EQ(Log().size(), 2u);  // not retried
  ExpectNoFiles();
}

TEST_F(FetcherTest, ProgressIsThrottled) {
  std::vector<std::pair<absl::Time, int64_t>> reports;
  options_.progress_interval = absl::Milliseconds(200);
  options_.progress = [&](int64_t done, int64_t, double) { reports.emplace_back(absl::Now(), done); };
  // About 1.5 s at 2 MiB/s.
  absl::StatusOr<FetchResult> r = FetchVerified(base_ + "/img.bin?rate=2097152", Sha256(), dest_, options_);
  ExpectFetched(r);
  ASSERT_GE(reports.size(), 3u);
  EXPECT_LE(reports.size(), 12u);
  EXPECT_EQ(reports.back().second, static_cast<int64_t>(data_.size()));
  // Every report but the final one is at least an interval after the previous one.
  for (size_t i = 1; i + 1 < reports.size(); ++i) {
    EXPECT_GE(reports[i].first - reports[i - 1].first, absl::Milliseconds(200)) << i;
    EXPECT_GE(reports[i].second, reports[i - 1].second);
  }
}

TEST_F(FetcherTest, UnresumablePartStartsOver) {
  // A .part as long as the file: the Range request gets 416, and we start from zero.
  WriteFile(dest_ + ".part", std::string(data_.size(), 'x'));
  absl::StatusOr<FetchResult> r = FetchVerified(base_ + "/img.bin", Sha256(), dest_, options_);
  ExpectFetched(r);
  EXPECT_FALSE(r->resumed);
  EXPECT_EQ(r->attempts, 2);
  std::vector<LogEntry> log = Log();
  ASSERT_EQ(log.size(), 2u);
  EXPECT_EQ(log[0].range, absl::StrCat("bytes=", data_.size(), "-"));
  EXPECT_EQ(log[1].range, "");
}

TEST_F(FetcherTest, RedirectFollowed) {
  absl::StatusOr<FetchResult> r = FetchVerified(base_ + "/redirect/redirect/img.bin", Sha256(), dest_, options_);
  ExpectFetched(r);
  fs::remove(dest_);
  options_.max_redirects = 1;
  r = FetchVerified(base_ + "/redirect/redirect/img.bin", Sha256(), dest_, options_);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("redirect"));
}

TEST_F(FetcherTest, RedirectLoop) {
  absl::StatusOr<FetchResult> r = FetchVerified(base_ + "/redirect-loop", Sha256(), dest_, options_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("redirect loop"));
  EXPECT_EQ(Log().size(), 6u);  // the first request and max_redirects (5) more
  ExpectNoFiles();
}

TEST_F(FetcherTest, ConnectionRefusedIsRetried) {
  // A port nobody listens on: bind, read the number, close.
  const int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  socklen_t len = sizeof addr;
  ::getsockname(s, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(s);
  options_.retries = 2;
  absl::StatusOr<FetchResult> r =
      FetchVerified(absl::StrCat("http://127.0.0.1:", ntohs(addr.sin_port), "/img.bin"), Sha256(), dest_, options_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(r.status().message(), HasSubstr("after 3 attempts"));
  ExpectNoFiles();
}

TEST_F(FetcherTest, LocalFileAndFileUrl) {
  absl::StatusOr<FetchResult> r = FetchVerified(root_ / "img.bin", Sha256(), dest_, options_);
  ExpectFetched(r);
  fs::remove(dest_);
  r = FetchVerified("file://" + (root_ / "img.bin"), Sha256(), dest_, options_);
  ExpectFetched(r);
  fs::remove(dest_);
  r = FetchVerified("file://" + (root_ / "img.bin"), Checksum{"sha256", std::string(64, '0')}, dest_, options_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  ExpectNoFiles();
  r = FetchVerified(root_ / "nope.bin", Sha256(), dest_, options_);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  r = FetchVerified("file://relative/img.bin", Sha256(), dest_, options_);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(FetcherTest, UnsupportedScheme) {
  for (const std::string url : {"ftp://127.0.0.1/img.bin", "gopher://x/y", "scp://host/img"}) {
    absl::StatusOr<FetchResult> r = FetchVerified(url, Sha256(), dest_, options_);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr("unsupported URL scheme"));
  }
  ExpectNoFiles();
}

TEST_F(FetcherTest, HttpsSelfSignedNeedsCaFile) {
  testing::TempDir tls;
  absl::StatusOr<CommandResult> gen = RunCommand(
      {"/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", tls / "key.pem", "-out",
       tls / "cert.pem", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"},
      absl::Seconds(60));
  ASSERT_TRUE(gen.ok()) << gen.status();
  ASSERT_EQ(gen->exit_code, 0) << gen->output;
  TestServer https;
  ASSERT_TRUE(https.Start({"--root", root_.path(), "--tls-cert", tls / "cert.pem", "--tls-key", tls / "key.pem"}));
  const std::string url = absl::StrCat("https://127.0.0.1:", https.port(), "/img.bin");

  absl::StatusOr<FetchResult> r = FetchVerified(url, Sha256(), dest_, options_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_THAT(r.status().message(), HasSubstr("TLS"));
  ExpectNoFiles();

  options_.ca_file = tls / "cert.pem";
  r = FetchVerified(url, Sha256(), dest_, options_);
  ExpectFetched(r);

  options_.ca_file = tls / "missing.pem";
  fs::remove(dest_);
  r = FetchVerified(url, Sha256(), dest_, options_);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("missing.pem"));
}

}  // namespace
}  // namespace ndq

namespace ndq {
namespace {

// Not a test: a throughput comparison, run with NDQ_FETCH_BENCH=1.
TEST(FetcherBench, Loopback256MiB) {
  if (std::getenv("NDQ_FETCH_BENCH") == nullptr) GTEST_SKIP() << "set NDQ_FETCH_BENCH=1 to run";
  testing::TempDir root, out;
  {
    std::mt19937_64 rng(7);
    std::string block(1 << 20, '\0');
    std::ofstream f(root / "big.bin", std::ios::binary);
    for (int i = 0; i < 256; ++i) {
      for (size_t j = 0; j < block.size(); j += 8) {
        const uint64_t v = rng();
        std::memcpy(&block[j], &v, 8);
      }
      f.write(block.data(), static_cast<std::streamsize>(block.size()));
    }
  }
  TestServer server;
  ASSERT_TRUE(server.Start({"--root", root.path()}));
  const std::string url = absl::StrCat("http://127.0.0.1:", server.port(), "/big.bin");
  const double mib = 256.0;
  for (int round = 0; round < 2; ++round) {
    absl::Time t0 = absl::Now();
    absl::StatusOr<CommandResult> c = RunCommand(
        {"/bin/sh", "-c", "curl -sS -o '" + (out / "curl.bin") + "' '" + url + "' && sha256sum '" + (out / "curl.bin") + "'"},
        absl::Minutes(5));
    const absl::Duration curl_took = absl::Now() - t0;
    ASSERT_TRUE(c.ok() && c->exit_code == 0) << (c.ok() ? c->output : c.status().ToString());
    std::filesystem::remove(out / "curl.bin");

    t0 = absl::Now();
    absl::StatusOr<FetchResult> r = FetchVerified(url, std::nullopt, out / "ours.bin", FetchOptions{});
    const absl::Duration ours_took = absl::Now() - t0;
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(c->output.substr(0, 64), r->hex_digest);
    std::filesystem::remove(out / "ours.bin");
    std::printf("round %d: FetchVerified %.0f MiB/s (%.2f s)   curl -o + sha256sum %.0f MiB/s (%.2f s)\n", round,
                mib / absl::ToDoubleSeconds(ours_took), absl::ToDoubleSeconds(ours_took),
                mib / absl::ToDoubleSeconds(curl_took), absl::ToDoubleSeconds(curl_took));
  }
}

}  // namespace
}  // namespace ndq
