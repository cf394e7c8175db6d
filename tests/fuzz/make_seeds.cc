// Writes the generated seed corpora of the fuzz targets:
//   fuzz_make_seeds SOURCE_DIR OUT_DIR   (OUT_DIR/<target>/<seed>)
// Configs are msgpack the way Nomad encodes them (cty: every schema attribute
// present, unset ones nil, port_map as a list of maps); QMP and guest-agent
// scripts come from the transcripts recorded from QEMU 7.2 and qemu-ga 7.2 in
// tests/unit/qemu/qmp_transcripts. The committed corpora under tests/fuzz/corpus
// were made with it; hand-made seeds (qcow2 headers, sizes, checksums) sit
// next to the generated ones.
#include <sys/stat.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace {

using nlohmann::json;

std::string g_out;

void Write(const std::string& target, const std::string& name, const std::string& bytes) {
  const std::string dir = g_out + "/" + target;
  ::mkdir(g_out.c_str(), 0755);
  ::mkdir(dir.c_str(), 0755);
  std::ofstream(dir + "/" + name, std::ios::binary | std::ios::trunc) << bytes;
}

std::string Msgpack(const json& value) {
  const std::vector<uint8_t> bytes = json::to_msgpack(value);
  return std::string(bytes.begin(), bytes.end());
}

// cty-style: every attribute of the schema present, unset ones nil.
json WithAllAttributes(const std::vector<std::string>& schema, const json& set) {
  json out = json::object();
  for (const std::string& name : schema) out[name] = nullptr;
  for (const auto& [key, value] : set.items()) out[key] = value;
  return out;
}

const std::vector<std::string> kPluginSchema = {
    "image_paths", "args_allowlist", "emulators_allowlist", "image_cache_dir", "state_dir",
    "supervisor_path", "allow_unverified_images", "max_image_size", "image_cache_max_size", "ca_file",
    "cgroup_parent", "memory_overhead", "pids_limit"};

const std::vector<std::string> kTaskSchema = {
    "image_path", "image_source", "image_sources", "checksum", "checksum_url", "image_format",
    "disk_size", "emulator", "machine_type", "drive_interface", "accelerator", "cpus",
    "instance_type", "graceful_shutdown", "guest_agent", "args", "port_map"};

void PluginConfigs() {
  const std::string t = "fuzz_plugin_config";
  Write(t, "all_nil", Msgpack(WithAllAttributes(kPluginSchema, json::object())));
  Write(t, "agent_hcl", Msgpack(WithAllAttributes(kPluginSchema, {
      {"image_paths", {"/srv/vm-images"}},
      {"args_allowlist", {"-smp", "-cpu"}},
      {"emulators_allowlist", {"x86_64"}},
      {"cgroup_parent", "nomad"},
      {"memory_overhead", "128MiB"},
      {"pids_limit", 1024}})));
  Write(t, "full", Msgpack(WithAllAttributes(kPluginSchema, {
      {"image_paths", {"/srv/vm-images", "/opt/images"}},
      {"args_allowlist", {"-smp", "-cpu", "-device", "-netdev"}},
      {"emulators_allowlist", {"x86_64", "aarch64"}},
      {"image_cache_dir", "/var/lib/nomad/qemu-cache"},
      {"state_dir", "/run/nomad-driver-qemu"},
      {"supervisor_path", "/opt/nomad/plugins/nomad-qemu-supervisor"},
      {"allow_unverified_images", false},
      {"max_image_size", "20G"},
      {"image_cache_max_size", "100GiB"},
      {"ca_file", "/etc/ssl/certs/internal-ca.pem"},
      {"cgroup_parent", "nomad/qemu"},
      {"memory_overhead", "256M"},
      {"pids_limit", 4096}})));
  // cty sends whole numbers in floats and huge ones as strings.
  Write(t, "number_forms", Msgpack(WithAllAttributes(kPluginSchema, {
      {"pids_limit", 1024.0}, {"max_image_size", "1.5T"}, {"allow_unverified_images", true}})));
  Write(t, "number_string", Msgpack(WithAllAttributes(kPluginSchema, {{"pids_limit", "18446744073709551616"}})));
  Write(t, "empty_map", Msgpack(json::object()));
}

