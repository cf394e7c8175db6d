#include "policy/allowlist.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "../../support/temp_dir.h"
#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "host/run_command.h"

namespace ndq {
namespace {

using ::ndq::testing::TempDir;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;

namespace fs = std::filesystem;

void Touch(const std::string& path) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path) << "image";
}

void Symlink(const std::string& target, const std::string& link) {
  fs::create_directories(fs::path(link).parent_path());
  ASSERT_EQ(::symlink(target.c_str(), link.c_str()), 0) << link;
}

std::string Message(const absl::Status& status) { return std::string(status.message()); }

// A Nomad-like layout in a temp dir: ROOT/alloc is the allocation, ROOT/alloc/web
// the task dir, ROOT/images an operator's image directory.
class AllowlistResolveImagePath : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(tmp_.path().empty());
    root_ = fs::canonical(tmp_.path()).string();
    alloc_ = root_ + "/alloc";
    task_ = alloc_ + "/web";
    images_ = root_ + "/images";
    fs::create_directories(task_ + "/local");
    fs::create_directories(images_);
  }
  // The admitted file's real path; also checks that the fd is that file.
  absl::StatusOr<std::string> Resolve(const std::string& path, const std::vector<std::string>& allowed = {}) {
    absl::StatusOr<AdmittedFile> file =
        AdmitFile("image_path", path, AdmissionScope{task_, alloc_, allowed}, FileAccess::kReadOnly);
    if (!file.ok()) return file.status();
    struct stat by_fd, by_path;
    EXPECT_EQ(::fstat(file->fd.get(), &by_fd), 0);
    EXPECT_EQ(::stat(file->path.c_str(), &by_path), 0);
    EXPECT_EQ(by_fd.st_ino, by_path.st_ino) << file->path;
    EXPECT_FALSE(file->writable);
    return file->path;
  }
  // Enough "../" from the task dir to reach "/".
  std::string UpToRoot() const {
    std::string up;
    for (const auto& part : fs::path(task_)) {
      if (part != "/") up += "../";
    }
    return up;
  }

  TempDir tmp_;
  std::string root_, alloc_, task_, images_;
};

TEST_F(AllowlistResolveImagePath, RelativePathIsTakenFromTheTaskDir) {
  Touch(task_ + "/local/linux.img");
  absl::StatusOr<std::string> path = Resolve("local/linux.img");
  ASSERT_TRUE(path.ok()) << path.status();
  EXPECT_EQ(*path, task_ + "/local/linux.img");
}

TEST_F(AllowlistResolveImagePath, AbsolutePathInsideTheAllocation) {
  Touch(alloc_ + "/alloc/data/shared.img");
  EXPECT_EQ(Resolve(alloc_ + "/alloc/data/shared.img").value(), alloc_ + "/alloc/data/shared.img");
  // Another directory of the same allocation, reached with "..".
  EXPECT_EQ(Resolve("../alloc/data/shared.img").value(), alloc_ + "/alloc/data/shared.img");
}

TEST_F(AllowlistResolveImagePath, ResultHasNoDotsOrSymlinks) {
  Touch(task_ + "/local/linux.img");
  Symlink("linux.img", task_ + "/local/current.img");
  EXPECT_EQ(Resolve("./local/../local/current.img").value(), task_ + "/local/linux.img");
}

TEST_F(AllowlistResolveImagePath, AllowedDirectory) {
  Touch(images_ + "/base.img");
  EXPECT_EQ(Resolve(images_ + "/base.img", {images_}).value(), images_ + "/base.img");
  // Trailing slash and dots in the operator's entry do not matter.
  EXPECT_EQ(Resolve(images_ + "/base.img", {root_ + "/./images/"}).value(), images_ + "/base.img");
}

TEST_F(AllowlistResolveImagePath, SymlinkIntoAnAllowedDirectoryIsFollowed) {
  Touch(images_ + "/base.img");
  Symlink(images_ + "/base.img", task_ + "/local/base.img");
  EXPECT_EQ(Resolve("local/base.img", {images_}).value(), images_ + "/base.img");
  // The same link without the operator's permission for ROOT/images.
  absl::StatusOr<std::string> refused = Resolve("local/base.img");
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kPermissionDenied);
}

