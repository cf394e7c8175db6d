#include "image/fetcher.h"

#include <curl/curl.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "base/error_kind.h"
#include "base/timeouts.h"
#include "policy/source_policy.h"

#ifndef NDQ_VERSION
#define NDQ_VERSION "dev"
#endif

namespace ndq {
namespace {

constexpr size_t kReadChunk = 1 << 20;
constexpr absl::Duration kMaxBackoff = timeouts::kDownloadMaxBackoff;
constexpr char kSystemCaBundle[] = "/etc/ssl/certs/ca-certificates.crt";
// How often a back-off wait looks at FetchOptions::cancelled (a predicate, so
// there is nothing to block on).
constexpr absl::Duration kCancelPoll = timeouts::kDownloadCancelPoll;

bool IsCancelled(const FetchOptions& options) { return options.cancelled && options.cancelled(); }

absl::Status CancelledStatus(const std::string& url) {
  return absl::CancelledError(absl::StrCat("fetching ", url, ": cancelled; the partial download was removed"));
}

// Sleeps for `d` unless cancelled first; false when cancelled.
bool WaitUnlessCancelled(absl::Duration d, const FetchOptions& options) {
  const absl::Time end = absl::Now() + d;
  while (!IsCancelled(options)) {
    const absl::Duration left = end - absl::Now();
    if (left <= absl::ZeroDuration()) return true;
    absl::SleepFor(std::min(left, kCancelPoll));
  }
  return false;
}

std::string Errno(absl::string_view what, const std::string& path) {
  return absl::StrCat(what, " ", path, ": ", std::strerror(errno));
}

// The .part file being written, removed unless Keep() says otherwise.
class PartFile {
 public:
  explicit PartFile(std::string path) : path_(std::move(path)) {}
  ~PartFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  PartFile(const PartFile&) = delete;
  PartFile& operator=(const PartFile&) = delete;

  // truncate: start empty; otherwise keep what an earlier process left.
  absl::Status Open(bool truncate) {
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW | (truncate ? O_TRUNC : 0), 0644);
    if (fd_ < 0) return absl::FailedPreconditionError(Errno("cannot create", path_));
    if (::lseek(fd_, 0, SEEK_END) < 0) return absl::InternalError(Errno("cannot seek in", path_));
    return absl::OkStatus();
  }
  absl::Status Write(const char* data, size_t len) {
    while (len > 0) {
      const ssize_t n = ::write(fd_, data, len);
      if (n < 0) {
        if (errno == EINTR) continue;
        return absl::ResourceExhaustedError(Errno("cannot write", path_));
      }
      data += n;
      len -= static_cast<size_t>(n);
    }
    return absl::OkStatus();
  }
  absl::Status Truncate() {
    if (::ftruncate(fd_, 0) != 0 || ::lseek(fd_, 0, SEEK_SET) != 0) {
      return absl::InternalError(Errno("cannot truncate", path_));
    }
    return absl::OkStatus();
  }
  absl::Status SyncAndClose() {
    if (::fsync(fd_) != 0) return absl::InternalError(Errno("fsync", path_));
    const int fd = std::exchange(fd_, -1);
    if (::close(fd) != 0) return absl::InternalError(Errno("close", path_));
    return absl::OkStatus();
  }
  void Remove() {
    if (fd_ >= 0) ::close(std::exchange(fd_, -1));
    ::unlink(path_.c_str());
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
};

class ProgressReporter {
 public:
  ProgressReporter(const FetchOptions& options, absl::Time start) : options_(options), start_(start), last_(start) {}
  void SetBase(int64_t done) { base_ = done; }
  void Maybe(int64_t done, int64_t total) {
    if (!options_.progress) return;
    const absl::Time now = absl::Now();
    if (now - last_ < options_.progress_interval) return;
    last_ = now;
    Report(done, total, now);
  }
  void Final(int64_t done, int64_t total) {
    if (options_.progress) Report(done, total, absl::Now());
  }

