// TailBuffer, the fixed ring that keeps the end of QEMU's stdout and stderr for
// the exit record, against a plain string holding everything appended.
#include "../../../src/supervisor/tail_buffer.h"

#include <cstddef>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace ndq::supervisor {
namespace {

template <size_t N>
std::string Tail(const TailBuffer<N>& buffer) {
  char out[N];
  const size_t len = buffer.CopyOut(out);
  EXPECT_LE(len, N);
  return std::string(out, len);
}

// Appends of every size, below, at and above the capacity, wrapping around the
// ring at every offset: the tail is always the last N bytes, oldest first.
TEST(TailBuffer, KeepsTheLastNBytesAcrossEveryWraparound) {
  constexpr size_t kN = 16;
  TailBuffer<kN> buffer;
  std::string all;
  char next = 'a';
  for (size_t size : {1, 3, 15, 16, 17, 5, 31, 2, 40, 0, 7, 16, 9}) {
    std::string chunk;
    for (size_t i = 0; i < size; ++i) {
      chunk.push_back(next);
      next = next == 'z' ? 'a' : static_cast<char>(next + 1);  // ASCII: no UTF-8 trimming
    }
    buffer.Append(chunk.data(), chunk.size());
    all += chunk;
    EXPECT_EQ(Tail(buffer), all.substr(all.size() > kN ? all.size() - kN : 0)) << "after " << all.size() << " bytes";
  }
}

TEST(TailBuffer, KeepsEverythingUntilItIsFull) {
  TailBuffer<8> buffer;
  EXPECT_EQ(Tail(buffer), "");
  buffer.Append("\x80\x80zz", 4);  // leading continuation bytes, but nothing was dropped
  EXPECT_EQ(Tail(buffer), "\x80\x80zz");
  buffer.Append("1234", 4);
  EXPECT_EQ(Tail(buffer), "\x80\x80zz1234");
}

// Once older bytes are gone, a character cut at the start is skipped, never
// more than the three continuation bytes a character can have.
TEST(TailBuffer, SkipsOnlyACharacterCutInHalfAtTheStart) {
  TailBuffer<6> euro;
  euro.Append("x\xe2\x82\xac yz", 7);  // "x€ yz": the 'x' is dropped, the € is whole
  EXPECT_EQ(Tail(euro), "\xe2\x82\xac yz");
  euro.Append("!", 1);  // now the €'s first byte is gone too
  EXPECT_EQ(Tail(euro), " yz!");

  TailBuffer<6> garbage;
  garbage.Append("a\x80\x80\x80\x80\x80\x80", 7);  // not UTF-8: keep what cannot be a cut character
  EXPECT_EQ(Tail(garbage), "\x80\x80\x80");
}

}  // namespace
}  // namespace ndq::supervisor
