// FetchVerified against a real HTTP(S) server on 127.0.0.1
// (tests/support/http_test_server.py) with injected faults.
#include "image/fetcher.h"
#include "base/error_kind.h"

#include <curl/curl.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <netinet/in.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "host/run_command.h"
#include "../../support/files.h"
#include "../../support/http_test_server.h"
#include "../../support/temp_dir.h"

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
  // The actual digest is never told (it could describe a file the job may not read).
  EXPECT_THAT(r.status().message(), ::testing::Not(HasSubstr(Sha256().hex)));
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
  EXPECT_EQ(KindOf(r.status()), ErrorKind::kBadConfig) << "never retried by Nomad";
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
  // Every report but the final one is at least an interval after the previous
  // one. The fetcher throttles on its own clock reading, taken just before it
  // calls back; ours is taken inside the callback, so a callback that ran late
  // makes the next gap look shorter by that delay (199.995 ms was seen under
  // TSan). 5 ms of that jitter is allowed; an unthrottled stream reports every
  // few milliseconds.
  for (size_t i = 1; i + 1 < reports.size(); ++i) {
    EXPECT_GE(reports[i].first - reports[i - 1].first, absl::Milliseconds(195)) << i;
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
  EXPECT_EQ(KindOf(r.status()), ErrorKind::kBadConfig) << "never retried by Nomad";
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
  EXPECT_EQ(KindOf(r.status()), ErrorKind::kBadConfig) << "never retried by Nomad";
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

// ---- Source policy: image_source_allowlist, redirects, link-local addresses ----

std::string Escape(const std::string& text) {
  char* escaped = curl_easy_escape(nullptr, text.c_str(), static_cast<int>(text.size()));
  std::string out(escaped);
  curl_free(escaped);
  return out;
}

// The requests a test server has seen (its /_log), by base URL.
size_t RequestsSeen(const std::string& base) {
  size_t n = 0;
  for (absl::string_view line : absl::StrSplit(HttpGet(base + "/_log"), '\n', absl::SkipEmpty())) {
    (void)line;
    ++n;
  }
  return n;
}

TEST_F(FetcherTest, AllowlistedPrefixFetches) {
  fs::create_directory(root_ / "allowed");
  WriteFile(root_ / "allowed/img.bin", data_);
  options_.url_allowlist = {"http://example.invalid/", base_ + "/allowed/"};
  ExpectFetched(FetchVerified(base_ + "/allowed/img.bin", Sha256(), dest_, options_));
  fs::remove(dest_);
  // The same server and file, with the whole host allowed.
  options_.url_allowlist = {base_};
  ExpectFetched(FetchVerified(base_ + "/img.bin?chunked=1", Sha256(), dest_, options_));
  EXPECT_EQ(Log().size(), 2u);
}

TEST_F(FetcherTest, UrlsOutsideTheAllowlistAreRefusedBeforeConnecting) {
  fs::create_directory(root_ / "allowed");
  WriteFile(root_ / "allowed/img.bin", data_);
  const std::string port = std::to_string(server_.port());
  options_.url_allowlist = {base_ + "/allowed/"};
  for (const std::string& url : std::vector<std::string>{
           base_ + "/img.bin",                                                  // outside the path
           base_ + "/allowedx/img.bin",                                         // a prefix of a segment only
           base_ + "/allowed/../img.bin",                                       // leaves it once normalised
           base_ + "/allowed/%2e%2e/img.bin",                                   // the same, encoded
           "http://127.0.0.1:" + port + "@localhost:" + port + "/allowed/img.bin",  // userinfo, host localhost
           "http://127.0.0.1.example.invalid:" + port + "/allowed/img.bin",     // host suffix
           "http://127.0.0.1:" + std::to_string(server_.port() == 65535 ? 1 : server_.port() + 1) +
               "/allowed/img.bin",                                              // another port
           "http://127.0.0.1/allowed/img.bin",                                  // the default port
           "https://127.0.0.1:" + port + "/allowed/img.bin",                    // another scheme
           "http://localhost:" + port + "/allowed/img.bin",                     // same address, other name
       }) {
    absl::StatusOr<FetchResult> r = FetchVerified(url, Sha256(), dest_, options_);
    ASSERT_FALSE(r.ok()) << url;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kPermissionDenied) << url << ": " << r.status();
    EXPECT_THAT(r.status().message(), HasSubstr("image_source_allowlist")) << url;
    ExpectNoFiles();
  }
  EXPECT_EQ(Log().size(), 0u) << "a refused URL reached the server";
}

