#include "qemu/cmdline.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/inotify.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <tuple>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <utility>

#include "../../support/golden.h"
#include "../../support/temp_dir.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "qemu/qmp_client.h"

extern char** environ;

namespace ndq {
namespace {

namespace fs = std::filesystem;
using ::ndq::testing::Diff;
using ::ndq::testing::Lines;
using ::ndq::testing::ReadFile;
using ::ndq::testing::TempDir;
using ::ndq::testing::UpdatingGoldens;
using ::testing::Contains;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;
using json = nlohmann::json;

// A VmSpec as the golden tests and the direct tests start from.
VmSpec BaseSpec() {
  VmSpec spec;
  spec.emulator = "x86_64";
  spec.emulator_path = "/usr/bin/qemu-system-x86_64";
  spec.machine_type = "pc";
  spec.accelerator = "tcg";
  spec.drive_interface = "ide";
  spec.image_path = "/alloc/web/local/linux.img";
  spec.memory_mb = 256;
  spec.name = "web";
  return spec;
}

// What the start opened for BaseSpec: the image, as QEMU's fd 3.
QemuFiles BaseFiles() {
  QemuFiles files;
  files.boot = {DiskNode{"raw", false, 3}};
  return files;
}

const RuntimePaths kPaths{"/run/ndq/t/qmp.sock", "/run/ndq/t/qga.sock"};

// The value after `option` in argv (first occurrence), or "" when absent.
std::string ValueOf(const std::vector<std::string>& argv, const std::string& option) {
  auto it = std::find(argv.begin(), argv.end(), option);
  return it == argv.end() || it + 1 == argv.end() ? "" : *(it + 1);
}

// QEMU's QemuOpts reading of "k=v,k2=v2" (",," is a literal comma; a first
// part without '=' is the implied key, reported here as key "").
std::vector<std::pair<std::string, std::string>> ParseQemuOpts(const std::string& text) {
  std::vector<std::pair<std::string, std::string>> out;
  std::string part;
  std::vector<std::string> parts;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == ',' && i + 1 < text.size() && text[i + 1] == ',') {
      part += ',';
      ++i;
    } else if (text[i] == ',') {
      parts.push_back(part);
      part.clear();
    } else {
      part += text[i];
    }
  }
  parts.push_back(part);
  for (const std::string& p : parts) {
    const size_t eq = p.find('=');
    // Only the first key may be implied; QEMU does the same.
    if (eq == std::string::npos) {
      out.emplace_back(out.empty() ? "" : p, out.empty() ? p : "on");
    } else {
      out.emplace_back(p.substr(0, eq), p.substr(eq + 1));
    }
  }
  return out;
}

std::vector<std::string> KeysOf(const std::string& text) {
  std::vector<std::string> keys;
  for (const auto& [key, value] : ParseQemuOpts(text)) keys.push_back(key);
  return keys;
}

// --- direct tests -------------------------------------------------------------

TEST(CmdlineEscape, DoublesEveryComma) {
  EXPECT_EQ(EscapeQemuOptionValue(""), "");
  EXPECT_EQ(EscapeQemuOptionValue("plain/path.img"), "plain/path.img");
  EXPECT_EQ(EscapeQemuOptionValue("a,b"), "a,,b");
  EXPECT_EQ(EscapeQemuOptionValue(",,"), ",,,,");
  EXPECT_EQ(EscapeQemuOptionValue(",x,"), ",,x,,");
}

// Every value after the option name, for each occurrence of `option`.
std::vector<std::string> ValuesOf(const std::vector<std::string>& argv, const std::string& option) {
  std::vector<std::string> values;
  for (size_t i = 0; i + 1 < argv.size(); ++i) {
    if (argv[i] == option) values.push_back(argv[i + 1]);
  }
  return values;
}

TEST(CmdlineBuildQemuArgv, TheImageIsPassedAsAnFdNeverByName) {
  VmSpec spec = BaseSpec();
  spec.image_path = "/alloc/web/local/x.img,file=/etc/shadow";
  QemuFiles files;
  files.boot = {DiskNode{"qcow2", false, 3}, DiskNode{"raw", true, 4}};
  const std::vector<std::string> argv = BuildQemuArgv(spec, files, kPaths);
  EXPECT_THAT(argv, Not(Contains(HasSubstr("x.img"))));
  EXPECT_THAT(argv, Not(Contains("-drive")));
  EXPECT_THAT(ValuesOf(argv, "-add-fd"), ElementsAre("fd=4,set=2", "fd=3,set=1"));
  EXPECT_THAT(ValuesOf(argv, "-blockdev"),
              ElementsAre("driver=file,node-name=image0-b1-file,filename=/dev/fdset/2,read-only=on",
                          "driver=raw,node-name=image0-b1,file=image0-b1-file,read-only=on",
                          "driver=file,node-name=image0-file,filename=/dev/fdset/1",
                          "driver=qcow2,node-name=image0,file=image0-file,backing=image0-b1"));
  EXPECT_EQ(ValueOf(argv, "-device"), "ide-hd,drive=image0");
}

