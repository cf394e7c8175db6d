#include "image/checksum.h"

#include <openssl/evp.h>

#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"

namespace ndq {
namespace {

const EVP_MD* MdForType(const std::string& type) {
  if (type == "md5") return EVP_md5();
  if (type == "sha1") return EVP_sha1();
  if (type == "sha256") return EVP_sha256();
  if (type == "sha512") return EVP_sha512();
  return nullptr;
}

std::string TypeForHexLength(size_t n) {
  switch (n) {
    case 32: return "md5";
    case 40: return "sha1";
    case 64: return "sha256";
    case 128: return "sha512";
    default: return "";
  }
}

bool IsHex(absl::string_view s) {
  if (s.empty()) return false;
  for (char c : s) {
    if (!absl::ascii_isxdigit(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

// "SHA256", "sha2-256", "SHA-512" ... → our type name; empty when unknown.
std::string NormalizeTag(absl::string_view tag) {
  std::string t;
  for (char c : tag) {
    if (c != '-' && c != '_') t.push_back(absl::ascii_tolower(static_cast<unsigned char>(c)));
  }
  if (t == "sha2256") return "sha256";
  if (t == "sha2512") return "sha512";
  if (t == "md5" || t == "sha1" || t == "sha256" || t == "sha512") return t;
  return "";
}

struct Line {
  std::string tag;  // BSD tag when present
  std::string hex;
  std::string name;
};

// GNU's escaped form: a leading backslash means the name has \\ and \n escapes.
std::string Unescape(absl::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size()) {
      ++i;
      out.push_back(s[i] == 'n' ? '\n' : s[i]);
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

bool ParseBsd(absl::string_view line, Line* out) {
  // TAG [SP] ( name ) [SP] = [SP] HEX ; the name may itself contain ") = ", so
  // split at the last "=".
  const size_t open = line.find('(');
  const size_t eq = line.rfind('=');
  if (open == absl::string_view::npos || eq == absl::string_view::npos || eq < open) return false;
  absl::string_view tag = absl::StripAsciiWhitespace(line.substr(0, open));
  absl::string_view hex = absl::StripAsciiWhitespace(line.substr(eq + 1));
  absl::string_view mid = absl::StripTrailingAsciiWhitespace(line.substr(open + 1, eq - open - 1));
  if (tag.empty() || !absl::ConsumeSuffix(&mid, ")")) return false;
  if (tag.find(' ') != absl::string_view::npos || !IsHex(hex)) return false;
  out->tag = std::string(tag);
  out->hex = std::string(hex);
  out->name = std::string(mid);
  return true;
}

bool ParseGnu(absl::string_view line, Line* out) {
  bool escaped = false;
  if (absl::ConsumePrefix(&line, "\\")) escaped = true;
  const size_t sp = line.find(' ');
  if (sp == absl::string_view::npos) return false;
  absl::string_view hex = line.substr(0, sp);
  absl::string_view rest = line.substr(sp + 1);
  if (!IsHex(hex)) return false;
  if (!rest.empty() && (rest[0] == ' ' || rest[0] == '*')) rest.remove_prefix(1);
  if (rest.empty()) return false;
  out->hex = std::string(hex);
  out->name = escaped ? Unescape(rest) : std::string(rest);
  return true;
}

bool NameMatches(const std::string& listed, const std::string& file_name) {
  if (listed == file_name) return true;
  return absl::EndsWith(listed, absl::StrCat("/", file_name));
}

}  // namespace

size_t HexLengthForType(const std::string& type) {
  if (type == "md5") return 32;
  if (type == "sha1") return 40;
  if (type == "sha256") return 64;
  if (type == "sha512") return 128;
  return 0;
}

absl::StatusOr<Checksum> ParseChecksum(const std::string& text) {
  absl::string_view s = absl::StripAsciiWhitespace(text);
  if (s.empty()) return absl::InvalidArgumentError("empty checksum");
  Checksum out;
  const size_t colon = s.find(':');
  if (colon != absl::string_view::npos) {
    out.type = absl::AsciiStrToLower(s.substr(0, colon));
    out.hex = absl::AsciiStrToLower(s.substr(colon + 1));
    if (HexLengthForType(out.type) == 0) {
      return absl::InvalidArgumentError(absl::StrCat("unknown checksum type \"", s.substr(0, colon),
                                                     "\" (want md5, sha1, sha256 or sha512)"));
    }
  } else {
    out.hex = absl::AsciiStrToLower(s);
  }
  if (!IsHex(out.hex)) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed checksum \"", s, "\": the digest must be hexadecimal digits"));
  }
  if (out.type.empty()) {
    out.type = TypeForHexLength(out.hex.size());
    if (out.type.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cannot tell the checksum type from ", out.hex.size(),
          " hex digits (32 md5, 40 sha1, 64 sha256, 128 sha512); write it as TYPE:HEX"));
    }
  } else if (out.hex.size() != HexLengthForType(out.type)) {
    return absl::InvalidArgumentError(absl::StrCat("a ", out.type, " checksum has ", HexLengthForType(out.type),
                                                   " hex digits, got ", out.hex.size()));
  }
  return out;
}

absl::StatusOr<Checksum> ChecksumFromFile(const std::string& content, const std::string& file_name,
                                          const std::string& type_hint) {
  const std::string hint = absl::AsciiStrToLower(type_hint);
  if (!hint.empty() && HexLengthForType(hint) == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown checksum type \"", type_hint, "\" (want md5, sha1, sha256 or sha512)"));
  }
  if (file_name.empty()) return absl::InvalidArgumentError("no file name to look up in the checksum file");
  std::vector<Checksum> found;
  std::string problems;
  int lineno = 0;
  for (absl::string_view raw : absl::StrSplit(content, '\n')) {
    ++lineno;
    absl::string_view line = absl::StripAsciiWhitespace(raw);
    if (line.empty() || line[0] == '#') continue;
    Line parsed;
    if (!ParseBsd(line, &parsed) && !ParseGnu(line, &parsed)) continue;
    if (!NameMatches(parsed.name, file_name)) continue;
    Checksum c;
    c.hex = absl::AsciiStrToLower(parsed.hex);
    if (!parsed.tag.empty()) {
      c.type = NormalizeTag(parsed.tag);
      if (c.type.empty()) {
        absl::StrAppend(&problems, "; line ", lineno, ": unknown digest \"", parsed.tag, "\"");
        continue;
      }
    } else {
      c.type = TypeForHexLength(c.hex.size());
      if (c.type.empty()) c.type = hint;
    }
    if (!hint.empty() && c.type != hint) continue;
    if (c.type.empty() || c.hex.size() != HexLengthForType(c.type)) {
      absl::StrAppend(&problems, "; line ", lineno, ": ", c.hex.size(), " hex digits do not make a ",
                      c.type.empty() ? "known" : c.type, " digest");
      continue;
    }
    found.push_back(std::move(c));
  }
  if (found.empty()) {
    return absl::NotFoundError(absl::StrCat("no ", hint.empty() ? "" : hint + " ", "checksum for \"", file_name,
                                            "\" in the checksum file", problems));
  }
  for (const Checksum& c : found) {
    if (c.type == found[0].type && c.hex != found[0].hex) {
      return absl::InvalidArgumentError(absl::StrCat("the checksum file lists \"", file_name,
                                                     "\" with different ", c.type, " digests"));
    }
  }
  return found[0];
}

