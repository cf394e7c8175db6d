#include "qemu_driver/supervisor_protocol.h"

#include <unistd.h>

#include <algorithm>
#include <climits>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "../../../src/supervisor/exit_record.h"
#include "../../support/temp_dir.h"
#include "absl/strings/str_cat.h"

namespace ndq::supervisor {
namespace {

using nlohmann::json;
using ::ndq::testing::TempDir;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::StartsWith;
namespace fs = std::filesystem;

// The example record from supervisor_protocol.h.
json Example() {
  return json{{"exit_code", 7},
              {"signal", 0},
              {"core_dumped", false},
              {"started_at", 1700000000000},
              {"exited_at", 1700000000123},
              {"stderr_tail", "qemu: could not open disk\n"},
              {"error", ""}};
}

std::optional<ExitRecord> Parse(const std::string& text, std::string* error) { return ParseExitRecord(text, error); }

TEST(ParseExitRecord, ReadsEveryFieldOfTheDocumentedRecord) {
  std::string error = "stale";
  std::optional<ExitRecord> record = Parse(Example().dump(), &error);
  ASSERT_TRUE(record.has_value()) << error;
  EXPECT_THAT(error, IsEmpty());
  EXPECT_EQ(record->exit_code, 7);
  EXPECT_EQ(record->signal, 0);
  EXPECT_FALSE(record->core_dumped);
  EXPECT_EQ(record->started_at_ms, 1700000000000);
  EXPECT_EQ(record->exited_at_ms, 1700000000123);
  EXPECT_EQ(record->stderr_tail, "qemu: could not open disk\n");
  EXPECT_THAT(record->error, IsEmpty());
}

TEST(ParseExitRecord, ReadsAKilledQemuAndACouldNotRunRecord) {
  json killed = Example();
  killed["exit_code"] = -1;
  killed["signal"] = 9;
  killed["core_dumped"] = true;
  std::string error;
  std::optional<ExitRecord> record = Parse(killed.dump(), &error);
  ASSERT_TRUE(record.has_value()) << error;
  EXPECT_EQ(record->exit_code, -1);
  EXPECT_EQ(record->signal, 9);
  EXPECT_TRUE(record->core_dumped);

  json never_ran = Example();
  never_ran["exit_code"] = kCouldNotRunExitCode;
  never_ran["error"] = "exec qemu-system-x86_64: No such file or directory";
  record = Parse(never_ran.dump(), &error);
  ASSERT_TRUE(record.has_value()) << error;
  EXPECT_EQ(record->exit_code, kCouldNotRunExitCode);
  EXPECT_EQ(record->error, "exec qemu-system-x86_64: No such file or directory");
}

TEST(ParseExitRecord, UnknownFieldsFromANewerSupervisorAreIgnored) {
  json newer = Example();
  newer["oom_killed"] = true;
  newer["rusage"] = {{"maxrss_kb", 123456}, {"nested", json::array({1, "two", nullptr})}};
  std::string error;
  std::optional<ExitRecord> record = Parse(newer.dump(), &error);
  ASSERT_TRUE(record.has_value()) << error;
  EXPECT_EQ(record->exit_code, 7);
}

TEST(ParseExitRecord, EscapedTextIsDecodedToUtf8) {
  const std::string text =
      R"({"exit_code":1,"signal":0,"core_dumped":false,"started_at":1,"exited_at":2,)"
      R"("stderr_tail":"caf\u00e9 \"quoted\"\n\ufffd","error":""})";
  std::string error;
  std::optional<ExitRecord> record = Parse(text, &error);
  ASSERT_TRUE(record.has_value()) << error;
  EXPECT_EQ(record->stderr_tail, "caf\xc3\xa9 \"quoted\"\n\xef\xbf\xbd");
}

TEST(ParseExitRecord, TextThatIsNotAJsonObjectIsRejected) {
  const std::string complete = Example().dump();
  for (const std::string& bad : {std::string(""), std::string("   "), std::string("null"), std::string("[]"),
                                std::string("7"), std::string("\"exit.json\""), complete.substr(0, complete.size() - 1),
                                complete.substr(0, complete.size() / 2), complete + " trailing", complete + "{}",
                                std::string("{\"exit_code\":7,}"), std::string("\xff\xfe{}")}) {
    std::string error;
    EXPECT_FALSE(Parse(bad, &error).has_value()) << bad;
    EXPECT_THAT(error, StartsWith("exit record")) << bad;
  }
}