TEST_F(FetcherTest, RedirectTargetsAreCheckedAgain) {
  fs::create_directory(root_ / "allowed");
  WriteFile(root_ / "allowed/img.bin", data_);
  TestServer other;
  ASSERT_TRUE(other.Start({"--root", root_.path()}));
  const std::string other_base = absl::StrCat("http://127.0.0.1:", other.port());
  options_.url_allowlist = {base_ + "/", other_base + "/allowed/"};

  // To an allowed URL: followed (the redirect's own body is not part of the image).
  ExpectFetched(FetchVerified(base_ + "/redirect-to?url=" + Escape(other_base + "/allowed/img.bin"), Sha256(),
                              dest_, options_));
  EXPECT_EQ(RequestsSeen(other_base), 1u);
  fs::remove(dest_);

  // To a URL outside the allowlist, on a server it does allow elsewhere: refused unsent.
  absl::StatusOr<FetchResult> r =
      FetchVerified(base_ + "/redirect-to?url=" + Escape(other_base + "/img.bin"), Sha256(), dest_, options_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kPermissionDenied) << r.status();
  EXPECT_THAT(r.status().message(), HasSubstr("redirect"));
  EXPECT_THAT(r.status().message(), HasSubstr(other_base + "/img.bin"));
  EXPECT_THAT(r.status().message(), HasSubstr("image_source_allowlist"));
  EXPECT_EQ(RequestsSeen(other_base), 1u);
  ExpectNoFiles();

  // Schemes other than http(s) are refused, with or without an allowlist.
  for (const std::vector<std::string>& allowlist : {options_.url_allowlist, std::vector<std::string>{}}) {
    options_.url_allowlist = allowlist;
    r = FetchVerified(base_ + "/redirect-to?url=" + Escape("file://" + (root_ / "img.bin")), Sha256(), dest_,
                      options_);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kPermissionDenied) << r.status();
    EXPECT_THAT(r.status().message(), HasSubstr("not an http:// or https:// URL"));
    ExpectNoFiles();
  }
}

TEST_F(FetcherTest, ResumesThroughARedirect) {
  // Every attempt starts at the job's URL again, and continues the .part with a Range request.
  options_.url_allowlist = {base_ + "/"};
  absl::StatusOr<FetchResult> r =
      FetchVerified(base_ + "/redirect-to?url=" + Escape(base_ + "/drop/img.bin"), Sha256(), dest_, options_);
  ExpectFetched(r);
  EXPECT_TRUE(r->resumed);
  EXPECT_EQ(r->attempts, 2);
  std::vector<LogEntry> log = Log();
  ASSERT_EQ(log.size(), 4u);
  EXPECT_THAT(log[0].path, HasSubstr("/redirect-to"));
  EXPECT_EQ(log[1].path, "/drop/img.bin");
  EXPECT_EQ(log[1].range, "");
  EXPECT_THAT(log[2].path, HasSubstr("/redirect-to"));
  EXPECT_EQ(log[3].path, "/drop/img.bin");
  EXPECT_THAT(log[3].range, HasSubstr("bytes="));
}

// Runs `body` on a thread of its own in a new network namespace that holds only
// `lo` (up) with 169.254.77.1/32 added, so the test touches no network but its
// own. Sets *skip when the namespace cannot be made (no CAP_SYS_ADMIN).
void InPrivateNetns(const std::function<void()>& body, std::string* skip) {
  std::thread thread([&] {
    // A thread's network namespace is its own: the rest of the test binary stays where it was,
    // and processes and threads started from here (the test servers, `ip`) inherit this one.
    if (::unshare(CLONE_NEWNET) != 0) {
      *skip = absl::StrCat("cannot make a network namespace: ", std::strerror(errno));
      return;
    }
    for (const std::vector<std::string>& argv :
         {std::vector<std::string>{"/usr/sbin/ip", "link", "set", "lo", "up"},
          std::vector<std::string>{"/usr/sbin/ip", "addr", "add", "169.254.77.1/32", "dev", "lo"}}) {
      absl::StatusOr<CommandResult> ip = RunCommand(argv, absl::Seconds(30));
      if (!ip.ok() || ip->exit_code != 0) {
        *skip = absl::StrCat("cannot set up the namespace's lo: ", ip.ok() ? ip->output : ip.status().ToString());
        return;
      }
    }
    body();
  });
  thread.join();
}

