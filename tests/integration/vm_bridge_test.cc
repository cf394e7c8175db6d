// network_mode = "bridge" end to end: in a network namespace the test makes
// (a bridge with an address and dnsmasq serving DHCP on it) the real plugin
// makes a TAP on the bridge, QEMU gets it as an fd, the test guest (real
// qemu-ga, DHCP on) gets a lease, and StartTask returns that address as the
// driver network. The TAP goes with the VM, also after a plugin kill +
// recovery. Hostile options are refused before any TAP exists.
#include <arpa/inet.h>
#include <signal.h>
#include <unistd.h>

#include <filesystem>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../support/bridge_netns.h"
#include "../support/event_recorder.h"
#include "../support/guest_task.h"
#include "../support/plugin_harness.h"
#include "../support/temp_dir.h"
#include "../support/test_guest.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "host/run_command.h"
#include "host/tap_device.h"
#include "vm/start_pipeline.h"

namespace ndq {
namespace {

using ::ndq::testing::BridgeNetns;
using ::ndq::testing::kBridge;
using ::ndq::testing::InSubnet;
using ::ndq::testing::EventRecorder;
using ::ndq::testing::FakeAlloc;
using ::ndq::testing::Guest;
using ::ndq::testing::PluginHarness;
using ::ndq::testing::ProcessesMentioning;
using ::ndq::testing::TempDir;
using ::ndq::testing::TestGuestDir;
using ::ndq::testing::WaitUntil;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using json = nlohmann::json;

// How many of `pid`'s fds are open on /dev/net/tun (a TAP).
int TunFds(pid_t pid) {
  int count = 0;
  std::error_code ignored;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ignored)) {
    std::error_code error;
    if (std::filesystem::read_symlink(entry.path(), error) == "/dev/net/tun") ++count;
  }
  return count;
}

class VmBridgeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(TestGuestDir().ok()) << TestGuestDir().status();
    ASSERT_TRUE(netns_.ok());
    plugin_config_["image_paths"] = {*TestGuestDir()};
    plugin_config_["bridges_allowlist"] = {kBridge, "ghost0"};
    plugin_config_["args_allowlist"] = {"-fw_cfg"};
    state_dir_ = state_.path() + "/s";
    harness_ = std::make_unique<PluginHarness>(state_dir_, plugin_config_,
                                               netns_.Exec({}));  // nsenter ... -- <plugin>
  }
  void TearDown() override {
    ::ndq::testing::KillVmsUnder(state_dir_);
    harness_.reset();
  }

  // The test guest with the real qemu-ga and DHCP on eth0, on the bridge.
  static json BridgeConfig(const json& extra = json::object()) {
    json config = {{"image_path", "local/disk.qcow2"},
                   {"accelerator", "tcg"},
                   {"drive_interface", "virtio"},
                   {"graceful_shutdown", true},
                   {"guest_agent", true},
                   {"network_mode", "bridge"},
                   {"bridge", kBridge},
                   {"advertise_address", true},
                   {"advertise_timeout", "60s"},  // a broken DHCP fails the test in a minute, not two
                   {"port_map", {{{"http", 80}}}},
                   {"args", {"-fw_cfg", "name=opt/guest/net,string=dhcp"}}};
    for (const auto& [key, value] : extra.items()) config[key] = value;
    return config;
  }

  grpc::Status Start(const driverpb::TaskConfig& task, driverpb::StartTaskResponse* response) {
    auto context = harness_->client().NewContext();
    driverpb::StartTaskRequest request;
    *request.mutable_task() = task;
    return harness_->driver().StartTask(context.get(), request, response);
  }

  // Interfaces named like the driver's TAPs, in the namespace.
  std::string DriverTaps() const {
    std::string taps;
    for (absl::string_view line : absl::StrSplit(netns_.Links(), '\n')) {
      if (absl::StrContains(line, ": ndq")) absl::StrAppend(&taps, line, "\n");
    }
    return taps;
  }

  BridgeNetns netns_;
  TempDir state_;
  std::string state_dir_;
  json plugin_config_ = json::object();
  std::unique_ptr<PluginHarness> harness_;
};

