// base/quoted: values in messages, quoted and bounded.
#include "base/quoted.h"

#include <gtest/gtest.h>

#include <string>

namespace ndq {
namespace {

TEST(Quoted, ShortValuesAreShownWhole) {
  EXPECT_EQ(Quoted(""), "\"\"");
  EXPECT_EQ(Quoted("a,b=c"), "\"a,b=c\"");
  const std::string at_bound(kQuotedMaxBytes, 'x');
  EXPECT_EQ(Quoted(at_bound), "\"" + at_bound + "\"");
}

TEST(Quoted, ALongValueShowsItsStartAndItsSize) {
  const std::string huge = std::string(kQuotedMaxBytes, 'a') + std::string(1 << 20, 'b');
  const std::string shown = Quoted(huge);
  EXPECT_EQ(shown, "\"" + std::string(kQuotedMaxBytes, 'a') + "...\" (" + std::to_string(huge.size()) + " bytes)");
  EXPECT_LT(shown.size(), kQuotedMaxBytes + 32);
}

TEST(Quoted, ListsQuoteEachItem) {
  EXPECT_EQ(QuotedList({}), "");
  EXPECT_EQ(QuotedList({"pc", "q35"}), "\"pc\", \"q35\"");
  EXPECT_EQ(QuotedList({std::string(300, 'z')}).size(), Quoted(std::string(300, 'z')).size());
}

}  // namespace
}  // namespace ndq
