#include "nomadplugin/hclspec.h"

namespace nomadplugin::hclspec {

Spec Attr(const std::string& name, const std::string& type, bool required) {
  Spec spec;
  auto* attr = spec.mutable_attr();
  attr->set_name(name);
  attr->set_type(type);
  attr->set_required(required);
  return spec;
}

Spec Literal(const std::string& expression) {
  Spec spec;
  spec.mutable_literal()->set_value(expression);
  return spec;
}

Spec Default(Spec primary, Spec fallback) {
  Spec spec;
  *spec.mutable_default_()->mutable_primary() = std::move(primary);
  *spec.mutable_default_()->mutable_default_() = std::move(fallback);
  return spec;
}

Spec Object(std::vector<std::pair<std::string, Spec>> attributes) {
  Spec spec;
  auto* fields = spec.mutable_object()->mutable_attributes();
  for (auto& [name, value] : attributes) (*fields)[name] = std::move(value);
  return spec;
}

Spec Block(const std::string& name, bool required, Spec nested) {
  Spec spec;
  auto* block = spec.mutable_block_value();
  block->set_name(name);
  block->set_required(required);
  *block->mutable_nested() = std::move(nested);
  return spec;
}

Spec BlockList(const std::string& name, Spec nested, uint64_t min_items, uint64_t max_items) {
  Spec spec;
  auto* list = spec.mutable_block_list();
  list->set_name(name);
  list->set_min_items(min_items);
  list->set_max_items(max_items);
  *list->mutable_nested() = std::move(nested);
  return spec;
}

Spec BlockAttrs(const std::string& name, const std::string& element_type, bool required) {
  Spec spec;
  auto* attrs = spec.mutable_block_attrs();
  attrs->set_name(name);
  attrs->set_type(element_type);
  attrs->set_required(required);
  return spec;
}

}  // namespace nomadplugin::hclspec
