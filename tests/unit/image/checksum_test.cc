#include "image/checksum.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace ndq {
namespace {

using ::testing::HasSubstr;

const std::string kMd5 = "9e107d9d372bb6826bd81d3542a419d6";
const std::string kSha1 = "2fd4e1c67a2d28fced849ee1bb76e7391b93eb12";
const std::string kSha256 = "d7a8fbb307d7809469ca9abcb0082e4f8d5651e46d3cdb762d02d0bf37c9e592";
const std::string kSha512 =
    "07e547d9586f6a73f73fbac0435ed76951218fb7d0c8d788a309d785436bbb642e93a252a954f23912547d1e8a3b5ed6e1bfd7097821233fa0"
    "538f3db854fee6";
const std::string kFox = "The quick brown fox jumps over the lazy dog";

TEST(ChecksumTest, ParsesTypedAndBare) {
  auto c = ParseChecksum("sha256:" + kSha256);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->type, "sha256");
  EXPECT_EQ(c->hex, kSha256);

  c = ParseChecksum("SHA1:" + std::string("2FD4E1C67A2D28FCED849EE1BB76E7391B93EB12"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->type, "sha1");
  EXPECT_EQ(c->hex, kSha1);

  for (const auto& [hex, type] : {std::pair<std::string, std::string>{kMd5, "md5"}, {kSha1, "sha1"},
                                  {kSha256, "sha256"}, {kSha512, "sha512"}}) {
    c = ParseChecksum("  " + hex + "\n");
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ(c->type, type);
    EXPECT_EQ(c->hex, hex);
  }
}

TEST(ChecksumTest, RejectsBadInput) {
  auto c = ParseChecksum("crc32:deadbeef");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("unknown checksum type \"crc32\""));

  c = ParseChecksum("sha256:" + kSha256.substr(1) + "g");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("hexadecimal"));

  c = ParseChecksum("sha256:" + kSha1);
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("sha256 checksum has 64 hex digits, got 40"));

  c = ParseChecksum(kSha256.substr(1));
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("cannot tell the checksum type from 63 hex digits"));

  EXPECT_FALSE(ParseChecksum("").ok());
  EXPECT_FALSE(ParseChecksum("sha256:").ok());
}

TEST(ChecksumTest, HasherKnownVectors) {
  for (const auto& [type, hex] : {std::pair<std::string, std::string>{"md5", kMd5}, {"sha1", kSha1},
                                  {"sha256", kSha256}, {"sha512", kSha512}}) {
    auto h = Hasher::Create(type);
    ASSERT_TRUE(h.ok()) << h.status();
    // In pieces: the digest must not depend on how the data is split.
    h->Update(kFox.data(), 10);
    h->Update(kFox.data() + 10, kFox.size() - 10);
    EXPECT_EQ(h->FinalHex(), hex) << type;
    h->Reset();
    h->Update(kFox.data(), kFox.size());
    EXPECT_EQ(h->FinalHex(), hex) << type << " after Reset";
  }
  auto empty = Hasher::Create("sha256");
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(empty->FinalHex(), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_FALSE(Hasher::Create("sha3").ok());
}

TEST(ChecksumTest, GnuFormFile) {
  const std::string other(64, 'a');
  const std::string content = "# published checksums\n" + other + "  debian-12-genericcloud-arm64.qcow2\n" + kSha256 +
                              "  debian-12-genericcloud-amd64.qcow2\n";
  auto c = ChecksumFromFile(content, "debian-12-genericcloud-amd64.qcow2", "");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->type, "sha256");
  EXPECT_EQ(c->hex, kSha256);

  // Binary marker, ./ prefix, directory prefix, CRLF line endings.
  c = ChecksumFromFile(kSha512 + " *img.raw\r\n", "img.raw", "");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->type, "sha512");
  c = ChecksumFromFile(kMd5 + "  ./img.raw\n", "img.raw", "");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->type, "md5");
  c = ChecksumFromFile(kSha1 + "  images/x86/img.raw\n", "img.raw", "");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->type, "sha1");
  EXPECT_EQ(c->hex, kSha1);

  // A longer name that merely ends with ours does not match.
  c = ChecksumFromFile(kSha256 + "  myimg.raw\n", "img.raw", "");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(c.status().message(), HasSubstr("\"img.raw\""));

  // Uppercase hex is normalised.
  std::string upper = kSha256;
  for (char& ch : upper) ch = static_cast<char>(toupper(ch));
  c = ChecksumFromFile(upper + "  img.raw\n", "img.raw", "sha256");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hex, kSha256);
}

TEST(ChecksumTest, BsdFormFile) {
  const std::string content = "SHA256 (other.img) = " + std::string(64, 'b') + "\nSHA256 (disk.img) = " + kSha256 +
                              "\nSHA512 (disk.img) = " + kSha512 + "\n";
  auto c = ChecksumFromFile(content, "disk.img", "sha512");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->type, "sha512");
  EXPECT_EQ(c->hex, kSha512);
  c = ChecksumFromFile(content, "disk.img", "sha256");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hex, kSha256);
  c = ChecksumFromFile(content, "disk.img", "");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->type, "sha256");  // first line for the file

  // OpenSSL 3 `dgst` style and MD5 tag.
  c = ChecksumFromFile("SHA2-256(./disk.img)= " + kSha256 + "\n", "disk.img", "");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->type, "sha256");
  c = ChecksumFromFile("MD5 (disk.img) = " + kMd5 + "\n", "disk.img", "");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->type, "md5");

  // Tag and digest length disagree.
  c = ChecksumFromFile("SHA512 (disk.img) = " + kSha256 + "\n", "disk.img", "");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("do not make a sha512 digest"));

  // Hint that no line satisfies.
  c = ChecksumFromFile(content, "disk.img", "md5");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("no md5 checksum for \"disk.img\""));
  EXPECT_FALSE(ChecksumFromFile(content, "disk.img", "crc").ok());
}

TEST(ChecksumTest, ConflictingLinesAreAnError) {
  const std::string content = kSha256 + "  a.img\n" + std::string(64, 'c') + "  a.img\n";
  auto c = ChecksumFromFile(content, "a.img", "");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("different sha256 digests"));
}

}  // namespace
}  // namespace ndq
