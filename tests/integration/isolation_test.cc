// Resource and network isolation end to end: the real plugin, supervisor and
// QEMU (TCG) booting the test guest, in real cgroups (v1 on this host) and a
// real network namespace joined to the host by a veth pair.
#include <signal.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../support/event_recorder.h"
#include "../support/guest_task.h"
#include "../support/plugin_harness.h"
#include "../support/temp_dir.h"
#include "../support/test_guest.h"
#include "vm/vm_task.h"

namespace ndq {
namespace {

using ::ndq::testing::AddGroupPort;
using ::ndq::testing::AddTaskPort;
using ::ndq::testing::CgroupsUnder;
using ::ndq::testing::EventRecorder;
using ::ndq::testing::FakeAlloc;
using ::ndq::testing::Guest;
using ::ndq::testing::FreePort;
using ::ndq::testing::kGuestBootTimeout;
using ::ndq::testing::PluginHarness;
using ::ndq::testing::ProcessesMentioning;
using ::ndq::testing::ReadFile;
using ::ndq::testing::TempDir;
using ::ndq::testing::TestGuestDir;
using ::ndq::testing::WaitForFileToContain;
using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

constexpr int64_t kMiB = 1 << 20;

std::string Trimmed(const std::string& path) {
  std::string text = ReadFile(path);
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  return text;
}

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

std::string Run(const std::vector<std::string>& argv) {
  auto out = RunCommand(argv, absl::Seconds(20));
  EXPECT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out.ok() ? out->exit_code : -1, 0) << (out.ok() ? out->output : "");
  return out.ok() ? out->output : "";
}

// The attributes of the plugin's first fingerprint.
std::map<std::string, std::string> FingerprintAttributes(PluginHarness& harness) {
  auto context = harness.client().NewContext(absl::Seconds(30));
  auto reader = harness.driver().Fingerprint(context.get(), {});
  driverpb::FingerprintResponse response;
  std::map<std::string, std::string> attributes;
  if (reader->Read(&response)) {
    for (const auto& [key, value] : response.attributes()) {
      attributes[key] = value.has_string_val() ? value.string_val() : value.has_bool_val() ? (value.bool_val() ? "true" : "false") : "";
    }
  }
  context->TryCancel();
  reader->Finish();
  return attributes;
}

class IsolationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(TestGuestDir().ok()) << TestGuestDir().status();
    plugin_config_["image_paths"].push_back(*TestGuestDir());
    state_dir_ = state_.path() + "/s";
    harness_ = std::make_unique<PluginHarness>(state_dir_, plugin_config_);
    const std::map<std::string, std::string> attributes = FingerprintAttributes(*harness_);
    isolation_ = attributes.count("driver.qemu.cgroups") ? attributes.at("driver.qemu.cgroups") : "";
    isolation_problem_ = attributes.count("driver.qemu.cgroups.reason") ? attributes.at("driver.qemu.cgroups.reason") : "";
  }
  void TearDown() override { harness_.reset(); }

  // Skips a cgroup test where this machine gives no cgroups to write.
  bool CgroupsUnavailable() {
    if (isolation_ == "v1" || isolation_ == "v2") return false;
    std::cerr << "cgroup isolation unavailable here: " << isolation_problem_ << "\n";
    return true;
  }

  driverpb::TaskConfig GuestTask(FakeAlloc& alloc, const std::string& variant, nlohmann::json extra = {},
                                 int memory_mb = 256) {
    nlohmann::json config = ::ndq::testing::GuestConfig(extra);
    if (!extra.contains("port_map")) config.erase("port_map");
    alloc.AddOverlay(Guest(variant));
    return alloc.Task(config, memory_mb);
  }

  driverpb::TaskHandle Start(const driverpb::TaskConfig& task) {
    driverpb::TaskHandle handle;
    const grpc::Status status = harness_->Start(task, &handle);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return handle;
  }

  TempDir state_;
  std::string state_dir_;
  nlohmann::json plugin_config_ = {{"image_paths", nlohmann::json::array()}};
  std::unique_ptr<PluginHarness> harness_;
  std::string isolation_, isolation_problem_;
};

TEST_F(IsolationTest, FingerprintSaysWhichCgroupsVmsGet) {
  // This host (root, cgroup v1 hierarchies writable) isolates VMs; anywhere
  // else the attribute must say why not rather than be missing.
  ASSERT_FALSE(isolation_.empty());
  if (CgroupsUnavailable()) {
    EXPECT_EQ(isolation_, "unavailable");
    EXPECT_FALSE(isolation_problem_.empty());
    return;
  }
  const auto attributes = FingerprintAttributes(*harness_);
  EXPECT_THAT(attributes.at("driver.qemu.cgroups.controllers"), HasSubstr("memory"));
}

