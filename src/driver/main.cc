// nomad-driver-qemu: the plugin binary the Nomad client agent launches.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "nomadplugin/hclog.h"
#include "nomadplugin/serve.h"
#include "driver/driver_service.h"

namespace {

constexpr char kLogLevelEnv[] = "NOMAD_DRIVER_QEMU_LOG_LEVEL";

int Usage() {
  std::fprintf(stderr,
               "usage: nomad-driver-qemu [--log-level trace|debug|info|warn|error] [--version]\n"
               "Nomad starts this plugin itself; see README.md. The log level can also be set\n"
               "with %s.\n",
               kLogLevelEnv);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  nomadplugin::PrepareProcessSignals();
  std::string level_name = std::getenv(kLogLevelEnv) != nullptr ? std::getenv(kLogLevelEnv) : "debug";
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--version") == 0) {
      std::printf("nomad-driver-qemu %s\n", ndq::kPluginVersion);
      return 0;
    }
    if (std::strcmp(argv[i], "--log-level") == 0 && i + 1 < argc) {
      level_name = argv[++i];
      continue;
    }
    return Usage();
  }
  spdlog::level::level_enum level;
  if (!nomadplugin::hclog::ParseLevel(level_name, &level)) {
    std::fprintf(stderr, "nomad-driver-qemu: unknown log level \"%s\"\n", level_name.c_str());
    return Usage();
  }
  nomadplugin::hclog::Init(ndq::kPluginName, level);

  nomadplugin::Lifecycle lifecycle;
  ndq::DriverSettings settings;
  const char* path = std::getenv("PATH");
  ndq::Fingerprinter fingerprinter(path != nullptr ? path : "", "/dev/kvm");
  ndq::TaskManagerOptions task_options;
  task_options.supervisor_path = ndq::DefaultSupervisorPath();
  ndq::EventBus events;
  ndq::TaskManager tasks(
      task_options, [&settings] { return settings.plugin_config(); }, &fingerprinter, &events);
  // Host probing and cache upkeep run once configured, off every RPC's path.
  ndq::BasePluginService base(&settings, [&tasks] { tasks.Prepare(); });
  ndq::DriverService driver(&settings, &fingerprinter, &tasks, &events, &lifecycle);

  nomadplugin::ServeOptions options;
  options.plugin_name = "nomad-driver-qemu";
  options.services = {&base, &driver};
  options.lifecycle = &lifecycle;
  return nomadplugin::Serve(options);
}