void TaskConfigs() {
  const std::string t = "fuzz_task_config";
  const std::vector<std::pair<std::string, json>> configs = {
      {"nomad_example", WithAllAttributes(kTaskSchema, {
          {"image_path", "local/linux.img"},
          {"accelerator", "kvm"},
          {"graceful_shutdown", true},
          {"args", {"-nodefaults", "-smp", "2"}},
          {"port_map", json::array({{{"ssh", 22}, {"http", 80}}})}})},
      {"image_source", WithAllAttributes(kTaskSchema, {
          {"image_source", "https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-generic-amd64.qcow2"},
          {"image_sources", {"https://mirror.example.com/debian-12-generic-amd64.qcow2"}},
          {"checksum", "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"},
          {"image_format", "qcow2"},
          {"disk_size", "20G"},
          {"instance_type", "c2m1024"},
          {"guest_agent", true}})},
      {"checksum_url", WithAllAttributes(kTaskSchema, {
          {"image_source", "https://example.com/images/disk.qcow2"},
          {"checksum_url", "https://example.com/images/SHA256SUMS"},
          {"emulator", "qemu-system-x86_64"},
          {"machine_type", "q35"},
          {"drive_interface", "virtio"},
          {"cpus", 4}})},
      {"port_map_blocks", WithAllAttributes(kTaskSchema, {
          {"image_path", "disk.img"},
          {"port_map", json::array({{{"http", 8080}}, {{"dns", 53}}, {{"big", 1e10}}})}})},
  };
  for (const auto& [name, config] : configs) {
    Write(t, name, Msgpack(config));
  }
  Write(t, "empty_map", Msgpack(json::object()));
  // Just past ConfigReader's nesting bound (64): 0x91 is a one-element array.
  Write(t, "too_deep", std::string("\x81\xa4" "args") + std::string(64, '\x91') + "\xc0");
}

void PortMaps() {
  const std::string t = "fuzz_port_map";
  const json group = {
      {"id", "7c1f5a9e-4c5f-1d2e-8a3b-2f0c9d8e7b6a/web/0a1b2c3d"},
      {"name", "web"},
      {"allocDir", "/tmp/ndq-fuzz-alloc"},
      {"resources", {
          {"allocatedResources", {{"memory", {{"memoryMb", 512}, {"memoryMaxMb", 1024}}}}},
          {"linuxResources", {{"cpusetCpus", "0-1,3"}}},
          {"ports", {{{"label", "http"}, {"value", 25123}, {"to", 8080}, {"hostIp", "10.0.0.5"}},
                     {{"label", "ssh"}, {"value", 25124}}}}}},
      {"networkIsolationSpec", {{"mode", "GROUP"}, {"path", "/var/run/netns/7c1f5a9e"}}},
      {"dns", {{"servers", {"8.8.8.8"}}, {"searches", {"service.consul", "example.com"}}}}};
  json host = group;
  host.erase("networkIsolationSpec");
  host["resources"].erase("ports");
  host["resources"]["allocatedResources"]["networks"] = {
      {{"ip", "192.168.1.10"},
       {"reservedPorts", {{{"label", "http"}, {"value", 8080}}}},
       {"dynamicPorts", {{{"label", "ssh"}, {"value", 22022}}}}}};
  const json task = WithAllAttributes(kTaskSchema, {
      {"image_path", "disk.img"},
      {"graceful_shutdown", true},
      {"guest_agent", true},
      {"args", {"-smp", "2", "-device", "virtio-rng-pci"}},
      {"port_map", json::array({{{"http", 80}}, {{"ssh", 22}}})}});
  json sized = task;
  sized["instance_type"] = "c2m512";
  json cpus = task;
  cpus["cpus"] = 3;
  cpus["accelerator"] = "kvm";
  cpus["port_map"] = json::array({{{"http", 80}, {"ssh", 22}}});
  Write(t, "group_ports", group.dump() + std::string(1, '\0') + Msgpack(task));
  Write(t, "host_ports", host.dump() + std::string(1, '\0') + Msgpack(task));
  Write(t, "instance_type", group.dump() + std::string(1, '\0') + Msgpack(sized));
  Write(t, "cpus", host.dump() + std::string(1, '\0') + Msgpack(cpus));
}

// A transcript's QEMU side as a peer script: what QEMU sent before the first
// request, then one chunk per request (see scripted_peer.h).
std::string ScriptFromTranscript(const std::string& path, const std::vector<std::string>& ids) {
  std::ifstream in(path);
  if (!in) {
    std::cerr << "cannot open " << path << "\n";
    std::exit(1);
  }
  std::string out;
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    for (size_t pos; (pos = line.find("\\xff")) != std::string::npos;) line.replace(pos, 4, "\xff");
    for (const std::string& id : ids) {
      for (size_t pos; (pos = line.find(id)) != std::string::npos;) line.replace(pos, id.size(), "$ID");
    }
    if (line.rfind("-> ", 0) == 0) {
      out.push_back('\0');
    } else if (line.rfind("<- ", 0) == 0) {
      out += line.substr(3) + "\n";
    }
  }
  return out;
}

