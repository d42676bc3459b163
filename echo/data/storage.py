"""Bytes in and out of object storage: ``s3://bucket/key`` through boto3, or local paths.

One small surface (``read_bytes``, ``write_bytes``, ``list_prefix``, ``exists``, ``join``)
so that everything above it is indifferent to where a video or manifest lives. Reads
return bytes in memory: no temporary files.

The S3 endpoint is taken, in order, from ``ECHO_SSL_S3_ENDPOINT``, then boto3's own
``AWS_ENDPOINT_URL`` handling, so S3-compatible stores (MinIO, moto) work. Clients use
boto3's ``adaptive`` retry mode, which retries throttling, 5xx answers, timeouts and
connection resets with backoff. Object reads, the loaders' hot path, go through
``echo.data.s3http`` instead: boto3 supplies the bucket's URL, the credentials and the region,
``s3http`` signs each GET (SigV4, the URL ``generate_presigned_url`` gives) and fetches it on
a kept-alive connection with the same faults retried, for a quarter of the CPU of
``get_object`` (0.4-0.5 ms against 1.6-2.5 ms per GET of a 189 KB video from the moto server).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

__all__ = [
    "StorageError",
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
PRESIGN_EXPIRES_S = 900  # longer than any chain of retries of one GET
_PROBE_KEY = "echo-ssl-url-probe"

_local = threading.local()


class StorageError(OSError):
    """A read, write or listing failed; the message names the URI."""


@dataclass
class _S3:
    client: object  # botocore.client.S3
    session: object  # boto3.session.Session
    url_prefixes: dict[str, str]  # bucket -> the URL its keys are appended to


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
    """This process's and thread's boto3 client, session and bucket URLs for the current endpoint."""
    cache = getattr(_local, "clients", None)
    if cache is None:
        cache = _local.clients = {}
    ep = s3_endpoint()
    key = (os.getpid(), ep)
    if key not in cache:
        import boto3
        from botocore.config import Config

        cfg = Config(
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "adaptive"},
            signature_version="s3v4",
            connect_timeout=5,
            read_timeout=30,
        )
        session = boto3.session.Session()
        client = session.client("s3", endpoint_url=ep.url, region_name=ep.region, config=cfg)
        cache[key] = _S3(client, session, {})
    return cache[key]


def s3_client():
    """A boto3 S3 client for this thread (and process), with adaptive retries.

    Clients are cached per thread and per endpoint; a forked loader worker builds its own
    because the cache is keyed by process ID.
    """
    return _s3().client


def _presigned_get(bucket: str, key: str) -> str:
    """A GET URL for ``s3://bucket/key`` signed for ``PRESIGN_EXPIRES_S`` seconds (``echo.data.s3http.presign``).

    boto3 resolves the bucket's URL (endpoint, path or virtual-host style) once per bucket and
    supplies the session's current (refreshed) credentials and the client's region.
    """
    from echo.data import s3http

    s3 = _s3()
    prefix = s3.url_prefixes.get(bucket)
    if prefix is None:
        probe = s3.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": _PROBE_KEY})
        prefix = s3.url_prefixes[bucket] = probe.split("?", 1)[0][: -len(_PROBE_KEY)]
    credentials = s3.session.get_credentials()
    if credentials is None:
        raise StorageError(f"no AWS credentials found to read s3://{bucket}/{key}")
    frozen = credentials.get_frozen_credentials()
    return s3http.presign(prefix, key, frozen, s3.client.meta.region_name, PRESIGN_EXPIRES_S)


def read_bytes(uri: str) -> bytes:
    """The whole object or file at ``uri``.

    Raises ``FileNotFoundError`` (naming the URI) when it does not exist and
    ``StorageError`` for other failures after retries.
    """
    if is_s3(uri):
        from botocore.exceptions import BotoCoreError

        from echo.data import s3http

        bucket, key = split_s3(uri)
        try:
            return s3http.get(_presigned_get(bucket, key), MAX_ATTEMPTS)
        except s3http.ObjectMissing:
            raise FileNotFoundError(f"no such object: {uri}") from None
        except (s3http.GetFailed, BotoCoreError) as e:
            raise StorageError(f"reading {uri} failed: {e}") from None
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {uri}") from None


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