TEST_F(VmBridgeTest, GuestAddressIsAdvertisedAndTheTapGoesWithTheVm) {
  EventRecorder events(harness_->client());
  FakeAlloc alloc("bridged");
  alloc.AddOverlay(Guest("guest-qga.qcow2"));
  const driverpb::TaskConfig task = alloc.Task(BridgeConfig());
  const std::string tap = TapName(TaskKey(task.id()));
  driverpb::StartTaskResponse started;
  const grpc::Status status = Start(task, &started);
  ASSERT_TRUE(status.ok()) << status.error_message() << "\nserial console:\n"
                           << ::ndq::testing::ReadFile(alloc.stdout_path());

  // The driver network: the guest's lease on the bridge's subnet, port_map's guest ports.
  const driverpb::NetworkOverride& network = started.network_override();
  const std::string ip = network.addr();
  EXPECT_TRUE(InSubnet(ip)) << ip;
  EXPECT_TRUE(network.auto_advertise());
  ASSERT_EQ(network.port_map().count("http"), 1u);
  EXPECT_EQ(network.port_map().at("http"), 80);
  EXPECT_TRUE(events.WaitFor(task.id(), "Guest address " + ip + " on bridge br0", absl::Seconds(5)));
  EXPECT_TRUE(events.WaitFor(task.id(), "attached to bridge br0 through TAP " + tap, absl::Seconds(5)));

  // The guest's page answers at its own address from inside the namespace.
  EXPECT_THAT(netns_.Curl("http://" + ip + "/"), HasSubstr("hello from the nomad-driver-qemu test guest"));
  EXPECT_EQ(netns_.Curl("http://" + ip + "/ip"), ip + "\n");
  // The TAP is on the bridge while the VM runs, and QEMU holds its only fd:
  // the plugin and the supervisor closed theirs, so the TAP ends with QEMU.
  EXPECT_THAT(netns_.Ports(kBridge), HasSubstr(" " + tap + ":"));
  const DriverStateRecord record = ::ndq::testing::RecordOf(started.handle());
  EXPECT_EQ(TunFds(record.qemu_pid), 1);
  EXPECT_EQ(TunFds(record.supervisor_pid), 0);
  EXPECT_EQ(TunFds(harness_->process().pid()), 0);

  driverpb::InspectTaskResponse inspected;
  ASSERT_TRUE(harness_->Inspect(task.id(), &inspected).ok());
  EXPECT_EQ(inspected.network_override().addr(), ip);
  EXPECT_EQ(inspected.driver().attributes().at("tap"), tap);

  ASSERT_TRUE(harness_->Stop(task.id(), absl::Seconds(20)).ok());
  EXPECT_TRUE(WaitUntil([&] { return !netns_.HasLink(tap); }, absl::Seconds(5))) << netns_.Links();
  ASSERT_TRUE(harness_->Destroy(task.id(), true).ok());
  EXPECT_EQ(DriverTaps(), "");

  // A second VM: the plugin is killed while it runs, a new one recovers it
  // from the handle alone and still reports the address; the TAP goes at stop.
  FakeAlloc alloc2("bridged2");
  alloc2.AddOverlay(Guest("guest-qga.qcow2"));
  const driverpb::TaskConfig task2 = alloc2.Task(BridgeConfig());
  const std::string tap2 = TapName(TaskKey(task2.id()));
  driverpb::StartTaskResponse started2;
  ASSERT_TRUE(Start(task2, &started2).ok());
  const std::string ip2 = started2.network_override().addr();
  EXPECT_TRUE(InSubnet(ip2)) << ip2;
  EXPECT_TRUE(netns_.HasLink(tap2));

  harness_->process().Signal(SIGKILL);
  ASSERT_TRUE(harness_->process().WaitExit(absl::Seconds(10)).ok());
  EXPECT_TRUE(netns_.HasLink(tap2)) << "the VM, and its TAP, outlive the plugin";
  harness_->Restart();
  ASSERT_TRUE(harness_->Recover(started2.handle()).ok());
  driverpb::InspectTaskResponse recovered;
  ASSERT_TRUE(harness_->Inspect(task2.id(), &recovered).ok());
  EXPECT_EQ(recovered.network_override().addr(), ip2);
  EXPECT_EQ(recovered.network_override().port_map().at("http"), 80);
  EXPECT_THAT(netns_.Curl("http://" + ip2 + "/ip"), ip2 + "\n");

  ASSERT_TRUE(harness_->Stop(task2.id(), absl::Seconds(20)).ok());
  EXPECT_TRUE(WaitUntil([&] { return !netns_.HasLink(tap2); }, absl::Seconds(5))) << netns_.Links();
  ASSERT_TRUE(harness_->Destroy(task2.id(), true).ok());
  EXPECT_EQ(DriverTaps(), "");
}

