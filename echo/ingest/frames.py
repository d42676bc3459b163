"""What every ingest decoder shares: the skip reason, the pixel budget, and frames reduced as decoded.

A source file (DICOM cine or video file) becomes grayscale frames one at a time; each frame is
shrunk to the working grid as soon as it is decoded, so memory holds ``T`` small frames and
one full-size frame, never ``T`` full-size ones. Before any pixel is decoded, the size the
header declares (frames x rows x columns) is checked against a budget, so a small file that
declares a huge clip is refused without being expanded.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "WORK_FACTOR",
    "SkipFile",
    "check_pixel_budget",
    "work_shape",
    "FrameStack",
]

# 2**31 pixels: 2,000 frames of 1024x1024, about ten times the longest cine seen in practice.
DEFAULT_MAX_PIXELS = 2**31
# The working grid keeps up to this many times the output size along the longer side, enough
# for the sector crop (at least a third of the frame) to be resized down, never up.
WORK_FACTOR = 4


class SkipFile(Exception):
    """A source file that is not ingested. ``reason``: a short code for the summary;
    ``detail``: a message naming the file only by the caller's opaque name, never a value that
    may carry patient data."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")

    def __reduce__(self):  # picklable across the ingest pool's processes
        return (type(self), (self.reason, self.detail))


def check_pixel_budget(n_frames: int, rows: int, cols: int, max_pixels: int, name: str) -> None:
    """Raise ``SkipFile("over_budget")`` when ``n_frames * rows * cols`` exceeds ``max_pixels``
    (or a dimension is not positive: ``"corrupt"``). Called with header values, before decoding."""
    if n_frames < 1 or rows < 1 or cols < 1:
        raise SkipFile("corrupt", f"{name}: the header declares {n_frames} frame(s) of {rows}x{cols} pixels")
    total = n_frames * rows * cols
    if total > max_pixels:
        raise SkipFile(
            "over_budget",
            f"{name}: {n_frames} frames of {rows}x{cols} = {total / 1e6:,.0f} Mpixel, over the budget of "
            f"{max_pixels / 1e6:,.0f} Mpixel (--max-pixels)",
        )


def work_shape(rows: int, cols: int, size: tuple[int, int]) -> tuple[int, int]:
    """The ``(h, w)`` grid frames of ``rows x cols`` are reduced to for output ``size`` ``(H, W)``:
    the longer side at most ``WORK_FACTOR * max(size)``, aspect kept, never enlarged."""
    limit = WORK_FACTOR * max(size)
    scale = min(1.0, limit / max(rows, cols))
    return max(1, round(rows * scale)), max(1, round(cols * scale))


class FrameStack:
    """Grayscale frames collected one at a time, each resized to ``shape`` ``(h, w)`` on arrival.

    uint8 frames stay uint8; any other dtype (more than 8 bits, float luma) is kept as float32
    and scaled to uint8 by the clip's own minimum and maximum in ``array``. ``max_frames``
    stops a decoder that yields more frames than its header declared.
    """

    def __init__(self, shape: tuple[int, int], max_frames: int, name: str):
        self.shape = shape
        self.max_frames = max_frames
        self.name = name
        self._frames: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._frames)

    def add(self, frame: np.ndarray) -> None:
        """Append one ``(rows, cols)`` frame of any numeric dtype, resized to the working grid."""
        if len(self._frames) >= self.max_frames:
            raise SkipFile("corrupt", f"{self.name}: more frames than the header declares ({self.max_frames})")
        h, w = self.shape
        if frame.dtype != np.uint8:
            frame = frame.astype(np.float32)
        if frame.shape != (h, w):
            frame = np.asarray(Image.fromarray(frame).resize((w, h), Image.Resampling.BILINEAR))
        self._frames.append(frame)

    def array(self) -> np.ndarray:
        """The frames as ``(T, h, w)`` uint8."""
        if not self._frames:
            raise SkipFile("corrupt", f"{self.name}: no frame could be decoded")
        if all(f.dtype == np.uint8 for f in self._frames):
            return np.stack(self._frames)
        return _scale_to_uint8(np.stack([f.astype(np.float32) for f in self._frames]))


def _scale_to_uint8(clip: np.ndarray) -> np.ndarray:
    """Min-max scale a clip of any numeric dtype to uint8 (a constant clip becomes zeros)."""
    lo, hi = float(clip.min()), float(clip.max())
    if hi <= lo:
        return np.zeros(clip.shape, np.uint8)
    out = (clip.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
