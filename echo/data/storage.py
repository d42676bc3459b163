"""Bytes in and out of object storage: ``s3://bucket/key`` through boto3 and obstore, or local paths.

One small surface (``read_bytes``, ``write_bytes``, ``list_prefix``, ``exists``, ``join``)
so that everything above it is indifferent to where a video or manifest lives. Reads
return bytes in memory: no temporary files.

The S3 endpoint is taken, in order, from ``ECHO_SSL_S3_ENDPOINT``, then boto3's own
``AWS_ENDPOINT_URL`` handling, so S3-compatible stores (MinIO, moto) work. Writes, listings
and HEADs go through boto3 clients in ``adaptive`` retry mode (throttling, 5xx answers,
timeouts and connection resets retried with backoff).

Object reads, the loaders' hot path, go through obstore (Rust ``object_store``): 0.4 ms of
CPU per GET of a 189 KB video from the moto server against 1.8 ms for boto3's
``get_object`` (``benchmarks/data_throughput.py`` prints both). boto3 still resolves
everything that depends on the account, so a read reaches whatever a boto3 call reaches:
the bucket's URL (endpoint, path or virtual-host addressing, from ``generate_presigned_url``),
the region, and the credentials of boto3's chain (environment, profile, instance role),
handed to obstore by a credential provider that asks the boto3 session again as they near
expiry. Proxies (``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY``) and the CA bundle
(``AWS_CA_BUNDLE`` or the profile's ``ca_bundle``, trusted beside the system's roots) are
passed to obstore as boto3 would use them. obstore retries 5xx answers, resets, timeouts and
bodies cut short (up to ``MAX_ATTEMPTS`` tries, exponential backoff with jitter); a body
shorter than the object's size is fetched again here as well.

One obstore store (its connection pool) per (process, thread, endpoint, bucket, proxy, CA
bundle). obstore's I/O threads start with the first read and do not survive ``fork``: a child
forked from a process that has read through obstore would hang in its first read, so it
reads with boto3's ``get_object`` instead. The loader's workers come from a fork server,
which never reads, and use obstore.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlparse, urlsplit

import obstore
from obstore.store import S3Store

__all__ = [
    "StorageError",
    "ObjectTooLarge",
    "is_s3",
    "split_s3",
    "join",
    "read_bytes",
    "write_bytes",
    "list_prefix",
    "exists",
    "s3_client",
    "s3_endpoint",
    "MAX_ATTEMPTS",
]

MAX_ATTEMPTS = int(os.environ.get("ECHO_SSL_S3_MAX_ATTEMPTS", "8"))
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0  # the longest wait for the next bytes of an answer before it is retried
REQUEST_TIMEOUT_S = 600.0  # a whole GET, body included (objects up to about a GB)
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 2.0
CREDENTIALS_TTL_S = 600  # refreshable credentials are asked for again after about half of this
_PROBE_KEY = "echo-ssl-url-probe"
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
_PROXY_VARIABLES += tuple(v.upper() for v in _PROXY_VARIABLES)
_S3_CODE = re.compile(r"<Code>([^<]{1,100})</Code>")

log = logging.getLogger(__name__)
_local = threading.local()
_obstore_pid: int | None = None  # the process whose obstore I/O threads run (the first to read)


class StorageError(OSError):
    """A read, write or listing failed; the message names the URI."""


class ObjectTooLarge(StorageError):
    """An object or file larger than the reader's cap; nothing past its size was read."""

    def __init__(self, uri: str, size: int, cap: int):
        self.uri, self.size, self.cap = uri, size, cap
        super().__init__(f"{uri} is {size / 2**20:.1f} MiB, over the {cap / 2**20:g} MiB cap (--max-object-mb)")

    def __reduce__(self):
        return (type(self), (self.uri, self.size, self.cap))


@dataclass
class _S3:
    client: object  # botocore.client.S3
    session: object  # boto3.session.Session
    core: object  # its botocore.session.Session (configuration: profile, CA bundle)
    url_prefixes: dict[str, str] = field(default_factory=dict)  # bucket -> the URL its keys are appended to
    stores: dict[tuple, object] = field(default_factory=dict)  # (bucket, proxy, CA bundle) -> obstore S3Store


@dataclass(frozen=True)
class _Endpoint:
    url: str | None
    region: str


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"not an s3:// URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def join(base: str, rel: str) -> str:
    """Resolve ``rel`` against the folder ``base`` (a URI or path). Absolute ``rel`` wins."""
    if is_s3(rel) or os.path.isabs(rel):
        return rel
    if is_s3(base):
        return base.rstrip("/") + "/" + rel.lstrip("/")
    return str(Path(base) / rel)


