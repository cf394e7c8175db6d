#!/usr/bin/python3
"""A small HTTP(S) server for the fetcher tests, with fault modes.

Usage: http_test_server.py --root DIR [--tls-cert CERT.pem --tls-key KEY.pem] [--bind ADDR]
Listens on 127.0.0.1 (or ADDR), an ephemeral port, which it prints on stdout (one line).

Paths (REST is a file path under --root; query strings are kept):
  /REST                         the file, with Range support (bytes=N- and bytes=N-M)
  /status/CODE-then-200/REST    answers CODE to the first `times` requests (query, default 2), then the file
  /status/CODE/REST             always CODE
  /drop/REST                    first request: full Content-Length, half the body, connection closed
  /stall/REST                   headers and 100 bytes, then nothing (until the server stops, <= 120 s)
  /redirect/REST                302 to /REST
  /redirect-loop                302 to itself
  /redirect-to?url=URL          302 to URL (percent-encoded in the query; any URL, any scheme)
  ?norange=1                    ignore Range headers (answer 200 with the whole file)
  ?chunked=1                    chunked encoding, no Content-Length
  ?rate=N                       send about N bytes per second (N/10 every 100 ms)
  /_log                         JSON lines {"method","path","range"} of every request so far (not itself)
"""

import argparse
import json
import os
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

LOCK = threading.Lock()
LOG = []
COUNTS = {}
STOP = threading.Event()


def query_value(path, name, default):
    return parse_qs(urlsplit(path).query).get(name, [default])[0]


def query_flag(path, name):
    return query_value(path, name, "0") == "1"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ndq-test-server"

    def log_message(self, fmt, *args):  # quiet
        pass

    def _simple(self, code, body=b"", headers=None):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        parts = urlsplit(self.path)
        path = parts.path
        query = parse_qs(parts.query)
        if path == "/_log":
            with LOCK:
                body = "".join(json.dumps(e) + "\n" for e in LOG).encode()
            self._simple(200, body, {"Content-Type": "application/json"})
            return
        with LOCK:
            LOG.append({"method": self.command, "path": self.path, "range": self.headers.get("Range", "")})
            COUNTS[self.path] = COUNTS.get(self.path, 0) + 1
            count = COUNTS[self.path]
        norange = query.get("norange", ["0"])[0] == "1"

        if path == "/redirect-to":
            self._simple(302, b"redirecting\n", {"Location": query.get("url", [""])[0]})
            return
        if path == "/redirect-loop":
            self._simple(302, b"", {"Location": "/redirect-loop"})
            return
        if path.startswith("/redirect/"):
            target = path[len("/redirect"):]
            if parts.query:
                target += "?" + parts.query
            self._simple(302, b"", {"Location": target})
            return
        if path.startswith("/status/"):
            rest = path[len("/status/"):]
            spec, _, file_path = rest.partition("/")
            if spec.endswith("-then-200"):
                code = int(spec[: -len("-then-200")])
                times = int(query.get("times", ["2"])[0])
                if count <= times:
                    self._simple(code, b"injected failure\n")
                    return
            else:
                self._simple(int(spec), b"injected status\n")
                return
            self._serve("/" + file_path, norange=norange)
            return
        if path.startswith("/drop/"):
            self._serve(path[len("/drop"):], norange=norange, drop=(count == 1))
            return
        if path.startswith("/stall/"):
            self._serve(path[len("/stall"):], norange=norange, stall=True)
            return
        self._serve(path, norange=norange)

    def _serve(self, rel, norange=False, drop=False, stall=False):
        root = self.server.root
        full = os.path.realpath(os.path.join(root, rel.lstrip("/")))
        if not full.startswith(root + os.sep) or not os.path.isfile(full):
            self._simple(404, b"not found\n")
            return
        size = os.path.getsize(full)
        start, end = 0, size - 1
        code = 200
        rng = self.headers.get("Range")
        if rng and not norange and rng.startswith("bytes="):
            a, _, b = rng[len("bytes="):].partition("-")
            try:
                start = int(a)
                end = int(b) if b else size - 1
            except ValueError:
                self._simple(400, b"bad range\n")
                return
            if start >= size or end < start:
                self._simple(416, b"", {"Content-Range": "bytes */%d" % size})
                return
            end = min(end, size - 1)
            code = 206
        length = end - start + 1
        chunked = query_flag(self.path, "chunked")
        rate = int(query_value(self.path, "rate", "0"))
        self.send_response(code)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if code == 206:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, size))
        self.end_headers()
        if self.command == "HEAD":
            return
        send = length
        if drop:
            send = length // 2
        if stall:
            send = min(100, length)
        with open(full, "rb") as f:
            if not chunked and not rate:
                if send > 0:
                    self.connection.sendfile(f, start, send)
            else:
                f.seek(start)
                step = max(1, rate // 10) if rate else 65536
                while send > 0:
                    piece = f.read(min(step, send))
                    send -= len(piece)
                    if chunked:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    else:
                        self.wfile.write(piece)
                    if rate:
                        time.sleep(0.1)  # pacing to `rate` bytes per second
                if chunked and not (drop or stall):
                    self.wfile.write(b"0\r\n\r\n")
        if stall:
            STOP.wait(120)
        if drop or stall:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    tls = None

    def finish_request(self, request, client_address):
        if self.tls is not None:
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return  # e.g. the client refused our certificate
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):
        pass  # clients hanging up mid-body are part of the tests


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--bind", default="127.0.0.1")
    args = ap.parse_args()
    server = Server((args.bind, 0), Handler)
    server.root = os.path.realpath(args.root)
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        server.tls = ctx
    sys.stdout.write("%d\n" % server.server_address[1])
    sys.stdout.flush()
    try:
        server.serve_forever()
    finally:
        STOP.set()


if __name__ == "__main__":
    main()
