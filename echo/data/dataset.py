"""Datasets over manifest rows: self-supervised pairs, labelled training clips, evaluation clips.

Each dataset maps a row position ``index`` (0-based, in the order of the ``rows`` DataFrame)
and an ``epoch`` to one sample dict of tensors. Every random choice (clip start, partner
video, augmentation, frame order) is drawn from a generator seeded by
``(seed, epoch, index)``, so a sample's content does not depend on which loader worker or
rank produces it, nor on how many there are.

A sample reads the video's compressed bytes with ``echo.data.storage.read_bytes`` and decodes only
the frames it needs with ``echo.data.video.decode_frames``; the decord reader is opened per sample,
in whichever process calls ``sample``. An optional LRU cache of compressed bytes
(``cache_bytes``) lives in the dataset object, so each loader worker process has its own.
``cache_decoded`` instead decodes whole videos once into memory (uint8) under a budget, so
samples of those videos skip storage and decoding (and give the same frames); the videos
that do not fit are streamed as before. It too lives in the dataset object: the loader's
worker processes each receive a copy.

A video that cannot be used (missing object, an object over ``max_object_bytes`` (judged from
its size, never read whole), empty/truncated/corrupt/non-video bytes, storage errors after retries) raises ``SampleSkipped`` naming its URI and the reason; the loader
records it and goes on. Any other exception is a bug and propagates.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from echo.data import storage
from echo.data.roots import DEFAULT_MAX_OBJECT_MB
from echo.data.augment import augment_clip
from echo.data.clips import decode_at, eval_clips, minmax, train_clip_indices
from echo.data.order import permutations
from echo.data.video import VideoDecodeError, decode_frames

__all__ = [
    "SSL_METHODS",
    "SampleSkipped",
    "ByteCache",
    "DecodedCacheStats",
    "ClipDataset",
    "SSLClipDataset",
    "LabelledClipDataset",
    "EvalClipDataset",
]

SSL_METHODS = ("simclr", "mi-simclr", "echoclr")

Sample = dict[str, Any]


class SampleSkipped(Exception):
    """One sample cannot be produced; ``uri`` is the video at fault, ``reason`` says why."""

    def __init__(self, uri: str, reason: str):
        self.uri = uri
        self.reason = reason
        super().__init__(f"skipped {uri}: {reason}")

    def __reduce__(self):  # picklable across processes
        return (type(self), (self.uri, self.reason))


class ByteCache:
    """LRU cache of objects' bytes under a total budget of ``capacity`` bytes (0 = off).

    An object larger than the whole budget is never cached.
    """

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.size = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> bytes | None:
        data = self._items.get(key)
        if data is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.capacity or key in self._items:
            return
        self._items[key] = data
        self.size += len(data)
        while self.size > self.capacity:
            _, old = self._items.popitem(last=False)
            self.size -= len(old)


@dataclass(frozen=True)
class DecodedCacheStats:
    """What ``ClipDataset.cache_decoded`` kept: videos and bytes cached, of how many videos,
    and the seconds it took."""

    cached: int
    total: int
    nbytes: int
    seconds: float

    @property
    def complete(self) -> bool:
        return self.cached == self.total

    def describe(self, budget_mb: float) -> str:
        """One progress line."""
        head = (f"decoded-frame cache: {self.cached}/{self.total} videos, {self.nbytes / 2**20:.0f} MB of "
                f"{budget_mb:g} MB, decoded in {self.seconds:.0f} s")
        if self.complete:
            return head
        return head + (f"; the corpus does not fit, the other {self.total - self.cached} videos are streamed "
                       "(read and decoded per sample)")


class ClipDataset:
    """Common ground: URIs, seeded generators, cached reads and frame decoding with skips.

    Subclasses implement ``sample(index, epoch) -> dict``.
    """

    def __init__(self, rows: pd.DataFrame, seed: int = 0, cache_bytes: int = 0,
                 max_object_bytes: int = DEFAULT_MAX_OBJECT_MB * 2**20):
        if "video_uri" not in rows.columns:
            raise ValueError("manifest rows need a 'video_uri' column")
        if len(rows) == 0:
            raise ValueError("no manifest rows to build a dataset from")
        self.uris: np.ndarray = rows["video_uri"].astype(str).to_numpy()
        self.seed = int(seed)
        self.epoch = 0
        self.cache = ByteCache(cache_bytes)
        self.max_object_bytes = int(max_object_bytes)  # larger objects are skipped, never read whole
        self.decoded: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.uris)

    def uri(self, index: int) -> str:
        return str(self.uris[index])

    def set_epoch(self, epoch: int) -> None:
        """The epoch ``__getitem__`` uses (the loader passes epochs to ``sample`` directly)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> Sample:
        return self.sample(index, self.epoch)

    def sample(self, index: int, epoch: int) -> Sample:
        raise NotImplementedError

    def rng(self, index: int, epoch: int) -> np.random.Generator:
        """The generator for every random choice of sample ``index`` in ``epoch``."""
        return np.random.default_rng([self.seed, int(epoch), int(index)])

    def read(self, uri: str) -> bytes:
        """The object's bytes, from the cache when there; ``SampleSkipped`` on a failed read."""
        data = self.cache.get(uri) if self.cache.capacity else None
        if data is not None:
            return data
        try:
            data = storage.read_bytes(uri, max_bytes=self.max_object_bytes)
        except FileNotFoundError:
            raise SampleSkipped(uri, "missing object") from None
        except storage.ObjectTooLarge as e:
            raise SampleSkipped(uri, f"{e.size / 2**20:.0f} MiB, over the {e.cap / 2**20:g} MiB cap (--max-object-mb)") from None
        except OSError as e:  # StorageError after boto3's retries, or a local I/O error
            raise SampleSkipped(uri, f"storage error: {e}") from None
        if self.cache.capacity:
            self.cache.put(uri, data)
        return data

    def cache_decoded(self, budget_bytes: int, shared: dict[str, np.ndarray] | None = None) -> DecodedCacheStats:
        """Decode whole videos into memory, in row order, while they fit in ``budget_bytes``
        (uint8 ``(T, H, W)`` each); stop at the first that does not fit. A video that cannot
        be read or decoded is left out (its samples are skipped as usual).

        ``shared``: a store of videos already decoded in this process (by an earlier dataset
        over the same videos), used and extended instead of decoding them again; the budget
        covers the whole store. The stats count this dataset's videos only.
        """
        started = time.perf_counter()
        if shared is not None:
            self.decoded = shared
        used = sum(a.nbytes for a in self.decoded.values())
        uris = list(dict.fromkeys(self.uris.tolist()))
        for uri in uris:
            if uri in self.decoded:
                continue
            try:
                frames = decode_frames(self.read(uri), lambda n: range(n), uri)
            except (SampleSkipped, VideoDecodeError):
                continue
            if used + frames.nbytes > budget_bytes:
                break
            self.decoded[uri] = frames
            used += frames.nbytes
        mine = [self.decoded[u] for u in uris if u in self.decoded]
        return DecodedCacheStats(len(mine), len(uris), sum(a.nbytes for a in mine), time.perf_counter() - started)

    def frames(self, uri: str, choose: Callable[[int], np.ndarray]) -> np.ndarray:
        """Decode the frames ``choose(n_frames)`` picks (``echo.data.clips.decode_at``); ``(T, H, W)``
        uint8 for a ``(T,)`` choice; from the decoded-frame cache when the video is there.
        ``SampleSkipped`` on failure."""
        cached = self.decoded.get(uri)
        if cached is not None:
            return cached[np.asarray(choose(len(cached)), dtype=np.int64)]
        data = self.read(uri)
        try:
            return decode_at(data, uri, choose)
        except VideoDecodeError as e:
            raise SampleSkipped(uri, e.reason) from None


