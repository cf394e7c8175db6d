// The qcow2 header probe (ProbeImage): job authors control the images a task
// uses (image_path in the allocation, image_source downloads). Each input is
// written to disk.img in a private directory on tmpfs and probed; backing file
// names are resolved from there, so "disk.img" chains to itself.
// qemu-img is kept off PATH: non-qcow2 files end at "qemu-img is not on PATH"
// instead of spawning a process per input.
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include <spdlog/spdlog.h>

#include "image/image_probe.h"

namespace {
std::string g_dir;
std::string g_image;
int g_fd = -1;

void Cleanup() {
  ::unlink(g_image.c_str());
  ::rmdir(g_dir.c_str());
}
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);
  ::setenv("PATH", "/nonexistent-ndq-fuzz", 1);
  char dir[] = "/dev/shm/ndq-fuzz-probe-XXXXXX";
  char dir_tmp[] = "/tmp/ndq-fuzz-probe-XXXXXX";
  const char* made = ::mkdtemp(dir);
  if (made == nullptr) made = ::mkdtemp(dir_tmp);
  if (made == nullptr) ::abort();
  g_dir = made;
  g_image = g_dir + "/disk.img";
  g_fd = ::open(g_image.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (g_fd < 0) ::abort();
  ::atexit(Cleanup);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (::ftruncate(g_fd, 0) != 0) ::abort();
  size_t off = 0;
  while (off < size) {
    const ssize_t n = ::pwrite(g_fd, data + off, size - off, static_cast<off_t>(off));
    if (n <= 0) ::abort();
    off += static_cast<size_t>(n);
  }
  absl::StatusOr<ndq::ImageInfo> info = ndq::ProbeImage(g_image);
  if (info.ok()) {
    for (const std::string& backing : info->backing) {
      if (backing.empty() || backing[0] != '/') __builtin_trap();  // always absolute
    }
  }
  return 0;
}
