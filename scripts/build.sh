#!/usr/bin/env bash
# Configures and builds one build tree. Usage: scripts/build.sh [DIR] [extra cmake args...]
# With ccache installed (scripts/test.sh installs it) every compile goes through
# it: its cache is in the home directory (~/.cache/ccache), so a new clone at the
# same path rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-build}"
shift || true
launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  # Paths under the checkout are hashed relative to it.
  export CCACHE_BASEDIR="$PWD"
  # Debug info names the build dir; another checkout of the same tree still hits.
  export CCACHE_NOHASHDIR=1
fi
cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "${launcher[@]}" "$@" >/dev/null
ninja -C "$dir" -j "$(nproc)"