 private:
  void Report(int64_t done, int64_t total, absl::Time now) {
    const double secs = absl::ToDoubleSeconds(now - start_);
    const double rate = secs > 0 ? static_cast<double>(done - base_) / secs : 0.0;
    options_.progress(done, total, rate);
  }
  const FetchOptions& options_;
  absl::Time start_;
  absl::Time last_;
  int64_t base_ = 0;
};

absl::Status TooBig(int64_t size, int64_t max, const std::string& url) {
  return absl::ResourceExhaustedError(
      absl::StrCat(url, " is larger than the limit of ", max, " bytes (", size, " bytes or more)"));
}

// fsync, compare, rename, fsync the directory.
absl::Status Finish(PartFile& part, Hasher& hasher, const std::optional<Checksum>& expected,
                    const std::string& url, const std::string& dest_path, FetchResult& result) {
  if (absl::Status s = part.SyncAndClose(); !s.ok()) {
    part.Remove();
    return s;
  }
  result.hex_digest = hasher.FinalHex();
  if (expected.has_value() && result.hex_digest != expected->hex) {
    part.Remove();
    // The actual digest and size are not told: an answer that carried them
    // would describe a file the job may not have been allowed to learn about.
    return absl::DataLossError(absl::StrCat("checksum mismatch for ", url, ": the downloaded file is not ",
                                            expected->type, ":", expected->hex));
  }
  if (::rename(part.path().c_str(), dest_path.c_str()) != 0) {
    const std::string msg = Errno(absl::StrCat("cannot rename ", part.path(), " to"), dest_path);
    part.Remove();
    return absl::InternalError(msg);
  }
  const size_t slash = dest_path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : dest_path.substr(0, slash));
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return absl::OkStatus();
}

// Adds the bytes of a file to `hasher`; returns how many.
absl::StatusOr<int64_t> HashFile(const std::string& path, Hasher& hasher, const FetchOptions& options,
                                 const std::string& url) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return absl::InternalError(Errno("cannot open", path));
  std::vector<char> buf(kReadChunk);
  int64_t total = 0;
  while (true) {
    const ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const std::string msg = Errno("cannot read", path);
      ::close(fd);
      return absl::InternalError(msg);
    }
    if (n == 0) break;
    hasher.Update(buf.data(), static_cast<size_t>(n));
    total += n;
    if (IsCancelled(options)) {  // a .part of gigabytes takes a while to hash
      ::close(fd);
      return CancelledStatus(url);
    }
  }
  ::close(fd);
  return total;
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  c = absl::ascii_tolower(static_cast<unsigned char>(c));
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

absl::StatusOr<std::string> FileUrlToPath(const std::string& url) {
  absl::string_view rest = absl::string_view(url).substr(7);  // after "file://"
  absl::ConsumePrefix(&rest, "localhost");
  if (rest.empty() || rest[0] != '/') {
    return absl::InvalidArgumentError(
        absl::StrCat("file URL \"", url, "\" must name an absolute local path (file:///path)"));
  }
  std::string path;
  for (size_t i = 0; i < rest.size(); ++i) {
    if (rest[i] == '%' && i + 2 < rest.size() && HexValue(rest[i + 1]) >= 0 && HexValue(rest[i + 2]) >= 0) {
      path.push_back(static_cast<char>(HexValue(rest[i + 1]) * 16 + HexValue(rest[i + 2])));
      i += 2;
    } else {
      path.push_back(rest[i]);
    }
  }
  return path;
}

