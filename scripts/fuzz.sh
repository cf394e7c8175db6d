#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz) with clang in build-fuzz and runs
# each for SECONDS, two at a time. Usage: scripts/fuzz.sh SECONDS [TARGET...]
#
# Each target starts from a scratch copy of tests/fuzz/corpus/<target> (the
# repository is not modified); its log is build-fuzz/logs/<target>.log and its
# grown corpus stays in build-fuzz/corpus/<target> until the next run. Crash,
# leak, timeout and out-of-memory inputs go to build-fuzz/artifacts/ (those of
# an earlier run are moved to build-fuzz/artifacts/previous/). Reproduce one
# with: build-fuzz/bin/<target> build-fuzz/artifacts/<file>
# The last line is "fuzz: N targets, M crashes"; the exit status is 1 when M > 0.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ] || ! [[ "$1" =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ]; then
  echo "usage: scripts/fuzz.sh SECONDS [TARGET...]" >&2
  exit 2
fi
seconds="$1"
shift
start=$(date +%s)

scripts/setup.sh --tests
missing=()
# libclang-rt-14-dev (the sanitizer runtimes) is only a recommendation of clang's.
for pkg in clang libfuzzer-14-dev libclang-rt-14-dev; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "fuzz: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# NDQ_FUZZ_BUILD_DIR names a tree already configured with -DNDQ_FUZZ=ON (the
# paths above are then under it): scripts/test.sh passes its clang ASan tree.
build="${NDQ_FUZZ_BUILD_DIR:-build-fuzz}"
all_targets=(fuzz_plugin_config fuzz_task_config fuzz_port_map fuzz_qmp fuzz_guest_agent fuzz_checksum
             fuzz_image_probe fuzz_parse_size)
targets=("${@:-${all_targets[@]}}")

if [ -z "${NDQ_FUZZ_BUILD_DIR:-}" ]; then
  CC=clang CXX=clang++ cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DNDQ_FUZZ=ON -DNDQ_BUILD_TESTS=OFF >/dev/null
fi
ninja -C "$build" -j "$(nproc)" "${targets[@]}"

artifacts="$build/artifacts"
logs="$build/logs"
corpora="$build/corpus"
mkdir -p "$artifacts/previous" "$logs" "$corpora"
find "$artifacts" -maxdepth 1 -type f -exec mv -t "$artifacts/previous" {} +

run_target() {
  local t="$1" corpus="$corpora/$1" dict=()
  rm -rf "$corpus"
  mkdir -p "$corpus"
  cp -r "tests/fuzz/corpus/$t/." "$corpus/"
  [ -f "tests/fuzz/$t.dict" ] && dict=("-dict=tests/fuzz/$t.dict")
  local rc=0
  "$build/bin/$t" "${dict[@]}" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$artifacts/$t-" "$corpus" >"$logs/$t.log" 2>&1 || rc=$?
  echo "$rc" >"$logs/$t.rc"
}

# Two at a time: the machine has two cores.
parallel=2
running=0
for t in "${targets[@]}"; do
  if ((running >= parallel)); then
    wait -n || true
    running=$((running - 1))
  fi
  echo "fuzz: running $t for ${seconds}s"
  run_target "$t" &
  running=$((running + 1))
done
wait || true

crashes=0
printf '%-20s %10s %8s %8s %8s %8s  %s\n' target "execs/s" cov ft corpus runs result
for t in "${targets[@]}"; do
  log="$logs/$t.log"
  rc=$(cat "$logs/$t.rc" 2>/dev/null || echo 1)
  last=$(grep -E '^#[0-9]+' "$log" | grep -E 'cov: ' | tail -n 1 || true)
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
  eps=$(sed -nE 's/^stat::average_exec_per_sec:[[:space:]]*([0-9]+).*/\1/p' "$log" | tail -n 1)
  runs=$(sed -nE 's/^stat::number_of_executed_units:[[:space:]]*([0-9]+).*/\1/p' "$log" | tail -n 1)
  files=$(find "$corpora/$t" -type f | wc -l)
  found=$(find "$artifacts" -maxdepth 1 -type f -name "$t-*" ! -name "$t-slow-unit-*" | wc -l)
  if ((rc != 0 && found == 0)); then found=1; fi
  result=ok
  if ((found > 0)); then
    result="CRASH ($(grep -m1 -E '^SUMMARY:|ERROR: libFuzzer|==ERROR' "$log" || echo "exit $rc, see $log"))"
    crashes=$((crashes + found))
  fi
  printf '%-20s %10s %8s %8s %8s %8s  %s\n' "$t" "${eps:-?}" "${cov:-?}" "${ft:-?}" "$files" "${runs:-?}" "$result"
done
find "$artifacts" -maxdepth 1 -type f ! -name '*-slow-unit-*' -printf 'fuzz: artifact %p\n'
echo "fuzz: logs in $logs, took $(($(date +%s) - start))s"
echo "fuzz: ${#targets[@]} targets, $crashes crashes"
((crashes == 0))
