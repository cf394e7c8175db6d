// bench: operating a running VM, side by side in one run on one test guest
// with the real qemu-ga (guest-qga.qcow2), 50 rounds each:
//   - guest-ping round trip (the agent's cheapest call; the baseline)
//   - guest-exec of `true` + its status, straight on the agent's socket
//   - ExecTask of `true` through the plugin over gRPC (what a script check costs)
// Median and p95 in milliseconds.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "../support/guest_task.h"
#include "../support/plugin_harness.h"
#include "../support/test_guest.h"
#include "qemu/guest_exec.h"
#include "qemu/guest_agent_client.h"

namespace ndq {
namespace {
namespace driverpb = hashicorp::nomad::plugins::drivers::proto;

constexpr int kRounds = 50;

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())))];
}

void Row(const std::string& what, const std::vector<double>& ms) {
  std::printf("%-56s %10.2f %10.2f  ms\n", what.c_str(), Percentile(ms, 0.5), Percentile(ms, 0.95));
}

template <typename F>
std::vector<double> Time(F&& round) {
  std::vector<double> ms;
  for (int i = 0; i < kRounds; ++i) {
    const absl::Time start = absl::Now();
    if (!round()) return {};
    ms.push_back(absl::ToDoubleMilliseconds(absl::Now() - start));
  }
  return ms;
}

int Run() {
  absl::StatusOr<std::string> guests = testing::TestGuestDir();
  if (!guests.ok()) {
    std::fprintf(stderr, "operate_bench: %s\n", std::string(guests.status().message()).c_str());
    return 1;
  }
  testing::TempDir state;
  testing::PluginHarness harness(state.path() + "/s", {{"image_paths", {*guests}}});
  testing::FakeAlloc alloc("vm");
  const driverpb::TaskHandle handle = testing::StartTestGuest(harness, alloc, *guests + "/guest-qga.qcow2",
                                                              testing::FreePort(), {{"guest_agent", true}});
  const DriverStateRecord record = testing::RecordOf(handle);

  std::vector<double> ping, direct_exec;
  {
    // Straight on the socket, before the plugin holds it (QEMU serves one client).
    auto agent = GuestAgentClient::Connect(record.guest_agent_socket, absl::Seconds(30));
    if (!agent.ok()) {
      std::fprintf(stderr, "operate_bench: %s\n", std::string(agent.status().message()).c_str());
      return 1;
    }
    ping = Time([&] { return (*agent)->Ping().ok(); });
    direct_exec = Time([&] {
      absl::StatusOr<GuestExec> exec = GuestExec::Start(**agent, GuestExecRequest{{"true"}, {}, "", true});
      return exec.ok() && exec->Wait(absl::Now() + absl::Seconds(30)).ok();
    });
  }
  std::vector<double> grpc_exec = Time([&] {
    auto context = harness.client().NewContext(absl::Seconds(30));
    driverpb::ExecTaskRequest request;
    request.set_task_id(handle.config().id());
    request.add_command("true");
    driverpb::ExecTaskResponse response;
    return harness.driver().ExecTask(context.get(), request, &response).ok() && response.result().exit_code() == 0;
  });
  harness.Destroy(handle.config().id(), true);
  if (ping.empty() || direct_exec.empty() || grpc_exec.empty()) {
    std::fprintf(stderr, "operate_bench: a round failed\n");
    return 1;
  }
  std::printf("\n%-56s %10s %10s\n", "operate_bench (50 rounds, real qemu-ga in the test guest)", "median", "p95");
  Row("guest-ping round trip (baseline)", ping);
  Row("guest-exec `true` + status, on the agent's socket", direct_exec);
  Row("ExecTask `true` through the plugin (gRPC)", grpc_exec);
  return 0;
}

}  // namespace
}  // namespace ndq

int main() { return ndq::Run(); }
