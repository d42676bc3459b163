"""Datasets over manifest rows: pairs per method, seeding, labels, eval clips, skips, byte cache."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from corpus import video_frames, write_corpus
from echo.data import storage
from echo.data.clips import eval_clips, minmax
from echo.data.dataset import ByteCache, EvalClipDataset, LabelledClipDataset, SampleSkipped, SSLClipDataset
from echo.data.order import permutations
from echo.data.video import encode_mp4


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> pd.DataFrame:
    return write_corpus(str(tmp_path_factory.mktemp("corpus")), n_videos=9, short=1)


class RecordingSSL(SSLClipDataset):
    """Records which objects a sample reads (observation only; reads are real)."""

    def read(self, uri: str) -> bytes:
        self.reads.append(uri)
        return super().read(uri)


@pytest.mark.parametrize("method", ["simclr", "mi-simclr", "echoclr"])
def test_ssl_sample_layout_and_seeding(rows, method):
    ds = SSLClipDataset(rows, method, clip_len=4, seed=3)
    s = ds.sample(4, epoch=0)
    assert set(s) == {"view1", "view2", "order1", "order2", "index"}
    for key in ("view1", "view2"):
        assert s[key].shape == (1, 4, 64, 64) and s[key].dtype == torch.float32
        assert s[key].min() == 0 and s[key].max() == 1
    assert s["index"].item() == 4 and s["index"].dtype == torch.int64
    assert not torch.equal(s["view1"], s["view2"])
    again = SSLClipDataset(rows, method, clip_len=4, seed=3).sample(4, epoch=0)
    assert all(torch.equal(s[k], again[k]) for k in s)
    other_epoch = ds.sample(4, epoch=1)
    assert not torch.equal(s["view1"], other_epoch["view1"])
    if method == "echoclr":
        assert 0 <= s["order1"].item() < 24 and 0 <= s["order2"].item() < 24
    else:
        assert s["order1"].item() == -1 and s["order2"].item() == -1


def test_simclr_reads_one_video(rows):
    ds = RecordingSSL(rows, "simclr")
    ds.reads = []
    ds.sample(2, 0)
    assert ds.reads == [rows.video_uri[2]]


def test_mi_simclr_pairs_videos_of_the_same_study(rows):
    ds = RecordingSSL(rows, "mi-simclr")
    studies = rows.study_id.to_numpy()
    partners_seen: dict[int, set[str]] = {}
    for index in range(len(rows)):
        for epoch in range(6):
            ds.reads = []
            ds.sample(index, epoch)
            own = rows.video_uri[index]
            assert ds.reads[0] == own
            same_study = set(rows.video_uri[studies == studies[index]])
            if len(same_study) == 1:
                assert ds.reads == [own]  # a one-video study pairs the video with itself, read once
            else:
                assert len(ds.reads) == 2 and ds.reads[1] in same_study - {own}
                partners_seen.setdefault(index, set()).add(ds.reads[1])
    # in a three-video study both other videos get chosen across epochs
    triple = [i for i in range(len(rows)) if (studies == studies[i]).sum() == 3]
    assert triple and any(len(partners_seen[i]) == 2 for i in triple)


def test_echoclr_reorders_the_mi_simclr_views_by_the_labelled_permutation(rows):
    perms = permutations(4)
    mi = SSLClipDataset(rows, "mi-simclr", seed=1)
    eco = SSLClipDataset(rows, "echoclr", seed=1)
    orders = set()
    for index in range(len(rows)):
        a, b = mi.sample(index, 2), eco.sample(index, 2)
        for v, o in (("view1", "order1"), ("view2", "order2")):
            k = b[o].item()
            orders.add(k)
            assert torch.equal(b[v][0], a[v][0][perms[k]])
    assert len(orders) > 5


def test_echoclr_refuses_a_clip_too_long_to_permute(rows):
    with pytest.raises(ValueError, match="clip_len"):
        SSLClipDataset(rows, "echoclr", clip_len=16)


def test_unknown_method_and_missing_study_column(rows):
    with pytest.raises(ValueError, match="unknown self-supervised method"):
        SSLClipDataset(rows, "byol")
    with pytest.raises(ValueError, match="study_id"):
        SSLClipDataset(rows.drop(columns=["study_id"]), "mi-simclr")


def test_short_video_clips_loop_real_frames(rows):
    # row 0 has 3 frames; a 4-frame clip wraps around instead of padding with zeros
    ds = LabelledClipDataset(rows, clip_len=8, augment=False)
    clip = ds.sample(0, 0)["clip"][0]
    assert clip.shape == (8, 64, 64)
    assert all(clip[t].max() == 1.0 or clip[t].max() > 0.5 for t in range(8))
    assert torch.allclose(clip[0], clip[3], atol=0.02) and torch.allclose(clip[1], clip[4], atol=0.02)


def test_labelled_clips(rows):
    ds = LabelledClipDataset(rows, clip_len=16, seed=0, augment=False)
    s = ds.sample(5, 0)
    assert s["clip"].shape == (1, 16, 64, 64) and s["label"].dtype == torch.float32
    assert s["label"].item() == rows.label[5]
    # without augmentation the clip is the min-max scaled frames of one window of the video
    frames = video_frames(5, int(rows.n_frames[5]))
    start = min(range(len(frames) - 15), key=lambda t: float(np.abs(minmax(frames[t : t + 16]) - s["clip"][0].numpy()).mean()))
    assert np.abs(minmax(frames[start : start + 16]) - s["clip"][0].numpy()).mean() < 0.02
    aug = LabelledClipDataset(rows, clip_len=16, seed=0, augment=True).sample(5, 0)
    assert aug["clip"].shape == (1, 16, 64, 64) and not torch.equal(aug["clip"], s["clip"])


def test_labelled_clips_need_labels(rows):
    bad = rows.copy()
    bad.loc[3, "label"] = np.nan
    with pytest.raises(ValueError, match=r"manifest row\(s\) \[4\]"):
        LabelledClipDataset(bad)


def test_eval_clips_dataset(rows):
    ds = EvalClipDataset(rows, clip_len=8, num_clips=3)
    s = ds.sample(6, 0)
    assert s["clips"].shape == (3, 1, 8, 64, 64)
    expected = eval_clips(storage.read_bytes(rows.video_uri[6]), rows.video_uri[6], 8, 3)
    assert np.array_equal(s["clips"][:, 0].numpy(), expected)
    assert s["index"].item() == 6 and s["label"].item() == rows.label[6]


def test_bad_objects_raise_sample_skipped(tmp_path, rows):
    good = storage.read_bytes(rows.video_uri[1])
    objects = {
        "empty.mp4": (b"", "empty object"),
        "text.mp4": (b"hello, not a video\n" * 50, "not a readable video"),
        "truncated.mp4": (good[: len(good) // 2], "not a readable video"),
        "garbage.mp4": (good[:64] + bytes(range(256)) * 40, "not a readable video"),
    }
    for name, (data, _) in objects.items():
        (tmp_path / name).write_bytes(data)
    table = pd.DataFrame(
        {
            "video_uri": [str(tmp_path / n) for n in objects] + [str(tmp_path / "missing.mp4")],
            "study_id": ["s"] * (len(objects) + 1),
            "label": [0.0] * (len(objects) + 1),
        }
    )
    reasons = [r for _, r in objects.values()] + ["missing object"]
    for ds in (SSLClipDataset(table, "simclr"), LabelledClipDataset(table), EvalClipDataset(table)):
        for index, reason in enumerate(reasons):
            with pytest.raises(SampleSkipped) as e:
                ds.sample(index, 0)
            assert e.value.uri == table.video_uri[index]
            assert e.value.reason.startswith(reason), (table.video_uri[index], e.value.reason)


def test_an_object_over_the_cap_is_skipped_unread(tmp_path, rows):
    with open(tmp_path / "huge.mp4", "wb") as f:
        f.truncate(64 * 2**30)  # sparse: reading it whole would exhaust memory
    table = pd.DataFrame({"video_uri": [str(tmp_path / "huge.mp4"), rows.video_uri[1]], "study_id": ["a", "b"],
                          "label": [0.0, 1.0]})
    for ds in (SSLClipDataset(table, "simclr"), LabelledClipDataset(table), EvalClipDataset(table)):
        with pytest.raises(SampleSkipped, match="65536 MiB, over the 1024 MiB cap") as e:
            ds.sample(0, 0)
        assert e.value.uri == table.video_uri[0]
    small = EvalClipDataset(table, max_object_bytes=len(storage.read_bytes(rows.video_uri[1])) - 1)
    with pytest.raises(SampleSkipped, match="over the"):
        small.sample(1, 0)


def test_a_failed_partner_skips_under_its_own_uri(tmp_path, rows):
    table = rows.iloc[[1, 2]].reset_index(drop=True)  # one study of two videos
    assert table.study_id.nunique() == 1
    table.loc[1, "video_uri"] = str(tmp_path / "gone.mp4")
    with pytest.raises(SampleSkipped) as e:
        SSLClipDataset(table, "mi-simclr").sample(0, 0)
    assert e.value.uri == str(tmp_path / "gone.mp4") and e.value.reason == "missing object"


def test_byte_cache_is_bounded_lru():
    cache = ByteCache(10)
    cache.put("a", b"1234")
    cache.put("b", b"5678")
    assert cache.get("a") == b"1234"  # a is now the most recent
    cache.put("c", b"90ab")  # over budget: evicts b, the least recent
    assert cache.get("b") is None and cache.get("a") == b"1234" and cache.get("c") == b"90ab"
    assert cache.size == 8 and len(cache) == 2
    cache.put("huge", b"x" * 11)
    assert cache.get("huge") is None and cache.size == 8


def test_dataset_cache_serves_repeat_reads(tmp_path):
    table = write_corpus(str(tmp_path), n_videos=3)
    ds = SSLClipDataset(table, "simclr", cache_bytes=10 * 2**20)
    first = ds.sample(0, 0)
    (tmp_path / "videos" / "v000.mp4").unlink()  # only the cache can serve it now
    again = ds.sample(0, 0)
    assert torch.equal(first["view1"], again["view1"]) and ds.cache.hits == 1
    no_cache = SSLClipDataset(table, "simclr")
    with pytest.raises(SampleSkipped, match="missing object"):
        no_cache.sample(0, 0)


def test_videos_of_other_sizes_decode_at_their_size(tmp_path):
    uri = str(tmp_path / "big.mp4")
    storage.write_bytes(uri, encode_mp4(video_frames(0, 20, size=96), fps=30))
    s = SSLClipDataset(pd.DataFrame({"video_uri": [uri]}), "simclr").sample(0, 0)
    assert s["view1"].shape == (1, 4, 96, 96)


@pytest.mark.parametrize("method", ["simclr", "echoclr"])
def test_decoded_cache_gives_the_same_samples_without_reading(rows, method):
    streamed = SSLClipDataset(rows, method, clip_len=4, seed=5)
    cached = RecordingSSL(rows, method, clip_len=4, seed=5)
    cached.reads = []
    stats = cached.cache_decoded(2**30)
    assert stats.complete and stats.cached == len(rows) and stats.nbytes > 0
    assert "does not fit" not in stats.describe(1024)
    cached.reads = []
    for i in range(len(rows)):
        a, b = streamed.sample(i, 2), cached.sample(i, 2)
        assert all(torch.equal(a[k], b[k]) for k in a), i
    assert cached.reads == []  # every sample came from memory


def test_decoded_cache_over_budget_streams_the_rest(rows):
    ds = RecordingSSL(rows, "simclr", clip_len=4, seed=5)
    ds.reads = []
    one = SSLClipDataset(rows, "simclr").cache_decoded(2**30).nbytes / len(rows)
    stats = ds.cache_decoded(int(2.5 * one))  # room for about two videos
    assert 1 <= stats.cached < len(rows) and not stats.complete and stats.nbytes <= 2.5 * one
    assert f"the other {len(rows) - stats.cached} videos are streamed" in stats.describe(1)
    ds.reads = []
    uncached = next(i for i, u in enumerate(rows.video_uri) if u not in ds.decoded)
    assert torch.equal(ds.sample(uncached, 0)["view1"], SSLClipDataset(rows, "simclr", clip_len=4, seed=5).sample(uncached, 0)["view1"])
    assert ds.reads == [rows.video_uri[uncached]]


def test_decoded_cache_shared_between_datasets_decodes_once(rows):
    store: dict = {}
    first = SSLClipDataset(rows, "simclr", clip_len=4, seed=5)
    assert first.cache_decoded(2**30, store).complete and len(store) == len(rows)
    second = RecordingSSL(rows.iloc[:4].reset_index(drop=True), "echoclr", clip_len=4, seed=5)
    second.reads = []
    stats = second.cache_decoded(2**30, store)
    assert second.reads == [] and stats.cached == 4 and stats.complete  # nothing decoded again
    assert stats.nbytes == sum(store[u].nbytes for u in rows.video_uri[:4])
