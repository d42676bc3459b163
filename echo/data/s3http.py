"""S3 object GETs without botocore's per-request machinery: SigV4 presigning and a small
HTTP/1.1 client on kept-alive connections, with retries.

Reading a video's bytes is the hot path of every loader worker, and ``get_object`` spends
about 1.5 ms of CPU per request in botocore (event hooks, header dictionaries, endpoint
rules, response parsing): a third of what decoding a 4-frame clip costs. Here boto3 still
resolves everything that depends on the account (credentials and their refresh, region,
endpoint, path- or virtual-host addressing; see ``echo.data.storage``), and this module signs
each GET (AWS Signature Version 4, query-string authentication, the same URL
``generate_presigned_url`` gives) and fetches it: 0.3-0.5 ms of CPU per GET against 1.6-2.5 ms.

The client speaks just what an object GET needs: one request at a time per connection, one
connection per (process, thread, route) kept alive between requests, bodies delimited by
``Content-Length`` (S3 always sends it for a GET; a 200 answer without it is refused). TLS
is checked against boto3's CA bundle (``AWS_CA_BUNDLE`` or the ``ca_bundle`` setting, else
certifi's); ``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY`` are honoured as boto3 honours them
(``http://`` proxy URLs; HTTPS goes through a ``CONNECT`` tunnel).

Transient faults are retried up to ``attempts`` times with exponential backoff and full
jitter (drawn from a private generator, so no seeded data choice depends on it): refused,
reset or timed-out connections before or during the body, a body shorter than its
``Content-Length``, HTTP 429 and 5xx answers, S3's ``RequestTimeout`` and ``SlowDown``. A
kept-alive connection the server closed while idle is reopened once without counting as an
attempt. Unlike boto3's ``adaptive`` mode there is no client-side rate limiter.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import random
import re
import socket
import ssl
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import SplitResult, quote, unquote, urlsplit

__all__ = [
    "GetFailed",
    "ObjectMissing",
    "presign",
    "get",
    "RETRY_STATUS",
    "RETRY_CODES",
]

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 2.0
MAX_HEAD_BYTES = 64 * 1024
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
RETRY_CODES = frozenset({"RequestTimeout", "SlowDown", "InternalError", "ServiceUnavailable", "Throttling"})

_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
_PROXY_VARIABLES += tuple(v.upper() for v in _PROXY_VARIABLES)
_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_jitter = random.Random()
_local = threading.local()
_tls: dict[tuple, ssl.SSLContext] = {}
_signing_keys: dict[tuple[str, str, str], bytes] = {}
_lock = threading.Lock()


class GetFailed(Exception):
    """The GET failed for good; ``reason`` says why (an S3 error code, a status, or the last fault)."""

    def __init__(self, reason: str, attempts: int):
        self.reason, self.attempts = reason, attempts
        super().__init__(reason if attempts == 1 else f"{reason} (after {attempts} attempts)")


class ObjectMissing(GetFailed):
    """HTTP 404 with S3's ``NoSuchKey`` (or no code at all)."""


class _Refused(Exception):
    """A fault no retry can mend (an untrusted certificate, a proxy that refuses the tunnel)."""


# ------------------------------------------------------------------------------ signing


def _signing_key(secret: str, date: str, region: str) -> bytes:
    key = (secret, date, region)
    found = _signing_keys.get(key)
    if found is None:
        found = f"AWS4{secret}".encode()
        for part in (date, region, "s3", "aws4_request"):
            found = hmac.new(found, part.encode(), hashlib.sha256).digest()
        with _lock:
            if len(_signing_keys) > 64:
                _signing_keys.clear()
            _signing_keys[key] = found
    return found


def _host(scheme: str, netloc_host: str, port: int | None) -> str:
    """The Host header (and signed host) of a URL: lowercase, without a default port."""
    host = f"[{netloc_host}]" if ":" in netloc_host else netloc_host
    return host if port is None or port == {"http": 80, "https": 443}[scheme] else f"{host}:{port}"