// Each refused at once with the field named; no TAP, no process, no state.
TEST_F(VmBridgeTest, HostileBridgeOptionsLeaveNothingBehind) {
  FakeAlloc alloc("hostile");
  alloc.AddOverlay(Guest("guest-qga.qcow2"));
  struct Case {
    json extra;
    std::vector<std::string> expected;
  };
  const std::vector<Case> cases = {
      // br1 exists in the namespace, nosuch9 does not: the same words.
      {{{"bridge", "br1"}}, {"task config \"bridge\": \"br1\" is not in the plugin's bridges_allowlist"}},
      {{{"bridge", "nosuch9"}}, {"task config \"bridge\": \"nosuch9\" is not in the plugin's bridges_allowlist"}},
      {{{"bridge", "br0,script=/tmp/x"}}, {"task config \"bridge\"", "is not an interface name"}},
      {{{"bridge", std::string(16, 'b')}}, {"task config \"bridge\"", "is not an interface name"}},
      {{{"bridge", "../../etc"}}, {"task config \"bridge\"", "is not an interface name"}},
      {{{"guest_agent", false}}, {"task config \"advertise_address\": needs guest_agent = true"}},
      {{{"network_mode", "user"}}, {"task config \"bridge\": only with network_mode = \"bridge\""}},
      {{{"network_mode", "tap"}}, {"task config \"network_mode\": \"tap\" is not supported"}},
      // Allowed by the operator but missing on the host: refused when the TAP would be made.
      {{{"bridge", "ghost0"}}, {"bridge \"ghost0\" (from the plugin's bridges_allowlist) does not exist"}},
      // QEMU runs and the TAP exists, but the guest cannot boot and lease in
      // a second: the start fails at the address wait and undoes everything.
      {{{"advertise_timeout", "1s"}},
       {"task config \"advertise_address\": the guest reported no IPv4 address for its NIC", "advertise_timeout"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.extra.dump());
    driverpb::StartTaskResponse response;
    const grpc::Status status = Start(alloc.Task(BridgeConfig(c.extra)), &response);
    ASSERT_FALSE(status.ok());
    for (const std::string& part : c.expected) EXPECT_THAT(status.error_message(), HasSubstr(part));
    // A failed start has reaped its supervisor; QEMU's TAP goes with QEMU.
    EXPECT_TRUE(WaitUntil([&] { return DriverTaps().empty(); }, absl::Seconds(5))) << DriverTaps();
    EXPECT_THAT(ProcessesMentioning(state_dir_), IsEmpty());
    EXPECT_THAT(netns_.Ports(kBridge), Not(HasSubstr("ndq")));
    EXPECT_THAT(::ndq::testing::VmStateLeft(state_dir_), IsEmpty()) << "no task state left";
  }
}

}  // namespace
}  // namespace ndq
