// Parsing untrusted JSON and msgpack with a bound on nesting depth.
//
// nlohmann::json parses text without recursion, but copying, comparing and
// dumping a value recurse once per level, and its msgpack reader recurses while
// parsing: a few hundred kilobytes of "[[[[..." overflow the stack. These parse
// like json::parse / json::from_msgpack (allow_exceptions = false, strict) and
// give a discarded value for input nested deeper than `max_depth` as well.
#pragma once

#include <cstddef>
#include <string_view>

#include <nlohmann/json.hpp>

namespace nomadplugin {

namespace bounded_json_internal {

// The DOM builder of json::parse, refusing to open a container past max_depth.
class DepthLimitedSax : public nlohmann::detail::json_sax_dom_parser<nlohmann::json> {
 public:
  DepthLimitedSax(nlohmann::json& result, size_t max_depth)
      : json_sax_dom_parser(result, /*allow_exceptions_=*/false), max_depth_(max_depth) {}

  bool start_object(std::size_t len) { return Enter() && json_sax_dom_parser::start_object(len); }
  bool end_object() {
    --depth_;
    return json_sax_dom_parser::end_object();
  }
  bool start_array(std::size_t len) { return Enter() && json_sax_dom_parser::start_array(len); }
  bool end_array() {
    --depth_;
    return json_sax_dom_parser::end_array();
  }
  bool too_deep() const { return too_deep_; }

 private:
  bool Enter() {
    if (++depth_ > max_depth_) {
      too_deep_ = true;
      return false;
    }
    return true;
  }
  size_t max_depth_;
  size_t depth_ = 0;
  bool too_deep_ = false;
};

inline nlohmann::json Parse(std::string_view input, nlohmann::json::input_format_t format, size_t max_depth,
                            bool* too_deep) {
  nlohmann::json result;
  DepthLimitedSax sax(result, max_depth);
  const bool ok = nlohmann::json::sax_parse(input.begin(), input.end(), &sax, format, /*strict=*/true);
  if (too_deep != nullptr) *too_deep = sax.too_deep();
  if (!ok || sax.is_errored()) return nlohmann::json(nlohmann::json::value_t::discarded);
  return result;
}

}  // namespace bounded_json_internal

// Deep enough for any real QMP or guest-agent message or configuration.
constexpr size_t kDefaultMaxJsonDepth = 128;

// json::parse(input, nullptr, false) with a depth bound; `too_deep` (optional)
// tells a too deep input from other malformed input.
inline nlohmann::json ParseJsonBounded(std::string_view input, size_t max_depth = kDefaultMaxJsonDepth,
                                       bool* too_deep = nullptr) {
  return bounded_json_internal::Parse(input, nlohmann::json::input_format_t::json, max_depth, too_deep);
}

// json::from_msgpack(input, true, false) with a depth bound.
inline nlohmann::json FromMsgpackBounded(std::string_view input, size_t max_depth = kDefaultMaxJsonDepth,
                                         bool* too_deep = nullptr) {
  return bounded_json_internal::Parse(input, nlohmann::json::input_format_t::msgpack, max_depth, too_deep);
}

}  // namespace nomadplugin
