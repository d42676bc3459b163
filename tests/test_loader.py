"""The supervised loader: exactly-once sharding, seeding, skips, hung and crashing workers."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import time
from collections import Counter

import pandas as pd
import pytest
import torch

from corpus import write_corpus
from echo.data import storage
from echo.data.dataset import SSLClipDataset
from echo.data.loader import Skip, TooManySkipped, VideoLoader, epoch_order, rank_shard


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> pd.DataFrame:
    return write_corpus(str(tmp_path_factory.mktemp("corpus")), n_videos=23, short=2)


@pytest.fixture(scope="module")
def bad_rows(tmp_path_factory, rows) -> pd.DataFrame:
    """The corpus plus one empty, one non-video, one truncated and one missing object."""
    folder = tmp_path_factory.mktemp("bad")
    good = storage.read_bytes(rows.video_uri[3])
    for name, data in {"empty.mp4": b"", "text.mp4": b"no video here\n" * 40, "cut.mp4": good[: len(good) // 3]}.items():
        (folder / name).write_bytes(data)
    extra = pd.DataFrame(
        {
            "video_uri": [str(folder / n) for n in ("empty.mp4", "text.mp4", "cut.mp4", "missing.mp4")],
            "patient_id": "PX",
            "study_id": "SX",
            "split": "train",
            "label": 0.0,
        }
    )
    return pd.concat([rows, extra], ignore_index=True)


def _epoch(loader: VideoLoader, epoch: int) -> list[dict]:
    loader.set_epoch(epoch)
    return list(loader)


def _indices(batches: list[dict]) -> list[int]:
    return [i for b in batches for i in b["index"].tolist()]


def test_exactly_once_across_two_ranks_and_two_workers(rows):
    ds = SSLClipDataset(rows, "simclr", seed=5)
    orders = {}
    for run in range(2):
        loaders = [VideoLoader(ds, batch_size=3, num_workers=2, rank=r, world_size=2, seed=9) for r in range(2)]
        try:
            for epoch in range(2):
                per_rank = [_indices(_epoch(loader, epoch)) for loader in loaders]
                union = per_rank[0] + per_rank[1]
                assert sorted(union) == list(range(len(rows)))  # complete, no duplicates
                assert not set(per_rank[0]) & set(per_rank[1])
                assert [len(p) for p in per_rank] == [12, 11]
                assert [loader.len_hint() for loader in loaders] == [4, 4]
                orders[(run, epoch)] = per_rank
        finally:
            for loader in loaders:
                loader.close()
    assert orders[(0, 0)] != orders[(0, 1)]  # reshuffled each epoch
    assert orders[(0, 0)] == orders[(1, 0)] and orders[(0, 1)] == orders[(1, 1)]  # same across runs
    assert orders[(0, 0)][1] == epoch_order(len(rows), 9, 0, rank=1, world_size=2).tolist()
    # a rank keeps its shard across epochs (so a worker's byte cache stays useful)
    assert set(orders[(0, 0)][0]) == set(orders[(0, 1)][0]) == set(rank_shard(len(rows), 9, 0, 2).tolist())


def test_batches_and_content_do_not_depend_on_worker_count(rows):
    ds = SSLClipDataset(rows, "echoclr", seed=2)
    runs = {}
    for workers in (0, 1, 3):
        with VideoLoader(ds, batch_size=4, num_workers=workers, seed=1) as loader:
            runs[workers] = _epoch(loader, 3)
    for workers in (1, 3):
        assert len(runs[workers]) == len(runs[0]) == 6
        for a, b in zip(runs[0], runs[workers]):
            assert set(a) == set(b)
            for key in ("view1", "view2", "order1", "order2", "index"):
                assert torch.equal(a[key], b[key]), (workers, key)


def test_len_hint_and_drop_last(rows):
    ds = SSLClipDataset(rows, "simclr")
    with VideoLoader(ds, batch_size=5, num_workers=0, drop_last=True) as loader:
        batches = _epoch(loader, 0)
        assert loader.len_hint() == len(batches) == 4 and all(len(b["index"]) == 5 for b in batches)
    with VideoLoader(ds, batch_size=5, num_workers=0, rank=1, world_size=3) as loader:
        assert loader.len_hint() == len(_epoch(loader, 0)) == 2  # 8 samples on rank 1 of 3


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_objects_are_skipped_reported_and_logged_once(bad_rows, workers, caplog):
    """Reported in the batches and ``loader.skipped``; logged once, at debug level (the caller names
    them to the user: see test_pretrain)."""
    n_good = len(bad_rows) - 4
    ds = SSLClipDataset(bad_rows, "simclr")
    caplog.set_level(logging.DEBUG, logger="echo.data.loader")
    with VideoLoader(ds, batch_size=4, num_workers=workers, max_skipped_fraction=0.2) as loader:
        for epoch in range(2):
            batches = _epoch(loader, epoch)
            assert sorted(_indices(batches)) == list(range(n_good))  # the training data still flows
            reported = [s for b in batches for s in b["skipped"]]
            assert sorted(reported) == sorted(loader.skipped) and all(isinstance(s, Skip) for s in reported)
            reasons = {os.path.basename(uri): reason for uri, reason in loader.skipped}
            assert len(loader.skipped) == 4
            assert reasons["empty.mp4"] == "empty object"
            assert reasons["text.mp4"].startswith("not a readable video")
            assert reasons["cut.mp4"].startswith("not a readable video")
            assert reasons["missing.mp4"] == "missing object"
    logged = Counter(r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().startswith("skipping "))
    assert len(logged) == 4 and set(logged.values()) == {1}  # each URI once over two epochs
    assert {r.levelno for r in caplog.records if r.getMessage().startswith("skipping ")} == {logging.DEBUG}


def test_too_many_skipped_stops_with_the_list(bad_rows):
    ds = SSLClipDataset(bad_rows, "simclr")
    with VideoLoader(ds, batch_size=4, num_workers=2, max_skipped_fraction=0.01) as loader:
        with pytest.raises(TooManySkipped) as e:
            _epoch(loader, 0)
    message = str(e.value)
    assert "of 27 samples skipped" in message
    for name in ("empty.mp4", "text.mp4", "cut.mp4", "missing.mp4"):
        if any(s.uri.endswith(name) for s in e.value.skipped):
            assert name in message
    assert e.value.skipped and "PX" not in message and "SX" not in message


class FaultyDataset(SSLClipDataset):
    """Real samples, except that some positions hang or kill their process.

    A decode that hangs forever (decord's get_batch deadlock while holding the GIL) or
    segfaults cannot be caused reliably with a real file, so those faults are simulated here.
    """

    hang: set[int] = set()
    exit_code: set[int] = set()
    segfault: set[int] = set()

    def sample(self, index: int, epoch: int) -> dict:
        if index in self.hang:
            time.sleep(3600)
        if index in self.exit_code:
            os._exit(3)
        if index in self.segfault:
            faulthandler.disable()  # keep pytest's inherited crash dump out of the test output
            os.kill(os.getpid(), signal.SIGSEGV)
        return super().sample(index, epoch)


def test_hung_and_crashing_workers_are_replaced_and_their_samples_skipped(rows):
    ds = FaultyDataset(rows, "simclr")
    ds.hang, ds.exit_code, ds.segfault = {4}, {9}, {15}
    with VideoLoader(ds, batch_size=3, num_workers=2, sample_timeout_s=1.5, max_skipped_fraction=0.2) as loader:
        started = time.monotonic()
        batches = _epoch(loader, 0)
        assert time.monotonic() - started < 30
        produced = _indices(batches)
        assert sorted(produced) == sorted(set(range(len(rows))) - {4, 9, 15})  # every other sample exactly once
        reasons = {uri: reason for uri, reason in loader.skipped}
        assert len(loader.skipped) == 3
        assert reasons[rows.video_uri[4]].startswith("decode timed out")
        assert reasons[rows.video_uri[9]] == "worker died (exit code 3)"
        assert reasons[rows.video_uri[15]] == "worker died (killed by SIGSEGV)"
        assert loader.restarts == 3
        # the next epoch runs on the replacement workers and meets the same faults
        assert sorted(_indices(_epoch(loader, 1))) == sorted(produced)


def test_an_abandoned_epoch_does_not_disturb_the_next(rows):
    ds = SSLClipDataset(rows, "simclr")
    with VideoLoader(ds, batch_size=2, num_workers=2) as loader:
        loader.set_epoch(0)
        for i, _ in enumerate(loader):
            if i == 1:
                break
        assert sorted(_indices(_epoch(loader, 1))) == list(range(len(rows)))


def test_too_many_skipped_survives_pickling():
    import pickle

    e = TooManySkipped([Skip("s3://b/v.mp4", "missing object")], attempted=10, max_fraction=0.01, epoch=2)
    back = pickle.loads(pickle.dumps(e))
    assert back.skipped == e.skipped and str(back) == str(e) and back.epoch == 2
