#include "image/seed_iso.h"

#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "../../support/files.h"
#include "../../support/temp_dir.h"

namespace ndq {
namespace {

using ::ndq::testing::ReadFile;

using ::testing::HasSubstr;
using ::testing::StartsWith;

const std::string kKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx4dW5pY29ybnNhbmRyYWluYm93cw user@example";

std::vector<std::string> Entries(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) names.push_back(entry.path().filename());
  return names;
}

SeedFiles SomeFiles() {
  SeedFiles files;
  files.user_data = "#cloud-config\nruncmd: [echo, hi]\n";
  files.meta_data = DefaultMetaData("i-1", "web", {kKey});
  files.network_config = "version: 2\n";
  return files;
}

TEST(SeedIsoTest, DefaultMetaDataQuotesEveryValue) {
  EXPECT_EQ(DefaultMetaData("8c5d2f3a-0000-4000-8000-000000000001", "web-1", {}),
            "instance-id: \"8c5d2f3a-0000-4000-8000-000000000001\"\nlocal-hostname: \"web-1\"\n");
  EXPECT_EQ(DefaultMetaData("i", "h", {kKey, "ecdsa-sha2-nistp256 AAAA x"}),
            "instance-id: \"i\"\nlocal-hostname: \"h\"\npublic-keys:\n  - \"" + kKey +
                "\"\n  - \"ecdsa-sha2-nistp256 AAAA x\"\n");
}

TEST(SeedIsoTest, DefaultMetaDataEscapesHostileValues) {
  // Quotes, backslashes, line breaks and YAML's flow and comment characters
  // stay inside the string; the integration test parses such text with cloud-init.
  std::string text = DefaultMetaData("a\"b\\c: #x - [y] {z}", "h\nevil: 1\r\t\x01\x7f", {});
  EXPECT_EQ(text,
            "instance-id: \"a\\\"b\\\\c: #x - [y] {z}\"\n"
            "local-hostname: \"h\\u000aevil: 1\\u000d\\u0009\\u0001\\u007f\"\n");
  // Non-ASCII of the BMP is escaped (YAML folds U+2028 and NEL), astral stays
  // raw, and bytes that are not UTF-8 become U+FFFD.
  EXPECT_EQ(DefaultMetaData("\xc3\xa9\xe2\x80\xa8\xc2\x85", "\xf0\x9f\x98\x80\xff", {}),
            "instance-id: \"\\u00e9\\u2028\\u0085\"\nlocal-hostname: \"\xf0\x9f\x98\x80\\ufffd\"\n");
}

TEST(SeedIsoTest, AddSshKeysAppendsABlock) {
  auto text = AddSshKeys("instance-id: x\nlocal-hostname: y", {kKey});
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "instance-id: x\nlocal-hostname: y\npublic-keys:\n  - \"" + kKey + "\"\n");
  text = AddSshKeys("instance-id: x\n", {kKey});
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "instance-id: x\npublic-keys:\n  - \"" + kKey + "\"\n");
  text = AddSshKeys("", {kKey});
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "public-keys:\n  - \"" + kKey + "\"\n");
  // Without keys the job's text is kept byte for byte, JSON included.
  text = AddSshKeys("{\"instance-id\": \"x\"}", {});
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "{\"instance-id\": \"x\"}");
  // A nested key of that name is not the top-level one.
  text = AddSshKeys("tags:\n  public-keys: none\n", {kKey});
  ASSERT_TRUE(text.ok()) << text.status();
}

TEST(SeedIsoTest, AddSshKeysRefusesWhatItCannotMerge) {
  for (const std::string& meta : {std::string("{\"instance-id\": \"x\"}"), std::string("\n  {a: 1}\n"),
                                  std::string("instance-id: x\npublic-keys:\n  - ssh-rsa AAAA\n"),
                                  std::string("\"public-keys\" : []\n"), std::string("'public-keys': x\n")}) {
    auto text = AddSshKeys(meta, {kKey});
    ASSERT_FALSE(text.ok()) << meta;
    EXPECT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(text.status().message(), HasSubstr("cloud_init.ssh_authorized_keys")) << meta;
  }
}

TEST(SeedIsoTest, CheckSshKeyAcceptsKnownTypes) {
  EXPECT_TRUE(CheckSshKey(kKey, 0).ok());
  EXPECT_TRUE(CheckSshKey("ssh-rsa AAAAB3NzaC1yc2E comment with spaces", 0).ok());
  EXPECT_TRUE(CheckSshKey("ecdsa-sha2-nistp256 AAAAE2VjZHNh", 0).ok());
  EXPECT_TRUE(CheckSshKey("sk-ssh-ed25519@openssh.com AAAAGnNr caf\xc3\xa9", 0).ok());
}

TEST(SeedIsoTest, CheckSshKeyRejectsBadKeys) {
  struct Case {
    std::string key;
    std::string message;
  };
  std::vector<Case> cases = {
      {kKey + "\n", "must be one line"},
      {"ssh-rsa AAAA\nssh-rsa BBBB", "must be one line"},
      {"ssh-rsa AAAA\r", "must be one line"},
      {"ssh-rsa AAAA\x1b[31m", "control character (0x1b)"},
      {"ssh-rsa\tAAAA", "control character (0x09)"},
      {"ssh-rsa AAAA \xc2\x85", "control character (U+0085)"},
      {"ssh-rsa AAAA \xff", "not valid UTF-8"},
      {"", "known key type"},
      {"AAAAB3NzaC1yc2E", "known key type"},
      {"command=\"rm -rf /\" ssh-rsa AAAA", "known key type"},
      {"ssh-rsa " + std::string(kMaxSshKeyBytes, 'A'), "more than the 16384"},
  };
  for (const Case& c : cases) {
    absl::Status status = CheckSshKey(c.key, 3);
    ASSERT_FALSE(status.ok()) << c.key;
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(status.message()), StartsWith("cloud_init.ssh_authorized_keys[3]")) << c.key;
    EXPECT_THAT(status.message(), HasSubstr(c.message)) << c.key;
  }
}

