// FormatExitRecord beyond what supervisor_protocol_test's round trips check:
// the documented byte layout, the stdout tail, and the worst-case size bound
// the supervisor's fixed buffer is computed from.
#include "../../../src/supervisor/exit_record.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "qemu_driver/supervisor_protocol.h"

namespace ndq::supervisor {
namespace {

using ::testing::EndsWith;

std::string Format(const ExitFacts& facts) {
  std::vector<char> buf(kMaxExitRecordBytes);  // exactly the promised size: ASan sees any overrun
  const size_t len = FormatExitRecord(facts, buf.data());
  EXPECT_LE(len, kMaxExitRecordBytes);
  return std::string(buf.data(), std::min(len, kMaxExitRecordBytes));
}

// The example in supervisor_protocol.h, byte for byte, as one line: older
// plugins and people reading the file rely on that layout.
TEST(ExitRecord, TheDocumentedExampleIsWrittenByteForByteAsOneLine) {
  ExitFacts facts;
  facts.exit_code = 7;
  facts.signal = 0;
  facts.core_dumped = false;
  facts.started_at_ms = 1700000000000;
  facts.exited_at_ms = 1700000000123;
  facts.stderr_tail = "...";
  facts.stderr_tail_len = 3;
  facts.stdout_tail = "...";
  facts.stdout_tail_len = 3;
  facts.error = "";
  EXPECT_EQ(Format(facts),
            "{\"exit_code\":7,\"signal\":0,\"core_dumped\":false,\"started_at\":1700000000000,"
            "\"exited_at\":1700000000123,\"stderr_tail\":\"...\",\"stdout_tail\":\"...\",\"error\":\"\"}\n");
}

// The serial console's tail gets the same escaping as stderr's, in its own field.
TEST(ExitRecord, TheStdoutTailIsEscapedAndKeptApartFromStderr) {
  const std::string console = "login: \"root\"\\\r\n\x1b[0m\x01\xff ok \xc3\xa9";
  const std::string err = "qemu: warning\n";
  ExitFacts facts;
  facts.exit_code = 0;
  facts.stdout_tail = console.data();
  facts.stdout_tail_len = console.size();
  facts.stderr_tail = err.data();
  facts.stderr_tail_len = err.size();
  std::string error;
  const std::optional<ExitRecord> record = ParseExitRecord(Format(facts), &error);
  ASSERT_TRUE(record.has_value()) << error;
  EXPECT_EQ(record->stdout_tail, "login: \"root\"\\\r\n\x1b[0m\x01\xef\xbf\xbd ok \xc3\xa9");
  EXPECT_EQ(record->stderr_tail, err);
}

// Tails are ring-buffer copies without a terminator: only `len` bytes count,
// NULs included.
TEST(ExitRecord, TailsAreTakenByLengthNotUpToANul) {
  const char stderr_bytes[] = "abc\0def-not-part-of-the-tail";
  const char stdout_bytes[] = "xyz-not-part";
  ExitFacts facts;
  facts.stderr_tail = stderr_bytes;
  facts.stderr_tail_len = 7;
  facts.stdout_tail = stdout_bytes;
  facts.stdout_tail_len = 3;
  std::string error;
  const std::optional<ExitRecord> record = ParseExitRecord(Format(facts), &error);
  ASSERT_TRUE(record.has_value()) << error;
  EXPECT_EQ(record->stderr_tail, std::string("abc\0def", 7));
  EXPECT_EQ(record->stdout_tail, "xyz");
}

// kMaxExitRecordBytes is the bound for every field at once escaping to six
// bytes per input byte (a control character becomes \u00XX); such a record is
// still complete, not cut, and parses back to the same bytes.
TEST(ExitRecord, EveryFieldAtItsWorstStillFitsTheBufferWhole) {
  const std::string err_tail(kStderrTailBytes, '\x01');
  const std::string out_tail(kStdoutTailBytes, '\x1f');
  const std::string message(kMaxErrorBytes - 1, '\x02');
  ExitFacts facts;
  facts.exit_code = INT_MIN;
  facts.signal = INT_MIN;
  facts.core_dumped = false;
  facts.started_at_ms = INT64_MIN;
  facts.exited_at_ms = INT64_MIN;
  facts.stderr_tail = err_tail.data();
  facts.stderr_tail_len = err_tail.size();
  facts.stdout_tail = out_tail.data();
  facts.stdout_tail_len = out_tail.size();
  facts.error = message.c_str();
  const std::string text = Format(facts);
  EXPECT_THAT(text, EndsWith("}\n"));
  std::string error;
  const std::optional<ExitRecord> record = ParseExitRecord(text, &error);
  ASSERT_TRUE(record.has_value()) << error;
  EXPECT_EQ(record->signal, INT_MIN);
  EXPECT_EQ(record->started_at_ms, INT64_MIN);
  EXPECT_EQ(record->stderr_tail, err_tail);
  EXPECT_EQ(record->stdout_tail, out_tail);
  EXPECT_EQ(record->error, message);
}

// What the supervisor records as `error` is an ErrorText: a message longer
// than its buffer is cut, stays terminated, and is recorded as cut.
TEST(ExitRecord, AnOverlongErrorTextIsCutToItsBufferAndRecorded) {
  const std::string path(3 * kMaxErrorBytes, 'p');
  ErrorText text;
  text.Set("exec %s: %s", path.c_str(), "No such file or directory");
  const std::string expected = ("exec " + path).substr(0, kMaxErrorBytes - 1);
  EXPECT_EQ(std::string(text.text), expected);
  ExitFacts facts;
  facts.exit_code = kCouldNotRunExitCode;
  facts.error = text.text;
  std::string error;
  const std::optional<ExitRecord> record = ParseExitRecord(Format(facts), &error);
  ASSERT_TRUE(record.has_value()) << error;
  EXPECT_EQ(record->error, expected);
}

}  // namespace
}  // namespace ndq::supervisor