absl::StatusOr<FetchResult> FetchLocal(const std::string& url, const std::string& path,
                                       const std::optional<Checksum>& expected, const std::string& dest_path,
                                       const FetchOptions& options, Hasher& hasher, absl::Time start) {
  FetchResult result;
  result.attempts = 1;
  if (IsCancelled(options)) return CancelledStatus(url);
  int src = -1;
  if (options.open_local) {
    absl::StatusOr<int> fd = options.open_local(path);
    if (!fd.ok()) return fd.status();
    src = *fd;
    if (src < 0) return absl::InternalError(absl::StrCat("opening ", path, " returned no file descriptor"));
  } else {
    src = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (src < 0) {
      if (errno == ENOENT) return absl::NotFoundError(absl::StrCat("image ", path, " does not exist"));
      return absl::FailedPreconditionError(Errno("cannot open image", path));
    }
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{src};
  struct stat st;
  if (::fstat(src, &st) != 0 || !S_ISREG(st.st_mode)) {
    return ConfigError(absl::StrCat("image ", path, " is not a regular file"));
  }
  const int64_t total = st.st_size;
  if (options.max_bytes > 0 && total > options.max_bytes) return TooBig(total, options.max_bytes, url);

  PartFile part(dest_path + ".part");
  if (absl::Status s = part.Open(/*truncate=*/true); !s.ok()) return s;
  ProgressReporter progress(options, start);
  std::vector<char> buf(kReadChunk);
  while (true) {
    const ssize_t n = ::read(src, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const std::string msg = Errno("cannot read", path);
      part.Remove();
      return absl::InternalError(msg);
    }
    if (n == 0) break;
    if (options.max_bytes > 0 && result.bytes + n > options.max_bytes) {
      part.Remove();
      return TooBig(result.bytes + n, options.max_bytes, url);
    }
    hasher.Update(buf.data(), static_cast<size_t>(n));
    if (absl::Status s = part.Write(buf.data(), static_cast<size_t>(n)); !s.ok()) {
      part.Remove();
      return s;
    }
    result.bytes += n;
    progress.Maybe(result.bytes, total);
    if (IsCancelled(options)) {
      part.Remove();
      return CancelledStatus(url);
    }
  }
  if (absl::Status s = Finish(part, hasher, expected, url, dest_path, result); !s.ok()) return s;
  progress.Final(result.bytes, total);
  result.took = absl::Now() - start;
  return result;
}

// ---- HTTP(S) ----

void GlobalInit() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

struct CurlDeleter {
  void operator()(CURL* c) const { curl_easy_cleanup(c); }
};

// State shared with libcurl's callbacks during one call (all attempts).
struct Transfer {
  std::string url;
  const FetchOptions* options = nullptr;
  const NetworkSourcePolicy* policy = nullptr;
  CURL* curl = nullptr;
  PartFile* part = nullptr;
  Hasher* hasher = nullptr;
  ProgressReporter* progress = nullptr;
  int64_t max_bytes = 0;

  int64_t offset = 0;          // bytes in the .part, all hashed
  int64_t request_offset = 0;  // the Range start of this attempt
  int64_t total = -1;
  bool saw_body = false;     // first body byte (or the end of an empty body) handled
  bool resumed = false;      // a 206 continued earlier bytes
  bool range_mismatch = false;
  bool discard = false;      // the current response is a redirect: its body is not the image
  absl::Status abort;        // set when a callback stops the transfer
  std::string refused_address;  // a link-local address OnOpenSocket would not connect to

  // From the headers of the current response.
  int64_t range_start = -1;
  int64_t range_total = -1;
};

size_t OnHeader(char* data, size_t size, size_t nitems, void* user) {
  Transfer* t = static_cast<Transfer*>(user);
  const size_t len = size * nitems;
  absl::string_view line(data, len);
  if (absl::StartsWith(line, "HTTP/")) {
    t->range_start = -1;
    t->range_total = -1;
    t->discard = false;
  } else if (absl::StartsWithIgnoreCase(line, "content-range:")) {
    // Content-Range: bytes START-END/TOTAL
    absl::string_view v = absl::StripAsciiWhitespace(line.substr(14));
    if (absl::ConsumePrefix(&v, "bytes ")) {
      const size_t dash = v.find('-');
      const size_t slash = v.find('/');
      int64_t start = -1, total = -1;
      if (dash != absl::string_view::npos && absl::SimpleAtoi(v.substr(0, dash), &start)) t->range_start = start;
      if (slash != absl::string_view::npos && absl::SimpleAtoi(v.substr(slash + 1), &total)) t->range_total = total;
    }
  }
  return len;
}

// Called at the first body byte of a response (or after an empty one): decides
// whether it continues the .part (206) or starts over (200).
bool OnFirstBody(Transfer* t) {
  t->saw_body = true;
  long code = 0;
  curl_easy_getinfo(t->curl, CURLINFO_RESPONSE_CODE, &code);
  curl_off_t length = -1;
  curl_easy_getinfo(t->curl, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &length);
  if (t->request_offset > 0 && code == 206) {
    if (t->range_start != t->request_offset) {
      t->range_mismatch = true;
      return false;
    }
    t->resumed = true;
    t->total = t->range_total >= 0 ? t->range_total : (length >= 0 ? t->request_offset + length : -1);
  } else {
    if (t->offset > 0) {  // the server ignored our Range: start over with a fresh hash
      if (absl::Status s = t->part->Truncate(); !s.ok()) {
        t->abort = s;
        return false;
      }
      t->hasher->Reset();
      t->offset = 0;
    }
    t->total = length >= 0 ? static_cast<int64_t>(length) : -1;
  }
  if (t->max_bytes > 0 && t->total > t->max_bytes) {
    t->abort = TooBig(t->total, t->max_bytes, t->url);
    return false;
  }
  return true;
}

size_t OnBody(char* data, size_t size, size_t nmemb, void* user) {
  Transfer* t = static_cast<Transfer*>(user);
  const size_t len = size * nmemb;
  if (t->discard) return len;
  if (!t->saw_body) {
    long code = 0;
    curl_easy_getinfo(t->curl, CURLINFO_RESPONSE_CODE, &code);
    // A redirect's body (we follow redirects ourselves) must neither land in the
    // .part nor make OnFirstBody throw away bytes a Range request is resuming.
    if (code >= 300 && code < 400) {
      t->discard = true;
      return len;
    }
    if (!OnFirstBody(t)) return CURL_WRITEFUNC_ERROR;
  }
  if (t->max_bytes > 0 && t->offset + static_cast<int64_t>(len) > t->max_bytes) {
    t->abort = TooBig(t->offset + static_cast<int64_t>(len), t->max_bytes, t->url);
    return CURL_WRITEFUNC_ERROR;
  }
  if (absl::Status s = t->part->Write(data, len); !s.ok()) {
    t->abort = s;
    return CURL_WRITEFUNC_ERROR;
  }
  t->hasher->Update(data, len);
  t->offset += static_cast<int64_t>(len);
  return len;
}

int OnProgress(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
  Transfer* t = static_cast<Transfer*>(user);
  if (IsCancelled(*t->options)) {
    t->abort = CancelledStatus(t->url);
    return 1;  // CURLE_ABORTED_BY_CALLBACK
  }
  t->progress->Maybe(t->offset, t->total);
  return 0;
}

// Every connection libcurl makes, to whatever address a name resolved to (or a
// redirect led to), passes here before a packet is sent: the link-local check
// is on the address itself, so DNS answers cannot get around it.
curl_socket_t OnOpenSocket(void* user, curlsocktype, curl_sockaddr* address) {
  Transfer* t = static_cast<Transfer*>(user);
  IpAddress ip;
  if (!AddressOf(&address->addr, &ip)) return CURL_SOCKET_BAD;  // http(s) connects to IP addresses only
  if (!t->policy->MayConnect(ip)) {
    t->refused_address = AddressText(ip);
    return CURL_SOCKET_BAD;  // libcurl tries the name's next address, if any
  }
  // Close-on-exec: the plugin spawns supervisors and qemu-img meanwhile.
  return ::socket(address->family, address->socktype | SOCK_CLOEXEC, address->protocol);
}

struct Outcome {
  absl::Status status;
  bool transient = false;
  bool restart = false;  // the .part cannot be continued: start over from byte 0
};

Outcome Classify(CURLcode rc, const Transfer& t, const char* errbuf) {
  long code = 0;
  curl_easy_getinfo(t.curl, CURLINFO_RESPONSE_CODE, &code);
  const std::string detail = errbuf[0] != '\0' ? std::string(errbuf) : std::string(curl_easy_strerror(rc));
  const std::string where = absl::StrCat("fetching ", t.url, ": ");
  switch (rc) {
    case CURLE_HTTP_RETURNED_ERROR: {
      const std::string msg = absl::StrCat(where, "server answered HTTP ", code);
      if (code == 404 || code == 410) return {absl::NotFoundError(msg), false};
      if (code >= 500 || code == 429 || code == 408) return {absl::UnavailableError(msg), true};
      if (code == 416 && t.request_offset > 0) {
        return {absl::UnavailableError(absl::StrCat(msg, " to a Range request from byte ", t.request_offset)), true,
                true};
      }
      return {ConfigError(msg), false};  // 401, 403, ...: asking again gives the same answer
    }
    case CURLE_OPERATION_TIMEDOUT:
      return {absl::DeadlineExceededError(absl::StrCat(where, detail)), true};
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_PARTIAL_FILE:
    case CURLE_GOT_NOTHING:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
    case CURLE_SSL_CONNECT_ERROR:
      return {absl::UnavailableError(absl::StrCat(where, detail)), true};
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_ISSUER_ERROR:
      return {ConfigError(absl::StrCat(where, "TLS verification failed: ", detail)), false};
    case CURLE_UNSUPPORTED_PROTOCOL:
      return {absl::InvalidArgumentError(absl::StrCat(where, "unsupported URL scheme (", detail, ")")), false};
    case CURLE_URL_MALFORMAT:
      return {absl::InvalidArgumentError(absl::StrCat(where, "malformed URL: ", detail)), false};
    default:
      return {absl::UnavailableError(absl::StrCat(where, detail)), false};
  }
}

absl::StatusOr<std::string> ReadWhole(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return ConfigError(absl::StrCat("cannot read CA bundle ", path, ": ", std::strerror(errno)));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// System bundle + the operator's CA, as one PEM blob (CURLOPT_CAINFO would
// replace the system bundle rather than add to it).
absl::StatusOr<std::string> CombinedCaBundle(const std::string& ca_file) {
  absl::StatusOr<std::string> extra = ReadWhole(ca_file);
  if (!extra.ok()) return extra.status();
  if (extra->find("-----BEGIN CERTIFICATE-----") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("ca_file ", ca_file, " holds no PEM certificate"));
  }
  const curl_version_info_data* info = curl_version_info(CURLVERSION_NOW);
  const std::string system = info != nullptr && info->cainfo != nullptr ? info->cainfo : kSystemCaBundle;
  absl::StatusOr<std::string> bundle = ReadWhole(system);
  std::string out = bundle.ok() ? *bundle : std::string();  // no system bundle: the extra CA alone
  out.append("\n");
  out.append(*extra);
  return out;
}

struct SlistDeleter {
  void operator()(curl_slist* l) const { curl_slist_free_all(l); }
};
using Slist = std::unique_ptr<curl_slist, SlistDeleter>;

// FetchOptions::resolve as a curl_slist for CURLOPT_RESOLVE (null when empty).
absl::StatusOr<Slist> ResolveList(const std::vector<std::string>& entries) {
  Slist resolve;
  for (const std::string& entry : entries) {
    curl_slist* head = resolve.release();
    curl_slist* l = curl_slist_append(head, entry.c_str());
    if (l == nullptr) {
      curl_slist_free_all(head);
      return absl::InternalError("curl_slist_append failed");
    }
    resolve.reset(l);
  }
  return resolve;
}

// What FetchHttp settles before anything is sent or created.
struct HttpSetup {
  NetworkSourcePolicy policy;
  std::string admitted;  // the job's URL, as the policy admitted it
  std::string ca_blob;   // system bundle + FetchOptions::ca_file; empty: libcurl's own
  Slist resolve;
};

absl::StatusOr<HttpSetup> PrepareHttp(const std::string& url, const FetchOptions& options) {
  // Refused before anything is sent or created.
  absl::StatusOr<NetworkSourcePolicy> policy = NetworkSourcePolicy::Create(options.url_allowlist);
  if (!policy.ok()) return policy.status();
  absl::StatusOr<std::string> admitted = policy->Admit(url);
  if (!admitted.ok()) return admitted.status();
  if (IsCancelled(options)) return CancelledStatus(url);
  std::string ca_blob;
  if (!options.ca_file.empty()) {
    absl::StatusOr<std::string> b = CombinedCaBundle(options.ca_file);
    if (!b.ok()) return b.status();
    ca_blob = std::move(*b);
  }
  absl::StatusOr<Slist> resolve = ResolveList(options.resolve);
  if (!resolve.ok()) return resolve.status();
  return HttpSetup{*std::move(policy), *std::move(admitted), std::move(ca_blob), *std::move(resolve)};
}

// Opens t.part. A .part left by an earlier process: hash what it holds once,
// then continue it (t.offset); otherwise start empty.
absl::Status OpenPart(Transfer& t) {
  struct stat st;
  const bool have_part = ::lstat(t.part->path().c_str(), &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0 &&
                         (t.options->max_bytes <= 0 || st.st_size <= t.options->max_bytes);
  if (absl::Status s = t.part->Open(/*truncate=*/!have_part); !s.ok()) return s;
  if (!have_part) return absl::OkStatus();
  absl::StatusOr<int64_t> n = HashFile(t.part->path(), *t.hasher, *t.options, t.url);
  if (!n.ok()) {
    t.part->Remove();
    return n.status();
  }
  t.offset = *n;
  return absl::OkStatus();
}

// One FetchHttp call, as its attempts see it.
struct HttpFetch {
  const FetchOptions& options;
  HttpSetup& setup;
  absl::Time deadline;
  Transfer& t;
  char errbuf[CURL_ERROR_SIZE];  // libcurl's message for the last request
};

// The options every request of the call shares.
void ConfigureCurl(HttpFetch& f) {
  CURL* c = f.t.curl;
  const FetchOptions& options = f.options;
  const std::string user_agent = absl::StrCat("nomad-driver-qemu/", NDQ_VERSION);

  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(c, CURLOPT_ERRORBUFFER, f.errbuf);
  curl_easy_setopt(c, CURLOPT_USERAGENT, user_agent.c_str());  // libcurl keeps a copy
  curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(c, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
  // Redirects are followed by PerformFollowingRedirects, each target held to the same policy.
  curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
  // Only connections we check: no proxy from the environment (it would connect
  // on our behalf to addresses we never see), and no ~/.netrc credentials.
  curl_easy_setopt(c, CURLOPT_PROXY, "");
  curl_easy_setopt(c, CURLOPT_NETRC, static_cast<long>(CURL_NETRC_IGNORED));
  curl_easy_setopt(c, CURLOPT_OPENSOCKETFUNCTION, OnOpenSocket);
  curl_easy_setopt(c, CURLOPT_OPENSOCKETDATA, &f.t);
  if (f.setup.resolve) curl_easy_setopt(c, CURLOPT_RESOLVE, f.setup.resolve.get());
  curl_easy_setopt(c, CURLOPT_FAILONERROR, 1L);
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS,
                   static_cast<long>(std::max<int64_t>(1, absl::ToInt64Milliseconds(options.connect_timeout))));
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, static_cast<long>(options.low_speed_bytes_per_sec));
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME,
                   static_cast<long>(std::max<int64_t>(1, absl::ToInt64Seconds(options.low_speed_time))));
  curl_easy_setopt(c, CURLOPT_BUFFERSIZE, 256L * 1024);
  curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, 1L);
  curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, 2L);
  if (!f.setup.ca_blob.empty()) {
    curl_blob blob{f.setup.ca_blob.data(), f.setup.ca_blob.size(), CURL_BLOB_COPY};
    curl_easy_setopt(c, CURLOPT_CAINFO_BLOB, &blob);
  }
  curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, OnHeader);
  curl_easy_setopt(c, CURLOPT_HEADERDATA, &f.t);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, OnBody);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &f.t);
  if (options.progress || options.cancelled) {
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, OnProgress);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, &f.t);
  }
}