TEST(SeedIsoTest, WritesAnIso9660VolumeNamedCidata) {
  testing::TempDir dir;
  const std::string path = dir / "seed.iso";
  ASSERT_TRUE(WriteSeedIso(SomeFiles(), path).ok());
  std::string image = ReadFile(path);
  ASSERT_GE(image.size(), 0x8000u + 2048u);
  EXPECT_EQ(image.size() % 2048, 0u);
  // Sector 16: the primary volume descriptor, type 1, "CD001", version 1.
  const std::string pvd = image.substr(0x8000, 2048);
  EXPECT_EQ(pvd[0], '\x01');
  EXPECT_EQ(pvd.substr(1, 5), "CD001");
  EXPECT_EQ(pvd[6], '\x01');
  EXPECT_EQ(pvd.substr(40, 32), "cidata" + std::string(26, ' '));
  // The contents are stored as given.
  EXPECT_NE(image.find("#cloud-config\nruncmd: [echo, hi]\n"), std::string::npos);
  // Each exact name is there twice: as a Rock Ridge NM entry (what Linux's
  // isofs shows; length 5 + name, version 1, no flags) and as a Joliet name
  // (UCS-2, big-endian). The integration test reads them through a mount.
  for (const std::string name : {"user-data", "meta-data", "network-config"}) {
    std::string nm = std::string("NM") + static_cast<char>(5 + name.size()) + std::string("\x01\x00", 2) + name;
    EXPECT_NE(image.find(nm), std::string::npos) << name;
    std::string joliet;
    for (char c : name) joliet += std::string(1, '\0') + c;
    EXPECT_NE(image.find(joliet), std::string::npos) << name;
  }
  EXPECT_EQ(image.find("vendor-data"), std::string::npos);  // not given, not written
  EXPECT_EQ(Entries(dir.path()), std::vector<std::string>{"seed.iso"});
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0644u);
}

TEST(SeedIsoTest, SameFilesGiveTheSameBytes) {
  testing::TempDir dir;
  const time_t first = ::time(nullptr);
  ASSERT_TRUE(WriteSeedIso(SomeFiles(), dir / "a.iso").ok());
  // Into the next second of the wall clock: a timestamp taken from it would now differ.
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (::time(nullptr) <= first && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(10));
  ASSERT_GT(::time(nullptr), first);
  ASSERT_TRUE(WriteSeedIso(SomeFiles(), dir / "b.iso").ok());
  EXPECT_TRUE(ReadFile(dir / "a.iso") == ReadFile(dir / "b.iso"));
}

TEST(SeedIsoTest, EmptyAndLargeFiles) {
  testing::TempDir dir;
  SeedFiles files;  // empty user-data and meta-data are still written
  ASSERT_TRUE(WriteSeedIso(files, dir / "empty.iso").ok());
  EXPECT_EQ(ReadFile(dir / "empty.iso").substr(0x8001, 5), "CD001");

  files.user_data.assign(16 << 20, 'u');
  files.vendor_data = std::string(16 << 20, 'v');
  ASSERT_TRUE(WriteSeedIso(files, dir / "big.iso").ok());
  struct stat st {};
  ASSERT_EQ(::stat((dir / "big.iso").c_str(), &st), 0);
  EXPECT_GT(st.st_size, 32 << 20);
}

TEST(SeedIsoTest, ReplacesAnExistingFile) {
  testing::TempDir dir;
  const std::string path = dir / "seed.iso";
  { std::ofstream(path) << "an old seed, much shorter than an image"; }
  SeedFiles files = SomeFiles();
  files.user_data = "#cloud-config\nhostname: second\n";
  ASSERT_TRUE(WriteSeedIso(files, path).ok());
  std::string image = ReadFile(path);
  EXPECT_EQ(image.substr(0x8001, 5), "CD001");
  EXPECT_NE(image.find("hostname: second"), std::string::npos);
  EXPECT_EQ(Entries(dir.path()), std::vector<std::string>{"seed.iso"});
}

TEST(SeedIsoTest, FailureLeavesNothingBehind) {
  testing::TempDir dir;
  absl::Status status = WriteSeedIso(SomeFiles(), dir / "missing/seed.iso");
  ASSERT_FALSE(status.ok());
  EXPECT_THAT(status.message(), HasSubstr("missing/.seed.iso.tmp-"));
  EXPECT_TRUE(Entries(dir.path()).empty());

  // A directory in the way of the rename: the image is made, then discarded.
  std::filesystem::create_directory(dir / "seed.iso");
  { std::ofstream(dir / "seed.iso/keep") << "x"; }
  status = WriteSeedIso(SomeFiles(), dir / "seed.iso");
  ASSERT_FALSE(status.ok());
  EXPECT_THAT(status.message(), HasSubstr("renaming the seed image"));
  EXPECT_EQ(Entries(dir.path()), std::vector<std::string>{"seed.iso"});

  // A read-only directory (root ignores the mode bits; then only the rest is checked).
  std::filesystem::create_directory(dir / "ro");
  ::chmod((dir / "ro").c_str(), 0555);
  status = WriteSeedIso(SomeFiles(), dir / "ro/seed.iso");
  if (::geteuid() != 0) {
    ASSERT_FALSE(status.ok());
    EXPECT_THAT(status.message(), HasSubstr("Permission denied"));
    EXPECT_TRUE(Entries(dir / "ro").empty());
  }
  ::chmod((dir / "ro").c_str(), 0755);
}

}  // namespace
}  // namespace ndq
