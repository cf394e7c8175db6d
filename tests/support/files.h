// Reading a whole file in a test.
#pragma once

#include <string>

#include "base/small_file.h"

namespace ndq::testing {

// The file's content, "" when it cannot be read (e.g. a /proc entry of a
// process that has just exited). Never throws.
inline std::string ReadFile(const std::string& path) {
  return ReadSmallFile(path, nullptr, size_t{256} << 20).value_or("");
}

}  // namespace ndq::testing
