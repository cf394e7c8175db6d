#include "qemu/network_plan.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_join.h"

namespace ndq {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using ::testing::Pair;

class PlanNetwork : public ::testing::Test {
 protected:
  // Problems joined, as PlanVm reports them.
  std::string Plan() {
    spec_ = VmSpec{};
    std::vector<std::string> problems;
    PlanNetworkMode(config_, plugin_, spec_, problems);
    return absl::StrJoin(problems, "; ");
  }
  void Bridge(const std::string& bridge) {
    config_.network_mode = "bridge";
    config_.bridge = bridge;
  }

  TaskConfig config_;
  PluginConfig plugin_;
  VmSpec spec_;
};

TEST_F(PlanNetwork, UserIsTheDefault) {
  EXPECT_EQ(Plan(), "");
  EXPECT_FALSE(spec_.network.enabled);
  config_.network_mode = "user";
  EXPECT_EQ(Plan(), "");
  EXPECT_FALSE(spec_.network.enabled);
}

TEST_F(PlanNetwork, UnknownModeIsRefused) {
  config_.network_mode = "host";
  EXPECT_EQ(Plan(), "task config \"network_mode\": \"host\" is not supported; use \"user\" or \"bridge\"");
}

TEST_F(PlanNetwork, BridgeNeedsAnAllowlist) {
  Bridge("br0");
  EXPECT_THAT(Plan(), AllOf(HasSubstr("task config \"network_mode\""), HasSubstr("bridges_allowlist is empty")));
}

TEST_F(PlanNetwork, AllowedBridge) {
  plugin_.bridges_allowlist = {"br0", "virbr1"};
  Bridge("virbr1");
  config_.port_map = {{"http", 80}, {"ssh", 22}};
  EXPECT_EQ(Plan(), "");
  EXPECT_TRUE(spec_.network.enabled);
  EXPECT_EQ(spec_.network.bridge, "virbr1");
  // port_map names guest ports only: nothing is forwarded from the host.
  EXPECT_THAT(spec_.network.guest_ports, ElementsAre(Pair("http", 80), Pair("ssh", 22)));
  EXPECT_THAT(spec_.port_forwards, IsEmpty());
  EXPECT_FALSE(spec_.network.advertise_address);
}

TEST_F(PlanNetwork, TheOnlyAllowedBridgeIsTheDefault) {
  plugin_.bridges_allowlist = {"br0"};
  config_.network_mode = "bridge";
  EXPECT_EQ(Plan(), "");
  EXPECT_EQ(spec_.network.bridge, "br0");
  plugin_.bridges_allowlist = {"br0", "br1"};
  EXPECT_EQ(Plan(), "task config \"bridge\" must be set with network_mode = \"bridge\": this client allows \"br0\", \"br1\"");
}

// The same words whether or not the host has such an interface: the job
// learns nothing about the host's other interfaces.
TEST_F(PlanNetwork, BridgeOutsideTheAllowlistIsRefusedWithoutProbingTheHost) {
  plugin_.bridges_allowlist = {"br0"};
  for (const std::string name : {"lo", "docker0", "nosuchbr9"}) {
    Bridge(name);
    EXPECT_EQ(Plan(), "task config \"bridge\": \"" + name + "\" is not in the plugin's bridges_allowlist \"br0\"");
    EXPECT_EQ(spec_.network.bridge, "");
  }
}

TEST_F(PlanNetwork, BridgeNameRules) {
  plugin_.bridges_allowlist = {"br0"};
  for (const std::string& name : {std::string(""), std::string("br0,script=/x"), std::string("a/b"), std::string("br 0"),
                                  std::string("."), std::string(".."), std::string(16, 'b'), std::string("br0\n"),
                                  std::string(10000, 'x')}) {
    Bridge(name);
    const std::string problems = Plan();
    EXPECT_THAT(problems, AllOf(HasSubstr("task config \"bridge\""), HasSubstr("is not an interface name")))
        << "name: " << name.substr(0, 20);
    EXPECT_LT(problems.size(), 200u) << "a long name is cut short";
  }
  Bridge(std::string(15, 'b'));
  plugin_.bridges_allowlist = {std::string(15, 'b')};
  EXPECT_EQ(Plan(), "");
}

TEST_F(PlanNetwork, AdvertiseAddressNeedsTheGuestAgent) {
  plugin_.bridges_allowlist = {"br0"};
  Bridge("br0");
  config_.advertise_address = true;
  EXPECT_EQ(Plan(), "task config \"advertise_address\": needs guest_agent = true (the guest's address is read from its "
                    "guest agent)");
  config_.guest_agent = true;
  EXPECT_EQ(Plan(), "");
  EXPECT_TRUE(spec_.network.advertise_address);
  EXPECT_EQ(spec_.network.advertise_timeout_ms, kDefaultAdvertiseTimeoutMs);
}

TEST_F(PlanNetwork, AdvertiseTimeout) {
  plugin_.bridges_allowlist = {"br0"};
  Bridge("br0");
  config_.guest_agent = true;
  config_.advertise_address = true;
  config_.advertise_timeout = "90s";
  EXPECT_EQ(Plan(), "");
  EXPECT_EQ(spec_.network.advertise_timeout_ms, 90000);
  for (const char* bad : {"0s", "-1s", "11m", "soon", ""}) {
    config_.advertise_timeout = bad;
    EXPECT_THAT(Plan(), HasSubstr("task config \"advertise_timeout\"")) << bad;
  }
  config_.advertise_address = false;
  config_.advertise_timeout = "90s";
  EXPECT_EQ(Plan(), "task config \"advertise_timeout\": only with advertise_address = true");
}

TEST_F(PlanNetwork, BridgeOptionsNeedBridgeMode) {
  plugin_.bridges_allowlist = {"br0"};
  config_.bridge = "br0";
  config_.guest_agent = true;
  config_.advertise_address = true;
  config_.advertise_timeout = "1m";
  const std::string problems = Plan();
  EXPECT_THAT(problems, AllOf(HasSubstr("task config \"bridge\": only with network_mode = \"bridge\""),
                              HasSubstr("task config \"advertise_address\": only with network_mode = \"bridge\""),
                              HasSubstr("task config \"advertise_timeout\": only with network_mode = \"bridge\"")));
  EXPECT_FALSE(spec_.network.enabled);
}

TEST_F(PlanNetwork, GuestPortsMustBePorts) {
  plugin_.bridges_allowlist = {"br0"};
  Bridge("br0");
  config_.port_map = {{"http", 0}, {"big", 70000}, {"ok", 443}};
  const std::string problems = Plan();
  EXPECT_THAT(problems, AllOf(HasSubstr("port \"http\" maps to guest port 0"), HasSubstr("port \"big\""),
                              Not(HasSubstr("\"ok\""))));
  EXPECT_THAT(spec_.network.guest_ports, ElementsAre(Pair("ok", 443)));
}

// boot_ready_port watches a host port forward, which bridge mode has not.
TEST_F(PlanNetwork, BootReadyPortNeedsTheUserNetwork) {
  plugin_.bridges_allowlist = {"br0"};
  Bridge("br0");
  config_.port_map = {{"http", 80}};
  config_.boot_timeout = "60s";
  config_.boot_ready_port = "http";
  EXPECT_THAT(Plan(), HasSubstr("task config \"boot_ready_port\": not with network_mode = \"bridge\""));
  config_.boot_ready_port.reset();
  EXPECT_EQ(Plan(), "");
}

TEST(PluginConfigBridges, InterfaceNames) {
  EXPECT_TRUE(IsInterfaceName("br0"));
  EXPECT_TRUE(IsInterfaceName("virbr-1.2_x"));
  EXPECT_TRUE(IsInterfaceName(std::string(15, 'a')));
  EXPECT_FALSE(IsInterfaceName(std::string(16, 'a')));
  EXPECT_FALSE(IsInterfaceName(""));
  EXPECT_FALSE(IsInterfaceName("."));
  EXPECT_FALSE(IsInterfaceName("a:b"));
  EXPECT_FALSE(IsInterfaceName("a/b"));
}

}  // namespace
}  // namespace ndq