TEST(CmdlineBuildQemuArgv, EverySplicedValueKeepsItsKeys) {
  VmSpec spec = BaseSpec();
  spec.machine_type = "pc,accel=kvm";
  spec.name = "web,debug-threads=on";
  QemuFiles files;
  files.boot = {DiskNode{"raw,file=/etc/shadow", false, 3}};
  spec.guest_agent = true;
  spec.dns_searches = {"a.example,hostfwd=tcp::22-:22"};
  spec.port_forwards = {{"http", "tcp", "1.2.3.4", 8080, 80}};
  const std::vector<std::string> argv = BuildQemuArgv(spec, files, RuntimePaths{"/r,x/qmp.sock", "/r,y/qga.sock"});
  EXPECT_THAT(KeysOf(ValueOf(argv, "-machine")), ElementsAre("type", "accel"));
  EXPECT_THAT(KeysOf(ValueOf(argv, "-name")), ElementsAre("guest"));
  EXPECT_THAT(KeysOf(ValuesOf(argv, "-blockdev").at(1)), ElementsAre("driver", "node-name", "file"));
  EXPECT_THAT(KeysOf(ValueOf(argv, "-netdev")), ElementsAre("", "id", "dnssearch", "hostfwd"));
  std::vector<std::vector<std::string>> chardevs;
  for (size_t i = 0; i + 1 < argv.size(); ++i) {
    if (argv[i] == "-chardev") chardevs.push_back(KeysOf(argv[i + 1]));
  }
  EXPECT_THAT(chardevs, ElementsAre(ElementsAre("", "id", "path", "server", "wait"),
                                    ElementsAre("", "path", "server", "wait", "id")));
  EXPECT_EQ(ParseQemuOpts(ValueOf(argv, "-name"))[0].second, "web,debug-threads=on");
}

TEST(CmdlineBuildQemuArgv, SharesPassTheOpenedDirectoryAndKeepTheirKeys) {
  VmSpec spec = BaseSpec();
  spec.shares = {Share{"a,path=/etc,b", ShareOrigin::kVolume, "/srv/x,path=/etc", false},
                 Share{"secrets", ShareOrigin::kAllocDir, "web/secrets", true},
                 Share{"unopened", ShareOrigin::kVolume, "/srv/y", false}};
  QemuFiles files = BaseFiles();
  files.shares = {7, 8, -1};
  const std::vector<std::string> argv = BuildQemuArgv(spec, files, kPaths);
  EXPECT_THAT(argv, Not(Contains(HasSubstr("/srv/"))));
  EXPECT_THAT(argv, Not(Contains(HasSubstr("unopened"))));
  const std::vector<std::string> fsdevs = ValuesOf(argv, "-fsdev");
  ASSERT_EQ(fsdevs.size(), 2u);
  EXPECT_THAT(KeysOf(fsdevs[0]), ElementsAre("", "id", "path", "security_model", "fmode", "dmode", "multidevs"));
  EXPECT_THAT(KeysOf(fsdevs[1]), ElementsAre("", "id", "path", "security_model", "fmode", "dmode", "multidevs", "readonly"));
  EXPECT_EQ(ParseQemuOpts(fsdevs[0])[2].second, "/proc/self/fd/7");
  const std::vector<std::string> devices = ValuesOf(argv, "-device");
  const auto tag = std::find_if(devices.begin(), devices.end(),
                                [](const std::string& d) { return absl::StartsWith(d, "virtio-9p-pci,fsdev=share0"); });
  ASSERT_NE(tag, devices.end());
  EXPECT_THAT(KeysOf(*tag), ElementsAre("", "fsdev", "mount_tag"));
  EXPECT_EQ(ParseQemuOpts(*tag)[2].second, "a,path=/etc,b");
}

TEST(CmdlineBuildQemuArgv, NameIsAnExplicitKeySoEqualsSignsAreHarmless) {
  VmSpec spec = BaseSpec();
  spec.name = "a=b";
  EXPECT_EQ(ValueOf(BuildQemuArgv(spec, BaseFiles(), kPaths), "-name"), "guest=a=b");
}

