#include "nomadplugin/hclog.h"

#include <ctime>

#include <spdlog/sinks/stdout_sinks.h>

#include "absl/strings/ascii.h"

namespace nomadplugin::hclog {
namespace {

// Fields travel inside spdlog's payload after this separator, so the formatter
// can rebuild them; it is a control character no human message contains.
constexpr char kFieldSeparator = '\x1f';

std::string_view LevelName(spdlog::level::level_enum level) {
  switch (level) {
    case spdlog::level::trace: return "trace";
    case spdlog::level::debug: return "debug";
    case spdlog::level::info: return "info";
    case spdlog::level::warn: return "warn";
    case spdlog::level::err:
    case spdlog::level::critical: return "error";
    default: return "info";
  }
}

std::string Timestamp(std::chrono::system_clock::time_point when) {
  const auto micros =
      std::chrono::duration_cast<std::chrono::microseconds>(when.time_since_epoch()).count();
  const std::time_t secs = static_cast<std::time_t>(micros / 1000000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[64];
  const size_t n = std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
  char out[96];
  std::snprintf(out, sizeof out, "%.*s.%06lldZ", static_cast<int>(n), buf,
                static_cast<long long>(micros % 1000000));
  return out;
}

class HclogFormatter final : public spdlog::formatter {
 public:
  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    std::string_view payload(msg.payload.data(), msg.payload.size());
    std::string_view message = payload;
    nlohmann::json fields = nlohmann::json::object();
    if (const size_t sep = payload.find(kFieldSeparator); sep != std::string_view::npos) {
      message = payload.substr(0, sep);
      fields = nlohmann::json::parse(payload.substr(sep + 1), nullptr, /*allow_exceptions=*/false);
      if (!fields.is_object()) fields = nlohmann::json::object();
    }
    std::string line = FormatLine(msg.level, msg.time,
                                  std::string_view(msg.logger_name.data(), msg.logger_name.size()),
                                  message, fields);
    line.push_back('\n');
    dest.append(line.data(), line.data() + line.size());
  }
  std::unique_ptr<spdlog::formatter> clone() const override {
    return std::make_unique<HclogFormatter>();
  }
};

}  // namespace

std::string FormatLine(spdlog::level::level_enum level, std::chrono::system_clock::time_point when,
                       std::string_view module, std::string_view message,
                       const nlohmann::json& fields) {
  nlohmann::json line = nlohmann::json::object();
  for (const auto& [key, value] : fields.items()) line[key] = value;
  line["@level"] = LevelName(level);
  line["@message"] = std::string(message);
  if (!module.empty()) line["@module"] = std::string(module);
  line["@timestamp"] = Timestamp(when);
  // Replace rather than throw on invalid UTF-8: a log line must never kill the plugin.
  return line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::unique_ptr<spdlog::formatter> MakeFormatter() { return std::make_unique<HclogFormatter>(); }

void Init(std::string_view module, spdlog::level::level_enum level) {
  auto sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
  auto logger = std::make_shared<spdlog::logger>(std::string(module), std::move(sink));
  logger->set_formatter(MakeFormatter());
  logger->set_level(level);
  logger->flush_on(spdlog::level::trace);
  spdlog::set_default_logger(std::move(logger));
}

bool ParseLevel(std::string_view name, spdlog::level::level_enum* level) {
  const std::string lower = absl::AsciiStrToLower(absl::string_view(name.data(), name.size()));
  if (lower == "trace") *level = spdlog::level::trace;
  else if (lower == "debug") *level = spdlog::level::debug;
  else if (lower == "info") *level = spdlog::level::info;
  else if (lower == "warn" || lower == "warning") *level = spdlog::level::warn;
  else if (lower == "error") *level = spdlog::level::err;
  else if (lower == "off") *level = spdlog::level::off;
  else return false;
  return true;
}

void Log(spdlog::level::level_enum level, std::string_view message, Fields fields) {
  auto logger = spdlog::default_logger_raw();
  if (!logger->should_log(level)) return;
  if (fields.size() == 0) {
    logger->log(level, spdlog::string_view_t(message.data(), message.size()));
    return;
  }
  nlohmann::json obj = nlohmann::json::object();
  for (const auto& [key, value] : fields) obj[std::string(key)] = value;
  std::string payload(message);
  payload.push_back(kFieldSeparator);
  payload += obj.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  logger->log(level, spdlog::string_view_t(payload.data(), payload.size()));
}

}  // namespace nomadplugin::hclog
