#!/usr/bin/env bash
# The quick start: installs what is needed, builds the three programs it runs
# (the plugin, its per-VM supervisor, qemu-driverctl: no tests), builds the small test VM,
# then drives the plugin the way a Nomad client does: info, fingerprint, and a
# VM started, its web page fetched through the mapped host port, and a
# graceful stop.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The test VM (mostly downloads) is built while the programs compile.
guest_list="$(mktemp /tmp/ndq-demo-guest.XXXXXX)"
bash tests/fixtures/build-test-guest.sh >"$guest_list" &
guest_pid=$!
# -O2 without debug info: the programs as fast as CI's, built in about half the time.
scripts/build.sh build -DNDQ_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O2 -DNDEBUG"
wait "$guest_pid" || { echo "demo: building the test VM failed" >&2; exit 1; }
guest_images="$(cat "$guest_list")"
rm -f "$guest_list"
guest_dir="$(dirname "$(echo "$guest_images" | head -n1)")"

demo="$(mktemp -d /tmp/ndq-demo.XXXXXX)"
trap 'rm -rf "$demo"' EXIT
mkdir -p "$demo/alloc/web/local"
# The task's disk: a copy-on-write overlay on the cached test guest.
qemu-img create -q -f qcow2 -F qcow2 -b "$guest_dir/guest.qcow2" "$demo/alloc/web/local/disk.qcow2"
# The overlay's backing file lives in the guest cache: allow that directory.
printf '{"emulators_allowlist": ["x86_64"], "image_paths": ["%s"], "state_dir": "%s/state"}\n' \
  "$guest_dir" "$demo" >"$demo/plugin.json"

echo "== what the plugin tells Nomad (PluginInfo, Capabilities)"
build/bin/qemu-driverctl info | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({k: d[k] for k in ("plugin_info", "capabilities")}, indent=2))'
echo "== fingerprint (node attributes for job constraints)"
build/bin/qemu-driverctl --config "$demo/plugin.json" fingerprint
echo "== a VM through its whole life"
build/bin/qemu-driverctl --config "$demo/plugin.json" run examples/demo-task.json \
  --alloc-dir "$demo/alloc" --check-http http --kill-timeout 10
