// bench: network_mode = "bridge" in a namespace of its own (a bridge and
// dnsmasq, tests/support/bridge_netns.h), the test guest with the real
// qemu-ga and DHCP:
//   - StartTask with advertise_address, until it returns the guest's address
//     (boot + DHCP + the agent's report), median of kRuns
//   - StartTask in bridge mode without advertise_address, paused (-S): the
//     cost of the TAP itself beside QEMU's start
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "../support/bridge_netns.h"
#include "../support/plugin_harness.h"
#include "../support/test_guest.h"

namespace ndq {
namespace {
namespace driverpb = hashicorp::nomad::plugins::drivers::proto;

using testing::BridgeNetns;
using testing::FakeAlloc;
using testing::PluginHarness;
using testing::TempDir;

constexpr int kRuns = 3;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// Milliseconds each StartTask took; the address of the last one in `ip`.
std::vector<double> Starts(PluginHarness& harness, const std::string& image, const nlohmann::json& config,
                           std::string* ip) {
  std::vector<double> times;
  for (int i = 0; i < kRuns; ++i) {
    FakeAlloc alloc("vm");
    alloc.AddOverlay(image);
    const auto task = alloc.Task(config);
    auto context = harness.client().NewContext();
    driverpb::StartTaskRequest request;
    *request.mutable_task() = task;
    driverpb::StartTaskResponse response;
    const absl::Time start = absl::Now();
    const grpc::Status status = harness.driver().StartTask(context.get(), request, &response);
    times.push_back(absl::ToDoubleMilliseconds(absl::Now() - start));
    if (!status.ok()) std::fprintf(stderr, "start failed: %s\n", status.error_message().c_str());
    *ip = response.network_override().addr();
    (void)harness.Destroy(task.id(), true);
  }
  return times;
}

void Row(const char* what, const std::vector<double>& ms) {
  std::printf("%-58s median %7.0f ms  (min %.0f, max %.0f, %d runs)\n", what, Median(ms),
              *std::min_element(ms.begin(), ms.end()), *std::max_element(ms.begin(), ms.end()), kRuns);
}

int Main() {
  absl::StatusOr<std::string> guests = testing::TestGuestDir();
  if (!guests.ok()) {
    std::fprintf(stderr, "bridge_bench: %s\n", std::string(guests.status().message()).c_str());
    return 1;
  }
  BridgeNetns netns;
  if (!netns.ok()) return 1;
  TempDir state;
  nlohmann::json plugin = {{"image_paths", {*guests}}, {"bridges_allowlist", {"br0"}}, {"args_allowlist", {"-fw_cfg", "-S"}}};
  PluginHarness harness(state.path() + "/s", plugin, netns.Exec({}));
  const nlohmann::json base = {{"image_path", "local/disk.qcow2"}, {"accelerator", "tcg"}, {"drive_interface", "virtio"},
                               {"guest_agent", true},             {"network_mode", "bridge"}};
  nlohmann::json advertised = base;
  advertised["advertise_address"] = true;
  advertised["args"] = {"-fw_cfg", "name=opt/guest/net,string=dhcp"};
  nlohmann::json paused = base;
  paused["args"] = {"-S"};
  std::string ip;
  std::printf("bridge networking (guest-qga.qcow2, TCG, DHCP from dnsmasq)\n");
  Row("StartTask -> advertised guest address", Starts(harness, *guests + "/guest-qga.qcow2", advertised, &ip));
  std::printf("  last address: %s\n", ip.c_str());
  Row("StartTask, bridge mode, paused VM (-S): TAP + QEMU up", Starts(harness, *guests + "/guest-qga.qcow2", paused, &ip));
  return 0;
}

}  // namespace
}  // namespace ndq

int main() { return ndq::Main(); }
