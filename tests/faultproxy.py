"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 endpoint (the moto server).

Every ``every``-th GET of an object (``/bucket/key``, path-style) meets the next fault of
``faults``, in turn:

- ``500`` / ``503`` / ``403``: an S3 error answer (``InternalError`` / ``SlowDown`` /
  ``AccessDenied``) instead of the object;
- ``reset``: the connection is reset (RST) before any answer;
- ``slow``: the answer comes after ``delay`` seconds;
- ``truncate``: the headers promise the whole object, half the body arrives, then a reset.

Everything else is forwarded untouched, to the upstream whatever the request names: it also
serves as a forward proxy (absolute-form targets, ``HTTP_PROXY``) and tunnels ``CONNECT``
requests to 127.0.0.1 (``HTTPS_PROXY``). ``GET /__faultproxy__/stats`` answers JSON counters:
requests, object GETs, injected faults, client connections, tunnels, absolute-form requests,
the ``Proxy-Authorization`` values and the access key IDs object GETs were signed with.
Run as a script (``python faultproxy.py --upstream URL --port N ...``); ``FaultProxy`` starts
and stops it from a test.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

TRANSIENT = ("500", "503", "reset", "slow", "truncate")  # a client that retries gets every object
FAULTS = TRANSIENT + ("403",)
_ERRORS = {  # fault: (status, S3 error code, message)
    "500": (500, "InternalError", "We encountered an internal error."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "403": (403, "AccessDenied", "Access Denied"),
}
_CREDENTIAL = re.compile(r"Credential=([A-Z0-9]+)/")


class _State:
    def __init__(self, upstream: str, every: int, faults: list[str], delay: float):
        parsed = urlparse(upstream)
        self.host, self.port = parsed.hostname, parsed.port
        self.every, self.faults, self.delay = every, faults, delay
        self.lock = threading.Lock()
        self.requests = 0
        self.object_gets = 0
        self.injected = {f: 0 for f in faults}
        self.connections = 0
        self.tunnels = 0
        self.absolute_form = 0
        self.proxy_authorizations: set[str] = set()
        self.access_keys: set[str] = set()

    def count(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)

    def saw_proxy_authorization(self, value: str) -> None:
        with self.lock:
            self.proxy_authorizations.add(value)

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "requests": self.requests,
                "object_gets": self.object_gets,
                "injected": dict(self.injected),
                "connections": self.connections,
                "tunnels": self.tunnels,
                "absolute_form": self.absolute_form,
                "proxy_authorizations": sorted(self.proxy_authorizations),
                "access_keys": sorted(self.access_keys),
            }

    def fault_for(self, method: str, path: str, authorization: str) -> str | None:
        bucket_and_key = urlparse(path).path.lstrip("/").split("/", 1)
        is_object_get = method == "GET" and len(bucket_and_key) == 2 and bucket_and_key[1] != ""
        with self.lock:
            self.requests += 1
            if not is_object_get:
                return None
            self.object_gets += 1
            if match := _CREDENTIAL.search(authorization):
                self.access_keys.add(match.group(1))
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

    def setup(self) -> None:
        super().setup()
        self.state.count("connections")

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
            data = json.dumps(self.state.snapshot()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if self.headers.get("Proxy-Authorization"):
            self.state.saw_proxy_authorization(self.headers["Proxy-Authorization"])
        target = urlparse(self.path)
        if target.scheme:  # absolute form, as a forward proxy receives it
            self.state.count("absolute_form")
            self.path = target.path + (f"?{target.query}" if target.query else "")
        body = self._body()
        fault = self.state.fault_for(self.command, self.path, self.headers.get("Authorization", ""))
        if fault in _ERRORS:
            status, code, message = _ERRORS[fault]
            data = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'.encode()
            self.send_response(status)
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

    def do_CONNECT(self) -> None:
        """A tunnel to ``host:port`` on 127.0.0.1, bytes copied both ways until either side closes."""
        host, _, port = self.path.rpartition(":")
        if host != "127.0.0.1" or not port.isdigit():
            self.send_error(403, "tunnels only to 127.0.0.1")
            return
        self.state.count("tunnels")
        upstream = socket.create_connection((host, int(port)), timeout=60)
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for sock in (src, dst):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        other = threading.Thread(target=pump, args=(upstream, self.connection), daemon=True)
        other.start()
        pump(self.connection, upstream)
        other.join()
        upstream.close()
        self.close_connection = True


def serve(upstream: str, port: int, every: int, faults: list[str], delay: float) -> None:
    handler = type("Handler", (_Handler,), {"state": _State(upstream, every, faults, delay)})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    server.serve_forever()


class FaultProxy:
    """The proxy in its own process; ``url`` is its endpoint, ``stats()`` its counters."""

    def __init__(
        self, upstream: str, every: int = 2, faults: tuple[str, ...] = TRANSIENT, delay: float = 0.5, port: int | None = None
    ):
        from conftest import free_port, wait_for_port

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--upstream", upstream, "--port", str(self.port), "--every", str(every),
             "--faults", ",".join(faults), "--delay", str(delay)],
            start_new_session=True,
        )
        wait_for_port(self.port, proc=self.proc)

    def stats(self) -> dict:
        from conftest import open_loopback

        with open_loopback(f"{self.url}/__faultproxy__/stats", timeout=10) as r:
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
    p.add_argument("--faults", default=",".join(TRANSIENT))
    p.add_argument("--delay", type=float, default=0.5)
    a = p.parse_args()
    faults = [f for f in a.faults.split(",") if f]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        p.error(f"unknown faults {sorted(unknown)} (known: {', '.join(FAULTS)})")
    serve(a.upstream, a.port, a.every, faults, a.delay)