// One request for `target`, continuing the .part from its end.
CURLcode Perform(HttpFetch& f, const std::string& target) {
  Transfer& t = f.t;
  const absl::Duration left = f.deadline - absl::Now();
  curl_easy_setopt(t.curl, CURLOPT_TIMEOUT_MS, static_cast<long>(std::max<int64_t>(1, absl::ToInt64Milliseconds(left))));
  curl_easy_setopt(t.curl, CURLOPT_URL, target.c_str());
  t.request_offset = t.offset;
  const std::string range = absl::StrCat(t.offset, "-");
  curl_easy_setopt(t.curl, CURLOPT_RANGE, t.offset > 0 ? range.c_str() : nullptr);
  t.saw_body = false;
  t.discard = false;
  t.range_mismatch = false;
  t.abort = absl::OkStatus();
  t.refused_address.clear();
  f.errbuf[0] = '\0';
  return curl_easy_perform(t.curl);
}

// One attempt: the job's URL, then each redirect target the policy admits.
// Returns libcurl's code for the last request, or why a redirect was not followed.
absl::StatusOr<CURLcode> PerformFollowingRedirects(HttpFetch& f) {
  const std::string& url = f.t.url;
  // Every attempt starts at the job's URL again: a redirect target may be a
  // short-lived (signed) URL.
  std::string current = f.setup.admitted;
  int redirects = 0;
  while (true) {
    const CURLcode rc = Perform(f, current);
    if (rc != CURLE_OK) return rc;
    long code = 0;
    curl_easy_getinfo(f.t.curl, CURLINFO_RESPONSE_CODE, &code);
    char* location = nullptr;
    if (code < 300 || code >= 400 || curl_easy_getinfo(f.t.curl, CURLINFO_REDIRECT_URL, &location) != CURLE_OK ||
        location == nullptr) {
      return rc;
    }
    if (++redirects > f.options.max_redirects) {
      return ConfigError(
          absl::StrCat("fetching ", url, ": more than ", f.options.max_redirects, " redirects (a redirect loop?)"));
    }
    // The target (absolute, as libcurl resolved it) passes the same checks as the job's URL.
    absl::StatusOr<std::string> next = f.setup.policy.Admit(location);
    if (!next.ok()) {
      return absl::PermissionDeniedError(
          absl::StrCat("fetching ", url, ": refused to follow a redirect: ", next.status().message()));
    }
    current = *std::move(next);
    if (IsCancelled(f.options)) return CancelledStatus(url);
  }
}