def _labels(rows: pd.DataFrame, allow_missing: bool) -> np.ndarray:
    if "label" not in rows.columns:
        raise ValueError("manifest rows need a 'label' column")
    labels = pd.to_numeric(rows["label"], errors="coerce").to_numpy(dtype=np.float32)
    if not allow_missing and np.isnan(labels).any():
        where = rows["row"].to_numpy() if "row" in rows.columns else np.arange(1, len(rows) + 1)
        bad = where[np.isnan(labels)][:10].tolist()
        raise ValueError(f"labelled clips need a label on every row; manifest row(s) {bad} have none")
    return labels


class SSLClipDataset(ClipDataset):
    """Positive pairs for self-supervised pretraining.

    - ``simclr``: two augmentations of one clip of the row's video.
    - ``mi-simclr``: the row's video and another video of the same study (chosen at random;
      a study with one video pairs it with itself), each with its own random clip and
      augmentation.
    - ``echoclr``: as ``mi-simclr``, then each view's frames are reordered by one of the
      ``clip_len!`` permutations of ``echo.data.order.permutations``; its row is the label.

    Sample: ``view1``, ``view2`` float32 ``(1, T, H, W)`` in ``[0, 1]`` (``T = clip_len``);
    ``order1``, ``order2`` int64 permutation labels (-1 unless ``echoclr``); ``index`` int64.
    A pair whose partner video fails is skipped under the partner's URI.
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        method: str,
        clip_len: int = 4,
        stride: int = 1,
        seed: int = 0,
        cache_bytes: int = 0,
        max_object_bytes: int = DEFAULT_MAX_OBJECT_MB * 2**20,
    ):
        super().__init__(rows, seed=seed, cache_bytes=cache_bytes, max_object_bytes=max_object_bytes)
        if method not in SSL_METHODS:
            raise ValueError(f"unknown self-supervised method {method!r} (expected one of {', '.join(SSL_METHODS)})")
        self.method = method
        self.clip_len = int(clip_len)
        self.stride = int(stride)
        self.perms: np.ndarray | None = None
        if method == "echoclr":
            self.perms = permutations(self.clip_len).numpy()
        self.partners: list[np.ndarray] = []
        if method != "simclr":
            if "study_id" not in rows.columns:
                raise ValueError(f"method {method!r} pairs videos of a study: manifest rows need a 'study_id' column")
            groups = pd.Series(np.arange(len(rows))).groupby(rows["study_id"].to_numpy()).indices
            members = {key: np.asarray(pos, dtype=np.int64) for key, pos in groups.items()}
            studies = rows["study_id"].to_numpy()
            self.partners = [members[s] for s in studies]

    def _partner(self, index: int, rng: np.random.Generator) -> int:
        others = self.partners[index]
        others = others[others != index]
        return int(rng.choice(others)) if len(others) else index

    def _clip_indices(self, rng: np.random.Generator) -> Callable[[int], np.ndarray]:
        return lambda n: train_clip_indices(n, self.clip_len, self.stride, rng)

    def _order(self, view: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
        if self.perms is None:
            return view, -1
        k = int(rng.integers(len(self.perms)))
        return view[torch.from_numpy(self.perms[k])], k

    def sample(self, index: int, epoch: int) -> Sample:
        rng = self.rng(index, epoch)
        uri = self.uri(index)
        if self.method == "simclr":
            clip = self.frames(uri, self._clip_indices(rng))
            v1, v2 = augment_clip(clip, rng), augment_clip(clip, rng)
        else:
            partner = self._partner(index, rng)
            if partner == index:
                # One video: decode both views' frames in one pass.
                c1, c2 = self.frames(uri, lambda n: np.stack([self._clip_indices(rng)(n) for _ in range(2)]))
            else:
                c1 = self.frames(uri, self._clip_indices(rng))
                c2 = self.frames(self.uri(partner), self._clip_indices(rng))
            v1, v2 = augment_clip(c1, rng), augment_clip(c2, rng)
        v1, o1 = self._order(v1, rng)
        v2, o2 = self._order(v2, rng)
        return {
            "view1": v1[None],
            "view2": v2[None],
            "order1": torch.tensor(o1, dtype=torch.int64),
            "order2": torch.tensor(o2, dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
        }


class LabelledClipDataset(ClipDataset):
    """One random clip per labelled video, for fine-tuning.

    Sample: ``clip`` float32 ``(1, T, H, W)`` in ``[0, 1]`` (augmented when ``augment``),
    ``label`` float32 scalar (1 = severe AS), ``index`` int64. Every row needs a label.
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        clip_len: int = 16,
        stride: int = 1,
        seed: int = 0,
        augment: bool = True,
        cache_bytes: int = 0,
        max_object_bytes: int = DEFAULT_MAX_OBJECT_MB * 2**20,
    ):
        super().__init__(rows, seed=seed, cache_bytes=cache_bytes, max_object_bytes=max_object_bytes)
        self.labels = _labels(rows, allow_missing=False)
        self.clip_len = int(clip_len)
        self.stride = int(stride)
        self.augment = bool(augment)

    def sample(self, index: int, epoch: int) -> Sample:
        rng = self.rng(index, epoch)
        clip = self.frames(self.uri(index), lambda n: train_clip_indices(n, self.clip_len, self.stride, rng))
        x = augment_clip(clip, rng) if self.augment else torch.from_numpy(minmax(clip))
        return {
            "clip": x[None],
            "label": torch.tensor(self.labels[index], dtype=torch.float32),
            "index": torch.tensor(index, dtype=torch.int64),
        }


