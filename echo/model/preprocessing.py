"""How a video becomes the clips a model scores: the settings a model bundle records.

Kept apart from :mod:`echo.model.scoring` (which applies them) so that reading a bundle's
metadata (``echo-ssl models pull``) needs neither torch nor a video decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

__all__ = ["PREPROCESSING_VERSION", "Preprocessing"]

# Version 1: num_clips evenly spaced clips of clip_len frames, stride apart, each min-max scaled
# to [0, 1], resized to frame_size (bilinear, antialiased); the video's probability is the mean
# over its clips of sigmoid(logit), in float64 (echo.model.scoring).
PREPROCESSING_VERSION = "1"


def _positive_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool) and int(value) > 0


@dataclass(frozen=True)
class Preprocessing:
    """``clip_len`` frames per clip, ``num_clips`` clips per video, ``stride`` frames between a
    clip's frames, ``frame_size`` ``(H, W)`` pixels the clips are resized to (``None``: as
    decoded; an int means a square)."""

    clip_len: int = 16
    num_clips: int = 4
    stride: int = 1
    frame_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for name in ("clip_len", "num_clips", "stride"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise ValueError(f"preprocessing: {name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        size = self.frame_size
        if size is None:
            return
        pair = (size, size) if _positive_int(size) else tuple(size) if isinstance(size, (list, tuple)) else ()
        if len(pair) != 2 or not all(_positive_int(s) for s in pair):
            raise ValueError(f"preprocessing: frame_size must be a positive int or [H, W] of positive ints, got {size!r}")
        object.__setattr__(self, "frame_size", (int(pair[0]), int(pair[1])))