// After an attempt whose last request libcurl completed: true when it
// delivered the image; false when OnFirstBody refused the (empty) body and
// the attempt is judged like a failed one.
absl::StatusOr<bool> Delivered(Transfer& t) {
  if (!t.saw_body && !OnFirstBody(&t)) {
    if (!t.abort.ok()) return t.abort;
    return false;
  }
  long code = 0;
  curl_easy_getinfo(t.curl, CURLINFO_RESPONSE_CODE, &code);
  if (code >= 200 && code < 300) return true;
  return ConfigError(absl::StrCat("fetching ", t.url, ": unexpected HTTP ", code, " (redirect without a location?)"));
}

// Why an attempt did not deliver the image: an Outcome to retry or report,
// or an error to return as it is (no retry, no attempt count).
absl::StatusOr<Outcome> AttemptFailure(CURLcode rc, const Transfer& t, const char* errbuf) {
  if (t.range_mismatch) {
    return Outcome{absl::UnavailableError(absl::StrCat("fetching ", t.url, ": server answered a Range request from ",
                                                       t.request_offset, " with bytes from ", t.range_start)),
                   true, true};
  }
  if (!t.abort.ok()) return t.abort;
  if (rc == CURLE_COULDNT_CONNECT && !t.refused_address.empty()) {
    // Not retried, and nothing but the fact: the job learns no more about what answers there.
    return absl::PermissionDeniedError(
        absl::StrCat("fetching ", t.url, ": the address ", t.refused_address, " is link-local and refused"));
  }
  return Classify(rc, t, errbuf);
}