TEST(CmdlineBuildQemuArgv, SmpFromCpusUnlessTheJobSetsIt) {
  VmSpec spec = BaseSpec();
  EXPECT_THAT(BuildQemuArgv(spec, BaseFiles(), kPaths), Not(Contains("-smp")));
  spec.cpus = 3;
  EXPECT_EQ(ValueOf(BuildQemuArgv(spec, BaseFiles(), kPaths), "-smp"), "3");
  spec.args = {"--smp", "2"};
  std::vector<std::string> argv = BuildQemuArgv(spec, BaseFiles(), kPaths);
  EXPECT_THAT(argv, Not(Contains("-smp")));
  EXPECT_EQ(ValueOf(argv, "--smp"), "2");
  // "-smp" as another option's value is not the job setting -smp.
  spec.args = {"-append", "-smp"};
  argv = BuildQemuArgv(spec, BaseFiles(), kPaths);
  EXPECT_EQ(std::count(argv.begin(), argv.end(), "-smp"), 2);
  EXPECT_EQ(ValueOf(argv, "-smp"), "3");
}

TEST(CmdlineBuildQemuArgv, NetworkOnlyWithForwardsOrDnsSearches) {
  VmSpec spec = BaseSpec();
  spec.ignored_dns_servers = {"8.8.8.8"};
  EXPECT_THAT(BuildQemuArgv(spec, BaseFiles(), kPaths), Not(Contains("-netdev")));
  spec.dns_searches = {"example.com"};
  EXPECT_EQ(ValueOf(BuildQemuArgv(spec, BaseFiles(), kPaths), "-netdev"), "user,id=user.0,dnssearch=example.com");
  EXPECT_THAT(BuildQemuArgv(spec, BaseFiles(), kPaths), Not(Contains(HasSubstr("8.8.8.8"))));
}

TEST(CmdlineBuildQemuArgv, EnableKvmOnlyForKvm) {
  VmSpec spec = BaseSpec();
  EXPECT_THAT(BuildQemuArgv(spec, BaseFiles(), kPaths), Not(Contains("-enable-kvm")));
  spec.accelerator = "kvm";
  const std::vector<std::string> argv = BuildQemuArgv(spec, BaseFiles(), kPaths);
  EXPECT_EQ(argv.back(), "-enable-kvm");
  EXPECT_EQ(ValueOf(argv, "-machine"), "type=pc,accel=kvm");
}

TEST(CmdlineBuildQemuArgv, QmpOnlyWithASocketPath) {
  const std::vector<std::string> argv = BuildQemuArgv(BaseSpec(), BaseFiles(), RuntimePaths{});
  EXPECT_THAT(argv, Not(Contains("-chardev")));
  EXPECT_THAT(argv, Not(Contains("-mon")));
}

TEST(CmdlineBuildQemuArgv, JobArgsAfterOursAndBeforeTheNetwork) {
  VmSpec spec = BaseSpec();
  spec.args = {"-netdev", "user,id=mine"};
  spec.port_forwards = {{"ssh", "tcp", "", 2222, 22}};
  const std::vector<std::string> argv = BuildQemuArgv(spec, BaseFiles(), kPaths);
  const auto mine = std::find(argv.begin(), argv.end(), "user,id=mine");
  const auto ours = std::find(argv.begin(), argv.end(), "user,id=user.0,hostfwd=tcp::2222-:22");
  const auto mon = std::find(argv.begin(), argv.end(), "-mon");
  ASSERT_NE(mine, argv.end());
  ASSERT_NE(ours, argv.end());
  EXPECT_LT(mon, mine);
  EXPECT_LT(mine, ours);
  EXPECT_EQ(argv.front(), "/usr/bin/qemu-system-x86_64");
}

// --- golden files -------------------------------------------------------------

const std::string& CmdlineGoldenDir() {
  static const std::string dir = std::string(NDQ_SOURCE_DIR) + "/tests/unit/qemu/cmdline_golden";
  return dir;
}

std::vector<std::string> GoldenCases() { return ::ndq::testing::GoldenCases(CmdlineGoldenDir(), ".json"); }

std::vector<DiskNode> NodesFromJson(const json& v) {
  std::vector<DiskNode> nodes;
  for (const json& n : v) {
    nodes.push_back(DiskNode{n.at("format").get<std::string>(), n.at("read_only").get<bool>(), n.at("fd").get<int>()});
  }
  return nodes;
}

// A planned drive: {"id", "media": "disk"|"cdrom", "interface", "cache",
// "discard", "serial", "read_only", "boot_index", "nodes"}.
Drive DriveFromJson(const json& d) {
  Drive drive;
  for (const auto& [key, v] : d.items()) {
    if (key == "id") drive.id = v.get<std::string>();
    else if (key == "media") drive.media = v.get<std::string>() == "cdrom" ? DriveMedia::kCdrom : DriveMedia::kDisk;
    else if (key == "interface") drive.interface = v.get<std::string>();
    else if (key == "cache") drive.cache = v.get<std::string>();
    else if (key == "discard") drive.discard = v.get<std::string>();
    else if (key == "serial") drive.serial = v.get<std::string>();
    else if (key == "read_only") drive.read_only = v.get<bool>();
    else if (key == "boot_index") drive.boot_index = v.get<int>();
    else ADD_FAILURE() << "unknown drive field in golden file: " << key;
  }
  return drive;
}