TEST_F(IsolationTest, QemuRunsInACgroupWithTheTaskLimitsRemovedOnDestroy) {
  if (CgroupsUnavailable()) GTEST_SKIP() << isolation_problem_;
  EventRecorder events(harness_->client());
  FakeAlloc alloc("limited");
  driverpb::TaskConfig task = GuestTask(alloc, "guest.qcow2");
  auto* linux_resources = task.mutable_resources()->mutable_linux_resources();
  linux_resources->set_cpu_shares(700);
  linux_resources->set_cpuset_cpus("1");
  const driverpb::TaskHandle handle = Start(task);
  ASSERT_TRUE(WaitForFileToContain(alloc.stdout_path(), "GUEST-READY", kGuestBootTimeout));
  auto record = DriverStateRecord::Decode(handle.driver_state());
  ASSERT_TRUE(record.ok()) << record.status();
  const TaskCgroup& cgroup = record->cgroup;
  ASSERT_NE(cgroup.version, CgroupVersion::kNone);

  // QEMU, and only QEMU, is in each of the VM's cgroups.
  for (const std::string& procs : cgroup.ProcsFiles()) {
    EXPECT_THAT(Lines(ReadFile(procs)), Contains(std::to_string(record->qemu_pid))) << procs;
    EXPECT_THAT(Lines(ReadFile(procs)), Not(Contains(std::to_string(record->supervisor_pid)))) << procs;
  }
  if (cgroup.version == CgroupVersion::kV1) {
    // 256 MiB of guest RAM plus the default 128 MiB overhead.
    EXPECT_EQ(Trimmed(cgroup.Dir("memory") + "/memory.limit_in_bytes"), std::to_string(384 * kMiB));
    EXPECT_EQ(Trimmed(cgroup.Dir("cpu") + "/cpu.shares"), "700");
    EXPECT_EQ(Trimmed(cgroup.Dir("cpuset") + "/cpuset.cpus"), "1");
    EXPECT_EQ(Trimmed(cgroup.Dir("pids") + "/pids.max"), "1024");
    // QEMU's threads are confined to core 1.
    EXPECT_THAT(ReadFile("/proc/" + std::to_string(record->qemu_pid) + "/status"),
                HasSubstr("Cpus_allowed_list:\t1\n"));
  } else {
    EXPECT_EQ(Trimmed(cgroup.Dir("memory") + "/memory.max"), std::to_string(384 * kMiB));
  }
  // -smp follows the reserved cores.
  std::string cmdline = ReadFile("/proc/" + std::to_string(record->qemu_pid) + "/cmdline");
  std::replace(cmdline.begin(), cmdline.end(), '\0', ' ');
  EXPECT_THAT(cmdline, HasSubstr("-smp 1 "));
  EXPECT_TRUE(events.WaitFor("VM isolated in cgroup", absl::Seconds(5))) << events.All();

  // Stats come from the cgroup: usage and peak, beside RSS and cache.
  auto context = harness_->client().NewContext(absl::Seconds(30));
  driverpb::TaskStatsRequest request;
  request.set_task_id(task.id());
  request.mutable_collection_interval()->set_seconds(1);
  auto reader = harness_->driver().TaskStats(context.get(), request);
  driverpb::TaskStatsResponse first, second;
  ASSERT_TRUE(reader->Read(&first));
  ASSERT_TRUE(reader->Read(&second));
  context->TryCancel();
  reader->Finish();
  const driverpb::MemoryUsage& memory = second.stats().agg_resource_usage().memory();
  EXPECT_THAT(memory.measured_fields(), Contains(driverpb::MemoryUsage::USAGE));
  EXPECT_THAT(memory.measured_fields(), Contains(driverpb::MemoryUsage::MAX_USAGE));
  EXPECT_THAT(memory.measured_fields(), Contains(driverpb::MemoryUsage::RSS));
  EXPECT_GT(memory.usage(), 20u * kMiB);
  EXPECT_LE(memory.usage(), 384u * kMiB);
  EXPECT_GE(memory.max_usage(), memory.usage());
  EXPECT_GT(memory.rss(), 10u * kMiB);
  const driverpb::CPUUsage& cpu = second.stats().agg_resource_usage().cpu();
  EXPECT_GE(cpu.percent(), 0);
  EXPECT_LT(cpu.percent(), 150);
  EXPECT_EQ(second.stats().resource_usage_by_pid().size(), 2u) << "QEMU and its supervisor";
  // The cgroup's CPU counters only grow while the guest runs.
  const CgroupUsage before = ReadCgroupUsage(cgroup);
  ASSERT_TRUE(before.cpu_total_ns.has_value());
  std::optional<uint64_t> later;
  for (const absl::Time deadline = absl::Now() + absl::Seconds(10); absl::Now() < deadline;) {
    later = ReadCgroupUsage(cgroup).cpu_total_ns;
    if (later && *later > *before.cpu_total_ns) break;
    absl::SleepFor(absl::Milliseconds(50));
  }
  ASSERT_TRUE(later.has_value());
  EXPECT_GT(*later, *before.cpu_total_ns);
  EXPECT_GE(*ReadCgroupUsage(cgroup).cpu_total_ns, *later);

  ASSERT_TRUE(harness_->Stop(task.id(), absl::Seconds(20)).ok());
  for (const auto& [controller, dir] : cgroup.dirs) EXPECT_TRUE(std::filesystem::exists(dir)) << "kept until destroy";
  ASSERT_TRUE(harness_->Destroy(task.id(), false).ok());
  for (const std::string& dir : cgroup.created) EXPECT_FALSE(std::filesystem::exists(dir)) << dir;
  EXPECT_THAT(CgroupsUnder(harness_->cgroup_parent()), IsEmpty());
}

