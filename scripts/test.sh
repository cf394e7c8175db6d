#!/usr/bin/env bash
# Installs what is needed, builds, and runs the whole test suite three times:
#   build       the normal build (the system compiler, gcc);
#   build-asan  clang with AddressSanitizer + UndefinedBehaviorSanitizer, and
#               -Wthread-safety checking every lock annotation; it also holds
#               the libFuzzer targets (NDQ_FUZZ);
#   build-tsan  clang with ThreadSanitizer (see scripts/build-tsan-absl.sh);
# then every libFuzzer target for 30 s (scripts/fuzz.sh, in build-asan).
# Each sanitizer tree is built while the previous tree's tests run.
# Set NDQ_SKIP_SANITIZERS=1 to run only the normal build.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --tests

# The test VM images are built once and cached (see tests/fixtures/README.md).
bash tests/fixtures/build-test-guest.sh >/dev/null

t0=$SECONDS
phase() { echo "test.sh: $1 ($((SECONDS - t0)) s)"; }
jobs_n="$(nproc)"

# Runs a build command in the background, its output in DIR/ci-build.log (shown
# if it fails). It gets only the CPU the tests leave idle, so their timing is as
# if they ran alone: nice 19, and as it runs in a session of its own (so that an
# early exit can stop all of it, see the trap), its scheduler autogroup too.
bg_pid=""
build_in_background() {
  local dir="$1"
  shift
  mkdir -p "$dir"
  setsid bash -c 'echo 19 >/proc/self/autogroup 2>/dev/null; exec nice -n 19 "$@"' _ "$@" \
    >"$dir/ci-build.log" 2>&1 &
  bg_pid=$!
}
wait_for_background() {
  local dir="$1" rc=0
  wait "$bg_pid" || rc=$?
  bg_pid=""
  if ((rc != 0)); then
    cat "$dir/ci-build.log"
    echo "test.sh: building $dir failed" >&2
    exit "$rc"
  fi
  phase "built $dir"
}
trap '[ -z "$bg_pid" ] || kill -TERM -- "-$bg_pid" 2>/dev/null || true' EXIT

scripts/build.sh build -DNDQ_BUILD_TESTS=ON
phase "built build"
if [ "${NDQ_SKIP_SANITIZERS:-0}" = 1 ]; then
  ctest --test-dir build --output-on-failure -j "$jobs_n"
  phase "tested build"
  exit 0
fi

clang=(-DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++)
# Slow tests of the guest's or the host's own behaviour (firmware refusing an
# unsigned kernel, the kernel's CPU accounting of a busy vCPU): their code
# paths are the same as other tests', so the sanitizer trees skip them and the
# normal build alone runs them.
sanitizer_skip='SecureBootBootsSignedAndRefusesUnsigned|StatsShowABusyVcpuAsAboutOneCore'
build_in_background build-asan scripts/build.sh build-asan "${clang[@]}" -DNDQ_SANITIZE=ON -DNDQ_FUZZ=ON
ctest --test-dir build --output-on-failure -j "$jobs_n"
phase "tested build"
wait_for_background build-asan

build_in_background build-tsan bash -c \
  'set -e; absl="$(scripts/build-tsan-absl.sh)"; scripts/build.sh build-tsan "$@" -DNDQ_TSAN_ABSL_LIBDIR="$absl"' \
  _ "${clang[@]}" -DNDQ_TSAN=ON
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build-asan --output-on-failure -j "$jobs_n" -E "$sanitizer_skip"
phase "tested build-asan"
wait_for_background build-tsan

# TSan reports of every process (the plugins and supervisors the tests start
# too, whose exit status a test may not look at) go to files; any file fails the run.
reports="$PWD/build-tsan/tsan-reports"
rm -rf "$reports"
mkdir -p "$reports"
chmod 1777 "$reports"  # some tests run the plugin as an unprivileged user
# clang 14's TSan cannot place its shadow memory when the kernel randomizes
# mmap with more than 28 bits (newer kernels' default on some systems); the
# usual remedy is to run without address-space randomization there.
no_aslr=()
if (($(cat /proc/sys/vm/mmap_rnd_bits 2>/dev/null || echo 28) > 28)); then no_aslr=(setarch "$(uname -m)" -R); fi
tsan_rc=0
TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 log_path=$reports/tsan suppressions=$PWD/tests/tsan.supp" \
  "${no_aslr[@]}" ctest --test-dir build-tsan --output-on-failure -j "$jobs_n" -E "$sanitizer_skip" || tsan_rc=$?
phase "tested build-tsan"
if compgen -G "$reports/tsan.*" >/dev/null; then
  for report in "$reports"/tsan.*; do
    echo "=== $report"
    cat "$report"
  done
  echo "test.sh: ThreadSanitizer reported the problems above" >&2
  exit 1
fi
((tsan_rc == 0)) || exit "$tsan_rc"

# Every parser of untrusted input under libFuzzer, 30 s each (clang).
NDQ_FUZZ_BUILD_DIR=build-asan scripts/fuzz.sh 30
phase "fuzzed"
