#include "nomadplugin/config_reader.h"

#include <cmath>
#include <limits>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nomadplugin/bounded_json.h"

namespace nomadplugin {
namespace {

// cty sends numbers too large for int64/float64 as decimal strings.
std::optional<double> AsNumber(const nlohmann::json& value) {
  if (value.is_number()) return value.get<double>();
  double parsed = 0;
  if (value.is_string() && absl::SimpleAtod(value.get<std::string>(), &parsed)) return parsed;
  return std::nullopt;
}

std::optional<int64_t> AsInteger(const nlohmann::json& value) {
  if (value.is_number_integer()) {
    if (value.is_number_unsigned() &&
        value.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return std::nullopt;
    }
    return value.get<int64_t>();
  }
  if (value.is_string()) {
    int64_t parsed = 0;
    if (absl::SimpleAtoi(value.get<std::string>(), &parsed)) return parsed;
  }
  std::optional<double> number = AsNumber(value);
  // 2^63 is exactly representable; anything at or above it does not fit.
  if (number && std::trunc(*number) == *number && std::fabs(*number) < 9223372036854775808.0) {
    return static_cast<int64_t>(*number);
  }
  return std::nullopt;
}

}  // namespace

std::string DescribeValue(const nlohmann::json& value) {
  std::string preview = value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (preview.size() > 40) preview = preview.substr(0, 37) + "...";
  std::string type = value.type_name();
  if (value.is_number()) type = "number";
  if (value.is_binary()) return "binary data";
  return absl::StrCat(type, " ", preview);
}

ConfigReader::ConfigReader(nlohmann::json root, std::string what)
    : root_(std::move(root)), what_(std::move(what)) {
  if (root_.is_null()) root_ = nlohmann::json::object();
  if (!root_.is_object()) {
    problems_.push_back(absl::StrCat("must be a map of options, got ", DescribeValue(root_)));
    root_ = nlohmann::json::object();
  }
}

absl::StatusOr<ConfigReader> ConfigReader::FromMsgpack(const std::string& bytes, std::string what) {
  if (bytes.empty()) return ConfigReader(nlohmann::json::object(), std::move(what));
  // Bounded: the msgpack reader recurses once per level of nesting.
  bool too_deep = false;
  nlohmann::json root = FromMsgpackBounded(bytes, kMaxConfigDepth, &too_deep);
  if (too_deep) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " is nested more than ", kMaxConfigDepth, " levels deep"));
  }
  if (root.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " is not valid msgpack"));
  }
  return ConfigReader(std::move(root), std::move(what));
}

const nlohmann::json* ConfigReader::Find(absl::string_view field) const {
  auto it = root_.find(std::string(field));
  if (it == root_.end() || it->is_null()) return nullptr;
  return &*it;
}

void ConfigReader::WrongType(absl::string_view field, absl::string_view want, const nlohmann::json& got) {
  AddProblem(field, absl::StrCat("must be ", want, ", got ", DescribeValue(got)));
}

void ConfigReader::AddProblem(absl::string_view field, absl::string_view problem) {
  problems_.push_back(absl::StrCat("\"", prefix_, field, "\" ", problem));
}

std::optional<std::string> ConfigReader::String(absl::string_view field) {
  const nlohmann::json* value = Find(field);
  if (value == nullptr) return std::nullopt;
  if (!value->is_string()) {
    WrongType(field, "a string", *value);
    return std::nullopt;
  }
  return value->get<std::string>();
}

std::optional<bool> ConfigReader::Bool(absl::string_view field) {
  const nlohmann::json* value = Find(field);
  if (value == nullptr) return std::nullopt;
  if (!value->is_boolean()) {
    WrongType(field, "a bool", *value);
    return std::nullopt;
  }
  return value->get<bool>();
}

std::optional<double> ConfigReader::Number(absl::string_view field) {
  const nlohmann::json* value = Find(field);
  if (value == nullptr) return std::nullopt;
  std::optional<double> number = AsNumber(*value);
  if (!number) WrongType(field, "a number", *value);
  return number;
}

