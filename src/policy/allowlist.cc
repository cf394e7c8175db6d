#include "policy/allowlist.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <iterator>
#include <memory>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "base/quoted.h"

namespace ndq {
namespace {

// QEMU 7.2 options that take NO value; every other option takes exactly one.
//
// How this list was made (Debian 12, QEMU 7.2.22):
//  1. Every option named in `qemu-system-x86_64 -help` (114 names; "-fda/-fdb"
//     and "-h or -help" give two each).
//  2. Each was run as `qemu-system-x86_64 -machine none -display none
//     -nodefaults -S -OPT` (last argument): QEMU says "-OPT: requires an
//     argument" for the 85 that take a value; the 29 below did not. Cross-check:
//     `qemu-system-x86_64 -OPT -m` fails with "-m: requires an argument" for
//     exactly these 29, because "-m" was not eaten as their value.
//  3. The binary's own option table (qemu_options[], read out of the ELF file
//     through its relocations) has 122 entries with the same flags, plus hidden
//     ones absent from -help: M, g, prom-env, qtest, qtest-log,
//     semihosting-config take a value; old-param and semihosting take none (not
//     for x86 targets, but QEMU parses them before saying so) and are listed.
// AllowlistQemuData.* in tests/unit/allowlist_test.cc re-checks step 2 against
// the installed QEMU. Keep it sorted: it is searched with binary_search.
constexpr const char* kOptionsWithoutValue[] = {
    "S",
    "async-teardown",
    "audio-help",
    "daemonize",
    "enable-kvm",
    "enable-sync-profile",
    "full-screen",
    "h",
    "help",
    "mem-prealloc",
    "no-acpi",
    "no-fd-bootchk",
    "no-hpet",
    "no-reboot",
    "no-shutdown",
    "no-user-config",
    "nodefaults",
    "nographic",
    "old-param",
    "only-migratable",
    "portrait",
    "preconfig",
    "s",
    "semihosting",
    "singlestep",
    "snapshot",
    "usb",
    "version",
    "win2k-hack",
    "xen-attach",
    "xen-domid-restrict",
};

// QEMU's own rule (softmmu/vl.c lookup_opt): one leading '-', and a second
// one is ignored, so "--smp" is "-smp".
std::string OptionName(absl::string_view arg) {
  absl::ConsumePrefix(&arg, "-");
  absl::ConsumePrefix(&arg, "-");
  return std::string(arg);
}

std::string TrimEmulatorPrefix(absl::string_view name) {
  absl::ConsumePrefix(&name, "qemu-system-");
  return std::string(name);
}

// realpath(3), keeping errno for the caller's message.
std::string RealPath(const std::string& path, int* error) {
  std::unique_ptr<char, decltype(&::free)> resolved(::realpath(path.c_str(), nullptr), &::free);
  if (resolved == nullptr) {
    *error = errno;
    return "";
  }
  *error = 0;
  return resolved.get();
}

// Whole components only: /srv/images2 is not inside /srv/images. A dir entry
// naming the file itself also counts, as Nomad allows image_paths entries
// that are single images.
bool IsInside(const std::string& path, const std::string& dir) {
  if (dir == "/") return true;
  return path == dir || (absl::StartsWith(path, dir) && path[dir.size()] == '/');
}

}  // namespace

bool QemuOptionTakesValue(const std::string& name) {
  return !std::binary_search(std::begin(kOptionsWithoutValue), std::end(kOptionsWithoutValue), name,
                             [](const std::string& a, const std::string& b) { return a < b; });
}

bool ArgsUseOption(const std::vector<std::string>& args, const std::string& name) {
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i].empty() || args[i][0] != '-') continue;
    const std::string option = OptionName(args[i]);
    if (option == name) return true;
    if (QemuOptionTakesValue(option)) ++i;
  }
  return false;
}

