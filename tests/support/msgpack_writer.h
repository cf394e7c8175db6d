// Writes msgpack byte by byte, so tests can send exactly the encodings Nomad's
// cty library produces (float64 for fractions, smallest integer forms, nil).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace ndq::testing {

class MsgpackWriter {
 public:
  MsgpackWriter& Map(uint32_t entries) {
    if (entries < 16) return Byte(0x80 | entries);
    Byte(0xdf);
    return Be(entries, 4);
  }
  MsgpackWriter& Array(uint32_t items) {
    if (items < 16) return Byte(0x90 | items);
    Byte(0xdd);
    return Be(items, 4);
  }
  MsgpackWriter& Str(const std::string& s) {
    if (s.size() < 32) {
      Byte(0xa0 | static_cast<uint8_t>(s.size()));
    } else {
      Byte(0xd9);
      Byte(static_cast<uint8_t>(s.size()));
    }
    out_ += s;
    return *this;
  }
  MsgpackWriter& Nil() { return Byte(0xc0); }
  MsgpackWriter& Bool(bool b) { return Byte(b ? 0xc3 : 0xc2); }
  MsgpackWriter& FixInt(int8_t v) { return Byte(static_cast<uint8_t>(v)); }
  MsgpackWriter& Int8(int8_t v) { Byte(0xd0); return Byte(static_cast<uint8_t>(v)); }
  MsgpackWriter& Uint16(uint16_t v) { Byte(0xcd); return Be(v, 2); }
  MsgpackWriter& Uint64(uint64_t v) { Byte(0xcf); return Be(v, 8); }
  MsgpackWriter& Int64(int64_t v) { Byte(0xd3); return Be(static_cast<uint64_t>(v), 8); }
  MsgpackWriter& Float64(double d) {
    uint64_t bits;
    std::memcpy(&bits, &d, sizeof bits);
    Byte(0xcb);
    return Be(bits, 8);
  }
  const std::string& bytes() const { return out_; }

 private:
  MsgpackWriter& Byte(uint8_t b) {
    out_.push_back(static_cast<char>(b));
    return *this;
  }
  MsgpackWriter& Be(uint64_t v, int n) {
    for (int i = n - 1; i >= 0; --i) Byte(static_cast<uint8_t>(v >> (8 * i)));
    return *this;
  }
  std::string out_;
};

}  // namespace ndq::testing