// The memhog guest fills its RAM. With memory_max equal to the guest's RAM
// there is no room for QEMU itself: the cgroup's OOM killer ends the VM, and
// the host is untouched. With the default limit (RAM + overhead) the same
// guest runs on.
TEST_F(IsolationTest, GuestFillingItsMemoryIsContainedByTheCgroupLimit) {
  if (CgroupsUnavailable()) GTEST_SKIP() << isolation_problem_;
  EventRecorder events(harness_->client());
  const nlohmann::json fast = {{"args", {"-fw_cfg", "name=opt/guest/memhog_rate,string=64"}}};
  FakeAlloc capped("capped"), roomy("roomy");
  driverpb::TaskConfig capped_task = GuestTask(capped, "guest-memhog.qcow2", fast);
  capped_task.mutable_resources()->mutable_allocated_resources()->mutable_memory()->set_memory_max_mb(256);
  driverpb::TaskConfig roomy_task = GuestTask(roomy, "guest-memhog.qcow2", fast);
  const driverpb::TaskHandle capped_handle = Start(capped_task);
  const driverpb::TaskHandle roomy_handle = Start(roomy_task);
  EXPECT_TRUE(events.WaitFor("leaves QEMU less than its 128 MiB overhead", absl::Seconds(5))) << events.All();

  driverpb::WaitTaskResponse wait;
  ASSERT_TRUE(harness_->Wait(capped_task.id(), &wait, absl::Seconds(120)).ok());
  EXPECT_TRUE(wait.result().oom_killed()) << wait.err();
  EXPECT_EQ(wait.result().signal(), SIGKILL);
  EXPECT_EQ(wait.result().exit_code(), 128 + SIGKILL);
  EXPECT_THAT(wait.err(), HasSubstr("OOM killer"));
  EXPECT_THAT(wait.err(), HasSubstr("256 MiB"));
  EXPECT_TRUE(events.WaitFor("OOM killer", absl::Seconds(5))) << events.All();

  // The other VM filled its memory too, and lives.
  ASSERT_TRUE(WaitForFileToContain(roomy.stdout_path(), "GUEST-MEMHOG-FULL", absl::Seconds(120)))
      << ReadFile(roomy.stdout_path());
  driverpb::InspectTaskResponse inspect;
  ASSERT_TRUE(harness_->Inspect(roomy_task.id(), &inspect).ok());
  EXPECT_EQ(inspect.task().state(), driverpb::RUNNING);
  auto record = DriverStateRecord::Decode(roomy_handle.driver_state());
  ASSERT_TRUE(record.ok());
  const uint64_t peak = std::stoull(Trimmed(record->cgroup.Dir("memory") +
                                            (record->cgroup.version == CgroupVersion::kV1 ? "/memory.max_usage_in_bytes"
                                                                                          : "/memory.peak")));
  EXPECT_GT(peak, 256u * kMiB) << "QEMU used more than the guest's RAM: the overhead is needed";
  EXPECT_LT(peak, 384u * kMiB);
  ASSERT_TRUE(harness_->Stop(roomy_task.id(), absl::Seconds(20)).ok());
  ASSERT_TRUE(harness_->Wait(roomy_task.id(), &wait, absl::Seconds(10)).ok());
  EXPECT_FALSE(wait.result().oom_killed());
  EXPECT_EQ(wait.result().exit_code(), 0) << wait.err();
  (void)capped_handle;
}

