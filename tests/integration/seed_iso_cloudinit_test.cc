// The seed image checked against its real readers: the image is attached to a
// loop device, found by its label with blkid and read by Debian's cloud-init
// (DataSourceNoCloud, the code a guest runs), and mounted to check the names
// the guest's kernel sees. Needs root, loop devices and python3-cloudinit.
//
// Linux's isofs is the reader a guest uses. A host kernel built without it
// (CONFIG_ISO9660_FS unset, as on some VM hosts) cannot mount the image; the
// test then mounts it with fuseiso, a separate userspace ISO 9660 + Rock Ridge
// reader, and says so. NDQ_REQUIRE_KERNEL_ISOFS=1 makes that a failure.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "host/run_command.h"
#include "image/seed_iso.h"
#include "../support/files.h"
#include "../support/temp_dir.h"

namespace ndq {
namespace {

using ::ndq::testing::ReadFile;

using nlohmann::json;

const std::string kAllocId = "5c6e1a7e-2f3b-4d1a-9c1e-7b0d3e9a4f21";
const std::vector<std::string> kKeys = {
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx4dW5pY29ybnNhbmRyYWluYm93cw ops@example",
    // A comment YAML would misread unquoted: the value must come back whole.
    "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTY key: #1 - [a] {b} \"q\" 'q'",
};
const std::string kUserData =
    "#cloud-config\n"
    "runcmd:\n"
    "  - [sh, -c, 'echo \"seed: ok\" > /run/seed-ok']\n";
const std::string kNetworkConfig =
    "version: 2\n"
    "ethernets:\n"
    "  eth0:\n"
    "    match: {macaddress: \"52:54:00:12:34:56\"}\n"
    "    dhcp4: true\n";
const std::string kVendorData = "#cloud-config\npackages: [htop]\n";

// Writes the script's JSON to argv[4]: what DataSourceNoCloud read, as a guest
// would see it. blkid is asked for real, but only our device is returned (other
// seeds may be attached on this host); with argv[2] set, the image is already
// mounted there (fuseiso) and cloud-init's own mount step reads that instead.
const char kReaderScript[] = R"PY(
import json, os, sys
from cloudinit import distros, helpers, util
from cloudinit.sources import DataSourceNoCloud as nocloud

dev, premounted, workdir, out = sys.argv[1:5]
real_find = util.find_devs_with
def find_ours(criteria=None, **kwargs):
    return [d for d in real_find(criteria, **kwargs) if os.path.realpath(d) == dev]
util.find_devs_with = find_ours
if premounted:
    def read_mounted(device, callback, data=None, **kwargs):
        if os.path.realpath(device) != dev:
            raise util.MountFailedError("not our device: " + device)
        return callback(premounted, data)
    util.mount_cb = read_mounted

paths = helpers.Paths({"cloud_dir": workdir + "/cloud", "run_dir": workdir + "/run"})
distro = distros.fetch("debian")("debian", {}, paths)
ds = nocloud.DataSourceNoCloud({"datasource": {"NoCloud": {"fs_label": "cidata"}}}, distro, paths)
found = ds.get_data()
text = lambda raw: raw.decode("utf-8") if isinstance(raw, bytes) else raw
result = {"found": found, "found_devices": find_ours("LABEL=cidata")}
if found:
    result.update(seed=ds.seed, userdata=text(ds.userdata_raw), vendordata=text(ds.vendordata_raw),
                  metadata=ds.metadata, network_config=ds.network_config,
                  instance_id=ds.get_instance_id(), public_keys=ds.get_public_ssh_keys())
with open(out, "w") as f:
    json.dump(result, f)
)PY";

// Runs a tool given by path, or found on $PATH, /usr/sbin or /sbin.
absl::StatusOr<CommandResult> RunTool(std::vector<std::string> argv) {
  std::string path = argv[0].find('/') != std::string::npos ? argv[0] : FindOnPath(argv[0]);
  for (const char* dir : {"/usr/sbin/", "/sbin/"}) {
    if (path.empty() && ::access((dir + argv[0]).c_str(), X_OK) == 0) path = dir + argv[0];
  }
  if (path.empty()) return absl::NotFoundError(argv[0] + " is not installed");
  argv[0] = path;
  return RunCommand(argv, absl::Seconds(120));
}

// Ok with the output when the command exits 0; otherwise what it said.
absl::StatusOr<std::string> RunOk(const std::vector<std::string>& argv) {
  absl::StatusOr<CommandResult> result = RunTool(argv);
  if (!result.ok()) return result.status();
  if (result->exit_code != 0) {
    return absl::InternalError(absl::StrCat(absl::StrJoin(argv, " "), " exited ", result->exit_code, ": ",
                                            result->output));
  }
  return result->output;
}

// A read-only loop device on a file, detached at scope end.
class LoopDevice {
 public:
  explicit LoopDevice(const std::string& file) {
    absl::StatusOr<std::string> out = RunOk({"losetup", "--find", "--show", "--read-only", file});
    if (out.ok()) {
      device_ = std::string(absl::StripTrailingAsciiWhitespace(*out));
    } else {
      error_ = std::string(out.status().message());
    }
  }
  ~LoopDevice() {
    if (!device_.empty()) (void)RunOk({"losetup", "--detach", device_});
  }
  LoopDevice(const LoopDevice&) = delete;
  LoopDevice& operator=(const LoopDevice&) = delete;
  const std::string& device() const { return device_; }
  const std::string& error() const { return error_; }