class EvalClipDataset(ClipDataset):
    """``num_clips`` evenly spaced clips per video (``echo.data.clips.eval_clips``, resized to
    ``frame_size`` ``(H, W)`` when given), no randomness.

    Sample: ``clips`` float32 ``(K, 1, T, H, W)`` in ``[0, 1]`` (each clip min-max scaled),
    ``label`` float32 scalar (NaN where unknown), ``index`` int64.
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        clip_len: int = 16,
        num_clips: int = 4,
        stride: int = 1,
        cache_bytes: int = 0,
        frame_size: tuple[int, int] | None = None,
        max_object_bytes: int = DEFAULT_MAX_OBJECT_MB * 2**20,
    ):
        super().__init__(rows, seed=0, cache_bytes=cache_bytes, max_object_bytes=max_object_bytes)
        self.labels = _labels(rows, allow_missing=True) if "label" in rows.columns else np.full(len(rows), math.nan, np.float32)
        self.clip_len = int(clip_len)
        self.num_clips = int(num_clips)
        self.stride = int(stride)
        self.frame_size = None if frame_size is None else (int(frame_size[0]), int(frame_size[1]))

    def sample(self, index: int, epoch: int) -> Sample:
        uri = self.uri(index)
        data = self.read(uri)
        try:
            clips = eval_clips(data, uri, self.clip_len, self.num_clips, self.stride, self.frame_size)
        except VideoDecodeError as e:
            raise SampleSkipped(uri, e.reason) from None
        return {
            "clips": torch.from_numpy(clips)[:, None],
            "label": torch.tensor(self.labels[index], dtype=torch.float32),
            "index": torch.tensor(index, dtype=torch.int64),
        }
