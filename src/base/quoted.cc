#include "base/quoted.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace ndq {

std::string Quoted(absl::string_view s) {
  if (s.size() <= kQuotedMaxBytes) return absl::StrCat("\"", s, "\"");
  return absl::StrCat("\"", s.substr(0, kQuotedMaxBytes), "...\" (", s.size(), " bytes)");
}

std::string QuotedList(const std::vector<std::string>& items) {
  return absl::StrJoin(items, ", ", [](std::string* out, const std::string& s) { out->append(Quoted(s)); });
}

}  // namespace ndq