TEST(ParseExitRecord, RawInvalidUtf8IsRejectedRatherThanPassedOn) {
  // The supervisor writes U+FFFD for bad bytes; a raw one means a corrupt file.
  json record = Example();
  std::string text = record.dump();
  text.replace(text.find("could"), 5, "co\xffld");
  std::string error;
  EXPECT_FALSE(Parse(text, &error).has_value());
  EXPECT_THAT(error, HasSubstr("not valid JSON"));
}

TEST(ParseExitRecord, EachMissingFieldIsNamedInTheError) {
  for (const std::string field : {"exit_code", "signal", "core_dumped", "started_at", "exited_at", "stderr_tail", "error"}) {
    json record = Example();
    record.erase(field);
    std::string error;
    EXPECT_FALSE(Parse(record.dump(), &error).has_value()) << field;
    EXPECT_THAT(error, HasSubstr("\"" + field + "\"")) << field;
  }
}

TEST(ParseExitRecord, FieldsOfTheWrongTypeAreRejected) {
  const std::vector<std::pair<std::string, json>> wrong = {
      {"exit_code", "7"},  {"exit_code", 7.5},   {"exit_code", 7.0},    {"exit_code", nullptr},
      {"signal", true},    {"core_dumped", 0},   {"core_dumped", "no"}, {"started_at", "1700000000000"},
      {"exited_at", 1e12}, {"stderr_tail", 42},  {"stderr_tail", json::array({"a"})},
      {"error", nullptr},  {"error", json::object()}};
  for (const auto& [field, value] : wrong) {
    json record = Example();
    record[field] = value;
    std::string error;
    EXPECT_FALSE(Parse(record.dump(), &error).has_value()) << record.dump();
    EXPECT_THAT(error, HasSubstr("\"" + field + "\"")) << record.dump();
  }
}

TEST(ParseExitRecord, NumbersOutOfRangeAreRejectedNotTruncated) {
  const std::vector<std::pair<std::string, std::string>> wrong = {
      {"exit_code", "2147483648"},            {"exit_code", "-2147483649"},
      {"signal", "4294967297"},               {"started_at", "9223372036854775808"},
      {"exited_at", "18446744073709551615"},  {"started_at", "99999999999999999999999"}};
  for (const auto& [field, number] : wrong) {
    json record = Example();
    record[field] = 0;
    std::string text = record.dump();
    const std::string key = "\"" + field + "\":0";
    ASSERT_NE(text.find(key), std::string::npos);
    text.replace(text.find(key), key.size(), "\"" + field + "\":" + number);
    std::string error;
    EXPECT_FALSE(Parse(text, &error).has_value()) << text;
    EXPECT_THAT(error, HasSubstr("\"" + field + "\"")) << text;
  }
}

TEST(ParseExitRecord, TheExtremesThatFitAreAccepted) {
  json record = Example();
  record["exit_code"] = INT_MIN;
  record["signal"] = INT_MAX;
  record["started_at"] = INT64_MIN;
  record["exited_at"] = INT64_MAX;
  std::string error;
  std::optional<ExitRecord> parsed = Parse(record.dump(), &error);
  ASSERT_TRUE(parsed.has_value()) << error;
  EXPECT_EQ(parsed->exit_code, INT_MIN);
  EXPECT_EQ(parsed->signal, INT_MAX);
  EXPECT_EQ(parsed->started_at_ms, INT64_MIN);
  EXPECT_EQ(parsed->exited_at_ms, INT64_MAX);
}

class StateDir : public ::testing::Test {
 protected:
  void Put(const std::string& name, const std::string& contents) {
    std::ofstream(dir_ / name, std::ios::binary) << contents;
  }
  TempDir dir_;
};

TEST_F(StateDir, NoExitRecordYetIsNulloptWithoutAnError) {
  std::string error = "stale";
  EXPECT_FALSE(ReadExitRecord(dir_.path(), &error).has_value());
  EXPECT_THAT(error, IsEmpty());
  // A record still being written (only the temporary file) is no record either.
  Put(std::string(kExitFile) + kTempSuffix, "{\"exit_co");
  EXPECT_FALSE(ReadExitRecord(dir_.path(), &error).has_value());
  EXPECT_THAT(error, IsEmpty());
  // Nor is a state directory that is gone altogether.
  EXPECT_FALSE(ReadExitRecord(dir_ / "removed", &error).has_value());
  EXPECT_THAT(error, IsEmpty());
}

