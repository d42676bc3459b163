"""The single-warp augmentation equals pad + crop + flip + rotate done step by step."""

from __future__ import annotations

from collections import Counter

import numpy as np
import scipy.ndimage as ndi
import torch

from echo.data.augment import PAD, AugmentParams, augment_clip, sample_params, warp_clip

H, W = 48, 40


def _clip(t: int = 4) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return np.stack([(120 + 80 * np.sin(xx / 5 + k) * np.cos(yy / 7 - k)).astype(np.uint8) for k in range(t)])


def _step_by_step(frame: np.ndarray, p: AugmentParams) -> np.ndarray:
    """The reference order: zero-pad, crop, flip, then scipy's rotation of the frame."""
    padded = np.pad(frame.astype(np.float64), p.pad)
    out = padded[p.crop_y : p.crop_y + H, p.crop_x : p.crop_x + W]
    if p.flip:
        out = out[:, ::-1]
    if p.angle:
        out = ndi.rotate(out, p.angle, reshape=False, order=1, mode="constant", cval=0.0)
    return out


def test_single_warp_equals_the_step_by_step_reference():
    clip = _clip()
    rng = np.random.default_rng(3)
    cases = [sample_params(rng) for _ in range(40)]
    cases += [AugmentParams(0, 2 * PAD, True, 10), AugmentParams(2 * PAD, 0, False, -10), AugmentParams(PAD, PAD, False, 0)]
    for p in cases:
        ours = warp_clip(clip, p).numpy()
        ref = np.stack([_step_by_step(f, p) for f in clip])
        diff = np.abs(ours - ref)
        # Only pixels whose sample lands exactly on the rotated frame's edge may round the other way.
        assert (diff > 0.5).mean() < 0.002, p
        assert np.median(diff) < 1e-3, p
        if p.angle == 0:
            assert diff.max() < 1e-2, p  # integer shifts and flips are exact


def test_identity_parameters_change_nothing():
    clip = _clip()
    out = warp_clip(clip, AugmentParams(PAD, PAD, False, 0))
    assert torch.allclose(out, torch.from_numpy(clip).float(), atol=1e-3)


def test_same_parameters_on_every_frame():
    frame = _clip(1)[0]
    clip = np.stack([frame] * 5)
    out = augment_clip(clip, np.random.default_rng(11))
    assert out.shape == (5, H, W) and out.dtype == torch.float32
    assert all(torch.equal(out[0], out[k]) for k in range(1, 5))
    assert out.min() == 0 and out.max() == 1


def test_parameters_follow_the_seed_and_the_published_distribution():
    a = [sample_params(np.random.default_rng(5)) for _ in range(2)]
    assert a[0] == a[1]
    rng = np.random.default_rng(0)
    draws = [sample_params(rng) for _ in range(4000)]
    flips = sum(d.flip for d in draws) / len(draws)
    rotated = [d.angle for d in draws if d.angle != 0]
    assert 0.46 < flips < 0.54
    assert 0.43 < len(rotated) / len(draws) < 0.52  # p=0.5, less the draws of angle 0
    assert set(rotated) == set(range(-10, 11)) - {0}
    assert Counter(d.crop_y for d in draws).keys() == set(range(2 * PAD + 1))
    assert Counter(d.crop_x for d in draws).keys() == set(range(2 * PAD + 1))


def test_augment_clip_is_deterministic_for_a_seed_and_differs_across_seeds():
    clip = _clip()
    x = augment_clip(clip, np.random.default_rng(1))
    y = augment_clip(clip, np.random.default_rng(1))
    z = augment_clip(clip, np.random.default_rng(2))
    assert torch.equal(x, y) and not torch.equal(x, z)
