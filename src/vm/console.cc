#include "vm/console.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "base/error_kind.h"
#include "base/unique_fd.h"
#include "qemu_driver/supervisor_protocol.h"

namespace ndq {
namespace {

constexpr const char* kConsoleSockets[] = {"serial.sock", "vnc.sock"};
constexpr char kScreendumpName[] = "screendump.png";
constexpr unsigned char kPngSignature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};


std::string Basename(const std::string& path) { return path.substr(path.rfind('/') + 1); }
std::string Dirname(const std::string& path) { return path.substr(0, path.rfind('/')); }

// Opens alloc_dir/alloc/logs: alloc_dir is Nomad's; below it nothing is
// followed, as a job (or a guest writing through a share) may plant links.
absl::StatusOr<UniqueFd> OpenLogDir(const std::string& alloc_dir) {
  UniqueFd dir(::open(alloc_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir.valid()) return ErrnoNow("cannot open the alloc dir " + alloc_dir);
  for (const char* part : {"alloc", "logs"}) {
    UniqueFd next(::openat(dir.get(), part, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (!next.valid()) return ErrnoNow(absl::StrCat("cannot open ", alloc_dir, "/alloc/logs (at ", part, ")"));
    dir = std::move(next);
  }
  return dir;
}

// Task names become file names: anything but [A-Za-z0-9._-] is '_'.
std::string SafeName(const std::string& name) {
  std::string out = name.empty() ? "task" : name;
  for (char& c : out) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') c = '_';
  }
  if (out[0] == '.') out[0] = '_';
  return out;
}

// The PNG QEMU wrote, opened without following links; a regular file of
// bounded size that starts like a PNG.
absl::StatusOr<UniqueFd> OpenScreendump(int run_fd) {
  UniqueFd png(::openat(run_fd, kScreendumpName, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC));
  if (!png.valid()) return ErrnoNow("QEMU's screendump cannot be opened");
  struct stat st;
  if (::fstat(png.get(), &st) != 0) return ErrnoNow("QEMU's screendump cannot be read");
  if (!S_ISREG(st.st_mode) || st.st_size < 8 || static_cast<size_t>(st.st_size) > kMaxScreenshotBytes) {
    return absl::DataLossError("QEMU's screendump is not a regular file of a plausible size");
  }
  unsigned char head[8];
  if (::pread(png.get(), head, sizeof head, 0) != sizeof head || std::memcmp(head, kPngSignature, 8) != 0) {
    return absl::DataLossError("QEMU's screendump is not a PNG");
  }
  return png;
}

// A new file in the log dir (O_EXCL: never an existing file or link).
absl::StatusOr<std::pair<UniqueFd, std::string>> CreateShotFile(int log_fd, const std::string& task_name) {
  static std::atomic<int> sequence{0};
  const std::string stem = absl::StrCat(SafeName(task_name), ".screenshot.",
                                        absl::FormatTime("%Y%m%dT%H%M%E3SZ", absl::Now(), absl::UTCTimeZone()));
  for (int attempt = 0; attempt < 100; ++attempt) {
    const std::string name =
        attempt == 0 ? stem + ".png" : absl::StrCat(stem, "-", sequence.fetch_add(1) + attempt, ".png");
    UniqueFd fd(::openat(log_fd, name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644));
    if (fd.valid()) return std::make_pair(std::move(fd), name);
    if (errno != EEXIST) return ErrnoNow("cannot create the screenshot " + name);
  }
  return absl::AlreadyExistsError("no free screenshot name in the log dir");
}

absl::Status CopyAll(int from, int to) {
  char buf[65536];
  size_t total = 0;
  for (;;) {
    const ssize_t n = ::read(from, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoNow("cannot read QEMU's screendump");
    if (n == 0) return absl::OkStatus();
    total += static_cast<size_t>(n);
    if (total > kMaxScreenshotBytes) return absl::DataLossError("QEMU's screendump grew while being copied");
    for (ssize_t done = 0; done < n;) {
      const ssize_t w = ::write(to, buf + done, static_cast<size_t>(n - done));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) return ErrnoNow("cannot write the screenshot");
      done += w;
    }
  }
}

}  // namespace

absl::Status MakeConsoleDir(const ConsolePlan& console, std::optional<std::pair<uid_t, gid_t>> owner,
                            Rollback& rollback) {
  if (!console.enabled) return absl::OkStatus();
  const std::string task_dir = Dirname(console.dir);
  const std::string name = Basename(console.dir);
  UniqueFd parent(::open(task_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!parent.valid()) return ErrnoNow("cannot open task dir " + task_dir);
  if (::mkdirat(parent.get(), name.c_str(), 0700) != 0 && errno != EEXIST) return ErrnoNow("cannot create " + console.dir);
  rollback.Push([dir = console.dir] { RemoveConsoleDir(dir); });
  UniqueFd dir(::openat(parent.get(), name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!dir.valid()) {
    return RefusedError(absl::StrCat("task config \"console\": ", console.dir, " is not a directory the driver made"));
  }
  for (const char* socket : kConsoleSockets) ::unlinkat(dir.get(), socket, 0);  // a previous run's
  if (::fchmod(dir.get(), 0700) != 0) return ErrnoNow("cannot set the mode of " + console.dir);
  if (owner && ::fchown(dir.get(), owner->first, owner->second) != 0) {
    return ErrnoNow("cannot hand " + console.dir + " to QEMU's user");
  }
  return absl::OkStatus();
}

void RemoveConsoleDir(const std::string& dir) {
  if (dir.empty()) return;
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!fd.valid()) return;
  for (const char* socket : kConsoleSockets) ::unlinkat(fd.get(), socket, 0);
  ::rmdir(dir.c_str());  // only if nothing else is in it
}

absl::StatusOr<std::string> TakeScreenshot(VmTask& vm) {
  const DriverStateRecord& record = vm.record();
  if (record.alloc_dir.empty()) return absl::FailedPreconditionError("the task's alloc dir is not known");
  const std::string run_dir = record.state_dir + "/" + supervisor::kRunDir;
  UniqueFd run(::open(run_dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!run.valid()) return ErrnoNow("cannot open " + run_dir);
  ::unlinkat(run.get(), kScreendumpName, 0);
  absl::StatusOr<nlohmann::json> dumped = vm.ExecuteQmp(
      "screendump", {{"filename", run_dir + "/" + kScreendumpName}, {"format", "png"}}, kScreenshotTimeout);
  if (!dumped.ok()) return absl::Status(dumped.status().code(), absl::StrCat("QMP screendump: ", dumped.status().message()));
  absl::StatusOr<UniqueFd> png = OpenScreendump(run.get());
  ::unlinkat(run.get(), kScreendumpName, 0);
  if (!png.ok()) return png.status();
  absl::StatusOr<UniqueFd> logs = OpenLogDir(record.alloc_dir);
  if (!logs.ok()) return logs.status();
  absl::StatusOr<std::pair<UniqueFd, std::string>> out = CreateShotFile(logs->get(), vm.identity().name);
  if (!out.ok()) return out.status();
  if (absl::Status copied = CopyAll(png->get(), out->first.get()); !copied.ok()) {
    ::unlinkat(logs->get(), out->second.c_str(), 0);
    return copied;
  }
  return record.alloc_dir + "/alloc/logs/" + out->second;
}

std::string LastLines(const std::string& text, size_t max_lines) {
  // Terminal control (ESC sequences such as "\x1b[2J", other control bytes)
  // is dropped so the lines read well in an event or error; \r too, as the
  // serial console ends lines with \r\n.
  std::string lines;
  for (size_t i = 0; i < text.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (c == 0x1b) {
      if (i + 1 < text.size() && text[i + 1] == '[') {
        for (i += 2; i < text.size() && !(text[i] >= 0x40 && text[i] <= 0x7e); ++i) {
        }
      } else {
        ++i;  // a two-byte sequence such as ESC c
      }
      continue;
    }
    if (c == '\n' || c == '\t' || c >= 0x20) lines.push_back(static_cast<char>(c));
  }
  while (!lines.empty() && lines.back() == '\n') lines.pop_back();
  size_t pos = lines.size();
  for (size_t count = 0; count < max_lines; ++count) {
    const size_t nl = pos == 0 ? std::string::npos : lines.rfind('\n', pos - 1);
    if (nl == std::string::npos) return lines;
    pos = nl;
  }
  return lines.substr(pos + 1);
}

}  // namespace ndq
