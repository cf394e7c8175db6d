// Builders for hclspec schemas, the form in which a Nomad plugin describes its
// plugin and task configuration so the agent can parse HCL into msgpack for it.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "nomad/hclspec.pb.h"

namespace nomadplugin::hclspec {

using Spec = hashicorp::nomad::plugins::shared::hclspec::Spec;

// An attribute; `type` is an HCL type expression such as "string",
// "list(string)" or "list(map(number))".
Spec Attr(const std::string& name, const std::string& type, bool required = false);
// A value written as an HCL expression, e.g. "true", "\"virtio\"", "[]".
Spec Literal(const std::string& expression);
// The primary spec's value, or the fallback's when the primary is null.
Spec Default(Spec primary, Spec fallback);
Spec Object(std::vector<std::pair<std::string, Spec>> attributes);
Spec Block(const std::string& name, bool required, Spec nested);
Spec BlockList(const std::string& name, Spec nested, uint64_t min_items = 0, uint64_t max_items = 0);
Spec BlockAttrs(const std::string& name, const std::string& element_type, bool required = false);

}  // namespace nomadplugin::hclspec