Hasher::Hasher(std::string type, evp_md_ctx_st* ctx) : type_(std::move(type)), ctx_(ctx) {}

Hasher::Hasher(Hasher&& o) noexcept : type_(std::move(o.type_)), ctx_(std::exchange(o.ctx_, nullptr)) {}

Hasher& Hasher::operator=(Hasher&& o) noexcept {
  if (this != &o) {
    if (ctx_ != nullptr) EVP_MD_CTX_free(ctx_);
    type_ = std::move(o.type_);
    ctx_ = std::exchange(o.ctx_, nullptr);
  }
  return *this;
}

Hasher::~Hasher() {
  if (ctx_ != nullptr) EVP_MD_CTX_free(ctx_);
}

absl::StatusOr<Hasher> Hasher::Create(const std::string& type) {
  const EVP_MD* md = MdForType(type);
  if (md == nullptr) return absl::InvalidArgumentError(absl::StrCat("unknown checksum type \"", type, "\""));
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  if (ctx == nullptr) return absl::ResourceExhaustedError("EVP_MD_CTX_new failed");
  if (EVP_DigestInit_ex(ctx, md, nullptr) != 1) {
    EVP_MD_CTX_free(ctx);
    return absl::InternalError(absl::StrCat("cannot initialise a ", type, " digest (disabled by OpenSSL policy?)"));
  }
  return Hasher(type, ctx);
}

void Hasher::Update(const void* data, size_t len) {
  if (len > 0) EVP_DigestUpdate(ctx_, data, len);
}

std::string Hasher::FinalHex() {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  EVP_DigestFinal_ex(ctx_, md, &n);
  static const char kDigits[] = "0123456789abcdef";
  std::string hex;
  hex.reserve(n * 2);
  for (unsigned int i = 0; i < n; ++i) {
    hex.push_back(kDigits[md[i] >> 4]);
    hex.push_back(kDigits[md[i] & 0xf]);
  }
  return hex;
}

void Hasher::Reset() { EVP_DigestInit_ex(ctx_, MdForType(type_), nullptr); }

}  // namespace ndq
