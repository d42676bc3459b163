"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 endpoint (the moto server).

Every ``every``-th GET of an object (``/bucket/key``, path-style) meets the next fault of
``faults``, in turn:

- ``500`` / ``503``: an S3 error answer (``InternalError`` / ``SlowDown``) instead of the object;
- ``reset``: the connection is reset (RST) before any answer;
- ``slow``: the answer comes after ``delay`` seconds;
- ``truncate``: the headers promise the whole object, half the body arrives, then a reset.

Everything else is forwarded untouched. ``GET /__faultproxy__/stats`` answers JSON counters.
Run as a script (``python faultproxy.py --upstream URL --port N ...``); ``FaultProxy`` starts
and stops it from a test.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

FAULTS = ("500", "503", "reset", "slow", "truncate")
_ERRORS = {"500": ("InternalError", "We encountered an internal error."), "503": ("SlowDown", "Please reduce your request rate.")}


class _State:
    def __init__(self, upstream: str, every: int, faults: list[str], delay: float):
        parsed = urlparse(upstream)
        self.host, self.port = parsed.hostname, parsed.port
        self.every, self.faults, self.delay = every, faults, delay
        self.lock = threading.Lock()
        self.requests = 0
        self.object_gets = 0
        self.injected = {f: 0 for f in faults}

    def fault_for(self, method: str, path: str) -> str | None:
        bucket_and_key = urlparse(path).path.lstrip("/").split("/", 1)
        is_object_get = method == "GET" and len(bucket_and_key) == 2 and bucket_and_key[1] != ""
        with self.lock:
            self.requests += 1
            if not is_object_get:
                return None
            self.object_gets += 1
            if not self.faults or self.every <= 0 or self.object_gets % self.every:
                return None
            fault = self.faults[sum(self.injected.values()) % len(self.faults)]
            self.injected[fault] += 1
            return fault


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: _State

    def log_message(self, *args: object) -> None:
        pass

    def _body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size + 2)[:size]
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(chunk)
        length = int(self.headers.get("Content-Length", 0) or 0)
        return self.rfile.read(length) if length else None

    def _reset(self) -> None:
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _handle(self) -> None:
        if self.path == "/__faultproxy__/stats":
            data = json.dumps(
                {"requests": self.state.requests, "object_gets": self.state.object_gets, "injected": self.state.injected}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        body = self._body()
        fault = self.state.fault_for(self.command, self.path)
        if fault in _ERRORS:
            code, message = _ERRORS[fault]
            data = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'.encode()
            self.send_response(int(fault))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if fault == "reset":
            self._reset()
            return
        if fault == "slow":
            time.sleep(self.state.delay)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(self.state.host, self.state.port, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            resp = upstream.getresponse()
            data = resp.read()
            out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in ("transfer-encoding", "connection", "content-length")]
        finally:
            upstream.close()
        self.send_response(resp.status)
        for k, v in out_headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == "truncate":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._reset()
            return
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


def serve(upstream: str, port: int, every: int, faults: list[str], delay: float) -> None:
    handler = type("Handler", (_Handler,), {"state": _State(upstream, every, faults, delay)})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    server.serve_forever()


class FaultProxy:
    """The proxy in its own process; ``url`` is its endpoint, ``stats()`` its counters."""

    def __init__(self, upstream: str, every: int = 2, faults: tuple[str, ...] = FAULTS, delay: float = 0.5):
        from conftest import free_port, wait_for_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--upstream", upstream, "--port", str(self.port), "--every", str(every),
             "--faults", ",".join(faults), "--delay", str(delay)],
            start_new_session=True,
        )
        wait_for_port(self.port, proc=self.proc)

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/__faultproxy__/stats", timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        from conftest import stop_process_group

        stop_process_group(self.proc)

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--faults", default=",".join(FAULTS))
    p.add_argument("--delay", type=float, default=0.5)
    a = p.parse_args()
    faults = [f for f in a.faults.split(",") if f]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        p.error(f"unknown faults {sorted(unknown)} (known: {', '.join(FAULTS)})")
    serve(a.upstream, a.port, a.every, faults, a.delay)