// The hardware beyond the boot image (hardware_plan.h).
void AddHardwareSetters(std::map<std::string, std::function<void(VmSpec&, const json&)>>& setters) {
  // The console (issue 11); boot_watch plans no argv.
  setters["console"] = [](VmSpec& s, const json& v) {
    s.console.enabled = v.at("enabled").get<bool>();
    s.console.dir = v.value("dir", "");
    s.console.serial_socket = v.at("serial_socket").get<std::string>();
    s.console.vnc_socket = v.at("vnc_socket").get<std::string>();
  };
  setters["boot_cache"] = [](VmSpec& s, const json& v) { s.boot_cache = v.get<std::string>(); };
  setters["boot_discard"] = [](VmSpec& s, const json& v) { s.boot_discard = v.get<std::string>(); };
  setters["boot_index"] = [](VmSpec& s, const json& v) { s.boot_index = v.get<int>(); };
  setters["drives"] = [](VmSpec& s, const json& v) {
    for (const json& d : v) s.drives.push_back(DriveFromJson(d));
  };
  setters["kernel"] = [](VmSpec& s, const json& v) {
    s.kernel = KernelBoot{v.value("kernel", ""), v.value("initrd", ""), v.value("cmdline", "")};
  };
  setters["net_device"] = [](VmSpec& s, const json& v) { s.net_device = v.get<std::string>(); };
  setters["mac_address"] = [](VmSpec& s, const json& v) { s.mac_address = v.get<std::string>(); };
  setters["own_nic"] = [](VmSpec& s, const json& v) { s.own_nic = v.get<bool>(); };
  setters["firmware"] = [](VmSpec& s, const json& v) {
    s.firmware = Firmware{v.value("uefi", false), v.value("secure_boot", false),
                          FirmwareFiles{v.value("code", ""), v.value("vars", "")}};
  };
  setters["tpm"] = [](VmSpec& s, const json& v) { s.tpm = v.get<bool>(); };
  // network_mode = "bridge" (src/qemu/network_plan.h)
  setters["network"] = [](VmSpec& s, const json& v) {
    s.network.enabled = v.value("enabled", false);
    s.network.bridge = v.value("bridge", "");
    s.network.advertise_address = v.value("advertise_address", false);
    s.network.guest_ports = v.value("guest_ports", std::map<std::string, int>{});
  };
  // warm_start (src/qemu/warm_plan.h); its mode and files are QemuFiles'.
  setters["warm"] = [](VmSpec& s, const json&) { s.warm.enabled = true; };
}

// virtio-9p shares (share_plan.h): [{"tag", "origin": "alloc_dir"|"volume",
// "host_path", "read_only", "fd"}].
void AddShareSetters(std::map<std::string, std::function<void(VmSpec&, const json&)>>& setters) {
  setters["shares"] = [](VmSpec& s, const json& v) {
    for (const json& share : v) {
      s.shares.push_back(Share{share.at("tag").get<std::string>(),
                               share.at("origin").get<std::string>() == "volume" ? ShareOrigin::kVolume
                                                                                 : ShareOrigin::kAllocDir,
                               share.at("host_path").get<std::string>(), share.value("read_only", false)});
    }
  };
}

