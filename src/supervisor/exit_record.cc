#include "exit_record.h"

#include <cstdio>
#include <cstring>

namespace ndq::supervisor {
namespace {

// Appends to a fixed buffer; the caller sized it for the worst case, and the
// bound check only keeps a bug from becoming memory corruption.
class Output {
 public:
  Output(char* buf, size_t cap) : buf_(buf), cap_(cap) {}
  void Raw(const char* s, size_t n) {
    if (n > cap_ - len_) n = cap_ - len_;
    std::memcpy(buf_ + len_, s, n);
    len_ += n;
  }
  void Raw(const char* s) { Raw(s, std::strlen(s)); }
  void Int(int64_t v) {
    char digits[24];
    const int n = std::snprintf(digits, sizeof digits, "%lld", static_cast<long long>(v));
    Raw(digits, static_cast<size_t>(n));
  }
  void String(const char* s, size_t n);
  size_t size() const { return len_; }

 private:
  char* buf_;
  size_t cap_;
  size_t len_ = 0;
};

// Length of the well-formed UTF-8 sequence at p (RFC 3629: no overlongs, no
// surrogates, nothing above U+10FFFF), or 0 if the byte at p starts none.
size_t Utf8Length(const unsigned char* p, size_t avail) {
  const unsigned char c = p[0];
  if (c < 0x80) return 1;
  size_t len = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    len = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    len = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (avail < len || p[1] < lo || p[1] > hi) return 0;
  for (size_t i = 2; i < len; ++i) {
    if ((p[i] & 0xC0) != 0x80) return 0;
  }
  return len;
}

void Output::String(const char* s, size_t n) {
  const auto* p = reinterpret_cast<const unsigned char*>(s);
  Raw("\"");
  for (size_t i = 0; i < n;) {
    const unsigned char c = p[i];
    if (c == '"' || c == '\\') {
      const char esc[2] = {'\\', static_cast<char>(c)};
      Raw(esc, 2);
      ++i;
    } else if (c < 0x20) {
      char esc[8];
      switch (c) {
        case '\n': Raw("\\n"); break;
        case '\r': Raw("\\r"); break;
        case '\t': Raw("\\t"); break;
        case '\b': Raw("\\b"); break;
        case '\f': Raw("\\f"); break;
        default:
          std::snprintf(esc, sizeof esc, "\\u%04x", c);
          Raw(esc, 6);
      }
      ++i;
    } else if (const size_t len = Utf8Length(p + i, n - i); len > 0) {
      Raw(s + i, len);
      i += len;
    } else {
      Raw("\\ufffd");  // one replacement character per invalid byte
      ++i;
    }
  }
  Raw("\"");
}

}  // namespace

size_t FormatExitRecord(const ExitFacts& f, char* out) {
  Output o(out, kMaxExitRecordBytes);
  o.Raw("{\"exit_code\":");
  o.Int(f.exit_code);
  o.Raw(",\"signal\":");
  o.Int(f.signal);
  o.Raw(",\"core_dumped\":");
  o.Raw(f.core_dumped ? "true" : "false");
  o.Raw(",\"started_at\":");
  o.Int(f.started_at_ms);
  o.Raw(",\"exited_at\":");
  o.Int(f.exited_at_ms);
  o.Raw(",\"stderr_tail\":");
  o.String(f.stderr_tail, f.stderr_tail_len);
  o.Raw(",\"stdout_tail\":");
  o.String(f.stdout_tail, f.stdout_tail_len);
  o.Raw(",\"error\":");
  o.String(f.error, strnlen(f.error, kMaxErrorBytes));
  o.Raw("}\n");
  return o.size();
}

}  // namespace ndq::supervisor
