// Golden files: inputs beside the output they must give, compared line by
// line with a readable diff. NDQ_UPDATE_GOLDEN=1 rewrites the outputs from what
// the code gives now (review the git diff afterwards).
#pragma once

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "files.h"

namespace ndq::testing {

// The stems of the files in `dir` ending in `extension` (".json"), sorted.
inline std::vector<std::string> GoldenCases(const std::string& dir, const std::string& extension) {
  std::vector<std::string> names;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(dir, error)) {
    if (entry.path().extension() == extension) names.push_back(entry.path().stem().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

inline bool UpdatingGoldens() {
  const char* update = std::getenv("NDQ_UPDATE_GOLDEN");
  return update != nullptr && std::string(update) == "1";
}

// A file's lines, without the empty one after a final newline.
inline std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> lines = absl::StrSplit(text, '\n');
  if (!lines.empty() && lines.back().empty()) lines.pop_back();
  return lines;
}

// A line diff (longest common subsequence): "  " same, "- " expected only,
// "+ " actual only.
inline std::string Diff(const std::vector<std::string>& expected, const std::vector<std::string>& actual) {
  const size_t n = expected.size(), m = actual.size();
  std::vector<std::vector<int>> lcs(n + 1, std::vector<int>(m + 1, 0));
  for (size_t i = n; i-- > 0;) {
    for (size_t j = m; j-- > 0;) {
      lcs[i][j] = expected[i] == actual[j] ? lcs[i + 1][j + 1] + 1 : std::max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  std::string out;
  size_t i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && expected[i] == actual[j]) {
      absl::StrAppend(&out, "  ", expected[i++], "\n");
      ++j;
    } else if (j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j])) {
      absl::StrAppend(&out, "+ ", actual[j++], "\n");
    } else {
      absl::StrAppend(&out, "- ", expected[i++], "\n");
    }
  }
  return out;
}

}  // namespace ndq::testing
