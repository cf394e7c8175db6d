#!/usr/bin/env bash
# Installs what is needed, builds, and runs the whole test suite twice: a normal
# build, then one with AddressSanitizer and UndefinedBehaviorSanitizer; then
# every libFuzzer target for 60 s (scripts/fuzz.sh).
# Set NDQ_SKIP_SANITIZERS=1 to run only the normal build.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

# The test VM images are built once and cached (see tests/fixtures/README.md).
bash tests/fixtures/build-test-guest.sh >/dev/null

scripts/build.sh build
ctest --test-dir build --output-on-failure -j "$(nproc)"

if [ "${NDQ_SKIP_SANITIZERS:-0}" != 1 ]; then
  scripts/build.sh build-asan -DNDQ_SANITIZE=ON
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build-asan --output-on-failure -j "$(nproc)"
  # Every parser of untrusted input under libFuzzer, 60 s each (clang).
  scripts/fuzz.sh 60
fi