TEST_F(FetcherTest, LinkLocalAddressesAreRefusedOnTheAddressConnectedTo) {
  std::string skip;
  InPrivateNetns(
      [&] {
        TestServer link_local, local;
        ASSERT_TRUE(link_local.Start({"--root", root_.path(), "--bind", "169.254.77.1"}));
        ASSERT_TRUE(local.Start({"--root", root_.path()}));
        const std::string port = std::to_string(link_local.port());
        const std::string ll_base = "http://169.254.77.1:" + port;
        const std::string local_base = absl::StrCat("http://127.0.0.1:", local.port());
        // A name only this fetch knows, resolving to the link-local address.
        const std::string named = "http://metadata.test:" + port + "/img.bin";
        options_.resolve = {"metadata.test:" + port + ":169.254.77.1"};

        // By name: the check is on the address connected to. Not retried, and says only that.
        for (const std::vector<std::string>& allowlist :
             {std::vector<std::string>{}, std::vector<std::string>{"http://metadata.test:" + port + "/"}}) {
          options_.url_allowlist = allowlist;
          options_.retries = 3;
          absl::StatusOr<FetchResult> r = FetchVerified(named, Sha256(), dest_, options_);
          ASSERT_FALSE(r.ok());
          EXPECT_EQ(r.status().code(), absl::StatusCode::kPermissionDenied) << r.status();
          EXPECT_EQ(r.status().message(), "fetching " + named + ": the address 169.254.77.1 is link-local and refused");
          ExpectNoFiles();
        }
        // The literal address in the URL: refused before connecting.
        options_.url_allowlist = {};
        absl::StatusOr<FetchResult> r = FetchVerified(ll_base + "/img.bin", Sha256(), dest_, options_);
        ASSERT_FALSE(r.ok());
        EXPECT_EQ(r.status().code(), absl::StatusCode::kPermissionDenied) << r.status();
        EXPECT_THAT(r.status().message(), HasSubstr("169.254.77.1 is link-local and refused"));
        // Through a redirect from an allowed server, by name and by address.
        for (const std::string& target : {named, ll_base + "/img.bin"}) {
          r = FetchVerified(local_base + "/redirect-to?url=" + Escape(target), Sha256(), dest_, options_);
          ASSERT_FALSE(r.ok()) << target;
          EXPECT_EQ(r.status().code(), absl::StatusCode::kPermissionDenied) << r.status();
          EXPECT_THAT(r.status().message(), HasSubstr("169.254.77.1 is link-local and refused")) << target;
          ExpectNoFiles();
        }
        EXPECT_EQ(RequestsSeen(ll_base), 0u) << "a request reached the link-local server";
        EXPECT_EQ(RequestsSeen(local_base), 2u);

        // An allowlist entry whose host is that address allows it, by address and by name.
        options_.url_allowlist = {ll_base + "/", "http://metadata.test:" + port + "/"};
        ExpectFetched(FetchVerified(ll_base + "/img.bin", Sha256(), dest_, options_));
        fs::remove(dest_);
        ExpectFetched(FetchVerified(named, Sha256(), dest_, options_));
        EXPECT_EQ(RequestsSeen(ll_base), 2u);
      },
      &skip);
  if (!skip.empty()) GTEST_SKIP() << skip;
}

