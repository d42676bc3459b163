"""The published clip augmentations as one affine warp per frame.

Published recipe, with the same parameters for every frame of a clip: zero-pad ``pad`` (8)
pixels and random-crop back to size, horizontal flip with p = 0.5, rotation by an integer
angle in ``[-max_angle, max_angle]`` (10) degrees with p = 0.5; then per-clip min-max to
``[0, 1]``. The reference code rotates every frame with ``scipy.ndimage.rotate`` after
padding, cropping and flipping. Here the three geometric steps are composed into one
matrix and applied with one bilinear ``grid_sample`` to the whole clip (frames as channels,
so they share one sampling grid); without rotation the matrix is an integer shift and flip,
applied as an exact copy. About 0.25 ms for a 4-frame 112 x 112 clip on one core, against
about 5 ms for the per-frame scipy rotation.

Step-by-step equivalence: zeros enter exactly where the reference puts them. The padding
is the zero padding of ``grid_sample``; where the rotation reads outside the cropped frame
the result is zeroed, as ``scipy.ndimage.rotate`` (``mode="constant"``) does. With bilinear
interpolation in both, values agree with the step-by-step reference up to float rounding
(``tests/test_augment.py``); the reference's default is cubic (``order=3``) interpolation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from echo.data.clips import minmax

__all__ = ["PAD", "MAX_ANGLE", "AugmentParams", "sample_params", "warp_matrix", "warp_clip", "augment_clip"]

PAD = 8  # pixels of zero padding before the random crop
MAX_ANGLE = 10  # degrees


@dataclass(frozen=True)
class AugmentParams:
    """One clip's augmentation. ``crop_y``/``crop_x``: top-left corner of the crop in the padded
    frame, in ``[0, 2 * pad]`` pixels; ``angle``: degrees (0 = no rotation), counter-clockwise
    in the sense of ``scipy.ndimage.rotate``."""

    crop_y: int
    crop_x: int
    flip: bool
    angle: int
    pad: int = PAD


def sample_params(
    rng: np.random.Generator,
    pad: int = PAD,
    max_angle: int = MAX_ANGLE,
    p_flip: float = 0.5,
    p_rotate: float = 0.5,
) -> AugmentParams:
    """Draw one clip's parameters from ``rng`` (always the same four draws, in this order)."""
    crop_y, crop_x = (int(v) for v in rng.integers(0, 2 * pad + 1, size=2))
    flip = bool(rng.random() < p_flip)
    rotate = bool(rng.random() < p_rotate)
    angle = int(rng.integers(-max_angle, max_angle + 1))
    return AugmentParams(crop_y, crop_x, flip, angle if rotate else 0, pad)


def _rotation(angle_deg: float, height: int, width: int) -> np.ndarray:
    """``(3, 3)`` map from output to input pixel ``(x, y, 1)`` of ``scipy.ndimage.rotate(reshape=False)``."""
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    centre = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1]], dtype=np.float64)
    uncentre = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], dtype=np.float64)
    return centre @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ uncentre


def warp_matrix(params: AugmentParams, height: int, width: int) -> np.ndarray:
    """``(3, 3)`` map from an output pixel ``(x, y, 1)`` to its source pixel in the original frame:
    rotation, then flip, then crop-of-the-padded-frame, composed (the reference applies them
    to the image in the opposite order: pad + crop, flip, rotate)."""
    crop = np.array([[1, 0, params.crop_x - params.pad], [0, 1, params.crop_y - params.pad], [0, 0, 1]], dtype=np.float64)
    flip = np.array([[-1, 0, width - 1], [0, 1, 0], [0, 0, 1]], dtype=np.float64) if params.flip else np.eye(3)
    return crop @ flip @ _rotation(params.angle, height, width)


def _normalised_theta(pixel_map: np.ndarray, height: int, width: int) -> torch.Tensor:
    """A pixel-space ``(3, 3)`` map as ``affine_grid``'s ``(1, 2, 3)`` theta (align_corners=False)."""
    to_norm = np.array([[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]])
    from_norm = np.array([[width / 2, 0, (width - 1) / 2], [0, height / 2, (height - 1) / 2], [0, 0, 1]])
    theta = to_norm @ pixel_map @ from_norm
    return torch.from_numpy(theta[:2].astype(np.float32))[None]


def _shift_flip(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """The warp without rotation, an integer shift (and flip), as an exact copy: ``(T, H, W)``."""
    _, h, w = x.shape
    dy, dx = params.crop_y - params.pad, params.crop_x - params.pad  # output (y, x) reads input (y + dy, x + dx)
    out = torch.zeros_like(x)
    ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    out[:, ys, xs] = x[:, ys.start + dy : ys.stop + dy, xs.start + dx : xs.stop + dx]
    return out.flip(-1) if params.flip else out


@functools.lru_cache(maxsize=64)
def _rotated_outside(angle: int, height: int, width: int) -> torch.Tensor:
    """``(1, H, W, 2)`` float32 grid offset: 10 (far outside, where ``grid_sample`` reads zeros)
    at output pixels whose rotation by ``angle`` lands outside the frame, 0 elsewhere.

    The reference rotates the cropped frame with zero fill (``scipy.ndimage.rotate``,
    ``mode="constant"``), so those pixels are zero whatever the crop and flip put there.
    Depends on the angle alone, so it is computed once per angle and size.
    """
    y, x = np.mgrid[:height, :width].astype(np.float64)
    m = _rotation(angle, height, width)
    qx = m[0, 0] * x + m[0, 1] * y + m[0, 2]
    qy = m[1, 0] * x + m[1, 1] * y + m[1, 2]
    eps = 1e-6
    outside = (qx < -eps) | (qx > width - 1 + eps) | (qy < -eps) | (qy > height - 1 + eps)
    return torch.from_numpy(np.repeat(10.0 * outside[None, :, :, None], 2, axis=3).astype(np.float32))


def warp_clip(clip: np.ndarray | torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Apply ``params`` to every frame of ``clip`` ``(T, H, W)`` in one warp; returns ``(T, H, W)``
    float32 in the input's units (not normalised).

    With a rotation: one bilinear ``grid_sample`` with the frames as channels. Without one the
    map is an integer shift and flip, done as an exact copy.
    """
    x = torch.as_tensor(clip).to(torch.float32)
    if x.ndim != 3:
        raise ValueError(f"a clip must be (T, H, W), got shape {tuple(x.shape)}")
    if not params.angle:
        return _shift_flip(x, params)
    t, h, w = x.shape
    grid = F.affine_grid(_normalised_theta(warp_matrix(params, h, w), h, w), [1, t, h, w], align_corners=False)
    grid.add_(_rotated_outside(params.angle, h, w))
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def augment_clip(
    clip: np.ndarray | torch.Tensor,
    rng: np.random.Generator,
    pad: int = PAD,
    max_angle: int = MAX_ANGLE,
) -> torch.Tensor:
    """The published augmentation of one clip ``(T, H, W)`` (uint8 or float), then min-max;
    returns ``(T, H, W)`` float32 in ``[0, 1]``. Parameters are drawn from ``rng``."""
    return minmax(warp_clip(clip, sample_params(rng, pad=pad, max_angle=max_angle)))