def s3_endpoint() -> _Endpoint:
    """The S3 endpoint URL (``ECHO_SSL_S3_ENDPOINT``, else ``AWS_ENDPOINT_URL``, else AWS) and region."""
    url = os.environ.get("ECHO_SSL_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    return _Endpoint(url, region)


def _s3() -> _S3:
    """This process's and thread's boto3 client and session, bucket URLs and obstore stores for
    the current endpoint."""
    cache = getattr(_local, "clients", None)
    if cache is None:
        cache = _local.clients = {}
    ep = s3_endpoint()
    key = (os.getpid(), ep)
    if key not in cache:
        import boto3  # here, not at the top: 0.2 s that `echo-ssl --help` and light commands skip
        import botocore.session
        from botocore.config import Config

        cfg = Config(
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "adaptive"},
            signature_version="s3v4",
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
        )
        core = botocore.session.get_session()
        session = boto3.session.Session(botocore_session=core)
        client = session.client("s3", endpoint_url=ep.url, region_name=ep.region, config=cfg)
        cache[key] = _S3(client, session, core)
    return cache[key]


def s3_client():
    """A boto3 S3 client for this thread (and process), with adaptive retries.

    Clients are cached per thread and per endpoint; a forked loader worker builds its own
    because the cache is keyed by process ID.
    """
    return _s3().client


class _BotoCredentials:
    """An obstore credential provider over a boto3 session's credentials (environment, profile,
    instance role, SSO, ...): static keys never expire; refreshable ones are handed out for
    ``CREDENTIALS_TTL_S`` at most, and botocore refreshes them itself well before they lapse."""

    def __init__(self, credentials):
        self.credentials = credentials
        self.refreshable = hasattr(credentials, "refresh_needed")

    def __call__(self) -> dict:
        frozen = self.credentials.get_frozen_credentials()
        expires = datetime.now(timezone.utc) + timedelta(seconds=CREDENTIALS_TTL_S) if self.refreshable else None
        return {
            "access_key_id": frozen.access_key,
            "secret_access_key": frozen.secret_key,
            "token": frozen.token,
            "expires_at": expires,
        }


def _bucket_url(s3: _S3, bucket: str) -> str:
    """The URL boto3 would send ``s3://bucket/...`` requests to, ending in ``/`` (resolved once)."""
    prefix = s3.url_prefixes.get(bucket)
    if prefix is None:
        probe = s3.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": _PROBE_KEY})
        prefix = s3.url_prefixes[bucket] = probe.split("?", 1)[0][: -len(_PROBE_KEY)]
    return prefix


def _proxy(scheme: str, host: str) -> tuple[str | None, str | None]:
    """``(proxy URL, NO_PROXY list)`` for an endpoint, as boto3 picks them from the environment."""
    # urllib's scan of the whole environment costs more than a GET: skip it when no proxy variable is set
    if not any(map(os.environ.get, _PROXY_VARIABLES)):
        return None, None
    proxy = urllib.request.getproxies_environment().get(scheme)
    if not proxy or urllib.request.proxy_bypass_environment(host):
        return None, None
    return (proxy if "://" in proxy else "http://" + proxy), (os.environ.get("NO_PROXY") or os.environ.get("no_proxy"))


def _store(s3: _S3, bucket: str, uri: str):
    """This thread's obstore store for ``bucket`` at the current endpoint, proxy and CA bundle."""
    prefix = _bucket_url(s3, bucket)
    parts = urlsplit(prefix)
    proxy = _proxy(parts.scheme, parts.hostname or "")
    ca_setting = os.environ.get("AWS_CA_BUNDLE")
    key = (bucket, proxy, ca_setting)
    store = s3.stores.get(key)
    if store is None:
        credentials = s3.session.get_credentials()
        if credentials is None:
            raise StorageError(f"no AWS credentials found to read {uri}")
        path_style = parts.path.endswith(f"/{bucket}/")
        endpoint = f"{parts.scheme}://{parts.netloc}" + (parts.path[: -len(bucket) - 2] if path_style else parts.path.rstrip("/"))
        client: dict = {
            "allow_http": parts.scheme == "http",
            "connect_timeout": timedelta(seconds=CONNECT_TIMEOUT_S),
            "read_timeout": timedelta(seconds=READ_TIMEOUT_S),
            "timeout": timedelta(seconds=REQUEST_TIMEOUT_S),
            "user_agent": "echo-ssl",
        }
        if proxy[0]:
            client["proxy_url"] = proxy[0]
            if proxy[1]:
                client["proxy_excludes"] = proxy[1]
        cafile = ca_setting or s3.core.get_config_variable("ca_bundle")
        if cafile:
            try:
                client["root_certificate"] = Path(cafile).read_text()
            except OSError as e:
                raise StorageError(f"reading {uri}: cannot read the CA bundle {cafile} ({e.strerror})") from None
        store = s3.stores[key] = S3Store(
            bucket,
            endpoint=endpoint,
            region=s3.client.meta.region_name,
            virtual_hosted_style_request=not path_style,
            client_options=client,
            retry_config={
                "max_retries": MAX_ATTEMPTS - 1,
                "backoff": {"init_backoff": timedelta(seconds=BACKOFF_BASE_S), "max_backoff": timedelta(seconds=BACKOFF_CAP_S)},
            },
            credential_provider=_BotoCredentials(credentials),
        )
    return store