TEST_F(StateDir, AWrittenExitRecordIsRead) {
  Put(kExitFile, Example().dump() + "\n");
  std::string error;
  std::optional<ExitRecord> record = ReadExitRecord(dir_.path(), &error);
  ASSERT_TRUE(record.has_value()) << error;
  EXPECT_EQ(record->exit_code, 7);
  EXPECT_EQ(record->exited_at_ms, 1700000000123);
}

TEST_F(StateDir, ACorruptExitRecordIsAnErrorNamingTheFile) {
  Put(kExitFile, "{\"exit_code\":7,\"signal\"");
  std::string error;
  EXPECT_FALSE(ReadExitRecord(dir_.path(), &error).has_value());
  EXPECT_THAT(error, StartsWith(dir_ / kExitFile));
  EXPECT_THAT(error, HasSubstr("not valid JSON"));
}

TEST_F(StateDir, AnExitRecordThatIsADirectoryOrHugeIsAnError) {
  fs::create_directory(dir_ / kExitFile);
  std::string error;
  EXPECT_FALSE(ReadExitRecord(dir_.path(), &error).has_value());
  EXPECT_THAT(error, HasSubstr(kExitFile));
  fs::remove(dir_ / kExitFile);

  // Valid JSON, but far beyond anything a supervisor writes.
  json huge = Example();
  huge["padding"] = std::string(2 << 20, 'x');
  Put(kExitFile, huge.dump());
  EXPECT_FALSE(ReadExitRecord(dir_.path(), &error).has_value());
  EXPECT_THAT(error, HasSubstr("larger than"));
}

TEST_F(StateDir, TheQemuPidIsRead) {
  Put(kPidFile, absl::StrCat(::getpid(), "\n"));
  std::string error;
  EXPECT_EQ(ReadQemuPid(dir_.path(), &error).value_or(-1), ::getpid()) << error;
  Put(kPidFile, "2147483647\n");
  EXPECT_EQ(ReadQemuPid(dir_.path(), &error).value_or(-1), INT_MAX) << error;
  Put(kPidFile, "1\n");
  EXPECT_EQ(ReadQemuPid(dir_.path(), &error).value_or(-1), 1) << error;
}

TEST_F(StateDir, NoPidFileYetIsNulloptWithoutAnError) {
  std::string error = "stale";
  EXPECT_FALSE(ReadQemuPid(dir_.path(), &error).has_value());
  EXPECT_THAT(error, IsEmpty());
}

TEST_F(StateDir, AnythingButDigitsAndOneNewlineIsNotAPid) {
  for (const std::string& bad : {std::string(""), std::string("\n"), std::string("1234"), std::string("1234\n\n"),
                                std::string(" 1234\n"), std::string("1234 \n"), std::string("+1234\n"),
                                std::string("-1234\n"), std::string("0\n"), std::string("00\n"),
                                std::string("12a4\n"), std::string("0x10\n"), std::string("1234\r\n"),
                                std::string("2147483648\n"), std::string("99999999999\n"),
                                std::string("123456789012345\n"), std::string("12\0" "34\n", 6)}) {
    Put(kPidFile, bad);
    std::string error;
    std::optional<pid_t> pid = ReadQemuPid(dir_.path(), &error);
    EXPECT_FALSE(pid.has_value()) << "\"" << bad << "\" read as " << pid.value_or(0);
    EXPECT_EQ(error, (dir_ / kPidFile) + ": not a pid") << bad;
  }
}

// The supervisor's own writer (src/supervisor/exit_record.cc, built into this
// test) against the plugin's reader: the two halves of the contract agree.
std::optional<ExitRecord> RoundTrip(const ExitFacts& facts, std::string* error) {
  std::vector<char> buf(kMaxExitRecordBytes);
  const size_t len = FormatExitRecord(facts, buf.data());
  EXPECT_LE(len, kMaxExitRecordBytes);
  return ParseExitRecord(std::string_view(buf.data(), len), error);
}

