// The last N bytes of a stream (QEMU's stderr), for the exit record: a fixed
// ring, so a VM that logs gigabytes costs the supervisor nothing extra.
#pragma once

#include <cstddef>
#include <cstring>

namespace ndq::supervisor {

template <size_t N>
class TailBuffer {
 public:
  void Append(const char* data, size_t len) {
    for (size_t copied = 0; copied < len;) {
      const size_t end = (start_ + size_) % N;  // where the next byte goes
      const size_t chunk = (len - copied < N - end) ? len - copied : N - end;
      std::memcpy(ring_ + end, data + copied, chunk);
      copied += chunk;
      size_ += chunk;
      if (size_ > N) {  // the chunk overwrote the oldest bytes
        start_ = (start_ + size_ - N) % N;
        size_ = N;
        dropped_ = true;
      }
    }
  }

  // Copies the tail, oldest byte first, into out[N]; returns its length. When
  // older bytes were dropped, a UTF-8 character cut in half at the start is
  // skipped rather than reported as garbage.
  size_t CopyOut(char* out) const {
    size_t skip = 0;
    if (dropped_) {
      while (skip < 3 && skip < size_ && (static_cast<unsigned char>(At(skip)) & 0xC0) == 0x80) ++skip;
    }
    for (size_t i = skip; i < size_; ++i) out[i - skip] = At(i);
    return size_ - skip;
  }

 private:
  char At(size_t i) const { return ring_[(start_ + i) % N]; }

  char ring_[N] = {};  // zero-initialized: a static TailBuffer needs no runtime constructor
  size_t start_ = 0;  // index of the oldest byte
  size_t size_ = 0;
  bool dropped_ = false;
};

}  // namespace ndq::supervisor
