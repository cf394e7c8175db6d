#include "policy/task_config.h"

#include "nomadplugin/config_reader.h"

namespace ndq {

namespace hs = nomadplugin::hclspec;

nomadplugin::hclspec::Spec TaskConfigSpec() {
  // image_path is optional here, unlike Nomad's driver, because image_source
  // may stand in its place; exactly one of them is checked at start.
  return hs::Object({
      {"image_path", hs::Attr("image_path", "string")},
      {"image_source", hs::Attr("image_source", "string")},
      {"image_sources", hs::Attr("image_sources", "list(string)")},
      {"checksum", hs::Attr("checksum", "string")},
      {"checksum_url", hs::Attr("checksum_url", "string")},
      {"image_format", hs::Attr("image_format", "string")},
      {"disk_size", hs::Attr("disk_size", "string")},
      {"emulator", hs::Attr("emulator", "string")},
      {"machine_type", hs::Attr("machine_type", "string")},
      {"drive_interface", hs::Attr("drive_interface", "string")},
      {"accelerator", hs::Attr("accelerator", "string")},
      {"cpus", hs::Attr("cpus", "number")},
      {"instance_type", hs::Attr("instance_type", "string")},
      {"graceful_shutdown", hs::Attr("graceful_shutdown", "bool")},
      {"guest_agent", hs::Attr("guest_agent", "bool")},
      {"args", hs::Attr("args", "list(string)")},
      {"port_map", hs::Attr("port_map", "list(map(number))")},
  });
}

absl::StatusOr<TaskConfig> DecodeTaskConfig(const std::string& msgpack, bool reject_unknown) {
  absl::StatusOr<nomadplugin::ConfigReader> reader =
      nomadplugin::ConfigReader::FromMsgpack(msgpack, "task config");
  if (!reader.ok()) return reader.status();
  if (reject_unknown) {
    const nomadplugin::hclspec::Spec spec = TaskConfigSpec();
    std::vector<absl::string_view> known;
    for (const auto& [name, unused] : spec.object().attributes()) known.push_back(name);
    reader->RejectUnknownFields(known);
  }
  TaskConfig config;
  config.image_path = reader->String("image_path");
  config.image_source = reader->String("image_source");
  config.image_sources = reader->StringList("image_sources").value_or(std::vector<std::string>{});
  config.checksum = reader->String("checksum");
  config.checksum_url = reader->String("checksum_url");
  config.image_format = reader->String("image_format");
  config.disk_size = reader->String("disk_size");
  config.emulator = reader->String("emulator");
  config.machine_type = reader->String("machine_type");
  config.drive_interface = reader->String("drive_interface");
  config.accelerator = reader->String("accelerator");
  config.cpus = reader->Integer("cpus");
  config.instance_type = reader->String("instance_type");
  config.graceful_shutdown = reader->Bool("graceful_shutdown").value_or(false);
  config.guest_agent = reader->Bool("guest_agent").value_or(false);
  config.args = reader->StringList("args").value_or(std::vector<std::string>{});
  config.port_map = reader->IntegerMapList("port_map").value_or(std::map<std::string, int64_t>{});
  if (absl::Status status = reader->status(); !status.ok()) return status;
  return config;
}

}  // namespace ndq