void QmpScripts(const std::string& src) {
  const std::string dir = src + "/tests/unit/qemu/qmp_transcripts/";
  for (const char* name : {"powerdown", "status_cycle", "errors"}) {
    Write("fuzz_qmp", name, ScriptFromTranscript(dir + name + ".qmp", {}));
  }
  // The fuzz client's own sequence: qmp_capabilities (1), query-status (2),
  // system_powerdown (3), human-monitor-command (4), quit (5), with events.
  const std::string greeting =
      R"({"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}})";
  std::string s = greeting + "\n";
  s += std::string(1, '\0') + R"({"return": {}, "id": 1})" + "\n";
  s += std::string(1, '\0') + R"({"timestamp": {"seconds": 1795315697, "microseconds": 1}, "event": "RESUME"})" + "\n" +
       R"({"return": {"status": "running", "singlestep": false, "running": true}, "id": 2})" + "\n";
  s += std::string(1, '\0') + R"({"timestamp": {"seconds": 1795315697, "microseconds": 431763}, "event": "POWERDOWN"})" +
       "\n" + R"({"return": {}, "id": 3})" + "\n" +
       R"({"timestamp": {"seconds": 1795315697, "microseconds": 460809}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}})" +
       "\n";
  s += std::string(1, '\0') + R"({"id": 4, "error": {"class": "CommandNotFound", "desc": "The command human-monitor-command has not been found"}})" +
       "\n" + R"({"timestamp": {"seconds": 1795315698, "microseconds": 5}, "event": "GUEST_PANICKED", "data": {"action": "pause", "info": {"type": "hyper-v"}}})" +
       "\n" + R"({"timestamp": {"seconds": 1795315698, "microseconds": 6}, "event": "RESET", "data": {"guest": false, "reason": "host-qmp-system-reset"}})" +
       "\n" + R"({"event": "STOP"})" + "\n";
  s += std::string(1, '\0') + R"({"return": {}, "id": 5})" + "\r\n" +
       R"({"timestamp": {"seconds": 1795315699, "microseconds": 0}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}})" +
       "\n";
  Write("fuzz_qmp", "client_sequence", s);
  // Event data just past the nesting bound (128): the session ends.
  const std::string deep = std::string(130, '[') + std::string(130, ']');
  Write("fuzz_qmp", "too_deep", greeting + "\n" + std::string(1, '\0') + R"({"return": {}, "id": 1})" + "\n" +
                                    std::string(1, '\0') + R"({"event": "RESET", "data": )" + deep + "}\n");
}

void GuestAgentScripts(const std::string& src) {
  Write("fuzz_guest_agent", "qemu_ga_transcript",
        ScriptFromTranscript(src + "/tests/unit/qemu/qmp_transcripts/guest_agent.qga", {"123456789", "42"}));
  // The fuzz client's own sequence: sync, guest-ping, guest-info,
  // guest-exec-status, guest-shutdown + sync, sync.
  const std::string nul(1, '\0');
  std::string s;  // no greeting
  s += nul + R"({"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}})" + "\n" +
       "\xff" + R"({"return": $ID})" + "\n";
  s += nul + R"({"return": {}})" + "\n";
  s += nul + R"({"return": {"version": "7.2.22", "supported_commands": [{"enabled": true, "name": "guest-ping", "success-response": true}]}})" + "\n";
  s += nul + R"({"error": {"class": "GenericError", "desc": "Invalid parameter 'pid'"}})" + "\n";
  s += nul;  // guest-shutdown: silent
  s += nul + "\xff" + R"({"return": $ID})" + "\n";
  s += nul + "\xff" + R"({"return": $ID})" + "\n";
  Write("fuzz_guest_agent", "client_sequence", s);
  const std::string deep = std::string(130, '[') + std::string(130, ']');
  Write("fuzz_guest_agent", "too_deep",
        nul + "\xff" + R"({"return": $ID})" + "\n" + nul + R"({"return": )" + deep + "}\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: fuzz_make_seeds SOURCE_DIR OUT_DIR\n";
    return 2;
  }
  const std::string src = argv[1];
  g_out = argv[2];
  PluginConfigs();
  TaskConfigs();
  PortMaps();
  QmpScripts(src);
  GuestAgentScripts(src);
  return 0;
}
