#include "nomadplugin/hclspec.h"

#include <gtest/gtest.h>

namespace nomadplugin::hclspec {
namespace {

TEST(HclSpec, Attr) {
  const Spec spec = Attr("image_path", "string", true);
  ASSERT_TRUE(spec.has_attr());
  EXPECT_EQ(spec.attr().name(), "image_path");
  EXPECT_EQ(spec.attr().type(), "string");
  EXPECT_TRUE(spec.attr().required());
}

TEST(HclSpec, ObjectKeepsEveryAttribute) {
  const Spec spec = Object({{"a", Attr("a", "bool")}, {"b", Attr("b", "list(map(number))")}});
  ASSERT_TRUE(spec.has_object());
  ASSERT_EQ(spec.object().attributes().size(), 2u);
  EXPECT_EQ(spec.object().attributes().at("b").attr().type(), "list(map(number))");
  EXPECT_FALSE(spec.object().attributes().at("a").attr().required());
}

TEST(HclSpec, DefaultWrapsPrimaryAndFallback) {
  const Spec spec = Default(Attr("accelerator", "string"), Literal("\"tcg\""));
  ASSERT_TRUE(spec.has_default_());
  EXPECT_EQ(spec.default_().primary().attr().name(), "accelerator");
  EXPECT_EQ(spec.default_().default_().literal().value(), "\"tcg\"");
}

TEST(HclSpec, Blocks) {
  const Spec block = Block("network", true, Object({{"mode", Attr("mode", "string")}}));
  ASSERT_TRUE(block.has_block_value());
  EXPECT_TRUE(block.block_value().required());
  EXPECT_TRUE(block.block_value().nested().has_object());

  const Spec list = BlockList("disk", Object({}), 1, 4);
  ASSERT_TRUE(list.has_block_list());
  EXPECT_EQ(list.block_list().min_items(), 1u);
  EXPECT_EQ(list.block_list().max_items(), 4u);

  const Spec attrs = BlockAttrs("labels", "string");
  ASSERT_TRUE(attrs.has_block_attrs());
  EXPECT_EQ(attrs.block_attrs().type(), "string");
}

TEST(HclSpec, SurvivesTheWire) {
  const Spec spec = Object({{"x", Default(Attr("x", "number"), Literal("3"))}});
  Spec copy;
  ASSERT_TRUE(copy.ParseFromString(spec.SerializeAsString()));
  EXPECT_EQ(copy.object().attributes().at("x").default_().default_().literal().value(), "3");
}

}  // namespace
}  // namespace nomadplugin::hclspec