absl::Status WithAttempts(const absl::Status& status, int attempts) {
  if (attempts <= 1) return status;
  return absl::Status(status.code(), absl::StrCat(status.message(), " (after ", attempts, " attempts)"));
}

// Sleeps before the attempt after `attempt`: initial_backoff, doubled per
// attempt, at most kMaxBackoff and never past the deadline. False when cancelled.
bool BackOff(int attempt, const FetchOptions& options, absl::Time deadline) {
  absl::Duration backoff = options.initial_backoff;
  for (int i = 1; i < attempt && backoff < kMaxBackoff; ++i) backoff *= 2;
  backoff = std::min({backoff, kMaxBackoff, deadline - absl::Now()});
  return backoff <= absl::ZeroDuration() || WaitUnlessCancelled(backoff, options);
}

// Attempts until the .part holds the whole image, retrying transient failures
// (resuming where the .part ends). On an error the caller removes the .part.
absl::Status Download(HttpFetch& f, FetchResult& result) {
  Transfer& t = f.t;
  const FetchOptions& options = f.options;
  for (int attempt = 1;; ++attempt) {
    result.attempts = attempt;
    if (IsCancelled(options)) return CancelledStatus(t.url);
    if (f.deadline - absl::Now() <= absl::ZeroDuration()) {
      return absl::DeadlineExceededError(absl::StrCat("fetching ", t.url, ": total timeout of ",
                                                      absl::FormatDuration(options.total_timeout), " reached after ",
                                                      attempt - 1, " attempts"));
    }
    const absl::StatusOr<CURLcode> rc = PerformFollowingRedirects(f);
    if (!rc.ok()) return rc.status();
    if (*rc == CURLE_OK) {
      const absl::StatusOr<bool> delivered = Delivered(t);
      if (!delivered.ok()) return delivered.status();
      if (*delivered) return absl::OkStatus();
    }
    const absl::StatusOr<Outcome> outcome = AttemptFailure(*rc, t, f.errbuf);
    if (!outcome.ok()) return outcome.status();
    if (outcome->restart) {
      if (absl::Status s = t.part->Truncate(); !s.ok()) return s;
      t.hasher->Reset();
      t.offset = 0;
    }
    if (!outcome->transient || attempt > options.retries) return WithAttempts(outcome->status, attempt);
    if (!BackOff(attempt, options, f.deadline)) return CancelledStatus(t.url);
  }
}

