// Reads a plugin or task configuration as Nomad sends it: a msgpack map with
// every schema attribute present (unset ones nil), numbers in their smallest
// msgpack form, float64, or a string for very large values. Every problem is
// collected with the field's name, so an operator sees all of them at once.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace nomadplugin {

class ConfigReader {
 public:
  // `what` names the configuration in messages, e.g. "task config".
  ConfigReader(nlohmann::json root, std::string what);

  // Decodes msgpack; empty input is an empty configuration. Input nested
  // deeper than kMaxConfigDepth is refused (hclspec types nest a few levels).
  static absl::StatusOr<ConfigReader> FromMsgpack(const std::string& bytes, std::string what);
  static constexpr size_t kMaxConfigDepth = 64;

  // Each returns nullopt when the field is absent or nil, and also (recording
  // the problem) when it has the wrong type.
  std::optional<std::string> String(absl::string_view field);
  std::optional<bool> Bool(absl::string_view field);
  std::optional<double> Number(absl::string_view field);
  // A number that must be whole and fit in 64 bits.
  std::optional<int64_t> Integer(absl::string_view field);
  std::optional<std::vector<std::string>> StringList(absl::string_view field);
  // list(map(number)) with whole numbers, the maps merged in order (Nomad sends
  // an HCL block or map as a list of maps). A single map is accepted too.
  std::optional<std::map<std::string, int64_t>> IntegerMapList(absl::string_view field);

  // A nested block (hclspec Block): a reader of its map whose problems name
  // the field as "block.field". nullopt when absent. Nomad sends a block as a
  // map; a list holding one map is taken too.
  std::optional<ConfigReader> Block(absl::string_view field);
  // Repeatable blocks (hclspec BlockList): one reader per block, named
  // "block[i].field" in problems. Empty when absent.
  std::vector<ConfigReader> BlockList(absl::string_view field);
  // Takes over the problems a nested reader found.
  void Absorb(const ConfigReader& nested);

  // Records a problem for every field not in `known` (for hand-written JSON,
  // where a typo would otherwise be ignored silently).
  void RejectUnknownFields(const std::vector<absl::string_view>& known);

  // Records a problem found by the caller's own validation.
  void AddProblem(absl::string_view field, absl::string_view problem);

  // OK, or InvalidArgument listing every problem found so far.
  absl::Status status() const;

  const nlohmann::json& root() const { return root_; }

 private:
  const nlohmann::json* Find(absl::string_view field) const;
  void WrongType(absl::string_view field, absl::string_view want, const nlohmann::json& got);

  nlohmann::json root_;
  std::string what_;
  std::string prefix_;  // "block." for a nested block's reader
  std::vector<std::string> problems_;
};

// A short description of a value for error messages: its type and a preview.
std::string DescribeValue(const nlohmann::json& value);

}  // namespace nomadplugin
