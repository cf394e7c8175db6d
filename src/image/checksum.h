// Image checksums: parsing an operator's `checksum` value, picking our file's
// line out of a published checksum file (GNU coreutils or BSD form), and a
// streaming hasher over OpenSSL's EVP interface.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

struct evp_md_ctx_st;  // OpenSSL's EVP_MD_CTX, kept out of this header.

namespace ndq {

struct Checksum {
  std::string type;  // md5, sha1, sha256 or sha512
  std::string hex;   // lowercase hex digest

  std::string ToString() const { return type + ":" + hex; }
  bool operator==(const Checksum& o) const { return type == o.type && hex == o.hex; }
};

// Number of hex digits of a digest of `type`; 0 for an unknown type.
size_t HexLengthForType(const std::string& type);

// "TYPE:HEX" (type case-insensitive, e.g. "sha256:ab12...") or a bare hex string
// whose length names the type (32 md5, 40 sha1, 64 sha256, 128 sha512).
// Errors: unknown type, non-hex digits, wrong length for the type.
absl::StatusOr<Checksum> ParseChecksum(const std::string& text);

// Picks the checksum of `file_name` from the contents of a checksum file.
// Accepted lines:
//   GNU coreutils: "HEX  name" or "HEX *name" (also "\HEX  name" with escaped names)
//   BSD / openssl: "SHA256 (name) = HEX", "SHA2-256(name)= HEX"
// The listed name matches when it equals `file_name`, is "./file_name" or a path
// ending in "/file_name". The type comes from the BSD tag, else from the hex length;
// a non-empty `type_hint` (md5/sha1/sha256/sha512) selects among several lines for
// the same file and skips lines of another type. Blank lines and '#' comments are ignored.
absl::StatusOr<Checksum> ChecksumFromFile(const std::string& content, const std::string& file_name,
                                          const std::string& type_hint);

// Streaming digest: Update() any number of times, FinalHex() once.
class Hasher {
 public:
  static absl::StatusOr<Hasher> Create(const std::string& type);

  Hasher(Hasher&&) noexcept;
  Hasher& operator=(Hasher&&) noexcept;
  ~Hasher();

  void Update(const void* data, size_t len);
  // Lowercase hex of the digest; afterwards the hasher must be Reset() before reuse.
  std::string FinalHex();
  // Starts over with nothing hashed.
  void Reset();
  const std::string& type() const { return type_; }

 private:
  Hasher(std::string type, evp_md_ctx_st* ctx);
  std::string type_;
  evp_md_ctx_st* ctx_ = nullptr;
};

}  // namespace ndq