 private:
  std::string device_;
  std::string error_;
};

// A read-only mount of `device` on `dir`, undone at scope end (lazily if busy).
class Mount {
 public:
  Mount(const std::string& device, const std::string& dir, bool fuse) : dir_(dir), fuse_(fuse) {
    absl::StatusOr<std::string> out = fuse ? RunOk({"fuseiso", device, dir})
                                           : RunOk({"mount", "-t", "iso9660", "-o", "ro", device, dir});
    mounted_ = out.ok();
    if (!out.ok()) error_ = std::string(out.status().message());
  }
  ~Mount() { Unmount(); }
  Mount(const Mount&) = delete;
  Mount& operator=(const Mount&) = delete;
  void Unmount() {
    if (!mounted_) return;
    mounted_ = false;
    if (fuse_ && RunOk({"fusermount", "-u", dir_}).ok()) return;
    if (!RunOk({"umount", dir_}).ok()) (void)RunOk({"umount", "-l", dir_});
  }
  bool mounted() const { return mounted_; }
  const std::string& error() const { return error_; }

 private:
  std::string dir_;
  bool fuse_;
  bool mounted_ = false;
  std::string error_;
};

bool KernelHasIsofs() { return ReadFile("/proc/filesystems").find("\tiso9660\n") != std::string::npos; }

std::vector<std::string> SortedNames(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) names.push_back(entry.path().filename());
  std::sort(names.begin(), names.end());
  return names;
}

// The names and contents as the mounted filesystem shows them.
void ExpectFilesAsWritten(const std::string& dir, const SeedFiles& files) {
  EXPECT_EQ(SortedNames(dir), (std::vector<std::string>{"meta-data", "network-config", "user-data", "vendor-data"}));
  EXPECT_EQ(ReadFile(dir + "/user-data"), files.user_data);
  EXPECT_EQ(ReadFile(dir + "/meta-data"), files.meta_data);
  EXPECT_EQ(ReadFile(dir + "/network-config"), *files.network_config);
  EXPECT_EQ(ReadFile(dir + "/vendor-data"), *files.vendor_data);
}

// Runs cloud-init's NoCloud datasource on `device`; its JSON report.
json ReadWithCloudInit(const testing::TempDir& work, const std::string& device, const std::string& premounted) {
  { std::ofstream(work / "read_seed.py") << kReaderScript; }
  // Debian's python3, whose dist-packages hold cloud-init (not one found first on $PATH).
  absl::StatusOr<std::string> out =
      RunOk({"/usr/bin/python3", work / "read_seed.py", device, premounted, work / "cloud-init", work / "result.json"});
  EXPECT_TRUE(out.ok()) << out.status();
  std::string report = ReadFile(work / "result.json");
  json result = json::parse(report, nullptr, /*allow_exceptions=*/false);
  EXPECT_FALSE(result.is_discarded()) << "cloud-init reader wrote no JSON; its output:\n"
                                      << (out.ok() ? *out : std::string(out.status().message()));
  return result;
}

void ExpectCloudInitRead(const json& got, const std::string& device, const SeedFiles& files) {
  ASSERT_TRUE(got.is_object());
  EXPECT_EQ(got["found_devices"], json::array({device})) << "blkid did not find the image by its cidata label";
  ASSERT_EQ(got["found"], true) << got.dump(2);
  EXPECT_EQ(got["seed"], device);
  EXPECT_EQ(got["userdata"], files.user_data);
  EXPECT_EQ(got["vendordata"], *files.vendor_data);
  EXPECT_EQ(got["instance_id"], kAllocId);
  EXPECT_EQ(got["metadata"]["instance-id"], kAllocId);
  EXPECT_EQ(got["metadata"]["local-hostname"], "web-1");
  EXPECT_EQ(got["metadata"]["public-keys"], json(kKeys));
  EXPECT_EQ(got["public_keys"], json(kKeys));
  json network = {{"version", 2},
                  {"ethernets", {{"eth0", {{"match", {{"macaddress", "52:54:00:12:34:56"}}}, {"dhcp4", true}}}}}};
  EXPECT_EQ(got["network_config"], network);
}