TEST_F(AllowlistResolveImagePath, AllowedDirectoryGivenThroughASymlink) {
  Touch(images_ + "/base.img");
  Symlink(images_, root_ + "/images-link");
  EXPECT_EQ(Resolve(images_ + "/base.img", {root_ + "/images-link"}).value(), images_ + "/base.img");
  EXPECT_EQ(Resolve(root_ + "/images-link/base.img", {images_}).value(), images_ + "/base.img");
}

TEST_F(AllowlistResolveImagePath, AllocDirGivenThroughASymlink) {
  Touch(task_ + "/local/linux.img");
  Symlink(alloc_, root_ + "/alloc-link");
  absl::StatusOr<AdmittedFile> file = AdmitFile("image_path", "local/linux.img",
                                                AdmissionScope{root_ + "/alloc-link/web", root_ + "/alloc-link", {}},
                                                FileAccess::kReadOnly);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->path, task_ + "/local/linux.img");
}

TEST_F(AllowlistResolveImagePath, SiblingWithTheSamePrefixIsNotInside) {
  Touch(root_ + "/images2/x.img");
  absl::StatusOr<std::string> path = Resolve(root_ + "/images2/x.img", {images_});
  ASSERT_FALSE(path.ok());
  EXPECT_THAT(Message(path.status()), HasSubstr("is not an existing file inside"));
  // Same for the allocation directory itself.
  Touch(root_ + "/alloc2/x.img");
  EXPECT_FALSE(Resolve(root_ + "/alloc2/x.img").ok());
}