absl::StatusOr<FetchResult> FetchHttp(const std::string& url, const std::optional<Checksum>& expected,
                                      const std::string& dest_path, const FetchOptions& options, Hasher& hasher,
                                      absl::Time start) {
  GlobalInit();
  absl::StatusOr<HttpSetup> setup = PrepareHttp(url, options);
  if (!setup.ok()) return setup.status();

  PartFile part(dest_path + ".part");
  Transfer t;
  t.url = url;
  t.options = &options;
  t.policy = &setup->policy;
  t.part = &part;
  t.hasher = &hasher;
  t.max_bytes = options.max_bytes;
  if (absl::Status s = OpenPart(t); !s.ok()) return s;

  std::unique_ptr<CURL, CurlDeleter> curl(curl_easy_init());
  if (!curl) {
    part.Remove();
    return absl::InternalError("curl_easy_init failed");
  }
  t.curl = curl.get();
  ProgressReporter progress(options, start);
  progress.SetBase(t.offset);
  t.progress = &progress;
  HttpFetch f{options, *setup, start + options.total_timeout, t, {}};
  ConfigureCurl(f);

  FetchResult result;
  if (absl::Status s = Download(f, result); !s.ok()) {
    part.Remove();
    return s;
  }
  result.bytes = t.offset;
  result.resumed = t.resumed;
  if (options.max_bytes > 0 && result.bytes > options.max_bytes) {
    part.Remove();
    return TooBig(result.bytes, options.max_bytes, url);
  }
  if (absl::Status s = Finish(part, hasher, expected, url, dest_path, result); !s.ok()) return s;
  progress.Final(result.bytes, t.total >= 0 ? t.total : result.bytes);
  result.took = absl::Now() - start;
  return result;
}

}  // namespace