TEST_F(FetcherTest, CancelledMidDownloadStopsPromptly) {
  std::mutex mu;
  std::condition_variable cv;
  bool started = false;
  std::atomic<bool> cancel{false};
  options_.progress_interval = absl::Milliseconds(50);
  options_.progress = [&](int64_t done, int64_t, double) {
    if (done <= 0) return;
    std::lock_guard<std::mutex> lock(mu);
    started = true;
    cv.notify_all();
  };
  options_.cancelled = [&] { return cancel.load(); };
  // About 48 s at 64 KiB/s: it must be the cancellation that ends it.
  std::future<absl::StatusOr<FetchResult>> fetch = std::async(std::launch::async, [&] {
    return FetchVerified(base_ + "/img.bin?rate=65536", Sha256(), dest_, options_);
  });
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(20), [&] { return started; })) << "no bytes arrived";
  }
  EXPECT_TRUE(fs::exists(dest_ + ".part"));
  cancel = true;
  ASSERT_EQ(fetch.wait_for(std::chrono::seconds(2)), std::future_status::ready) << "not stopped within 2 s";
  absl::StatusOr<FetchResult> r = fetch.get();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled) << r.status();
  EXPECT_THAT(r.status().message(), HasSubstr("cancelled"));
  ExpectNoFiles();
}

TEST_F(FetcherTest, CancelledDuringRetryBackOff) {
  options_.retries = 3;
  options_.initial_backoff = absl::Hours(1);  // only a cancellation ends this wait in time
  std::atomic<bool> cancel{false};
  absl::Time cancelled_at = absl::InfiniteFuture();
  options_.cancelled = [&] {
    // Cancel once the server has answered the first attempt (503).
    if (!cancel && RequestsSeen(base_) >= 1) {
      cancelled_at = absl::Now();
      cancel = true;
    }
    return cancel.load();
  };
  std::future<absl::StatusOr<FetchResult>> fetch = std::async(std::launch::async, [&] {
    return FetchVerified(base_ + "/status/503/img.bin", Sha256(), dest_, options_);
  });
  ASSERT_EQ(fetch.wait_for(std::chrono::seconds(20)), std::future_status::ready);
  absl::StatusOr<FetchResult> r = fetch.get();
  EXPECT_LT(absl::Now() - cancelled_at, absl::Seconds(2));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled) << r.status();
  EXPECT_EQ(Log().size(), 1u);
  ExpectNoFiles();
}

TEST_F(FetcherTest, CancelledLocalCopyAndCancelledBeforeStart) {
  int calls = 0;
  options_.cancelled = [&] { return ++calls >= 2; };  // after the first 1 MiB chunk
  absl::StatusOr<FetchResult> r = FetchVerified(root_ / "img.bin", Sha256(), dest_, options_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled) << r.status();
  ExpectNoFiles();

  options_.cancelled = [] { return true; };
  r = FetchVerified(base_ + "/img.bin", Sha256(), dest_, options_);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled) << r.status();
  EXPECT_EQ(Log().size(), 0u);
  ExpectNoFiles();
}

TEST_F(FetcherTest, LocalSourcesAreOpenedThroughTheHook) {
  std::vector<std::string> asked;
  int given_fd = -1;
  options_.open_local = [&](const std::string& path) -> absl::StatusOr<int> {
    asked.push_back(path);
    if (absl::StrContains(path, "secret")) return absl::PermissionDeniedError("not in image_paths: " + path);
    // Whatever was named, the hook decides what is read.
    given_fd = ::open((root_ / "img.bin").c_str(), O_RDONLY | O_CLOEXEC);
    return given_fd;
  };
  ExpectFetched(FetchVerified("file://" + (root_ / "no%20such.bin"), Sha256(), dest_, options_));
  EXPECT_EQ(::fcntl(given_fd, F_GETFD), -1) << "the fetcher closes the hook's fd";
  fs::remove(dest_);
  ExpectFetched(FetchVerified(root_ / "other.bin", Sha256(), dest_, options_));
  fs::remove(dest_);
  absl::StatusOr<FetchResult> r = FetchVerified("/etc/secret.img", Sha256(), dest_, options_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status(), absl::PermissionDeniedError("not in image_paths: /etc/secret.img"));
  ExpectNoFiles();
  EXPECT_EQ(asked, (std::vector<std::string>{root_ / "no such.bin", root_ / "other.bin", "/etc/secret.img"}));
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
