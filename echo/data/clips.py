"""Which frames a clip takes, and evaluation clips decoded straight from video bytes.

A clip is ``clip_len`` frames taken ``stride`` frames apart, so it spans
``(clip_len - 1) * stride + 1`` frames of the video.

Short-video policy (one policy everywhere): a video shorter than a clip's span is **looped**:
frame indices wrap around modulo the video's frame count, so a clip is always made of real
frames of the video, never padding zeros. A 3-frame video read as a 4-frame clip at stride 1
from start 0 gives frames ``0, 1, 2, 0``.

Normalisation: each clip is min-max scaled to ``[0, 1]`` on its own (``minmax``); a constant
clip (max == min) becomes all zeros.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from echo.data.video import decode_frames

__all__ = [
    "clip_span",
    "train_clip_indices",
    "eval_clip_indices",
    "minmax",
    "decode_at",
    "resize_clips",
    "eval_clips",
]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def _check(n_frames: int, clip_len: int, stride: int) -> None:
    if n_frames < 1:
        raise ValueError(f"a video needs at least one frame, got n_frames={n_frames}")
    if clip_len < 1 or stride < 1:
        raise ValueError(f"clip_len and stride must be >= 1, got clip_len={clip_len}, stride={stride}")


def clip_span(clip_len: int, stride: int) -> int:
    """Frames of the video that one clip covers: ``(clip_len - 1) * stride + 1``."""
    return (clip_len - 1) * stride + 1


def train_clip_indices(n_frames: int, clip_len: int, stride: int, rng: np.random.Generator) -> np.ndarray:
    """Frame indices of one training clip with a random start; ``(clip_len,)`` int64.

    The start is uniform over every position where the clip fits. A video shorter than the
    clip's span starts uniformly anywhere and loops (indices modulo ``n_frames``).
    """
    _check(n_frames, clip_len, stride)
    span = clip_span(clip_len, stride)
    offsets = np.arange(clip_len, dtype=np.int64) * stride
    if n_frames >= span:
        start = int(rng.integers(0, n_frames - span + 1))
        return start + offsets
    start = int(rng.integers(0, n_frames))
    return (start + offsets) % n_frames


def eval_clip_indices(n_frames: int, clip_len: int, num_clips: int, stride: int) -> np.ndarray:
    """Frame indices of ``num_clips`` evenly spaced clips; ``(num_clips, clip_len)`` int64.

    When the clip fits, starts are ``round(linspace(0, n_frames - span, num_clips))`` so the
    first clip begins at frame 0 and the last ends at the last frame. A video shorter than the
    span loops, with starts ``floor(k * n_frames / num_clips)`` spread over the video.
    """
    _check(n_frames, clip_len, stride)
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    span = clip_span(clip_len, stride)
    offsets = np.arange(clip_len, dtype=np.int64) * stride
    if n_frames >= span:
        starts = np.rint(np.linspace(0, n_frames - span, num_clips)).astype(np.int64)
        return starts[:, None] + offsets[None, :]
    starts = (np.arange(num_clips, dtype=np.int64) * n_frames) // num_clips
    return (starts[:, None] + offsets[None, :]) % n_frames


def minmax(clip: ArrayT) -> ArrayT:
    """Scale a clip (any shape, e.g. ``(T, H, W)``) to ``[0, 1]`` by its own min and max.

    Returns float32 (numpy in, numpy out; tensor in, tensor out). A constant clip becomes zeros.
    """
    if isinstance(clip, torch.Tensor):
        x = clip.to(torch.float32)
        lo, hi = x.min(), x.max()
        return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    x = np.asarray(clip, dtype=np.float32)
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def decode_at(data: bytes, uri: str, choose: Callable[[int], np.ndarray]) -> np.ndarray:
    """Frames at ``choose(n_frames)`` (an int array of any shape, repeats and any order allowed).

    Opens the video once, decodes each distinct frame once in ascending order, and returns
    uint8 of shape ``choose(n).shape + (H, W)``.
    """
    plan: dict[str, np.ndarray] = {}

    def needed(n_frames: int) -> list[int]:
        idx = np.asarray(choose(n_frames), dtype=np.int64)
        distinct, inverse = np.unique(idx, return_inverse=True)
        plan["inverse"] = inverse.reshape(idx.shape)
        return distinct.tolist()

    frames = decode_frames(data, needed, uri)
    return frames[plan["inverse"]]


def resize_clips(clips: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Clips ``(K, T, H, W)`` float32 in ``[0, 1]`` resized to ``size = (H', W')`` pixels
    (bilinear, antialiased, clamped back to ``[0, 1]``); returned as they are when already that size."""
    k, t, h, w = clips.shape
    if (h, w) == tuple(size):
        return clips
    x = torch.from_numpy(np.ascontiguousarray(clips)).reshape(k * t, 1, h, w)
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True).clamp_(0.0, 1.0)
    return x.reshape(k, t, *size).numpy()


def eval_clips(data: bytes, uri: str, clip_len: int = 16, num_clips: int = 4, stride: int = 1,
               frame_size: tuple[int, int] | None = None) -> np.ndarray:
    """Evaluation clips of one video from its MP4 bytes; ``(K, T, H, W)`` float32 in ``[0, 1]``.

    ``K = num_clips`` evenly spaced clips of ``T = clip_len`` frames (``eval_clip_indices``),
    each min-max normalised on its own, then resized to ``frame_size`` ``(H, W)`` pixels when
    given (:func:`resize_clips`). The union of the frames the clips need is decoded once.
    Raises ``echo.data.video.VideoDecodeError`` naming ``uri`` for an unreadable video.
    """
    clips = decode_at(data, uri, lambda n: eval_clip_indices(n, clip_len, num_clips, stride))
    out = np.stack([minmax(c) for c in clips]).astype(np.float32, copy=False)
    return out if frame_size is None else resize_clips(out, frame_size)
