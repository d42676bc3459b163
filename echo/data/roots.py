"""Data roots: where the videos a manifest names may live.

A manifest is input from whoever wrote it, and its ``video_uri`` column decides what a job
reads. Every resolved ``video_uri`` must lie inside one of the job's data roots: by default
the manifest's own folder (local manifests) or its bucket (``s3://`` manifests); a job's
``--data-root`` (folders or ``s3://bucket/prefix``, several allowed) names others instead.
Local paths are compared after resolving symlinks (``os.path.realpath``), so ``..``, an
absolute path or a symlink cannot lead outside; an existing local path must be a regular file
(no device, FIFO, socket or folder). ``s3://`` keys may not hold ``.`` or ``..`` segments
(some S3-compatible stores resolve them). Other URL schemes are refused.
"""

from __future__ import annotations

import os
import stat
from typing import Sequence

from echo.data import storage

__all__ = ["DEFAULT_MAX_OBJECT_MB", "default_roots", "normalise_roots", "outside_reason"]

DEFAULT_MAX_OBJECT_MB = 1024  # --max-object-mb: larger videos are skipped and reported, never read whole


def default_roots(manifest_uri: str) -> list[str]:
    """The manifest's folder (local) or its bucket (``s3://``)."""
    if storage.is_s3(manifest_uri):
        return [f"s3://{storage.split_s3(manifest_uri)[0]}"]
    return [os.path.dirname(os.path.abspath(manifest_uri))]


def normalise_roots(roots: Sequence[str], manifest_uri: str) -> list[str]:
    """``roots`` (or the defaults when empty) as comparable prefixes: real local folders,
    ``s3://bucket/prefix`` without a trailing ``/``."""
    out = []
    for root in roots or default_roots(manifest_uri):
        if storage.is_s3(root):
            bucket, prefix = storage.split_s3(root)
            out.append(f"s3://{bucket}/{prefix.strip('/')}".rstrip("/"))
        else:
            out.append(os.path.realpath(root))
    return out


def _inside_s3(uri: str, root: str) -> bool:
    bucket, key = storage.split_s3(uri)
    root_bucket, prefix = storage.split_s3(root + "/")
    return bucket == root_bucket and (not prefix.strip("/") or key.startswith(prefix))


def outside_reason(uri: str, roots: Sequence[str]) -> str | None:
    """Why resolved ``uri`` may not be read under normalised ``roots``, or ``None`` when it may.

    The reason never repeats ``uri`` (a manifest cell); it names the roots.
    """
    shown = ", ".join(roots)
    if storage.is_s3(uri):
        key = storage.split_s3(uri)[1]
        if any(part in (".", "..") for part in key.split("/")):
            return "the key holds '.' or '..' segments"
        if not any(_inside_s3(uri, r) for r in roots if storage.is_s3(r)):
            return f"resolves outside the data roots ({shown}; --data-root names others)"
        return None
    if "://" in uri:
        return "unsupported scheme (local paths and s3:// only)"
    real = os.path.realpath(uri)
    if not any(not storage.is_s3(r) and os.path.commonpath([real, r]) == r for r in roots):
        return f"resolves outside the data roots ({shown}; --data-root names others)"
    try:
        mode = os.stat(real).st_mode
    except OSError:
        return None  # missing: --check-objects reports it, and a job skips it
    if not stat.S_ISREG(mode):
        return "not a regular file (a device, FIFO, socket or folder)"
    return None
