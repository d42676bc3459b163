"""Bytes in and out of object storage: ``s3://bucket/key`` through boto3, or local paths.

One small surface (``read_bytes``, ``write_bytes``, ``list_prefix``, ``exists``, ``join``)
so that everything above it is indifferent to where a video or manifest lives. Reads
return bytes in memory: no temporary files.

The S3 endpoint is taken, in order, from ``ECHO_SSL_S3_ENDPOINT``, then boto3's own
``AWS_ENDPOINT_URL`` handling, so S3-compatible stores (MinIO, moto) work. Clients use
boto3's ``adaptive`` retry mode, which retries throttling, 5xx answers, timeouts and
connection resets with backoff.
"""

from __future__ import annotations

import os
import threading
import time
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
    "MAX_ATTEMPTS",
]

MAX_ATTEMPTS = int(os.environ.get("ECHO_SSL_S3_MAX_ATTEMPTS", "8"))

_local = threading.local()


class StorageError(OSError):
    """A read, write or listing failed; the message names the URI."""


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


def _endpoint() -> _Endpoint:
    url = os.environ.get("ECHO_SSL_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    return _Endpoint(url, region)


def s3_client():
    """A boto3 S3 client for this thread (and process), with adaptive retries.

    Clients are cached per thread and per endpoint; a forked loader worker builds its own
    because the cache lives in ``threading.local`` keyed by process ID.
    """
    import boto3
    from botocore.config import Config

    ep = _endpoint()
    key = (os.getpid(), ep)
    cache = getattr(_local, "clients", None)
    if cache is None:
        cache = _local.clients = {}
    if key not in cache:
        cfg = Config(
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "adaptive"},
            connect_timeout=5,
            read_timeout=30,
        )
        cache[key] = boto3.session.Session().client(
            "s3", endpoint_url=ep.url, region_name=ep.region, config=cfg
        )
    return cache[key]


def read_bytes(uri: str) -> bytes:
    """The whole object or file at ``uri``.

    Raises ``FileNotFoundError`` (naming the URI) when it does not exist and
    ``StorageError`` for other failures after retries.
    """
    if is_s3(uri):
        from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, IncompleteReadError

        bucket, key = split_s3(uri)
        try:
            # boto3 retries the request, not the body that follows it: a connection that
            # breaks mid-body is retried here, with the same budget and exponential backoff.
            for attempt in range(MAX_ATTEMPTS):
                body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
                try:
                    return body.read()
                except (HTTPClientError, IncompleteReadError):
                    if attempt == MAX_ATTEMPTS - 1:
                        raise
                    time.sleep(min(2.0, 0.05 * 2**attempt))
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"no such object: {uri}") from None
            raise StorageError(f"reading {uri} failed: {code or e}") from e
        except BotoCoreError as e:
            raise StorageError(f"reading {uri} failed: {e}") from e
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
