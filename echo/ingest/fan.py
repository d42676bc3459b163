"""The scan sector (the ultrasound fan) of a clip, and the masked, cropped, resized clip.

One estimate for every source, DICOM or video file: the fan is found from the pixels
(``estimate_sector``), and a declared region box (DICOM's Sequence of Ultrasound Regions) only
ever narrows it (``sector_mask``): the kept area is the box intersected with the estimate,
never the box alone, because a box can enclose burned-in text, measurement readouts and the
depth scale. Every pixel outside the kept area, the corners beside the fan included, is zero
in the output (``crop_to_sector``).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage, spatial

from echo.ingest.frames import SkipFile

__all__ = [
    "SECTOR_MIN_FRACTION",
    "SECTOR_MAX_FRACTION",
    "MOVING_FRACTION",
    "MIN_CONTRAST",
    "Box",
    "regions_mask",
    "estimate_sector",
    "sector_mask",
    "crop_to_sector",
]

Box = tuple[int, int, int, int]  # x0, y0, x1, y1, corners inclusive (DICOM's convention)

# A sector smaller than this fraction of the frame is not a sector; one larger leaves no room
# for burned-in text to be told apart from it, so it cannot be trusted either.
SECTOR_MIN_FRACTION = 0.05
SECTOR_MAX_FRACTION = 0.95
# Share of consecutive frame pairs in which a sector pixel changes, at least.
MOVING_FRACTION = 0.5
# A moving pixel belongs to the sector only when it gets more than this many gray levels brighter
# than the background at some point: noise in the black surround moves but stays dark. Small,
# because a fan's far corners are barely brighter than the surround (2-4 levels in the real cine).
MIN_CONTRAST = 2.0


def regions_mask(regions: tuple[Box, ...], shape: tuple[int, int]) -> np.ndarray | None:
    """The union of the region boxes as an ``(H, W)`` bool mask, or None when there is none or
    one cannot be placed: a box reaching outside the image (the pixels were rescaled after the
    header was written) or an inverted box."""
    h, w = shape
    if not regions:
        return None
    mask = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in regions:
        if not (0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h):
            return None
        mask[y0 : y1 + 1, x0 : x1 + 1] = True
    return mask


def _disk(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def _fill_polygon(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(N, 2)`` (x, y) polygon vertices -> filled ``(H, W)`` bool mask, border included."""
    img = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(img).polygon([(float(x), float(y)) for x, y in points], fill=1, outline=1)
    return np.asarray(img, dtype=bool)


def _check_fraction(mask: np.ndarray, name: str, what: str) -> np.ndarray:
    fraction = float(mask.mean())
    if not SECTOR_MIN_FRACTION <= fraction <= SECTOR_MAX_FRACTION:
        raise SkipFile(
            "no_sector", f"{name}: {what} covers {fraction:.0%} of the frame; cannot tell the scan sector from the rest"
        )
    return mask


def estimate_sector(frames: np.ndarray, name: str = "clip") -> np.ndarray:
    """The scan sector of ``frames`` (``(T, H, W)`` uint8, T >= 2) as an ``(H, W)`` bool mask.

    Two cues across the frames. Motion: a pixel moves when it changes between consecutive
    frames in more than ``MOVING_FRACTION`` of the pairs, by more than twice the background
    noise level; speckle inside the sector changes nearly every
    frame, burned-in text never, and an ECG sweep or scrolling trace only when the trace
    passes. Intensity: a moving pixel counts only if it rises ``MIN_CONTRAST`` gray levels
    above the background's brightest level at some point, so noise in the dark surround
    does not. An opening removes thin moving lines (timers), a closing joins the speckle, and
    the convex hull of the largest component is the sector. Raises ``SkipFile("no_sector")``
    when the result is not between ``SECTOR_MIN_FRACTION`` and ``SECTOR_MAX_FRACTION`` of the frame.
    """
    t, h, w = frames.shape
    if t < 2:
        raise SkipFile("no_sector", f"{name}: one frame cannot show which pixels move")
    sample = np.linspace(0, t - 2, min(16, t - 1)).round().astype(int)
    noise = np.median(np.abs(frames[sample + 1].astype(np.int16) - frames[sample]), axis=0)
    floor = 2.0 * float(np.percentile(noise, 20))
    # One (H, W) counter and one running maximum whatever the clip length.
    changes = np.zeros((h, w), np.uint16)
    peak = frames[0].copy()
    for i in range(t - 1):
        changes += np.abs(frames[i + 1].astype(np.int16) - frames[i]) > floor
        np.maximum(peak, frames[i + 1], out=peak)
    moving = changes > MOVING_FRACTION * (t - 1)
    # The background's level: the brightest value reached by the darkest tenth of the pixels.
    background = float(np.percentile(peak, 10))
    moving &= peak > background + MIN_CONTRAST
    radius = max(2, round(min(h, w) / 100))
    moving = ndimage.binary_opening(moving, _disk(radius))
    moving = ndimage.binary_closing(moving, _disk(2 * radius))
    labels, n = ndimage.label(moving)
    if n == 0:
        raise SkipFile("no_sector", f"{name}: no pixels change over time")
    sizes = ndimage.sum_labels(moving, labels, index=np.arange(1, n + 1))
    component = labels == int(np.argmax(sizes)) + 1
    ys, xs = np.nonzero(component)
    points = np.stack([xs, ys], axis=1)
    try:
        mask = _fill_polygon(points[spatial.ConvexHull(points).vertices], (h, w))
    except spatial.QhullError:  # a degenerate (flat) component
        mask = component
    return _check_fraction(mask, name, "the moving area")


def sector_mask(frames: np.ndarray, regions: tuple[Box, ...] = (), name: str = "clip") -> tuple[np.ndarray, str]:
    """``(mask, source)``: the estimated sector of ``frames`` (``(T, H, W)`` uint8), narrowed
    to the declared region boxes when they fit the image (``source == "regions+estimated"``),
    else the estimate alone (``"estimated"``). A box never widens the estimate."""
    fan = estimate_sector(frames, name)
    box = regions_mask(regions, frames.shape[1:])
    if box is None:
        return fan, "estimated"
    return _check_fraction(fan & box, name, "the region box within the estimated sector"), "regions+estimated"


def crop_to_sector(frames: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Zero everything outside ``mask``, crop to its bounding box and resize to ``size``
    ``(H, W)`` keeping the aspect ratio (centred, zero padding).

    ``frames``: ``(T, H, W)`` uint8; returns ``(T, size[0], size[1])`` uint8 in which every pixel
    outside the resized mask is exactly 0.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("empty sector mask")
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop_mask = mask[y0:y1, x0:x1]
    ch, cw = crop_mask.shape
    out_h, out_w = size
    scale = min(out_h / ch, out_w / cw)
    nh, nw = max(1, min(out_h, round(ch * scale))), max(1, min(out_w, round(cw * scale)))
    top, left = (out_h - nh) // 2, (out_w - nw) // 2
    small_mask = np.asarray(
        Image.fromarray(crop_mask.astype(np.uint8) * 255).resize((nw, nh), Image.Resampling.BILINEAR)
    ) >= 128
    out = np.zeros((len(frames), out_h, out_w), np.uint8)
    for i, frame in enumerate(frames):
        crop = np.where(crop_mask, frame[y0:y1, x0:x1], 0).astype(np.uint8)
        small = np.asarray(Image.fromarray(crop).resize((nw, nh), Image.Resampling.BILINEAR))
        out[i, top : top + nh, left : left + nw] = np.where(small_mask, small, 0)
    return out