std::optional<absl::StatusOr<std::string>> LocalSourcePath(const std::string& source) {
  const size_t sep = source.find("://");
  if (sep == std::string::npos) return absl::StatusOr<std::string>(source);
  if (absl::AsciiStrToLower(absl::string_view(source).substr(0, sep)) != "file") return std::nullopt;
  return FileUrlToPath(source);
}

absl::StatusOr<FetchResult> FetchVerified(const std::string& url, const std::optional<Checksum>& expected,
                                          const std::string& dest_path, const FetchOptions& options) {
  const absl::Time start = absl::Now();
  if (url.empty()) return absl::InvalidArgumentError("empty image URL");
  if (dest_path.empty()) return absl::InvalidArgumentError("empty destination path");
  absl::StatusOr<Hasher> hasher = Hasher::Create(expected.has_value() ? expected->type : "sha256");
  if (!hasher.ok()) return hasher.status();

  if (std::optional<absl::StatusOr<std::string>> path = LocalSourcePath(url)) {
    if (!path->ok()) return path->status();
    return FetchLocal(url, **path, expected, dest_path, options, *hasher, start);
  }
  const std::string scheme = absl::AsciiStrToLower(absl::string_view(url).substr(0, url.find("://")));
  if (scheme == "http" || scheme == "https") {
    return FetchHttp(url, expected, dest_path, options, *hasher, start);
  }
  return absl::InvalidArgumentError(absl::StrCat("unsupported URL scheme \"", scheme, "\" in ", url,
                                                 " (want http, https, file or a local path)"));
}

}  // namespace ndq