TEST_F(IsolationTest, WithoutCgroupPermissionTheFingerprintAndLogSaySo) {
  // The same plugin run as nobody: it may not create cgroups.
  TempDir nobody_dir;
  std::filesystem::permissions(nobody_dir.path(), std::filesystem::perms::all);
  nomadplugin::LaunchOptions options;
  options.binary = "/usr/bin/setpriv";
  options.args = {"--reuid=65534", "--regid=65534", "--clear-groups", NDQ_PLUGIN_BINARY};
  options.env["TMPDIR"] = nobody_dir.path();
  auto plugin = nomadplugin::PluginProcess::Launch(options);
  ASSERT_TRUE(plugin.ok()) << plugin.status();
  nomadplugin::DriverClient client((*plugin)->channel(), absl::Seconds(30));
  ASSERT_TRUE(client.SetConfig({{"cgroup_parent", "ndq-test-nobody"}}).ok());
  auto context = client.NewContext(absl::Seconds(30));
  auto reader = client.driver().Fingerprint(context.get(), {});
  driverpb::FingerprintResponse response;
  ASSERT_TRUE(reader->Read(&response));
  context->TryCancel();
  reader->Finish();
  const auto& attributes = response.attributes();
  ASSERT_TRUE(attributes.count("driver.qemu.cgroups"));
  EXPECT_EQ(attributes.at("driver.qemu.cgroups").string_val(), "unavailable");
  EXPECT_THAT(attributes.at("driver.qemu.cgroups.reason").string_val(), HasSubstr("Permission denied"));
  EXPECT_TRUE((*plugin)->WaitForStderrLine(
      [](const std::string& line) { return line.find("VMs run without cgroup resource limits") != std::string::npos; },
      absl::Seconds(5)));
}

TEST_F(IsolationTest, VmsRunWithoutCgroupsWhereTheyCannotBeMade) {
  // A parent that cannot be created (its own parent is missing): the driver
  // reports it and runs the VM anyway, unconfined.
  harness_.reset();
  plugin_config_["cgroup_parent"] = "ndq-test-missing/child";
  ASSERT_NO_FATAL_FAILURE(harness_ = std::make_unique<PluginHarness>(state_dir_, plugin_config_));
  const auto attributes = FingerprintAttributes(*harness_);
  EXPECT_EQ(attributes.at("driver.qemu.cgroups"), "unavailable");
  EXPECT_THAT(attributes.at("driver.qemu.cgroups.reason"), HasSubstr("ndq-test-missing/child"));
  FakeAlloc alloc("unconfined");
  driverpb::TaskConfig task = GuestTask(alloc, "guest.qcow2");
  const driverpb::TaskHandle handle = Start(task);
  ASSERT_TRUE(WaitForFileToContain(alloc.stdout_path(), "GUEST-READY", kGuestBootTimeout));
  auto record = DriverStateRecord::Decode(handle.driver_state());
  ASSERT_TRUE(record.ok());
  EXPECT_EQ(record->cgroup.version, CgroupVersion::kNone);
  EXPECT_THAT(CgroupsUnder("ndq-test-missing"), IsEmpty());
  ASSERT_TRUE(harness_->Stop(task.id(), absl::Seconds(20)).ok());
}