// Meta-data made from hostile values, parsed by cloud-init's own YAML loader,
// gives back exactly those values.
TEST(SeedIsoCloudInitTest, HostileValuesSurviveCloudInitsYaml) {
  const std::vector<std::string> values = {
      "a: b", "- [x, {y: z}]", "# comment", "\"quoted\" 'single' \\back", "line\nbreak\r\ttab",
      "*alias &anchor !tag %directive @ `", "caf\xc3\xa9 \xe2\x80\xa8 \xc2\x85 \xf0\x9f\x98\x80", "", " ", "null",
      "~", "true", "0x10", "1e3", "---", "..."};
  testing::TempDir work;
  ASSERT_FALSE(work.path().empty());
  json documents = json::array();
  for (size_t i = 0; i < values.size(); ++i) {
    std::string path = work / ("meta-data-" + std::to_string(i));
    std::ofstream(path) << DefaultMetaData(values[i], values[values.size() - 1 - i], {"ssh-rsa AAAA " + values[i]});
    documents.push_back(path);
  }
  { std::ofstream(work / "load.py") << "import json, sys\nfrom cloudinit import util\n"
                                       "print(json.dumps([util.load_yaml(util.load_file(p)) for p in sys.argv[1:]]))\n"; }
  std::vector<std::string> argv = {"/usr/bin/python3", work / "load.py"};
  for (const auto& path : documents) argv.push_back(path);
  absl::StatusOr<std::string> out = RunOk(argv);
  ASSERT_TRUE(out.ok()) << out.status();
  json loaded = json::parse(*out, nullptr, /*allow_exceptions=*/false);
  ASSERT_TRUE(loaded.is_array()) << *out;
  ASSERT_EQ(loaded.size(), values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    json expected = {{"instance-id", values[i]},
                     {"local-hostname", values[values.size() - 1 - i]},
                     {"public-keys", {"ssh-rsa AAAA " + values[i]}}};
    EXPECT_EQ(loaded[i], expected) << "value " << i;
  }
}

TEST(SeedIsoCloudInitTest, NoCloudReadsTheSeed) {
  ASSERT_EQ(::geteuid(), 0u) << "this test attaches a loop device and mounts it: run it as root";
  ASSERT_EQ(::access("/dev/loop-control", F_OK), 0) << "no /dev/loop-control: this host has no loop devices";
  testing::TempDir work;
  ASSERT_FALSE(work.path().empty());
  SeedFiles files{kUserData, DefaultMetaData(kAllocId, "web-1", kKeys), kNetworkConfig, kVendorData};
  ASSERT_TRUE(WriteSeedIso(files, work / "seed.iso").ok());

  LoopDevice loop(work / "seed.iso");
  ASSERT_FALSE(loop.device().empty()) << "cannot attach a loop device: " << loop.error();
  std::filesystem::create_directory(work / "mnt");

  auto kernel = std::make_unique<Mount>(loop.device(), work / "mnt", /*fuse=*/false);
  if (kernel->mounted()) {
    ExpectFilesAsWritten(work / "mnt", files);
    kernel->Unmount();  // cloud-init mounts the device itself, as in a guest
    ExpectCloudInitRead(ReadWithCloudInit(work, loop.device(), ""), loop.device(), files);
    return;
  }
  ASSERT_FALSE(KernelHasIsofs()) << "mounting the seed failed: " << kernel->error();
  const char* strict = std::getenv("NDQ_REQUIRE_KERNEL_ISOFS");
  ASSERT_FALSE(strict != nullptr && std::string(strict) == "1")
      << "this kernel has no iso9660 filesystem (CONFIG_ISO9660_FS), and NDQ_REQUIRE_KERNEL_ISOFS=1";
  std::cout << "NOTE: this kernel has no iso9660 filesystem; reading the seed with fuseiso instead\n";
  ::testing::Test::RecordProperty("reader", "fuseiso");
  Mount fuse(loop.device(), work / "mnt", /*fuse=*/true);
  ASSERT_TRUE(fuse.mounted()) << "the kernel has no iso9660 and fuseiso failed too: " << fuse.error();
  ExpectFilesAsWritten(work / "mnt", files);
  ExpectCloudInitRead(ReadWithCloudInit(work, loop.device(), work / "mnt"), loop.device(), files);
}

}  // namespace
}  // namespace ndq