def presign(prefix: str, key: str, credentials, region: str, expires_s: int, now: datetime | None = None) -> str:
    """A GET URL for object ``key`` under ``prefix`` (the bucket's URL, ending in ``/``), signed
    with SigV4 query-string authentication for ``expires_s`` seconds from ``now`` (UTC).

    ``credentials`` has ``access_key``, ``secret_key`` and ``token`` (botocore's frozen
    credentials). The result is the URL botocore's ``generate_presigned_url`` gives.
    """
    if not 1 <= expires_s <= 7 * 24 * 3600:
        raise ValueError(f"expires_s must be 1 s to 7 days, got {expires_s}")
    url = prefix + quote(key.encode("utf-8"), safe="/~")
    parts = urlsplit(url)
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    scope = f"{stamp[:8]}/{region}/s3/aws4_request"
    params = [
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
        ("X-Amz-Credential", f"{credentials.access_key}/{scope}"),
        ("X-Amz-Date", stamp),
        ("X-Amz-Expires", str(expires_s)),
        ("X-Amz-SignedHeaders", "host"),
    ]
    if credentials.token is not None:
        params.append(("X-Amz-Security-Token", credentials.token))
    encoded = [(quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in params]
    query = "&".join(f"{k}={v}" for k, v in encoded)
    canonical = "\n".join(
        [
            "GET",
            parts.path,
            "&".join(f"{k}={v}" for k, v in sorted(encoded)),
            f"host:{_host(parts.scheme, parts.hostname, parts.port)}\n",
            "host",
            "UNSIGNED-PAYLOAD",
        ]
    )
    to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key_bytes = _signing_key(credentials.secret_key, stamp[:8], region)
    signature = hmac.new(key_bytes, to_sign.encode(), hashlib.sha256).hexdigest()
    return f"{url}?{query}&X-Amz-Signature={signature}"


# ---------------------------------------------------------------------------- transport


@dataclass(frozen=True)
class _Route:
    """How to reach a URL: directly, through an HTTP proxy, or tunnelled through one."""

    host: str  # where to connect
    port: int
    tls_host: str | None  # the name TLS verifies (the origin's), or None for plain HTTP
    tunnel: str | None  # "host:port" to CONNECT to through the proxy
    forward: bool  # plain HTTP through the proxy: absolute-form targets, Proxy-Authorization on each GET
    proxy_auth: str | None  # a Proxy-Authorization header value


def _route(parts: SplitResult) -> _Route:
    port = parts.port or (443 if parts.scheme == "https" else 80)
    tls_host = parts.hostname if parts.scheme == "https" else None
    # urllib's scan of the whole environment costs more than a GET: skip it when no proxy variable is set
    proxy = any(map(os.environ.get, _PROXY_VARIABLES)) and urllib.request.getproxies_environment().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass_environment(parts.hostname):
        return _Route(parts.hostname, port, tls_host, None, False, None)
    p = urlsplit(proxy if "://" in proxy else "http://" + proxy)
    if p.scheme != "http":
        raise _Refused(f"only http:// proxies are supported, not {p.scheme}:// ({p.hostname})")
    auth = None
    if p.username is not None:
        creds = f"{unquote(p.username)}:{unquote(p.password or '')}".encode()
        auth = "Basic " + base64.b64encode(creds).decode("ascii")
    tunnel = f"{_host(parts.scheme, parts.hostname, None)}:{port}" if tls_host else None
    return _Route(p.hostname, p.port or 80, tls_host, tunnel, tunnel is None, auth)


def _tls_context() -> ssl.SSLContext:
    """A verifying context for boto3's CA bundle; built once per setting (botocore takes ms to read it)."""
    setting = tuple(map(os.environ.get, ("AWS_CA_BUNDLE", "AWS_CONFIG_FILE", "AWS_PROFILE", "AWS_DEFAULT_PROFILE")))
    with _lock:
        context = _tls.get(setting)
    if context is None:
        from botocore.httpsession import get_cert_path
        from botocore.session import get_session

        cafile = setting[0] or get_session().get_config_variable("ca_bundle") or get_cert_path(True)
        context = ssl.create_default_context(cafile=cafile)
        with _lock:
            _tls[setting] = context
    return context


def _read_head(sock: socket.socket, buf: bytearray) -> tuple[int, bool, dict[bytes, bytes], int]:
    """Read an answer's status line and headers into ``buf``: ``(status, keep_alive, headers,
    end of the head in buf)``; header names are lowercase bytes."""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        if len(buf) > MAX_HEAD_BYTES:
            raise ConnectionError(f"an answer head longer than {MAX_HEAD_BYTES} bytes")
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("the server closed the connection before answering")
        buf += chunk
    lines = bytes(buf[:end]).split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    status = rest[:3]
    if not version.startswith(b"HTTP/1.") or not status.isdigit():
        raise ConnectionError(f"not an HTTP answer: {lines[0][:60]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    keep_alive = version == b"HTTP/1.1" and headers.get(b"connection", b"").lower() != b"close"
    return int(status), keep_alive, headers, end + 4


class _Connection:
    """One kept-alive connection along a route; one request at a time."""

    def __init__(self, route: _Route):
        self.route = route
        self.sock: socket.socket | None = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _open(self) -> socket.socket:
        r = self.route
        sock = socket.create_connection((r.host, r.port), timeout=CONNECT_TIMEOUT_S)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if r.tunnel:
                auth = f"Proxy-Authorization: {r.proxy_auth}\r\n" if r.proxy_auth else ""
                sock.sendall(f"CONNECT {r.tunnel} HTTP/1.1\r\nHost: {r.tunnel}\r\n{auth}\r\n".encode())
                status = _read_head(sock, bytearray())[0]
                if status != 200:
                    raise _Refused(f"the proxy {r.host}:{r.port} refused a tunnel to {r.tunnel}: HTTP {status}")
            if r.tls_host:
                try:
                    sock = _tls_context().wrap_socket(sock, server_hostname=r.tls_host)
                except ssl.SSLCertVerificationError as e:
                    raise _Refused(f"TLS: {e.verify_message or e} ({r.tls_host}; a private CA goes in AWS_CA_BUNDLE)") from None
            sock.settimeout(READ_TIMEOUT_S)
        except BaseException:
            sock.close()
            raise
        return sock

    def get(self, target: str, host: str) -> tuple[int, dict[bytes, bytes], bytes]:
        """``(status, headers, body)`` of one GET. Raises ``OSError`` on transport faults."""
        auth = f"Proxy-Authorization: {self.route.proxy_auth}\r\n" if self.route.proxy_auth and self.route.forward else ""
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: echo-ssl\r\n"
            f"Accept-Encoding: identity\r\n{auth}\r\n"
        ).encode("ascii")
        reused = self.sock is not None
        buf = bytearray()
        try:
            if self.sock is None:
                self.sock = self._open()
            try:
                self.sock.sendall(request)
                status, keep_alive, headers, start = _read_head(self.sock, buf)
            except OSError:
                if not reused or buf:
                    raise
                self.close()  # closed by the server while idle: reopen once, not counted as an attempt
                self.sock = self._open()
                self.sock.sendall(request)
                status, keep_alive, headers, start = _read_head(self.sock, buf)
            length = headers.get(b"content-length")
            if length is None or not length.isdigit():
                self.close()
                if status == 200:
                    raise _Refused("a 200 answer without Content-Length (a truncated body could not be told apart)")
                return status, headers, b""
            body = self._read_body(buf, start, int(length))
            if not keep_alive:
                self.close()
            return status, headers, body
        except BaseException:
            self.close()
            raise

    def _read_body(self, buf: bytearray, start: int, length: int) -> bytes:
        body = bytearray(length)
        have = min(len(buf) - start, length)
        body[:have] = buf[start : start + have]
        view = memoryview(body)
        while have < length:
            n = self.sock.recv_into(view[have:])
            if n == 0:
                raise ConnectionResetError(f"the body ended after {have} of {length} bytes")
            have += n
        return bytes(body)


def _connection(route: _Route) -> _Connection:
    """This process's and thread's connection for ``route``."""
    if getattr(_local, "pid", None) != os.getpid():  # a forked child never shares its parent's sockets
        _local.pid, _local.conns = os.getpid(), {}
    conn = _local.conns.get(route)
    if conn is None:
        conn = _local.conns[route] = _Connection(route)
    return conn


def get(url: str, attempts: int) -> bytes:
    """The body of ``GET url`` (a presigned S3 URL), retried on transient faults.

    Raises ``ObjectMissing`` for a missing key, ``GetFailed`` for any other answer that is not
    200, for faults no retry can mend, and for transient faults that outlast ``attempts`` tries.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {parts.scheme}://{parts.hostname}")
    if any(c <= " " for c in url):
        raise ValueError("the URL holds spaces or control characters; it must be percent-encoded")
    try:
        route = _route(parts)
    except _Refused as e:
        raise GetFailed(str(e), 1) from None
    target = url.split("#", 1)[0] if route.forward else parts.path + ("?" + parts.query if parts.query else "")
    host = _host(parts.scheme, parts.hostname, parts.port)
    conn = _connection(route)
    for attempt in range(1, attempts + 1):
        try:
            status, headers, body = conn.get(target, host)
        except _Refused as e:
            raise GetFailed(str(e), attempt) from None
        except OSError as e:
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        else:
            if status == 200:
                return body
            match = _CODE.search(body)
            code = match.group(1).decode("utf-8", "replace") if match else ""
            reason = f"HTTP {status}" + (f" {code}" if code else "")
            region = headers.get(b"x-amz-bucket-region", b"").decode("ascii", "replace")
            if region and status in (301, 400, 403):
                reason += f" (the bucket is in {region}: set AWS_DEFAULT_REGION={region})"
            if status == 404 and code in ("", "NoSuchKey"):
                raise ObjectMissing(reason, attempt)
            if status not in RETRY_STATUS and code not in RETRY_CODES:
                raise GetFailed(reason, attempt)
        if attempt < attempts:
            time.sleep(_jitter.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1))))
    raise GetFailed(reason, attempts)
