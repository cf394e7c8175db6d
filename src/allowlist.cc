#include "qemu_driver/allowlist.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <algorithm>
#include <iterator>
#include <memory>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"

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

std::string Quoted(absl::string_view s) { return absl::StrCat("\"", s, "\""); }

std::string QuotedList(const std::vector<std::string>& items) {
  return absl::StrJoin(items, ", ", [](std::string* out, const std::string& s) { out->append(Quoted(s)); });
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

absl::StatusOr<std::string> ResolveImagePath(const std::string& image_path, const std::string& task_dir,
                                             const std::string& alloc_dir,
                                             const std::vector<std::string>& allowed_dirs) {
  const std::string prefix = "task config \"image_path\": ";
  if (image_path.empty()) return absl::InvalidArgumentError(prefix + "must not be empty");
  // QEMU runs with the task dir as its working directory, so that is what a
  // relative path means to it.
  const std::string absolute = image_path[0] == '/' ? image_path : absl::StrCat(task_dir, "/", image_path);
  int error = 0;
  const std::string resolved = RealPath(absolute, &error);
  if (error == ENOENT || error == ENOTDIR) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, Quoted(image_path), " does not exist (looked for ", Quoted(absolute), ")"));
  }
  if (error != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, Quoted(image_path), " cannot be resolved (", Quoted(absolute), "): ", ::strerror(error)));
  }

  std::vector<std::string> roots;
  if (!alloc_dir.empty()) {
    const std::string real_alloc = RealPath(alloc_dir, &error);
    if (error == 0) roots.push_back(real_alloc);
  }
  for (const std::string& dir : allowed_dirs) {
    if (dir.empty()) continue;
    // A directory that does not exist (yet) contains nothing.
    const std::string real_dir = RealPath(dir, &error);
    if (error == 0) roots.push_back(real_dir);
  }
  const bool inside =
      std::any_of(roots.begin(), roots.end(), [&](const std::string& root) { return IsInside(resolved, root); });
  if (!inside) {
    return absl::PermissionDeniedError(absl::StrCat(
        prefix, Quoted(image_path), " resolves to ", Quoted(resolved), ", which is outside the allocation directory ",
        Quoted(alloc_dir), " and the plugin's image_paths (",
        allowed_dirs.empty() ? std::string("none configured") : QuotedList(allowed_dirs), ")"));
  }

  // Checked after the location, so nothing is revealed about files outside.
  struct stat st;
  if (::stat(resolved.c_str(), &st) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, Quoted(image_path), " resolves to ", Quoted(resolved), ": ", ::strerror(errno)));
  }
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, Quoted(image_path), " resolves to ", Quoted(resolved),
                                                   ", which is not a regular file or block device"));
  }
  return resolved;
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