// Strict: an unknown key is a typo in a golden file, not something to ignore.
VmSpec SpecFromJson(const json& j) {
  using Setter = std::function<void(VmSpec&, const json&)>;
  static auto* setters = new std::map<std::string, Setter>{
      {"emulator", [](VmSpec& s, const json& v) { s.emulator = v.get<std::string>(); }},
      {"emulator_path", [](VmSpec& s, const json& v) { s.emulator_path = v.get<std::string>(); }},
      {"machine_type", [](VmSpec& s, const json& v) { s.machine_type = v.get<std::string>(); }},
      {"accelerator", [](VmSpec& s, const json& v) { s.accelerator = v.get<std::string>(); }},
      {"drive_interface", [](VmSpec& s, const json& v) { s.drive_interface = v.get<std::string>(); }},
      {"image_path", [](VmSpec& s, const json& v) { s.image_path = v.get<std::string>(); }},
      {"image_format", [](VmSpec& s, const json& v) { s.image_format = v.get<std::string>(); }},
      {"sandbox", [](VmSpec& s, const json& v) { s.sandbox = v.get<bool>(); }},
      {"memory_mb", [](VmSpec& s, const json& v) { s.memory_mb = v.get<int64_t>(); }},
      {"memory_max_mb", [](VmSpec& s, const json& v) { s.memory_max_mb = v.get<int64_t>(); }},
      {"cpus", [](VmSpec& s, const json& v) { s.cpus = v.get<int>(); }},
      {"name", [](VmSpec& s, const json& v) { s.name = v.get<std::string>(); }},
      {"graceful_shutdown", [](VmSpec& s, const json& v) { s.graceful_shutdown = v.get<bool>(); }},
      {"guest_agent", [](VmSpec& s, const json& v) { s.guest_agent = v.get<bool>(); }},
      {"args", [](VmSpec& s, const json& v) { s.args = v.get<std::vector<std::string>>(); }},
      {"dns_searches", [](VmSpec& s, const json& v) { s.dns_searches = v.get<std::vector<std::string>>(); }},
      {"ignored_dns_servers",
       [](VmSpec& s, const json& v) { s.ignored_dns_servers = v.get<std::vector<std::string>>(); }},
      {"port_forwards",
       [](VmSpec& s, const json& v) {
         for (const json& f : v) {
           s.port_forwards.push_back(PortForward{f.at("label").get<std::string>(), f.at("protocol").get<std::string>(),
                                                 f.at("host_ip").get<std::string>(), f.at("host_port").get<int>(),
                                                 f.at("guest_port").get<int>()});
         }
       }},
  };
  static const bool hardware = (AddHardwareSetters(*setters), AddShareSetters(*setters), true);
  (void)hardware;
  VmSpec spec;
  for (const auto& [key, value] : j.items()) {
    const auto it = setters->find(key);
    if (it == setters->end()) {
      ADD_FAILURE() << "unknown VmSpec field in golden file: " << key;
      continue;
    }
    it->second(spec, value);
  }
  return spec;
}

// The runtime half of a golden spec, which the files keep beside the plan
// (one JSON object, as the VmSpec held both before QemuFiles): "disk" (the
// boot chain), each drive's "nodes", "kernel_fd", "initrd_fd", "code_fd",
// "vars_fd", "tap_fd", warm's "mode", "memory_fd" and "state_fd", each
// share's "fd". Taken out of `spec`, so what remains is the plan.
QemuFiles TakeFilesFromJson(json& spec) {
  QemuFiles files;
  auto take = [](json& object, const char* key, int fallback) {
    if (!object.is_object() || !object.contains(key)) return fallback;
    const int value = object.at(key).get<int>();
    object.erase(key);
    return value;
  };
  if (spec.contains("disk")) {
    files.boot = NodesFromJson(spec.at("disk"));
    spec.erase("disk");
  }
  if (spec.contains("drives")) {
    for (json& drive : spec["drives"]) {
      files.drives.push_back(drive.contains("nodes") ? NodesFromJson(drive.at("nodes")) : std::vector<DiskNode>{});
      drive.erase("nodes");
    }
  }
  if (spec.contains("kernel")) {
    files.kernel = take(spec["kernel"], "kernel_fd", -1);
    files.initrd = take(spec["kernel"], "initrd_fd", -1);
  }
  if (spec.contains("firmware")) {
    files.firmware_code = take(spec["firmware"], "code_fd", -1);
    files.firmware_vars = take(spec["firmware"], "vars_fd", -1);
  }
  if (spec.contains("network")) files.tap = take(spec["network"], "tap_fd", -1);
  if (spec.contains("warm")) {
    json& warm = spec["warm"];
    files.warm_mode = warm.value("mode", "") == "restore" ? WarmMode::kRestore : WarmMode::kCold;
    warm.erase("mode");
    files.warm_memory = take(warm, "memory_fd", -1);
    files.warm_state = take(warm, "state_fd", -1);
  }
  if (spec.contains("shares")) {
    for (json& share : spec["shares"]) files.shares.push_back(take(share, "fd", -1));
  }
  return files;
}

RuntimePaths PathsFromJson(const json& j) {
  RuntimePaths p;
  for (const auto& [key, v] : j.items()) {
    if (key == "qmp_socket") {
      p.qmp_socket = v.get<std::string>();
    } else if (key == "guest_agent_socket") {
      p.guest_agent_socket = v.get<std::string>();
    } else if (key == "tpm_socket") {
      p.tpm_socket = v.get<std::string>();
    } else {
      ADD_FAILURE() << "unknown RuntimePaths field in golden file: " << key;
    }
  }
  return p;
}

class CmdlineGolden : public ::testing::TestWithParam<std::string> {};

