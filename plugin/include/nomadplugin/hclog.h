// Logging as hclog JSON lines on stderr: go-plugin reads a plugin's stderr line by
// line and keeps the level, message and fields of lines in this form.
#pragma once

#include <chrono>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

namespace nomadplugin::hclog {

using Fields = std::initializer_list<std::pair<std::string_view, nlohmann::json>>;

// Makes the default spdlog logger write hclog JSON to stderr, flushing every line.
void Init(std::string_view module, spdlog::level::level_enum level);

// "trace", "debug", "info", "warn"/"warning", "error", "off"; false when unknown.
bool ParseLevel(std::string_view name, spdlog::level::level_enum* level);

// One JSON object (no newline): @level, @message, @module, @timestamp with exactly
// six fractional digits in UTC, then `fields` as extra keys.
std::string FormatLine(spdlog::level::level_enum level, std::chrono::system_clock::time_point when,
                       std::string_view module, std::string_view message,
                       const nlohmann::json& fields);

// The spdlog formatter behind Init, exposed for tests.
std::unique_ptr<spdlog::formatter> MakeFormatter();

// Logs through the default logger with structured fields.
void Log(spdlog::level::level_enum level, std::string_view message, Fields fields = {});
inline void Trace(std::string_view m, Fields f = {}) { Log(spdlog::level::trace, m, f); }
inline void Debug(std::string_view m, Fields f = {}) { Log(spdlog::level::debug, m, f); }
inline void Info(std::string_view m, Fields f = {}) { Log(spdlog::level::info, m, f); }
inline void Warn(std::string_view m, Fields f = {}) { Log(spdlog::level::warn, m, f); }
inline void Error(std::string_view m, Fields f = {}) { Log(spdlog::level::err, m, f); }

}  // namespace nomadplugin::hclog