TEST(ExitRecordRoundTrip, EveryFieldTheSupervisorWritesIsReadBack) {
  const std::string tail = "qemu-system-x86_64: -drive file=/x: \"quoted\" \\ back\tslash\r\n";
  ExitFacts facts;
  facts.exit_code = -1;
  facts.signal = 11;
  facts.core_dumped = true;
  facts.started_at_ms = 1700000000000;
  facts.exited_at_ms = 1700000004321;
  facts.stderr_tail = tail.data();
  facts.stderr_tail_len = tail.size();
  facts.error = "";
  std::string error;
  std::optional<ExitRecord> record = RoundTrip(facts, &error);
  ASSERT_TRUE(record.has_value()) << error;
  EXPECT_EQ(record->exit_code, -1);
  EXPECT_EQ(record->signal, 11);
  EXPECT_TRUE(record->core_dumped);
  EXPECT_EQ(record->started_at_ms, 1700000000000);
  EXPECT_EQ(record->exited_at_ms, 1700000004321);
  EXPECT_EQ(record->stderr_tail, tail);
  EXPECT_THAT(record->error, IsEmpty());
}

// QEMU's stderr is arbitrary bytes: ASCII (controls and NUL too) and valid
// UTF-8 come back unchanged, each byte that starts no valid sequence as U+FFFD.
TEST(ExitRecordRoundTrip, ArbitraryStderrBytesArriveAsValidUtf8) {
  std::string tail;
  for (int b = 0; b < 256; ++b) tail.push_back(static_cast<char>(b));
  const std::string valid = "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80";
  tail += valid;
  tail += "\xed\xa0\x80";  // an encoded surrogate: three bad bytes
  tail += "\xc0\xaf";       // an overlong '/': two bad bytes
  tail += "\xe2\x82";       // cut short at the end
  ExitFacts facts;
  facts.exit_code = 1;
  facts.stderr_tail = tail.data();
  facts.stderr_tail_len = tail.size();
  facts.error = "exec: \"/nix/qemu\"\nnot found";
  std::string error;
  std::optional<ExitRecord> record = RoundTrip(facts, &error);
  ASSERT_TRUE(record.has_value()) << error;

  const std::string kReplacement = "\xef\xbf\xbd";
  std::string expected;
  for (int b = 0; b < 128; ++b) expected.push_back(static_cast<char>(b));
  for (int b = 128; b < 256; ++b) expected += kReplacement;  // no two of them form a sequence
  expected += valid;
  for (int i = 0; i < 3 + 2 + 2; ++i) expected += kReplacement;
  EXPECT_EQ(record->stderr_tail, expected);
  EXPECT_EQ(record->error, "exec: \"/nix/qemu\"\nnot found");
}

// The worst case the supervisor can produce still fits its buffer and parses.
TEST(ExitRecordRoundTrip, TheLargestPossibleRecordIsCompleteAndParses) {
  const std::string tail(kStderrTailBytes, '\xff');
  const std::string error_text(kMaxErrorBytes - 1, '\x01');
  ExitFacts facts;
  facts.exit_code = INT_MIN;
  facts.signal = INT_MAX;
  facts.started_at_ms = INT64_MIN;
  facts.exited_at_ms = INT64_MAX;
  facts.stderr_tail = tail.data();
  facts.stderr_tail_len = tail.size();
  facts.error = error_text.c_str();
  std::string error;
  std::optional<ExitRecord> record = RoundTrip(facts, &error);
  ASSERT_TRUE(record.has_value()) << error;
  EXPECT_EQ(record->exit_code, INT_MIN);
  EXPECT_EQ(record->exited_at_ms, INT64_MAX);
  EXPECT_EQ(record->stderr_tail.size(), kStderrTailBytes * 3) << "one U+FFFD per byte";
  EXPECT_EQ(record->error, error_text);
}

TEST(SupervisorArgv, TheMinimalCommandLineEndsOptionsBeforeQemu) {
  EXPECT_THAT(SupervisorArgv("/opt/sup", "/run/t", "/alloc/out", "/alloc/err", "", {"/usr/bin/qemu", "-m", "512"}),
              ElementsAre("/opt/sup", "--state-dir", "/run/t", "--stdout", "/alloc/out", "--stderr", "/alloc/err",
                          "--", "/usr/bin/qemu", "-m", "512"));
}