// A network namespace with a veth pair to the host, as Nomad's bridge
// networking gives an allocation (minus the bridge).
class NetworkNamespace {
 public:
  NetworkNamespace() : name_("ndq-test-" + std::to_string(::getpid())) {
    // Addresses from the pid, so parallel runs do not collide.
    const int subnet = 16 + ::getpid() % 200;
    host_ip_ = "10.231." + std::to_string(subnet) + ".1";
    ns_ip_ = "10.231." + std::to_string(subnet) + ".2";
    const std::string veth = "ndq" + std::to_string(::getpid() % 100000);
    RunCommand({"/sbin/ip", "netns", "del", name_}, absl::Seconds(10)).IgnoreError();
    Run({"/sbin/ip", "netns", "add", name_});
    Run({"/sbin/ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name_});
    Run({"/sbin/ip", "addr", "add", host_ip_ + "/30", "dev", veth});
    Run({"/sbin/ip", "link", "set", veth, "up"});
    Exec({"ip", "addr", "add", ns_ip_ + "/30", "dev", "eth0"});
    Exec({"ip", "link", "set", "eth0", "up"});
    Exec({"ip", "link", "set", "lo", "up"});
  }
  ~NetworkNamespace() { RunCommand({"/sbin/ip", "netns", "del", name_}, absl::Seconds(10)).IgnoreError(); }

  std::string path() const { return "/var/run/netns/" + name_; }
  const std::string& ns_ip() const { return ns_ip_; }

  // Runs a command inside the namespace; its output, or "" when it failed.
  std::string Exec(std::vector<std::string> argv) const {
    argv.insert(argv.begin(), {"/sbin/ip", "netns", "exec", name_});
    auto out = RunCommand(argv, absl::Seconds(20));
    return out.ok() && out->exit_code == 0 ? out->output : "";
  }

 private:
  std::string name_, host_ip_, ns_ip_;
};

TEST_F(IsolationTest, GroupNetworkModeServesInsideTheAllocationsNamespaceOnly) {
  NetworkNamespace netns;
  EventRecorder events(harness_->client());
  FakeAlloc alloc("bridged");
  driverpb::TaskConfig task = GuestTask(alloc, "guest.qcow2", {{"port_map", {{{"http", 80}}}}});
  // Nomad's bridge mode: host port `value` is NATed to the namespace's `to`.
  const int to = 8080;
  AddGroupPort(&task, "http", FreePort(), to);
  task.mutable_network_isolation_spec()->set_mode(driverpb::NetworkIsolationSpec::GROUP);
  task.mutable_network_isolation_spec()->set_path(netns.path());
  const driverpb::TaskHandle handle = Start(task);
  ASSERT_TRUE(WaitForFileToContain(alloc.stdout_path(), "GUEST-READY", kGuestBootTimeout));
  EXPECT_TRUE(events.WaitFor("network namespace " + netns.path(), absl::Seconds(5))) << events.All();

  const std::string page = "nomad-driver-qemu test guest";
  const std::string inside = "http://127.0.0.1:" + std::to_string(to) + "/";
  EXPECT_THAT(netns.Exec({"/usr/bin/curl", "-s", "--max-time", "10", inside}), HasSubstr(page));
  // Through the veth, as traffic NATed by Nomad arrives.
  auto via_veth = RunCommand(
      {"/usr/bin/curl", "-s", "--max-time", "10", "http://" + netns.ns_ip() + ":" + std::to_string(to) + "/"},
      absl::Seconds(20));
  ASSERT_TRUE(via_veth.ok());
  EXPECT_THAT(via_veth->output, HasSubstr(page));
  // Nothing listens in the host's namespace.
  auto on_host = RunCommand({"/usr/bin/curl", "-s", "--max-time", "5", inside}, absl::Seconds(20));
  ASSERT_TRUE(on_host.ok());
  EXPECT_NE(on_host->exit_code, 0) << "port " << to << " must not be open on the host: " << on_host->output;

  ASSERT_TRUE(harness_->Stop(task.id(), absl::Seconds(20)).ok());
  driverpb::WaitTaskResponse wait;
  ASSERT_TRUE(harness_->Wait(task.id(), &wait, absl::Seconds(10)).ok());
  EXPECT_EQ(wait.result().exit_code(), 0) << wait.err();
  (void)handle;
}

TEST_F(IsolationTest, MissingNetworkNamespaceIsRefusedLeavingNothing) {
  FakeAlloc alloc("nons");
  driverpb::TaskConfig task = GuestTask(alloc, "guest.qcow2");
  task.mutable_network_isolation_spec()->set_mode(driverpb::NetworkIsolationSpec::GROUP);
  task.mutable_network_isolation_spec()->set_path("/var/run/netns/ndq-test-does-not-exist");
  const grpc::Status status = harness_->Start(task, nullptr);
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(status.error_message(), HasSubstr("network namespace \"/var/run/netns/ndq-test-does-not-exist\""));
  EXPECT_THAT(status.error_message(), HasSubstr("No such file or directory"));
  // A file that is not a namespace is refused too.
  task.mutable_network_isolation_spec()->set_path("/etc/hostname");
  const grpc::Status not_ns = harness_->Start(task, nullptr);
  EXPECT_THAT(not_ns.error_message(), HasSubstr("is not a network namespace"));
  EXPECT_TRUE(ProcessesMentioning(state_dir_).empty());
  EXPECT_THAT(::ndq::testing::VmStateLeft(state_dir_), IsEmpty());
  EXPECT_THAT(CgroupsUnder(harness_->cgroup_parent()), IsEmpty());
}

}  // namespace
}  // namespace ndq
