// Downloads a VM image to a local path while verifying its checksum in the
// same pass: http(s) through libcurl, file:// URLs and plain paths by reading.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "base/timeouts.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "image/checksum.h"

namespace ndq {

struct FetchOptions {
  absl::Duration connect_timeout = timeouts::kDownloadConnect;
  // A transfer slower than this for low_speed_time is aborted (and retried, resuming).
  int64_t low_speed_bytes_per_sec = 1024;
  absl::Duration low_speed_time = timeouts::kDownloadLowSpeed;
  // For the whole call, retries and back-off included.
  absl::Duration total_timeout = absl::Hours(1);
  int64_t max_bytes = 0;  // 0: unlimited
  int max_redirects = 5;
  // An extra PEM CA bundle trusted IN ADDITION to the system bundle
  // (/etc/ssl/certs/ca-certificates.crt): both are concatenated in memory and handed
  // to libcurl with CURLOPT_CAINFO_BLOB, because CURLOPT_CAINFO would replace it.
  std::string ca_file;
  int retries = 3;  // extra attempts after the first, for transient errors only
  absl::Duration initial_backoff = timeouts::kDownloadFirstBackoff;  // doubles per retry, capped
  // done: bytes in the file so far; total: expected size, -1 when unknown.
  std::function<void(int64_t done, int64_t total, double bytes_per_sec)> progress;
  absl::Duration progress_interval = absl::Seconds(1);

  // URL prefixes network sources must match (the operator's
  // image_source_allowlist; see NetworkSourcePolicy): checked before anything
  // is sent and again for every redirect target. Empty: any http/https URL.
  // Link-local addresses (169.254.0.0/16, fe80::/10) are never connected to,
  // whatever name led there, unless an entry's host is that very address.
  std::vector<std::string> url_allowlist;
  // Polled during the transfer (libcurl's progress callback, at least about
  // once a second), between retries and while copying local files; once it
  // returns true the fetch stops, removes the .part and returns Cancelled.
  std::function<bool()> cancelled;
  // Opens local sources (file:// URLs and plain paths) instead of the fetcher,
  // e.g. to hold them to an allowlist: returns a read-only fd, which the
  // fetcher reads and closes, or the error to return as is. Empty: open(2).
  std::function<absl::StatusOr<int>(const std::string& path)> open_local;
  // FOR TESTS ONLY: libcurl CURLOPT_RESOLVE entries ("host:port:address"), so a
  // test can point a name at an address of its own without DNS.
  std::vector<std::string> resolve;
};

struct FetchResult {
  int64_t bytes = 0;
  std::string hex_digest;  // of the expected checksum's type; sha256 when none was expected
  int attempts = 0;
  bool resumed = false;  // some bytes came from a Range request (or a .part left earlier)
  absl::Duration took;
};

// The local path a source names: a file:// URL's path (InvalidArgument when it
// is not absolute) or the source itself when it has no scheme; nullopt for
// any other scheme.
std::optional<absl::StatusOr<std::string>> LocalSourcePath(const std::string& source);

// Fetches `url` (http://, https://, file://, or a local path) to `dest_path`.
// Bytes are written to `dest_path + ".part"` and hashed as they arrive; once
// complete the file is fsynced, the digest compared with `expected` (when given)
// and only then renamed to `dest_path` (and the directory fsynced).
// Errors: NotFound (404, missing local file), DataLoss (checksum mismatch: names
// both digests), ResourceExhausted (over max_bytes), DeadlineExceeded (timeouts),
// Unavailable (connection problems, 5xx after retries), InvalidArgument (bad URL,
// unsupported scheme), FailedPrecondition (TLS, redirects, other HTTP errors),
// PermissionDenied (a URL or redirect target outside url_allowlist, a link-local
// address), Cancelled (options.cancelled), or open_local's own error.
// On failure no .part is left behind.
absl::StatusOr<FetchResult> FetchVerified(const std::string& url, const std::optional<Checksum>& expected,
                                          const std::string& dest_path, const FetchOptions& options);

}  // namespace ndq
