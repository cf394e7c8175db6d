#!/usr/bin/env bash
# Builds the installed Abseil's synchronization libraries with ThreadSanitizer
# and prints the directory that holds them (for -DNDQ_TSAN_ABSL_LIBDIR).
#
# Why: Debian's libabsl is not instrumented, so under TSan absl::Mutex's lock and
# unlock are invisible and every field it guards would be reported as a race.
# Built with -fsanitize=thread, Abseil compiles in its TSan mutex annotations.
# The source is Debian's own source package of the installed version (same
# patches, same options.h, so the same ABI) plus one upstream TSan fix. Only the
# `synchronization` target and the libraries it depends on are built (92 steps,
# about 1 CPU-minute; 2-4 minutes on the loaded 2-core dev machine).
#
# Cached per machine in ${NDQ_CACHE_DIR:-~/.cache/nomad-driver-qemu}/absl-tsan/,
# keyed by the package version, clang's version and this script: a cache hit
# prints the path at once. Safe to run concurrently (flock).
set -euo pipefail
script="$(readlink -f "$0")"

pkg=libabsl-dev
src_pkg="$(dpkg-query -W -f='${source:Package}' "$pkg")"
src_version="$(dpkg-query -W -f='${source:Version}' "$pkg")"
clang_version="$(clang++ --version | head -n1)"
key="$(printf '%s\n' "$src_pkg" "$src_version" "$clang_version" | cat - "$script" | sha256sum | cut -c1-16)"

root="${NDQ_CACHE_DIR:-$HOME/.cache/nomad-driver-qemu}/absl-tsan"
out="$root/$src_version-$key"
if [ -f "$out/.stamp" ]; then
  echo "$out/lib"
  exit 0
fi

mkdir -p "$root"
exec 9>"$root/.lock"
flock 9
if [ -f "$out/.stamp" ]; then
  echo "$out/lib"
  exit 0
fi

work="$(mktemp -d "$root/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# apt-get source with a private source list and state, so the system's apt
# configuration is left as it is (it has no deb-src lines).
. /etc/os-release
cat >"$work/sources.list" <<EOF
deb-src http://deb.debian.org/debian $VERSION_CODENAME main
deb-src http://deb.debian.org/debian $VERSION_CODENAME-updates main
deb-src http://deb.debian.org/debian-security $VERSION_CODENAME-security main
EOF
mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial"
apt_opts=(-q -o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/nonexistent
  -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache" -o APT::Sandbox::User=root)
echo "build-tsan-absl: fetching $src_pkg $src_version source" >&2
apt-get "${apt_opts[@]}" update >/dev/null
(cd "$work" && apt-get "${apt_opts[@]}" source "$src_pkg=$src_version" >/dev/null)
srcdir="$(find "$work" -maxdepth 1 -type d -name "$src_pkg-*" | head -n1)"
[ -n "$srcdir" ] || { echo "build-tsan-absl: no source tree unpacked" >&2; exit 1; }

# Abseil's own fix for a false report, from after this release: a thread's
# wait semaphore is handed between threads inside the Mutex code, which TSan is
# told to ignore, so TSan must not track the semaphore's accesses either
# (upstream commit bb7be494, "absl: fix Mutex TSan annotations").
(cd "$srcdir" && git apply) <<'EOF'
--- a/absl/synchronization/mutex.cc
+++ b/absl/synchronization/mutex.cc
@@ -562,10 +562,15 @@
 void Mutex::IncrementSynchSem(Mutex *mu, PerThreadSynch *w) {
   if (mu) {
     ABSL_TSAN_MUTEX_PRE_DIVERT(mu, 0);
-  }
-  PerThreadSem::Post(w->thread_identity());
-  if (mu) {
+    // We miss synchronization around passing PerThreadSynch between threads
+    // since it happens inside of the Mutex code, so we need to ignore all
+    // accesses to the object.
+    ABSL_ANNOTATE_IGNORE_READS_AND_WRITES_BEGIN();
+    PerThreadSem::Post(w->thread_identity());
+    ABSL_ANNOTATE_IGNORE_READS_AND_WRITES_END();
     ABSL_TSAN_MUTEX_POST_DIVERT(mu, 0);
+  } else {
+    PerThreadSem::Post(w->thread_identity());
   }
 }
 
EOF

echo "build-tsan-absl: building Abseil's synchronization libraries with TSan" >&2
# As Debian builds it (C++17, shared, no NDEBUG), plus TSan. $ORIGIN: the
# libraries find each other here rather than the system's copies.
# -Bsymbolic-functions: their calls to inline functions and templates (e.g.
# call_once's CallOnceImpl) stay on their own instrumented copies instead of
# binding to the same symbol exported by an uninstrumented system libabsl_*
# loaded earlier, which would hide that synchronization from TSan.
flags="-O2 -g -fsanitize=thread"
CC=clang CXX=clang++ cmake -S "$srcdir" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=None \
  -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_CXX_STANDARD=17 -DABSL_PROPAGATE_CXX_STD=ON -DBUILD_SHARED_LIBS=ON \
  "-DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=thread -Wl,-Bsymbolic-functions" -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON \
  '-DCMAKE_INSTALL_RPATH=$ORIGIN' >/dev/null
ninja -C "$work/build" -j "$(nproc)" synchronization >"$work/ninja.log" || {
  tail -n 40 "$work/ninja.log" >&2
  exit 1
}

mkdir -p "$work/out/lib"
find "$work/build/absl" -name 'libabsl_*.so.*' -exec cp -a {} "$work/out/lib/" \;
[ -e "$work/out/lib/libabsl_synchronization.so.${src_version%%.*}" ] || {
  echo "build-tsan-absl: libabsl_synchronization.so.${src_version%%.*} was not built" >&2
  exit 1
}
printf '%s %s\n%s\n' "$src_pkg" "$src_version" "$clang_version" >"$work/out/.stamp"
rm -rf "$out"
mv "$work/out" "$out"
echo "$out/lib"