// NAME.json holds {"spec": VmSpec, "paths": RuntimePaths}; NAME.argv the
// expected argv, one argument per line. NDQ_UPDATE_GOLDEN=1 rewrites the .argv
// files from the current output (review the git diff afterwards).
TEST_P(CmdlineGolden, MatchesArgvFile) {
  const std::string base = CmdlineGoldenDir() + "/" + GetParam();
  const json input = json::parse(ReadFile(base + ".json"));
  for (const auto& [key, unused] : input.items()) {
    EXPECT_TRUE(key == "spec" || key == "paths" || key == "comment") << "unknown key " << key;
  }
  json spec = input.at("spec");
  const QemuFiles files = TakeFilesFromJson(spec);
  const std::vector<std::string> actual =
      BuildQemuArgv(SpecFromJson(spec), files, PathsFromJson(input.value("paths", json::object())));
  if (UpdatingGoldens()) {
    std::ofstream(base + ".argv") << absl::StrJoin(actual, "\n") << "\n";
    GTEST_SKIP() << "rewrote " << base << ".argv";
  }
  const std::string text = ReadFile(base + ".argv");
  ASSERT_FALSE(text.empty()) << base << ".argv is missing or empty";
  const std::vector<std::string> expected = Lines(text);
  EXPECT_EQ(expected, actual) << "argv differs from " << base << ".argv (- expected, + actual):\n"
                              << Diff(expected, actual);
}

