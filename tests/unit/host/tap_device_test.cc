// host/tap_device against the real kernel, in a network namespace of the
// test's own (entered by one thread with setns, so the host's interfaces are
// never touched). Needs root, like the driver's bridge mode.
#include "host/tap_device.h"
#include "base/error_kind.h"

#include <fcntl.h>
#include <sched.h>
#include <unistd.h>

#include <functional>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "host/run_command.h"

namespace ndq {
namespace {

using ::testing::HasSubstr;

bool Ip(const std::vector<std::string>& args, std::string* output = nullptr) {
  std::vector<std::string> argv = {"/usr/sbin/ip"};
  argv.insert(argv.end(), args.begin(), args.end());
  absl::StatusOr<CommandResult> out = RunCommand(argv, absl::Seconds(30));
  if (output != nullptr && out.ok()) *output = out->output;
  return out.ok() && out->exit_code == 0;
}

class TapDeviceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0 || ::access("/dev/net/tun", R_OK | W_OK) != 0) GTEST_SKIP() << "needs root and /dev/net/tun";
    ASSERT_TRUE(Ip({"netns", "add", ns_}));
    made_ = true;
    ASSERT_TRUE(Ip({"-n", ns_, "link", "add", "br0", "type", "bridge"}));
    ASSERT_TRUE(Ip({"-n", ns_, "link", "set", "br0", "mtu", "1400"}));
  }
  void TearDown() override {
    if (made_) Ip({"netns", "del", ns_});
  }

  // Runs `body` on a thread that has entered the namespace.
  void InNetns(const std::function<void()>& body) {
    std::thread thread([&] {
      const int fd = ::open(("/run/netns/" + ns_).c_str(), O_RDONLY | O_CLOEXEC);
      ASSERT_GE(fd, 0);
      ASSERT_EQ(::setns(fd, CLONE_NEWNET), 0);
      ::close(fd);
      body();
    });
    thread.join();
  }
  std::string Link(const std::string& name) {
    std::string out;
    Ip({"-n", ns_, "-o", "link", "show", "dev", name}, &out);
    return out;
  }

  std::string ns_ = absl::StrCat("ndqtap", ::getpid());
  bool made_ = false;
};

TEST_F(TapDeviceTest, NameIsShortAndStable) {
  EXPECT_EQ(TapName("0123456789abcdef"), "ndq0123456789ab");
  EXPECT_EQ(TapName("0123456789abcdef").size(), 15u);
}

TEST_F(TapDeviceTest, TapIsAttachedUpAndGoneWithItsFd) {
  InNetns([&] {
    absl::StatusOr<UniqueFd> tap = CreateBridgedTap("ndqtest0", "br0");
    ASSERT_TRUE(tap.ok()) << tap.status();
    const std::string link = Link("ndqtest0");
    EXPECT_THAT(link, HasSubstr("master br0"));
    EXPECT_THAT(link, HasSubstr("mtu 1400")) << "the bridge's MTU";
    EXPECT_THAT(link, HasSubstr(",UP"));
    // A second TAP of the name is refused, not attached to the first.
    absl::StatusOr<UniqueFd> again = CreateBridgedTap("ndqtest0", "br0");
    EXPECT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists);
    // Held open: DeleteTap leaves it (QEMU would still be using it).
    EXPECT_FALSE(DeleteTap("ndqtest0").ok());
    EXPECT_TRUE(InterfaceExists("ndqtest0"));
    tap->reset();
    EXPECT_FALSE(InterfaceExists("ndqtest0")) << "not persistent: the last close removes it";
  });
}

TEST_F(TapDeviceTest, BridgeMustExistAndBeABridge) {
  InNetns([&] {
    absl::StatusOr<UniqueFd> missing = CreateBridgedTap("ndqtest1", "nosuch0");
    EXPECT_THAT(std::string(missing.status().message()), HasSubstr("bridge \"nosuch0\" (from the plugin's "
                                                                   "bridges_allowlist) does not exist"));
    absl::StatusOr<UniqueFd> not_bridge = CreateBridgedTap("ndqtest1", "lo");
    EXPECT_THAT(std::string(not_bridge.status().message()), HasSubstr("\"lo\" (from the plugin's "
                                                                      "bridges_allowlist) is not a bridge"));
    EXPECT_EQ(KindOf(missing.status()), ErrorKind::kBadConfig) << "the operator's list, not a passing fault";
    EXPECT_EQ(KindOf(not_bridge.status()), ErrorKind::kBadConfig);
    EXPECT_FALSE(InterfaceExists("ndqtest1")) << "a failed attach leaves no TAP";
  });
}

TEST_F(TapDeviceTest, DeleteTapRemovesOnlyALeftoverTap) {
  ASSERT_TRUE(Ip({"-n", ns_, "tuntap", "add", "mode", "tap", "name", "ndqleft0"}));  // persistent
  InNetns([&] {
    EXPECT_TRUE(DeleteTap("ndqleft0").ok());
    EXPECT_FALSE(InterfaceExists("ndqleft0"));
    EXPECT_TRUE(DeleteTap("ndqnone0").ok()) << "nothing to remove is fine";
    EXPECT_FALSE(DeleteTap("br0").ok()) << "not a TAP";
    EXPECT_TRUE(InterfaceExists("br0"));
  });
}

}  // namespace
}  // namespace ndq
