#!/usr/bin/env bash
# Installs the Debian 12 packages this project needs. Quick when they are
# already there: apt runs only for what is missing.
#   scripts/setup.sh          what it takes to build and run the plugin (the demo)
#   scripts/setup.sh --tests  that, and what the test suite adds (scripts/test.sh)
# The test VM's own packages (busybox, syslinux, ...) are installed by
# tests/fixtures/build-test-guest.sh when it builds the VM.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config git curl python3 openssl ca-certificates
  # every compile goes through it (scripts/build.sh): a rebuild takes seconds
  ccache
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
  libcurl4-openssl-dev libssl-dev nlohmann-json3-dev libspdlog-dev
  qemu-system-x86 qemu-utils
  # the cloud-init seed image (src/image/seed_iso.cc)
  libisofs-dev
  # xxHash: the checksums of warm-start templates (XXH3, memory speed)
  libxxhash-dev
)
TEST_PACKAGES=(
  libgtest-dev libgmock-dev
  # the real guest agent, run on the host by the guest-exec tests (the package only
  # adds a systemd unit: nothing starts here)
  qemu-guest-agent
  # UEFI firmware (OVMF) for VMs that boot with UEFI or Secure Boot
  ovmf
  # a TPM per VM (tpm = true): the swtpm emulator the supervisor starts, and its tools
  swtpm swtpm-tools
  # the tests read the seed image back with cloud-init's NoCloud code, and with
  # fuseiso where the kernel has no iso9660 (cloud-init's package only adds
  # service links: nothing starts without systemd or sysvinit)
  cloud-init fuseiso
  # the sanitizer and fuzz builds (scripts/test.sh): clang, its sanitizer
  # runtimes and libFuzzer; dpkg-dev unpacks Abseil's source for the TSan build
  clang libclang-rt-14-dev libfuzzer-14-dev dpkg-dev
  # network namespace tests (ip netns, veth)
  iproute2
  # the bridge-networking test's DHCP server (dnsmasq-base: the binary only, no
  # service that would start on the host)
  dnsmasq-base
)
case "${1:-}" in
  "") ;;
  --tests) PACKAGES+=("${TEST_PACKAGES[@]}") ;;
  *) echo "usage: scripts/setup.sh [--tests]" >&2; exit 2 ;;
esac

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