TEST_F(AllowlistResolveImagePath, SymlinkToShadowIsRefused) {
  Symlink("/etc/shadow", task_ + "/local/evil.img");
  absl::StatusOr<std::string> path = Resolve("local/evil.img", {images_});
  ASSERT_FALSE(path.ok());
  EXPECT_EQ(path.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(Message(path.status()), AllOf(HasSubstr("\"image_path\""), HasSubstr("\"local/evil.img\""),
                                            HasSubstr("is not an existing file inside the allocation directory"),
                                            HasSubstr(images_), Not(HasSubstr("shadow"))));
}

TEST_F(AllowlistResolveImagePath, DotDotOutOfTheAllocationIsRefused) {
  const std::string escape = UpToRoot() + "etc/passwd";
  absl::StatusOr<std::string> path = Resolve(escape);
  ASSERT_FALSE(path.ok());
  EXPECT_THAT(Message(path.status()), AllOf(HasSubstr("\"" + escape + "\""), HasSubstr("none configured")));
  // The brief's literal "../../etc/passwd", here landing in ROOT/etc.
  Touch(root_ + "/etc/passwd");
  path = Resolve("../../etc/passwd");
  ASSERT_FALSE(path.ok());
  EXPECT_THAT(Message(path.status()), HasSubstr("is not an existing file inside"));
}

TEST_F(AllowlistResolveImagePath, AbsolutePathOutsideIsRefused) {
  absl::StatusOr<std::string> path = Resolve("/etc/passwd", {images_});
  ASSERT_FALSE(path.ok());
  EXPECT_THAT(Message(path.status()), AllOf(HasSubstr("\"/etc/passwd\" (\"/etc/passwd\") is not an existing file"),
                                            HasSubstr("\"" + alloc_ + "\""), HasSubstr("\"" + images_ + "\"")));
}

// The answer must not tell a job whether a file outside exists: a link to an
// existing file, to a missing one, a loop and a plain missing path read alike.
TEST_F(AllowlistResolveImagePath, RefusalsRevealNothingAboutFilesOutside) {
  Touch(root_ + "/outside/secret.img");
  Symlink(root_ + "/outside/secret.img", task_ + "/local/x.img");
  const std::string exists(Message(Resolve("local/x.img").status()));
  std::filesystem::remove(task_ + "/local/x.img");
  Symlink(root_ + "/outside/missing.img", task_ + "/local/x.img");
  const std::string missing(Message(Resolve("local/x.img").status()));
  std::filesystem::remove(task_ + "/local/x.img");
  Symlink("x.img", task_ + "/local/x.img");
  const std::string loop(Message(Resolve("local/x.img").status()));
  std::filesystem::remove(task_ + "/local/x.img");
  const std::string absent(Message(Resolve("local/x.img").status()));
  EXPECT_EQ(exists, missing);
  EXPECT_EQ(exists, loop);
  EXPECT_EQ(exists, absent);
  EXPECT_THAT(exists, Not(HasSubstr("outside/")));
}

// A FIFO outside the scope is never opened (opening one for reading would block).
TEST_F(AllowlistResolveImagePath, NothingOutsideIsOpened) {
  ASSERT_EQ(::mkfifo((root_ + "/outside.fifo").c_str(), 0600), 0);
  Symlink(root_ + "/outside.fifo", task_ + "/local/fifo.img");
  EXPECT_EQ(Resolve("local/fifo.img").status().code(), absl::StatusCode::kPermissionDenied);
}

TEST_F(AllowlistResolveImagePath, ReadWriteWhenAskedAndPossible) {
  Touch(task_ + "/local/disk.img");
  absl::StatusOr<AdmittedFile> file = AdmitFile("image_path", "local/disk.img", AdmissionScope{task_, alloc_, {}},
                                                FileAccess::kReadWriteIfPossible);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE(file->writable);
  EXPECT_EQ(::fcntl(file->fd.get(), F_GETFL) & O_ACCMODE, O_RDWR);
  EXPECT_NE(::fcntl(file->fd.get(), F_GETFD) & FD_CLOEXEC, 0);
}

TEST_F(AllowlistResolveImagePath, MissingFile) {
  absl::StatusOr<std::string> path = Resolve("local/nope.img");
  ASSERT_FALSE(path.ok());
  EXPECT_EQ(path.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(Message(path.status()), AllOf(HasSubstr("\"image_path\""), HasSubstr("\"local/nope.img\""),
                                            HasSubstr(task_ + "/local/nope.img"), HasSubstr("is not an existing file")));
  // A file used as a directory on the way.
  Touch(task_ + "/local/linux.img");
  EXPECT_THAT(Message(Resolve("local/linux.img/x").status()), HasSubstr("is not an existing file"));
  // A dangling symlink.
  Symlink(task_ + "/local/gone.img", task_ + "/local/dangling.img");
  EXPECT_THAT(Message(Resolve("local/dangling.img").status()), HasSubstr("is not an existing file"));
}

TEST_F(AllowlistResolveImagePath, EmptyPath) {
  EXPECT_THAT(Message(Resolve("").status()), HasSubstr("\"image_path\": must not be empty"));
}

TEST_F(AllowlistResolveImagePath, DirectoryIsNotAnImage) {
  absl::StatusOr<std::string> path = Resolve("local");
  ASSERT_FALSE(path.ok());
  EXPECT_THAT(Message(path.status()), HasSubstr("not a regular file or block device"));
}

TEST_F(AllowlistResolveImagePath, CharacterDeviceAndFifoAreNotImages) {
  EXPECT_THAT(Message(Resolve("/dev/null", {"/dev"}).status()), HasSubstr("not a regular file or block device"));
  ASSERT_EQ(::mkfifo((task_ + "/local/fifo.img").c_str(), 0600), 0);
  EXPECT_THAT(Message(Resolve("local/fifo.img").status()), HasSubstr("not a regular file or block device"));
}

TEST_F(AllowlistResolveImagePath, BlockDeviceIsAnImage) {
  std::string device;
  for (const auto& entry : fs::directory_iterator("/dev")) {
    if (entry.is_block_file()) {
      device = entry.path().string();
      break;
    }
  }
  if (device.empty()) GTEST_SKIP() << "no block device in /dev";
  absl::StatusOr<std::string> path = Resolve(device, {"/dev"});
  ASSERT_TRUE(path.ok()) << path.status();
  EXPECT_EQ(*path, fs::canonical(device).string());
}

TEST_F(AllowlistResolveImagePath, OperatorEntryMayNameOneImage) {
  Touch(images_ + "/base.img");
  Touch(images_ + "/other.img");
  EXPECT_TRUE(Resolve(images_ + "/base.img", {images_ + "/base.img"}).ok());
  EXPECT_FALSE(Resolve(images_ + "/other.img", {images_ + "/base.img"}).ok());
  EXPECT_FALSE(Resolve(images_ + "/base.img.bak", {images_ + "/base.img"}).ok());
}

TEST_F(AllowlistResolveImagePath, MissingAllowedDirectoryContainsNothing) {
  Touch(images_ + "/base.img");
  EXPECT_FALSE(Resolve(images_ + "/base.img", {root_ + "/not-there", ""}).ok());
  EXPECT_TRUE(Resolve(images_ + "/base.img", {root_ + "/not-there", images_}).ok());
}

TEST_F(AllowlistResolveImagePath, RootAsAllowedDirectoryAllowsAll) {
  EXPECT_EQ(Resolve("/etc/passwd", {"/"}).value(), "/etc/passwd");
}

// ---------------------------------------------------------------------------

TEST(AllowlistArgs, EmptyAllowlistAllowsEverythingLikeNomad) {
  EXPECT_TRUE(CheckArgsAllowed({"-drive", "file=/etc/shadow", "/etc/shadow", "-smp"}, {}).ok());
}

TEST(AllowlistArgs, ListedOptionsWithTheirValues) {
  EXPECT_TRUE(
      CheckArgsAllowed({"-smp", "2", "-device", "virtio-rng-pci", "-nodefaults"}, {"-smp", "-device", "-nodefaults"})
          .ok());
  EXPECT_TRUE(CheckArgsAllowed({}, {"-smp"}).ok());
}

TEST(AllowlistArgs, SingleAndDoubleDashFormsMatchEitherWay) {
  EXPECT_TRUE(CheckArgsAllowed({"--smp", "2"}, {"-smp"}).ok());
  EXPECT_TRUE(CheckArgsAllowed({"-smp", "2"}, {"--smp"}).ok());
  EXPECT_TRUE(CheckArgsAllowed({"--nodefaults"}, {"--nodefaults"}).ok());
  // QEMU drops only one extra dash: "---smp" is an unknown option "-smp".
  EXPECT_FALSE(CheckArgsAllowed({"---smp", "2"}, {"-smp"}).ok());
}

TEST(AllowlistArgs, ComparedAfterTrimming) { EXPECT_TRUE(CheckArgsAllowed({"-smp ", "2"}, {" -smp\t"}).ok()); }

TEST(AllowlistArgs, UnlistedOptionIsRefused) {
  const absl::Status status = CheckArgsAllowed({"-smp", "2", "-drive", "file=/etc/shadow"}, {"-smp"});
  ASSERT_FALSE(status.ok());
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(status),
              AllOf(HasSubstr("task config \"args\""), HasSubstr("\"-drive\" is not in the plugin's args_allowlist"),
                    Not(HasSubstr("/etc/shadow"))));
}

TEST(AllowlistArgs, ValueThatLooksLikeAnOptionIsAValue) {
  // QEMU reads "-drive" here as the kernel command line, not as an option.
  EXPECT_TRUE(CheckArgsAllowed({"-append", "-drive", "-smp", "1"}, {"-append", "-smp"}).ok());
}

TEST(AllowlistArgs, BarePositionalIsRefused) {
  const absl::Status status = CheckArgsAllowed({"/etc/shadow"}, {"-smp"});
  ASSERT_FALSE(status.ok());
  EXPECT_THAT(Message(status), AllOf(HasSubstr("\"/etc/shadow\" is not an option"), HasSubstr("disk image")));
}

TEST(AllowlistArgs, OptionWithoutValueDoesNotHideTheNextArgument) {
  // -nodefaults takes no value, so QEMU would open /etc/shadow as a disk.
  const absl::Status status = CheckArgsAllowed({"-nodefaults", "/etc/shadow"}, {"-nodefaults"});
  ASSERT_FALSE(status.ok());
  EXPECT_THAT(Message(status), HasSubstr("\"/etc/shadow\" is not an option"));
  EXPECT_FALSE(CheckArgsAllowed({"-snapshot", "/etc/shadow"}, {"-snapshot"}).ok());
  EXPECT_FALSE(CheckArgsAllowed({"-S", "disk.img"}, {"-S"}).ok());
}

TEST(AllowlistArgs, LeadingWhitespaceMakesAPositional) {
  // QEMU reads " -drive" as a disk image, and then "-chardev" as an option:
  // treating " -drive" as -drive would let -chardev through as its value.
  const absl::Status status = CheckArgsAllowed({" -drive", "-chardev", "socket,id=x,path=/tmp/s"}, {"-drive"});
  ASSERT_FALSE(status.ok());
  EXPECT_THAT(Message(status), AllOf(HasSubstr("\" -drive\" is not an option"), HasSubstr("leading whitespace"),
                                     HasSubstr("\"-chardev\" is not in the plugin's args_allowlist")));
}

TEST(AllowlistArgs, EmptyArgumentIsAPositional) {
  EXPECT_THAT(Message(CheckArgsAllowed({""}, {"-smp"})), HasSubstr("\"\" is not an option"));
}

TEST(AllowlistArgs, MissingValueAtTheEnd) {
  const absl::Status status = CheckArgsAllowed({"-nodefaults", "-smp"}, {"-smp", "-nodefaults"});
  ASSERT_FALSE(status.ok());
  EXPECT_THAT(Message(status), HasSubstr("\"-smp\" needs a value but is the last argument"));
  EXPECT_TRUE(CheckArgsAllowed({"-smp", "1", "-nodefaults"}, {"-smp", "-nodefaults"}).ok());
}

TEST(AllowlistArgs, EveryProblemIsReported) {
  const absl::Status status = CheckArgsAllowed({"-drive", "x", "/etc/shadow", "-cdrom"}, {"-smp"});
  EXPECT_THAT(Message(status), AllOf(HasSubstr("\"-drive\" is not"), HasSubstr("\"/etc/shadow\" is not an option"),
                                     HasSubstr("\"-cdrom\" is not"), HasSubstr("\"-cdrom\" needs a value")));
}

TEST(AllowlistArgs, UnknownOptionTakesOneValue) {
  EXPECT_TRUE(CheckArgsAllowed({"-future-option", "/not/a/disk"}, {"-future-option"}).ok());
}

TEST(AllowlistArgs, OptionsWithoutValue) {
  for (const char* name : {"S", "nodefaults", "nographic", "snapshot", "enable-kvm", "no-reboot", "no-shutdown",
                           "daemonize", "version", "h", "help", "s", "usb", "no-user-config"}) {
    EXPECT_FALSE(QemuOptionTakesValue(name)) << name;
  }
  for (const char* name : {"smp", "drive", "m", "machine", "M", "name", "netdev", "device", "append", "serial",
                           "monitor", "qmp", "chardev", "object", "readconfig", "g", "qtest", "unknown-thing"}) {
    EXPECT_TRUE(QemuOptionTakesValue(name)) << name;
  }
}

TEST(AllowlistArgs, ArgsUseOption) {
  EXPECT_TRUE(ArgsUseOption({"-smp", "2"}, "smp"));
  EXPECT_TRUE(ArgsUseOption({"--smp", "2"}, "smp"));
  EXPECT_TRUE(ArgsUseOption({"-nodefaults", "-smp", "2"}, "smp"));
  EXPECT_TRUE(ArgsUseOption({"-device", "x", "-smp", "cpus=2"}, "smp"));
  EXPECT_FALSE(ArgsUseOption({"-append", "-smp"}, "smp"));
  EXPECT_FALSE(ArgsUseOption({"-smpx", "2"}, "smp"));
  EXPECT_FALSE(ArgsUseOption({}, "smp"));
}

// ---------------------------------------------------------------------------

TEST(AllowlistEmulator, EmptyAllowlistAllowsAll) { EXPECT_TRUE(CheckEmulatorAllowed("aarch64", {}).ok()); }

TEST(AllowlistEmulator, ShortAndFullNamesMatchEitherWay) {
  EXPECT_TRUE(CheckEmulatorAllowed("x86_64", {"x86_64"}).ok());
  EXPECT_TRUE(CheckEmulatorAllowed("qemu-system-x86_64", {"x86_64"}).ok());
  EXPECT_TRUE(CheckEmulatorAllowed("x86_64", {"qemu-system-x86_64"}).ok());
}

TEST(AllowlistEmulator, OtherEmulatorIsRefused) {
  const absl::Status status = CheckEmulatorAllowed("aarch64", {"x86_64", "riscv64"});
  ASSERT_FALSE(status.ok());
  EXPECT_EQ(status.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(Message(status),
              AllOf(HasSubstr("\"emulator\""), HasSubstr("\"aarch64\" is not in the plugin's "
                                                         "emulators_allowlist (\"x86_64\", \"riscv64\")")));
  EXPECT_FALSE(CheckEmulatorAllowed("x86", {"x86_64"}).ok());
}

// ---------------------------------------------------------------------------

std::string FindOnPath(const std::string& name) {
  const char* path = ::getenv("PATH");
  for (absl::string_view dir : absl::StrSplit(path ? path : "/usr/bin:/bin", ':')) {
    const std::string candidate = absl::StrCat(dir, "/", name);
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

// Option names as `-help` lists them: "-fda/-fdb file", "-h or -help".
std::set<std::string> HelpOptionNames(const std::string& help) {
  std::set<std::string> names;
  for (absl::string_view line : absl::StrSplit(help, '\n')) {
    if (!absl::StartsWith(line, "-")) continue;
    std::vector<absl::string_view> words = absl::StrSplit(line, ' ', absl::SkipEmpty());
    std::vector<absl::string_view> spellings = absl::StrSplit(words[0], '/');
    if (words.size() > 2 && words[1] == "or") spellings.push_back(words[2]);
    for (absl::string_view spelling : spellings) {
      absl::ConsumePrefix(&spelling, "-");
      absl::ConsumePrefix(&spelling, "-");
      names.insert(std::string(spelling));
    }
  }
  return names;
}

// Re-checks the data in src/allowlist.cc against the installed QEMU, the way
// it was made: an option that takes a value complains when it is last; one
// that does not leaves a following "-m" to complain instead. Every run exits
// at once.
TEST(AllowlistQemuData, OptionsWithoutValueMatchInstalledQemu) {
  const std::string qemu = FindOnPath("qemu-system-x86_64");
  if (qemu.empty()) GTEST_SKIP() << "qemu-system-x86_64 is not installed";
  absl::StatusOr<CommandResult> version = RunCommand({qemu, "--version"}, absl::Seconds(30));
  ASSERT_TRUE(version.ok()) << version.status();
  if (!absl::StrContains(version->output, "version 7.2.")) {
    GTEST_SKIP() << "the option data is for QEMU 7.2; installed: " << version->output;
  }
  absl::StatusOr<CommandResult> help = RunCommand({qemu, "-help"}, absl::Seconds(30));
  ASSERT_TRUE(help.ok()) << help.status();
  std::set<std::string> names = HelpOptionNames(help->output);
  ASSERT_GT(names.size(), 100u);
  // Hidden options from the binary's option table (see src/allowlist.cc).
  names.insert({"old-param", "semihosting", "M", "g", "qtest"});
  int without_value = 0;
  for (const std::string& name : names) {
    const bool takes_value = QemuOptionTakesValue(name);
    std::vector<std::string> argv = {qemu, "-" + name};
    if (!takes_value) argv.push_back("-m");
    absl::StatusOr<CommandResult> run = RunCommand(argv, absl::Seconds(30));
    ASSERT_TRUE(run.ok()) << name << ": " << run.status();
    const std::string expected = absl::StrCat(takes_value ? "-" + name : "-m", ": requires an argument");
    EXPECT_THAT(run->output, HasSubstr(expected)) << "-" << name << (takes_value ? " takes" : " takes no") << " value?";
    without_value += takes_value ? 0 : 1;
  }
  EXPECT_EQ(without_value, 31);
}

}  // namespace
}  // namespace ndq