def _describe(error: Exception) -> str:
    """obstore's message cut to one line: what failed and S3's error code, no response body."""
    text = str(error)
    line = text.split("\n", 1)[0]
    head, _, body = line.partition(": <?xml")
    code = _S3_CODE.search(body)
    reason = head + (f" {code.group(1)}" if code else "")
    if "certificate" in text.lower():
        reason += " (TLS certificate not trusted; a private CA goes in AWS_CA_BUNDLE)"
    return reason


def _boto3_get(s3: _S3, bucket: str, key: str, uri: str, max_bytes: int | None) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        answer = s3.client.get_object(Bucket=bucket, Key=key)
        if max_bytes is not None and answer["ContentLength"] > max_bytes:
            answer["Body"].close()
            raise ObjectTooLarge(uri, answer["ContentLength"], max_bytes)
        return answer["Body"].read()
    except ClientError as e:
        if e.response.get("Error", {}).get("Code", "") in ("404", "NoSuchKey", "NotFound"):
            raise FileNotFoundError(f"no such object: {uri}") from None
        raise StorageError(f"reading {uri} failed: {e}") from None
    except BotoCoreError as e:
        raise StorageError(f"reading {uri} failed: {e}") from None


def _read_s3(uri: str, max_bytes: int | None) -> bytes:
    global _obstore_pid
    bucket, key = split_s3(uri)
    s3 = _s3()
    if _obstore_pid not in (None, os.getpid()):  # forked after obstore's threads started here
        return _boto3_get(s3, bucket, key, uri, max_bytes)
    from botocore.exceptions import BotoCoreError

    try:
        store = _store(s3, bucket, uri)
    except (BotoCoreError, obstore.exceptions.BaseError) as e:
        raise StorageError(f"reading {uri} failed: {e}") from None
    _obstore_pid = os.getpid()
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            answer = obstore.get(store, key)
            size = answer.meta["size"]
            if max_bytes is not None and size > max_bytes:
                raise ObjectTooLarge(uri, size, max_bytes)  # the body is dropped unread with the answer
            data = bytes(answer.bytes())
        except FileNotFoundError:  # obstore's NotFoundError
            raise FileNotFoundError(f"no such object: {uri}") from None
        except obstore.exceptions.BaseError as e:
            raise StorageError(f"reading {uri} failed: {_describe(e)}") from None
        if len(data) == size:
            return data
        log.debug("%s: %d of %d bytes (attempt %d); reading it again", uri, len(data), size, attempt)
    raise StorageError(f"reading {uri} failed: the body ended short of its {size} bytes (after {MAX_ATTEMPTS} attempts)")


def _read_file(path: str, max_bytes: int | None) -> bytes:
    """A regular file's bytes; a device, FIFO or socket is refused without reading it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StorageError(f"{path} is not a regular file")
        if max_bytes is None:
            return f.read()
        if info.st_size > max_bytes:
            raise ObjectTooLarge(path, info.st_size, max_bytes)
        data = f.read(max_bytes + 1)  # files of /proc and the like report size 0
        if len(data) > max_bytes:
            raise ObjectTooLarge(path, len(data), max_bytes)
        return data


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The whole object or file at ``uri``.

    Raises ``FileNotFoundError`` (naming the URI) when it does not exist, ``ObjectTooLarge``
    when it holds more than ``max_bytes`` bytes (judged from its size, before its body is
    read), and ``StorageError`` for a local path that is not a regular file (a device, FIFO
    or socket) and for other failures after retries.
    """
    if is_s3(uri):
        return _read_s3(uri, max_bytes)
    return _read_file(uri, max_bytes)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri``, creating local parent folders. Local writes are atomic."""
    if is_s3(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(uri)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        except (ClientError, BotoCoreError) as e:
            raise StorageError(f"writing {uri} failed: {e}") from e
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One temporary name per process and thread: concurrent writers of one path never share it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def list_prefix(uri: str) -> list[str]:
    """Every object (or file, recursively) under ``uri``, as full URIs, sorted."""
    if is_s3(uri):
        bucket, prefix = split_s3(uri)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        out: list[str] = []
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            out.extend(f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", []))
        return sorted(out)
    root = Path(uri)
    if not root.exists():
        return []
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def exists(uri: str) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code", "") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"checking {uri} failed: {e}") from e
    return Path(uri).exists()
