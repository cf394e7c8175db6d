#!/usr/bin/env python3
"""Re-record the QMP transcripts that qmp_client_test replays.

    tests/unit/qmp_transcripts/capture.py [IMAGEDIR]

Talks to a real qemu-system-x86_64 (TCG) and writes every line exactly as it
crossed the socket:

    -> LINE   sent to QEMU
    <- LINE   received from QEMU
    <-EOF     QEMU closed the connection

Lines starting with '#' are comments; in guest agent transcripts (*.qga) the
four characters \xff stand for the byte 0xFF. IMAGEDIR holds the test guest
images (default: what tests/fixtures/build-test-guest.sh prints); powerdown.qmp
needs a guest that reacts to the ACPI power button. guest_agent.qga comes from
the real qemu-ga (Debian package qemu-guest-agent) listening on a host unix
socket, with guest-shutdown blocked so nothing can power off this machine.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "..", "fixtures")
QEMU = "qemu-system-x86_64"


class Recorder:
    def __init__(self, path, argv):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.buf = b""
        self.lines = ["# QEMU command line: " + " ".join(argv)]
        self.next_id = 1

    def recv_line(self):
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                # What a reader sees when QEMU exits with unread input queued.
                chunk = b""
            if not chunk:
                if self.buf:
                    self.lines.append("<- " + self.buf.decode())
                self.lines.append("<-EOF")
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        line = line.rstrip(b"\r").decode()
        self.lines.append("<- " + line)
        return json.loads(line)

    def execute(self, command, arguments=None):
        msg = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        msg["id"] = self.next_id
        self.next_id += 1
        raw = json.dumps(msg)
        self.lines.append("-> " + raw)
        self.sock.sendall(raw.encode() + b"\n")
        while True:
            r = self.recv_line()
            if r is None or r.get("id") == msg["id"]:
                return r

    def until_eof(self):
        while self.recv_line() is not None:
            pass

    def save(self, name, comment, scrubs=()):
        save(self.lines, name, comment, scrubs)


def scrub(text, tmp, imagedir=None):
    text = text.replace(tmp, "$TMP")
    return text.replace(imagedir, "$IMAGEDIR") if imagedir else text


def start(tmp, extra):
    qmp = os.path.join(tmp, "qmp.sock")
    if os.path.exists(qmp):
        os.unlink(qmp)
    argv = [QEMU, "-machine", "accel=tcg", "-nodefaults", "-display", "none",
            "-qmp", "unix:%s,server=on,wait=off" % qmp] + extra
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    return proc, Recorder(qmp, argv)


def status_cycle(tmp):
    proc, r = start(tmp, ["-S"])
    try:
        r.recv_line()
        r.execute("qmp_capabilities")
        r.execute("query-status")
        r.execute("cont")
        r.execute("query-status")
        r.execute("stop")
        r.execute("query-status")
        r.execute("quit")
        r.until_eof()
        r.save("status_cycle.qmp", "prelaunch -> cont -> running -> stop -> paused -> quit",
               [(tmp, "$TMP")])
    finally:
        proc.kill()
        proc.wait()


def errors(tmp):
    proc, r = start(tmp, ["-S"])
    try:
        r.recv_line()
        r.execute("qmp_capabilities")
        r.execute("no-such-command")
        r.execute("system_reset", {"bogus": 1})
        r.execute("query-status")
        r.save("errors.qmp", "an unknown command, bad arguments, then a good command",
               [(tmp, "$TMP")])
    finally:
        proc.kill()
        proc.wait()


def powerdown(tmp, imagedir):
    console = os.path.join(tmp, "console.log")
    open(console, "w").close()
    proc, r = start(tmp, ["-m", "256", "-serial", "file:" + console,
                          "-drive", "file=%s,if=virtio,snapshot=on"
                          % os.path.join(imagedir, "guest.qcow2")])
    try:
        r.recv_line()
        r.execute("qmp_capabilities")
        deadline = time.monotonic() + 60
        while "GUEST-READY" not in open(console, errors="replace").read():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("guest never printed GUEST-READY")
            time.sleep(0.05)
        r.execute("query-status")
        r.execute("system_powerdown")
        r.until_eof()
        assert proc.wait(10) == 0
        r.save("powerdown.qmp",
               "test guest (guest.qcow2) after GUEST-READY: system_powerdown, "
               "the guest powers off", [(tmp, "$TMP"), (imagedir, "$IMAGEDIR")])
    finally:
        proc.kill()
        proc.wait()


def save(lines, name, comment, scrubs=()):
    text = "# %s\n" % comment + "\n".join(lines) + "\n"
    for old, new in scrubs:
        text = text.replace(old, new)
    with open(os.path.join(HERE, name), "w") as f:
        f.write(text)
    print("wrote", name)


class AgentRecorder:
    """Like Recorder, for the guest agent's byte stream (0xFF framing)."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.buf = b""
        self.lines = []

    @staticmethod
    def show(raw):
        return raw.decode("latin-1").replace("\xff", "\\xff")

    def send(self, raw):
        self.lines.append("-> " + self.show(raw))
        self.sock.sendall(raw + b"\n")

    def reply(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("qemu-ga closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        self.lines.append("<- " + self.show(line))
        return line

    def execute(self, command, arguments=None, delimited=False):
        msg = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        self.send((b"\xff" if delimited else b"") + json.dumps(msg).encode())
        line = self.reply()
        # qemu-ga answers the 0xFF itself with a parse error before the
        # delimited reply; record everything up to the sentinel.
        while delimited and not line.startswith(b"\xff"):
            line = self.reply()
        return json.loads(line.lstrip(b"\xff"))


def guest_agent(tmp):
    qga = "/usr/sbin/qemu-ga"
    if not os.path.exists(qga):
        print("skipping guest_agent.qga: install qemu-guest-agent to record it")
        return
    path = os.path.join(tmp, "qga.sock")
    argv = [qga, "-m", "unix-listen", "-p", path, "--block-rpcs=guest-shutdown",
            "-t", tmp, "-l", os.path.join(tmp, "qga.log")]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        r = AgentRecorder(path)
        r.lines.append("# " + " ".join(argv))
        r.execute("guest-sync-delimited", {"id": 123456789}, delimited=True)
        r.execute("guest-ping")
        r.execute("guest-info")
        r.execute("no-such-command")
        r.execute("guest-shutdown", {"mode": "powerdown"})
        r.execute("guest-sync-delimited", {"id": 42})
        version = subprocess.run([qga, "--version"], stdout=subprocess.PIPE, text=True).stdout.strip()
        r.lines.insert(0, "# " + version)
        save(r.lines, "guest_agent.qga", "real qemu-ga on a host unix socket (guest-shutdown blocked)",
               [(tmp, "$TMP")])
    finally:
        proc.kill()
        proc.wait()


def main():
    if len(sys.argv) > 1:
        imagedir = sys.argv[1]
    else:
        out = subprocess.run([os.path.join(FIXTURES, "build-test-guest.sh")], check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        imagedir = os.path.dirname(out.split()[0])
    with tempfile.TemporaryDirectory(prefix="qmp-capture.") as tmp:
        status_cycle(tmp)
        errors(tmp)
        powerdown(tmp, imagedir)
        guest_agent(tmp)


if __name__ == "__main__":
    main()