TEST(SupervisorArgv, UserAndPlacementComeBeforeTheEndOfOptions) {
  Placement placement;
  placement.cgroup_procs = {"/sys/fs/cgroup/memory/nomad/t/cgroup.procs", "/sys/fs/cgroup/cpu/nomad/t/cgroup.procs"};
  placement.netns = "/var/run/netns/alloc1";
  placement.passed_fds = 2;
  const std::optional<std::string> ids = UserIds("nobody");
  ASSERT_TRUE(ids.has_value()) << "this host has no user nobody";
  EXPECT_THAT(SupervisorArgv("/opt/sup", "/run/t", "/o", "/e", "nobody", {"/usr/bin/qemu"}, placement),
              ElementsAre("/opt/sup", "--state-dir", "/run/t", "--stdout", "/o", "--stderr", "/e", "--user", "nobody",
                          "--user-ids", *ids, "--cgroup", "/sys/fs/cgroup/memory/nomad/t/cgroup.procs", "--cgroup",
                          "/sys/fs/cgroup/cpu/nomad/t/cgroup.procs", "--netns", "/var/run/netns/alloc1",
                          "--pass-fds", "2", "--", "/usr/bin/qemu"));
}

// A warm pool's QEMU gets its output paths at handover, not on its command line.
TEST(SupervisorArgv, APooledVmHasNoOutputPaths) {
  Placement placement;
  placement.passed_fds = 3;
  placement.pooled = true;
  EXPECT_THAT(SupervisorArgv("/opt/sup", "/run/pool/p1", "", "", "", {"/usr/bin/qemu"}, placement),
              ElementsAre("/opt/sup", "--state-dir", "/run/pool/p1", "--pooled", "--pass-fds", "3", "--",
                          "/usr/bin/qemu"));
}

// The user's ids as the plugin looks them up: uid, gid, then its groups.
TEST(UserIds, UidGidAndGroupsOfAKnownUserNoneForAnUnknownOne) {
  const std::optional<std::string> root = UserIds("root");
  ASSERT_TRUE(root.has_value());
  EXPECT_EQ(root->substr(0, 5), "0:0:0");
  EXPECT_EQ(UserIds("ndq-no-such-user"), std::nullopt);
}

// QEMU arguments that look like the supervisor's own options stay QEMU's.
TEST(SupervisorArgv, QemuArgumentsAreCopiedVerbatimAfterTheSeparator) {
  const std::vector<std::string> qemu = {"/usr/bin/qemu", "--user", "root", "--", "--state-dir", "/etc", "",
                                         "with space", "quote\"d"};
  const std::vector<std::string> argv = SupervisorArgv("/opt/sup", "/run/t", "/o", "/e", "", qemu);
  ASSERT_GE(argv.size(), qemu.size() + 1);
  const auto separator = argv.end() - static_cast<std::ptrdiff_t>(qemu.size()) - 1;
  EXPECT_EQ(*separator, kArgEndOfOptions);
  EXPECT_EQ(std::count(argv.begin(), separator, std::string(kArgEndOfOptions)), 0);
  EXPECT_THAT(std::vector<std::string>(separator + 1, argv.end()), ElementsAreArray(qemu));
  EXPECT_EQ(std::count(argv.begin(), separator, std::string(kArgUser)), 0) << "no --user was asked for";
}

TEST(SupervisorArgv, AnSwtpmComesAsThreeOptionsBeforeTheEndOfOptions) {
  Placement placement;
  placement.swtpm_path = "/usr/bin/swtpm";
  placement.swtpm_state_dir = "/run/t/tpm";
  placement.swtpm_socket = "/run/t/tpm.sock";
  EXPECT_THAT(SupervisorArgv("/opt/sup", "/run/t", "/o", "/e", "", {"/q"}, placement),
              ElementsAre("/opt/sup", "--state-dir", "/run/t", "--stdout", "/o", "--stderr", "/e", "--swtpm",
                          "/usr/bin/swtpm", "--swtpm-state", "/run/t/tpm", "--swtpm-socket", "/run/t/tpm.sock", "--",
                          "/q"));
}

TEST(SupervisorArgv, NoPassedFdsAndNoNetnsAddNoFlags) {
  Placement placement;
  placement.passed_fds = 0;
  const std::vector<std::string> argv = SupervisorArgv("/opt/sup", "/run/t", "/o", "/e", "", {"/q"}, placement);
  for (const char* flag : {kArgPassFds, kArgNetns, kArgCgroup, kArgUser, kArgSwtpm, kArgSwtpmState, kArgSwtpmSocket}) {
    EXPECT_EQ(std::count(argv.begin(), argv.end(), std::string(flag)), 0) << flag;
  }
}

}  // namespace
}  // namespace ndq::supervisor