std::optional<int64_t> ConfigReader::Integer(absl::string_view field) {
  const nlohmann::json* value = Find(field);
  if (value == nullptr) return std::nullopt;
  std::optional<int64_t> integer = AsInteger(*value);
  if (!integer) WrongType(field, "a whole number", *value);
  return integer;
}

std::optional<std::vector<std::string>> ConfigReader::StringList(absl::string_view field) {
  const nlohmann::json* value = Find(field);
  if (value == nullptr) return std::nullopt;
  if (!value->is_array()) {
    WrongType(field, "a list of strings", *value);
    return std::nullopt;
  }
  std::vector<std::string> out;
  for (size_t i = 0; i < value->size(); ++i) {
    const nlohmann::json& item = (*value)[i];
    if (!item.is_string()) {
      WrongType(absl::StrCat(field, "[", i, "]"), "a string", item);
      return std::nullopt;
    }
    out.push_back(item.get<std::string>());
  }
  return out;
}

std::optional<std::map<std::string, int64_t>> ConfigReader::IntegerMapList(absl::string_view field) {
  const nlohmann::json* value = Find(field);
  if (value == nullptr) return std::nullopt;
  nlohmann::json maps = value->is_object() ? nlohmann::json::array({*value}) : *value;
  if (!maps.is_array()) {
    WrongType(field, "a map of numbers", *value);
    return std::nullopt;
  }
  std::map<std::string, int64_t> out;
  bool ok = true;
  for (const nlohmann::json& map : maps) {
    if (!map.is_object()) {
      WrongType(field, "a map of numbers", map);
      return std::nullopt;
    }
    for (const auto& [key, item] : map.items()) {
      std::optional<int64_t> number = AsInteger(item);
      if (!number) {
        WrongType(absl::StrCat(field, ".", key), "a whole number", item);
        ok = false;
        continue;
      }
      out[key] = *number;
    }
  }
  if (!ok) return std::nullopt;
  return out;
}

std::optional<ConfigReader> ConfigReader::Block(absl::string_view field) {
  const nlohmann::json* value = Find(field);
  if (value == nullptr) return std::nullopt;
  const nlohmann::json* map = value;
  if (value->is_array() && value->size() == 1) map = &(*value)[0];
  if (!map->is_object()) {
    WrongType(field, "a block", *value);
    return std::nullopt;
  }
  ConfigReader nested(*map, what_);
  nested.prefix_ = absl::StrCat(prefix_, field, ".");
  return nested;
}

std::vector<ConfigReader> ConfigReader::BlockList(absl::string_view field) {
  std::vector<ConfigReader> blocks;
  const nlohmann::json* value = Find(field);
  if (value == nullptr) return blocks;
  nlohmann::json list = value->is_object() ? nlohmann::json::array({*value}) : *value;
  if (!list.is_array()) {
    WrongType(field, "a list of blocks", *value);
    return blocks;
  }
  for (size_t i = 0; i < list.size(); ++i) {
    if (!list[i].is_object()) {
      WrongType(absl::StrCat(field, "[", i, "]"), "a block", list[i]);
      continue;
    }
    ConfigReader nested(list[i], what_);
    nested.prefix_ = absl::StrCat(prefix_, field, "[", i, "].");
    blocks.push_back(std::move(nested));
  }
  return blocks;
}

void ConfigReader::Absorb(const ConfigReader& nested) {
  problems_.insert(problems_.end(), nested.problems_.begin(), nested.problems_.end());
}

void ConfigReader::RejectUnknownFields(const std::vector<absl::string_view>& known) {
  for (const auto& [key, value] : root_.items()) {
    bool found = false;
    for (absl::string_view k : known) found = found || k == key;
    if (!found) AddProblem(key, "is not a known option");
  }
}

absl::Status ConfigReader::status() const {
  if (problems_.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("invalid ", what_, ": ", absl::StrJoin(problems_, "; ")));
}

}  // namespace nomadplugin
