"""The loader over the moto S3 server, and transient S3 faults injected by a proxy on 127.0.0.1."""

from __future__ import annotations

import time

import pandas as pd
import pytest
import torch

from corpus import write_corpus
from echo.data import storage
from echo.data.dataset import SSLClipDataset
from echo.data.loader import VideoLoader
from faultproxy import FaultProxy


@pytest.fixture
def corpus(s3_bucket, tmp_path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The same ten videos as local files and as objects in the bucket: ``(local_rows, s3_rows)``."""
    local = write_corpus(str(tmp_path), n_videos=10)
    remote = local.copy()
    remote["video_uri"] = [f"s3://{s3_bucket}/corpus/{uri.rsplit('/', 1)[1]}" for uri in local.video_uri]
    for src, dst in zip(local.video_uri, remote.video_uri):
        storage.write_bytes(dst, storage.read_bytes(src))
    return local, remote


def _epoch(rows: pd.DataFrame, epoch: int = 0, **kw) -> list[dict]:
    ds = SSLClipDataset(rows, "mi-simclr", seed=4)
    with VideoLoader(ds, batch_size=4, num_workers=2, max_skipped_fraction=0.0, **kw) as loader:
        loader.set_epoch(epoch)
        return list(loader)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("view1", "view2", "index")
    )


def test_s3_objects_give_the_same_samples_as_local_files(corpus):
    local, remote = corpus
    from_s3 = _epoch(remote)
    assert sorted(i for b in from_s3 for i in b["index"].tolist()) == list(range(10))
    assert _same(from_s3, _epoch(local))


def test_transient_faults_are_retried_and_nothing_is_dropped(s3_server, corpus, monkeypatch):
    local, remote = corpus
    expected = _epoch(local, epoch=1)
    # every second object GET fails in turn: 500, reset before the answer, reset mid-body,
    # 0.2 s late, 503 SlowDown; every retry of a failed GET gets through
    with FaultProxy(s3_server, every=2, faults=("500", "reset", "truncate", "slow", "503"), delay=0.2) as proxy:
        monkeypatch.setenv("ECHO_SSL_S3_ENDPOINT", proxy.url)  # boto3 (and the forked workers) talk to the proxy
        started = time.monotonic()
        got = _epoch(remote, epoch=1)  # max_skipped_fraction=0: a single dropped sample would raise
        elapsed = time.monotonic() - started
        stats = proxy.stats()
    assert _same(got, expected)
    assert all(n >= 1 for n in stats["injected"].values()), stats
    assert stats["object_gets"] >= 10 + sum(stats["injected"].values()) - stats["injected"]["slow"]
    assert elapsed < 60


def test_the_byte_cache_spares_the_network_in_later_epochs(s3_server, corpus, monkeypatch):
    _, remote = corpus
    with FaultProxy(s3_server, every=0, faults=()) as proxy:
        monkeypatch.setenv("ECHO_SSL_S3_ENDPOINT", proxy.url)
        ds = SSLClipDataset(remote, "simclr", cache_bytes=32 * 2**20)
        with VideoLoader(ds, batch_size=3, num_workers=2) as loader:
            gets = []
            for epoch in range(3):
                loader.set_epoch(epoch)
                assert sum(len(b["index"]) for b in loader) == 10
                gets.append(proxy.stats()["object_gets"])
    # each worker owns a fixed share of the videos, so after epoch 0 every read is a cache hit
    assert gets == [10, 10, 10]
