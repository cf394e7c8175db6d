#include "nomadplugin/hclog.h"

#include <gtest/gtest.h>

#include <regex>

#include <spdlog/sinks/ostream_sink.h>

namespace nomadplugin::hclog {
namespace {

const std::regex kTimestamp(R"(^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$)");

TEST(Hclog, LineHasHclogKeysAndSixFractionalDigits) {
  // 2026-01-02T15:04:05.000007Z
  const auto when = std::chrono::system_clock::time_point(std::chrono::seconds(1767366245)) +
                    std::chrono::microseconds(7);
  const nlohmann::json line =
      nlohmann::json::parse(FormatLine(spdlog::level::warn, when, "qemu", "disk full", {{"task_id", "a/b/c"}}));
  EXPECT_EQ(line["@level"], "warn");
  EXPECT_EQ(line["@message"], "disk full");
  EXPECT_EQ(line["@module"], "qemu");
  EXPECT_EQ(line["@timestamp"], "2026-01-02T15:04:05.000007Z");
  EXPECT_EQ(line["task_id"], "a/b/c");
}

TEST(Hclog, LevelNamesAreHclogs) {
  const auto now = std::chrono::system_clock::now();
  auto level_of = [&](spdlog::level::level_enum l) {
    return nlohmann::json::parse(FormatLine(l, now, "m", "x", nlohmann::json::object()))["@level"];
  };
  EXPECT_EQ(level_of(spdlog::level::trace), "trace");
  EXPECT_EQ(level_of(spdlog::level::debug), "debug");
  EXPECT_EQ(level_of(spdlog::level::info), "info");
  EXPECT_EQ(level_of(spdlog::level::err), "error");
  EXPECT_EQ(level_of(spdlog::level::critical), "error");
}

TEST(Hclog, InvalidUtf8DoesNotThrow) {
  const std::string line = FormatLine(spdlog::level::info, std::chrono::system_clock::now(), "m",
                                      std::string("bad \xff byte"), nlohmann::json::object());
  EXPECT_TRUE(nlohmann::json::accept(line)) << line;
}

TEST(Hclog, FieldsSurviveTheSpdlogPipeline) {
  std::ostringstream out;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out);
  auto logger = std::make_shared<spdlog::logger>("qemu", sink);
  logger->set_formatter(MakeFormatter());
  logger->set_level(spdlog::level::trace);
  auto previous = spdlog::default_logger();
  spdlog::set_default_logger(logger);
  Info("started", {{"pid", 42}, {"path", "/x"}});
  Debug("plain message");
  spdlog::set_default_logger(previous);

  std::istringstream lines(out.str());
  std::string first, second;
  ASSERT_TRUE(std::getline(lines, first));
  ASSERT_TRUE(std::getline(lines, second));
  const nlohmann::json a = nlohmann::json::parse(first);
  EXPECT_EQ(a["@message"], "started");
  EXPECT_EQ(a["pid"], 42);
  EXPECT_EQ(a["path"], "/x");
  EXPECT_TRUE(std::regex_match(a["@timestamp"].get<std::string>(), kTimestamp));
  const nlohmann::json b = nlohmann::json::parse(second);
  EXPECT_EQ(b["@message"], "plain message");
  EXPECT_EQ(b["@level"], "debug");
}

TEST(Hclog, ParsesLevels) {
  spdlog::level::level_enum level;
  ASSERT_TRUE(ParseLevel("WARN", &level));
  EXPECT_EQ(level, spdlog::level::warn);
  ASSERT_TRUE(ParseLevel("trace", &level));
  EXPECT_EQ(level, spdlog::level::trace);
  EXPECT_FALSE(ParseLevel("loud", &level));
}

}  // namespace
}  // namespace nomadplugin::hclog