absl::StatusOr<AdmittedFile> AdmitFile(const std::string& field, const std::string& path, const AdmissionScope& scope,
                                       FileAccess access) {
  const std::string prefix = absl::StrCat("task config ", Quoted(field), ": ");
  if (path.empty()) return absl::InvalidArgumentError(prefix + "must not be empty");
  if (path.find('\0') != std::string::npos) return absl::InvalidArgumentError(prefix + "contains a NUL byte");
  // QEMU runs with the task dir as its working directory, so that is what a
  // relative path means to it.
  const std::string absolute = path[0] == '/' ? path : absl::StrCat(scope.task_dir, "/", path);

  std::vector<std::string> roots;
  int error = 0;
  if (!scope.alloc_dir.empty()) {
    const std::string real_alloc = RealPath(scope.alloc_dir, &error);
    if (error == 0) roots.push_back(real_alloc);
  }
  for (const std::string& dir : scope.allowed_dirs) {
    if (dir.empty()) continue;
    // A directory that does not exist (yet) contains nothing.
    const std::string real_dir = RealPath(dir, &error);
    if (error == 0) roots.push_back(real_dir);
  }
  auto inside = [&roots](const std::string& real) {
    return std::any_of(roots.begin(), roots.end(), [&](const std::string& root) { return IsInside(real, root); });
  };
  // Missing, looping, or outside: one answer, so that a job learns nothing
  // about the host's files by trying paths or planting symlinks.
  const absl::Status refused = absl::PermissionDeniedError(absl::StrCat(
      prefix, Quoted(path), " (", Quoted(absolute), ") is not an existing file inside the allocation directory ",
      Quoted(scope.alloc_dir), " or the plugin's image_paths (",
      scope.allowed_dirs.empty() ? std::string("none configured") : QuotedList(scope.allowed_dirs), ")"));

  const std::string resolved = RealPath(absolute, &error);
  if (error != 0 || !inside(resolved)) return refused;

  // Opened only now, after the location check (opening some device files has
  // effects of its own), and with no symlink followed on the way, so a path
  // component swapped for a link since realpath() fails the open.
  open_how how{};
  how.flags = O_CLOEXEC | O_NOCTTY | O_NONBLOCK | (access == FileAccess::kReadOnly ? O_RDONLY : O_RDWR);
  how.resolve = RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
  auto open_resolved = [&resolved, &how] {
    return static_cast<int>(::syscall(SYS_openat2, AT_FDCWD, resolved.c_str(), &how, sizeof how));
  };
  UniqueFd fd(open_resolved());
  bool writable = access != FileAccess::kReadOnly;
  if (!fd.valid() && writable && (errno == EROFS || errno == EACCES || errno == ETXTBSY || errno == EPERM)) {
    how.flags = (how.flags & ~O_ACCMODE) | O_RDONLY;
    fd.reset(open_resolved());
    writable = false;
  }
  if (!fd.valid()) {
    if (errno == ELOOP || errno == ENOENT || errno == ENOTDIR || errno == EXDEV) return refused;  // changed under us
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, Quoted(path), " resolves to ", Quoted(resolved), " but cannot be opened: ",
                     ::strerror(errno)));
  }
  // What was opened, by the kernel's account; a mount or rename race between
  // realpath() and the open must not leave it outside.
  std::array<char, PATH_MAX> opened{};
  const std::string self = absl::StrCat("/proc/self/fd/", fd.get());
  const ssize_t n = ::readlink(self.c_str(), opened.data(), opened.size() - 1);
  if (n <= 0 || !inside(std::string(opened.data(), static_cast<size_t>(n)))) return refused;

  struct stat st;
  if (::fstat(fd.get(), &st) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, Quoted(path), " resolves to ", Quoted(resolved), ": ", ::strerror(errno)));
  }
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, Quoted(path), " resolves to ", Quoted(resolved),
                                                   ", which is not a regular file or block device"));
  }
  const int flags = ::fcntl(fd.get(), F_GETFL);
  if (flags >= 0) ::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK);
  return AdmittedFile{resolved, std::move(fd), writable};
}

absl::Status CheckArgsAllowed(const std::vector<std::string>& args, const std::vector<std::string>& allowlist) {
  if (allowlist.empty()) return absl::OkStatus();
  std::set<std::string> allowed;
  for (const std::string& entry : allowlist) {
    const std::string name = OptionName(absl::StripAsciiWhitespace(entry));
    if (!name.empty()) allowed.insert(name);
  }

  std::vector<std::string> problems;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    // QEMU decides on the first byte, untrimmed: " -drive" is a disk image
    // named " -drive" to it, so it must not pass as the option -drive here.
    if (arg.empty() || arg[0] != '-') {
      const bool padded = absl::StartsWith(absl::StripLeadingAsciiWhitespace(arg), "-");
      problems.push_back(absl::StrCat(Quoted(arg), " is not an option",
                                      padded ? " (QEMU does not ignore the leading whitespace)" : "",
                                      " and follows no option that takes a value; QEMU would open it as a disk image"));
      continue;
    }
    const std::string name = OptionName(absl::StripAsciiWhitespace(arg));
    if (!allowed.count(name)) problems.push_back(absl::StrCat(Quoted(arg), " is not in the plugin's args_allowlist"));
    if (QemuOptionTakesValue(name)) {
      if (i + 1 == args.size()) {
        problems.push_back(absl::StrCat(Quoted(arg), " needs a value but is the last argument"));
      }
      ++i;  // its value, whatever it looks like, is not an option
    }
  }
  if (problems.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("task config \"args\": ", absl::StrJoin(problems, "; ")));
}

absl::Status CheckEmulatorAllowed(const std::string& emulator, const std::vector<std::string>& allowlist) {
  if (allowlist.empty()) return absl::OkStatus();
  const std::string name = TrimEmulatorPrefix(emulator);
  for (const std::string& entry : allowlist) {
    if (TrimEmulatorPrefix(entry) == name) return absl::OkStatus();
  }
  return absl::PermissionDeniedError(absl::StrCat("task config \"emulator\": ", Quoted(emulator),
                                                  " is not in the plugin's emulators_allowlist (",
                                                  QuotedList(allowlist), ")"));
}

}  // namespace ndq