INSTANTIATE_TEST_SUITE_P(Files, CmdlineGolden, ::testing::ValuesIn(GoldenCases()),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

TEST(CmdlineGoldenFiles, CoverEveryFeature) {
  const std::vector<std::string> cases = GoldenCases();
  for (const char* name :
       {"minimal_defaults", "kvm_with_cpus", "guest_agent", "port_forwards_task_network", "port_forwards_group_ports",
        "dns_search", "args_with_smp", "commas_in_image_path", "format_set", "everything", "backing_chain_sandboxed",
        "drive_interface_scsi", "drive_interface_floppy", "drive_interface_pflash", "drive_interface_none",
        "extra_disks_every_interface", "boot_disk_tuning", "cdrom_boot_first", "cloud_init_seed", "kernel_boot",
        "nic_model_and_mac", "nic_without_forwards", "uefi", "secure_boot_tpm_q35", "tpm_pc",
        "hostile_values_escaped", "shares_alloc_dirs", "shares_volumes_readonly", "shares_hostile_tag", "console",
        "console_hostile_paths", "bridge_tap", "bridge_hostile_values", "warm_cold", "warm_restore"}) {
    EXPECT_THAT(cases, Contains(name));
  }
}

TEST(CmdlineGoldenFiles, DiffIsReadable) {
  EXPECT_EQ(Diff({"a", "b", "c"}, {"a", "x", "c", "d"}), "  a\n+ x\n- b\n  c\n+ d\n");
}

// --- the real QEMU ------------------------------------------------------------

std::string FindOnPath(const std::string& name) {
  const char* path = ::getenv("PATH");
  for (absl::string_view dir : absl::StrSplit(path ? path : "/usr/bin:/bin", ':')) {
    const std::string candidate = absl::StrCat(dir, "/", name);
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

int FreeTcpPort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  int port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  ::close(fd);
  return port;
}

// Kills and reaps the process when the test ends, however it ends.
struct ChildGuard {
  pid_t pid = -1;
  ~ChildGuard() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
};

// Waits without polling loops: inotify reports the socket's creation, a pidfd
// QEMU's exit. Returns "" when `file` exists, else why not.
std::string WaitForFileOrExit(const std::string& dir, const std::string& file, pid_t pid, absl::Duration timeout) {
  const int inotify = ::inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (inotify < 0 || pidfd < 0) return "inotify/pidfd_open failed";
  ::inotify_add_watch(inotify, dir.c_str(), IN_CREATE);
  const absl::Time deadline = absl::Now() + timeout;
  std::string result = "timed out";
  while (true) {
    if (fs::exists(file)) {
      result = "";
      break;
    }
    pollfd fds[2] = {{inotify, POLLIN, 0}, {pidfd, POLLIN, 0}};
    const int64_t left = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (left <= 0) break;
    if (::poll(fds, 2, static_cast<int>(left)) < 0 && errno != EINTR) {
      result = "poll failed";
      break;
    }
    if (fds[1].revents & POLLIN) {
      result = fs::exists(file) ? "" : "QEMU exited";
      break;
    }
    char events[4096];
    while (::read(inotify, events, sizeof events) > 0) {
    }
  }
  ::close(inotify);
  ::close(pidfd);
  return result;
}

// Our argv, run by the real binary: QEMU must accept every option, open the
// image whose name has a comma (not a second file), and take the escaped
// name and socket paths literally. -S keeps the guest from running.
// Starts QEMU with `files` opened as fds 3, 4, ... (as the supervisor hands
// them on; read-only for names ending in ".ro", as QEMU wants the access mode
// of a read-only node) and its output in `log`.
::testing::AssertionResult SpawnQemu(const std::vector<std::string>& argv, const std::vector<std::string>& files,
                                     const std::string& log, ChildGuard* child) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  std::vector<int> fds;
  for (size_t i = 0; i < files.size(); ++i) {
    const bool read_only = absl::EndsWith(files[i], ".ro");
    fds.push_back(::open(files[i].c_str(), (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC));
    if (fds.back() < 0) return ::testing::AssertionFailure() << "cannot open " << files[i];
  }
  // Moved out of the way first, so no dup2 overwrites an fd still to be read.
  for (int& fd : fds) fd = ::fcntl(fd, F_DUPFD_CLOEXEC, 100);
  for (size_t i = 0; i < fds.size(); ++i) posix_spawn_file_actions_adddup2(&actions, fds[i], 3 + static_cast<int>(i));
  std::vector<std::string> storage = argv;
  std::vector<char*> cargv;
  for (std::string& a : storage) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  const int rc = ::posix_spawn(&child->pid, argv[0].c_str(), &actions, nullptr, cargv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  for (int fd : fds) ::close(fd);
  if (rc != 0) return ::testing::AssertionFailure() << "posix_spawn " << argv[0];
  return ::testing::AssertionSuccess();
}

TEST(CmdlineQemu, RealQemuAcceptsTheArgv) {
  const std::string qemu = FindOnPath("qemu-system-x86_64");
  if (qemu.empty()) GTEST_SKIP() << "qemu-system-x86_64 is not installed";
  TempDir tmp;
  ASSERT_FALSE(tmp.path().empty());
  const std::string dir = fs::canonical(tmp.path()).string();
  const std::string image = dir + "/disk,file=other.img";
  {
    std::ofstream out(image, std::ios::binary);
    out << std::string(1 << 20, '\0');  // 1 MiB raw disk
  }
  const int port = FreeTcpPort();
  ASSERT_GT(port, 0);

  VmSpec spec = BaseSpec();
  spec.emulator_path = qemu;
  spec.image_path = image;
  spec.sandbox = true;
  spec.memory_mb = 128;
  spec.cpus = 1;
  spec.name = "ndq,e2e";
  spec.guest_agent = true;
  spec.args = {"-S"};
  spec.port_forwards = {{"ssh", "tcp", "127.0.0.1", port, 22}};
  spec.dns_searches = {"example.com"};
  const RuntimePaths paths{dir + "/q,mp.sock", dir + "/qga,x.sock"};
  const std::vector<std::string> argv = BuildQemuArgv(spec, BaseFiles(), paths);

  const std::string log = dir + "/qemu.log";
  // The image reaches QEMU only as fd 3, as the supervisor hands it on.
  ChildGuard child;
  ASSERT_TRUE(SpawnQemu(argv, {image}, log, &child));
  const std::string waited = WaitForFileOrExit(dir, paths.qmp_socket, child.pid, absl::Seconds(60));
  ASSERT_EQ(waited, "") << "argv: " << absl::StrJoin(argv, " ") << "\nQEMU output:\n" << ReadFile(log);

  absl::StatusOr<std::unique_ptr<QmpClient>> qmp = QmpClient::Connect(paths.qmp_socket, absl::Seconds(30));
  ASSERT_TRUE(qmp.ok()) << qmp.status() << "\nQEMU output:\n" << ReadFile(log);
  absl::StatusOr<json> blocks = (*qmp)->Execute("query-block");
  ASSERT_TRUE(blocks.ok()) << blocks.status();
  std::vector<std::string> files;
  for (const json& block : *blocks) {
    if (block.contains("inserted")) files.push_back(block["inserted"].value("file", ""));
  }
  EXPECT_THAT(files, ElementsAre("/dev/fdset/1"));
  // QEMU reads the file we opened: the same inode, through its fd set.
  absl::StatusOr<json> fdsets = (*qmp)->Execute("query-fdsets");
  ASSERT_TRUE(fdsets.ok()) << fdsets.status();
  EXPECT_EQ(fdsets->size(), 1u) << fdsets->dump();
  absl::StatusOr<json> name = (*qmp)->Execute("query-name");
  ASSERT_TRUE(name.ok()) << name.status();
  EXPECT_EQ(name->value("name", ""), "ndq,e2e");
  absl::StatusOr<std::string> status = (*qmp)->QueryStatus();
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_EQ(*status, "prelaunch");
  absl::StatusOr<json> usernet = (*qmp)->Execute("human-monitor-command", {{"command-line", "info usernet"}});
  ASSERT_TRUE(usernet.ok()) << usernet.status();
  EXPECT_THAT(usernet->get<std::string>(), HasSubstr(absl::StrCat("127.0.0.1 ", port)));
  EXPECT_TRUE(fs::exists(paths.guest_agent_socket));
}

// Every disk interface, cache and discard mode, a CD-ROM with a boot order,
// and a NIC model with its MAC, as QEMU 7.2 takes them.
TEST(CmdlineQemu, RealQemuAcceptsEveryDriveAndNicOption) {
  const std::string qemu = FindOnPath("qemu-system-x86_64");
  if (qemu.empty()) GTEST_SKIP() << "qemu-system-x86_64 is not installed";
  TempDir tmp;
  const std::string dir = fs::canonical(tmp.path()).string();
  std::vector<std::string> files;
  for (int i = 0; i < 6; ++i) {
    files.push_back(absl::StrCat(dir, "/disk", i, i == 5 ? ".ro" : ".img"));  // the last is the CD-ROM
    std::ofstream(files.back(), std::ios::binary) << std::string(1 << 20, '\0');
  }
  VmSpec spec = BaseSpec();
  spec.emulator_path = qemu;
  spec.memory_mb = 128;
  QemuFiles opened = BaseFiles();
  spec.boot_index = 2;
  spec.boot_cache = "writethrough";
  spec.args = {"-S"};
  const std::vector<std::tuple<std::string, std::string, std::string, std::string>> disks = {
      {"virtio", "none", "unmap", "data1"}, {"scsi", "writethrough", "", "data2"},
      {"ide", "unsafe", "ignore", "data3"}, {"nvme", "directsync", "unmap", "data4"}};
  for (size_t i = 0; i < disks.size(); ++i) {
    Drive drive;
    drive.id = absl::StrCat("disk", i + 1);
    std::tie(drive.interface, drive.cache, drive.discard, drive.serial) = disks[i];
    opened.drives.push_back({DiskNode{"raw", false, 4 + static_cast<int>(i)}});
    spec.drives.push_back(drive);
  }
  Drive cdrom;
  cdrom.id = "cdrom0";
  cdrom.media = DriveMedia::kCdrom;
  cdrom.read_only = true;
  cdrom.boot_index = 1;
  opened.drives.push_back({DiskNode{"raw", true, 8}});
  spec.drives.push_back(cdrom);
  spec.net_device = "e1000";
  spec.mac_address = "02:12:34:56:78:9a";
  spec.own_nic = true;
  const RuntimePaths paths{dir + "/qmp.sock", ""};
  const std::vector<std::string> argv = BuildQemuArgv(spec, opened, paths);
  ChildGuard child;
  ASSERT_TRUE(SpawnQemu(argv, files, dir + "/qemu.log", &child));
  ASSERT_EQ(WaitForFileOrExit(dir, paths.qmp_socket, child.pid, absl::Seconds(60)), "")
      << "argv: " << absl::StrJoin(argv, " ") << "\nQEMU output:\n" << ReadFile(dir + "/qemu.log");
  absl::StatusOr<std::unique_ptr<QmpClient>> qmp = QmpClient::Connect(paths.qmp_socket, absl::Seconds(30));
  ASSERT_TRUE(qmp.ok()) << qmp.status() << "\nargv: " << absl::StrJoin(argv, " ") << "\nQEMU output:\n"
                        << ReadFile(dir + "/qemu.log");
  absl::StatusOr<json> qtree = (*qmp)->Execute("human-monitor-command", {{"command-line", "info qtree"}});
  ASSERT_TRUE(qtree.ok()) << qtree.status();
  const std::string tree = qtree->get<std::string>();
  for (const char* serial : {"data1", "data2", "data3", "data4"}) {
    EXPECT_THAT(tree, HasSubstr(absl::StrCat("serial = \"", serial, "\""))) << serial;
  }
  EXPECT_THAT(tree, HasSubstr("dev: ide-cd"));
  EXPECT_THAT(tree, HasSubstr("dev: nvme"));
  EXPECT_THAT(tree, HasSubstr("dev: virtio-scsi-pci"));
  EXPECT_THAT(tree, HasSubstr("mac = \"02:12:34:56:78:9a\""));
  EXPECT_THAT(tree, HasSubstr("dev: e1000"));
  absl::StatusOr<json> blocks = (*qmp)->Execute("query-block");
  ASSERT_TRUE(blocks.ok()) << blocks.status();
  std::vector<std::string> nodes;
  for (const json& block : *blocks) {
    if (block.contains("inserted")) nodes.push_back(block["inserted"].value("node-name", ""));
  }
  EXPECT_THAT(nodes, ::testing::UnorderedElementsAre("image0", "disk1", "disk2", "disk3", "disk4", "cdrom0"))
      << blocks->dump();
}

}  // namespace
}  // namespace ndq
