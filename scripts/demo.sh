#!/usr/bin/env bash
# The quick start: installs what is needed, builds, then launches the plugin the
# way a Nomad client does and shows what it tells Nomad about this host.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh build

echo "== plugin info, schemas and capabilities (PluginInfo, ConfigSchema, TaskConfigSchema, Capabilities)"
build/bin/qemu-driverctl info
echo "== fingerprint (what job constraints can match on)"
build/bin/qemu-driverctl --config examples/plugin-config.json fingerprint
