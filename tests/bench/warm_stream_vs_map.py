#!/usr/bin/env python3
"""Warm starts, the two ways QEMU 7.2 can restore a saved VM, side by side
(plain QEMU under TCG and the test guest, no driver):

  stream: the RAM in the migration stream (anonymous memory; the whole state
          file is read back at restore);
  map:    the RAM in a memory-backend-file saved with x-ignore-shared; the
          restore maps it copy-on-write (share=off) and reads only the device
          state (what the driver does, src/vm/warm_start.cc).

Prints the state size, the median state-load time and StartTask-like
"QEMU start -> guest page" time over N restores each.
Usage: tests/bench/warm_stream_vs_map.py [N]   (the test guest must be built)
"""
import json, os, shutil, socket, statistics, subprocess, sys, tempfile, time, urllib.request

GUEST = os.path.join(os.environ.get("TEST_GUEST_DIR", os.path.expanduser("~/.cache/nomad-driver-qemu/test-guest")),
                     "guest.qcow2")
MEM = 256


def qmp(path, deadline):
    s = socket.socket(socket.AF_UNIX)
    while True:
        try:
            s.connect(path)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.002)
    f = s.makefile("rw")
    f.readline()

    def cmd(name, **args):
        f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        f.flush()
        while True:
            reply = json.loads(f.readline())
            if "return" in reply or "error" in reply:
                return reply
    cmd("qmp_capabilities")
    return cmd


def page(port, deadline):
    while time.time() < deadline:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
        except Exception:
            time.sleep(0.005)
    raise SystemExit("the guest did not answer")


def qemu(work, port, disk, ram=None, share="on", extra=()):
    argv = ["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", f"{MEM}M", "-nographic", "-serial", "null",
            "-monitor", "none", "-drive", f"file={disk},format=qcow2,if=virtio",
            "-chardev", f"socket,id=q,path={work}/q{port}.sock,server=on,wait=off", "-mon", "chardev=q,mode=control",
            "-netdev", f"user,id=user.0,hostfwd=tcp:127.0.0.1:{port}-:80", "-device", "virtio-net,netdev=user.0"]
    if ram:
        argv += ["-object", f"memory-backend-file,id=ram0,size={MEM}M,mem-path={ram},share={share}",
                 "-machine", "memory-backend=ram0"]
    return subprocess.Popen(argv + list(extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def overlay(backing, path):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, path], check=True)


def migrated(cmd):
    while cmd("query-migrate")["return"].get("status") != "completed":
        time.sleep(0.001)


def take(work, kind, port):
    disk = f"{work}/{kind}-cold.qcow2"
    overlay(GUEST, disk)
    ram = None
    if kind == "map":
        ram = f"{work}/live.ram"
        open(ram, "wb").truncate(MEM << 20)
    p = qemu(work, port, disk, ram)
    cmd = qmp(f"{work}/q{port}.sock", time.time() + 10)
    page(port, time.time() + 120)
    cmd("stop")
    if kind == "map":
        cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
    cmd("migrate", uri=f"exec:cat > {work}/{kind}.state")
    migrated(cmd)
    shutil.copyfile(disk, f"{work}/{kind}.qcow2")
    if ram:
        shutil.copyfile(ram, f"{work}/{kind}.ram")
    p.terminate()
    p.wait()


def restore(work, kind, port):
    disk = f"{work}/r{port}.qcow2"
    overlay(f"{work}/{kind}.qcow2", disk)
    started = time.time()
    ram = f"{work}/{kind}.ram" if kind == "map" else None
    p = qemu(work, port, disk, ram, "off", ["-incoming", "defer"])
    cmd = qmp(f"{work}/q{port}.sock", started + 10)
    if kind == "map":
        cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
    load = time.time()
    cmd("migrate-incoming", uri=f"exec:cat {work}/{kind}.state")
    migrated(cmd)
    loaded = time.time()
    cmd("cont")
    page(port, started + 30)
    answered = time.time()
    p.terminate()
    p.wait()
    return loaded - load, answered - started


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    work = tempfile.mkdtemp(prefix="ndq-warm-bench-")
    try:
        port = 19100
        for kind in ("stream", "map"):
            take(work, kind, port)
            port += 1
        results = {"stream": [], "map": []}
        for _ in range(n):
            for kind in ("stream", "map"):
                results[kind].append(restore(work, kind, port))
                port += 1
        print(f"{'restore':<8} {'state file':>12} {'load (median)':>14} {'start->page (median)':>21}")
        for kind, runs in results.items():
            size = os.path.getsize(f"{work}/{kind}.state")
            print(f"{kind:<8} {size / 1024:>9.0f} KiB {1000 * statistics.median(r[0] for r in runs):>11.0f} ms"
                  f" {1000 * statistics.median(r[1] for r in runs):>18.0f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
