"""echo.ingest.fan: the scan sector estimated from the pixels, a region box that only narrows it,
and the masked crop, on pydicom's real cine (tests/dicomfiles.py) and derived frames."""

from __future__ import annotations

import numpy as np
import pytest
from dicomfiles import ECG_BAND, FAN_BOX, TEXT_BOX, luma, real_cine, real_rgb, to_bytes, with_overlays, with_regions

from echo.ingest import dicom, fan
from echo.ingest.frames import SkipFile

# Where the real cine's burned-in annotations lie (320x240 pixels, x0, y0, x1, y1 exclusive):
# "PLA / Gen THI / S" at the top left, "Crd P21 MI 0.9 TIS 0.7" and the depth scale at the right.
ANNOTATIONS = {"PLA / Gen THI": (0, 0, 40, 30), "MI 0.9 TIS 0.7": (290, 10, 320, 100), "depth scale": (298, 100, 320, 200)}


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return real_rgb()


def test_a_trusted_region_box_never_keeps_burned_in_text():
    """Issue 17 item 2: the example with its region box set to (0,0)-(319,219), which holds
    every annotation above the toolbar. The kept area is the box within the estimated fan: no
    pixel outside the estimate survives (even made white), and the fan's content does."""
    ds = with_regions(real_cine(), (0, 0, 319, 219, 1))
    ds = dicom.open_dataset(to_bytes(ds), "f")
    header = dicom.read_header(ds, "f")
    assert header.regions == ((0, 0, 319, 219),)
    frames = dicom.decode_frames(ds, "f")
    estimate = fan.estimate_sector(frames, "f")
    mask, source = fan.sector_mask(frames, header.regions, "f")
    assert source == "regions+estimated"
    assert not (mask & ~estimate).any() and not mask[220:].any()
    assert mask.sum() >= 0.9 * estimate.sum(), "the box cuts only the fan's bottom rows"
    for what, (x0, y0, x1, y1) in ANNOTATIONS.items():
        assert not estimate[y0:y1, x0:x1].any(), f"{what} lies outside the fan"
    # Corners outside the fan: everything outside the estimate, set to white, comes out black.
    white_outside = np.where(estimate, 0, 255).astype(np.uint8)[None].repeat(3, axis=0)
    assert fan.crop_to_sector(white_outside, mask, (112, 112)).max() == 0
    # The fan's content survives: same brightness as the source inside the mask, and it moves.
    out = fan.crop_to_sector(frames, mask, (112, 112))
    support = fan.crop_to_sector(np.full((1, *mask.shape), 255, np.uint8), mask, (112, 112))[0] == 255
    assert support.mean() > 0.35
    assert out[:, support].mean() == pytest.approx(frames[:, mask].mean(), abs=3)
    assert np.abs(np.diff(out[:, support].astype(int), axis=0)).mean() > 2


def test_regions_mask_places_2d_boxes_and_rejects_boxes_off_the_image():
    ds = with_regions(real_cine(), (42, 15, 297, 207, 1), (20, 214, 300, 232, 4))
    regions = dicom.ultrasound_regions(ds)
    assert regions == ((42, 15, 297, 207),), "the ECG waveform region is not part of the sector"
    mask = fan.regions_mask(regions, (240, 320))
    assert mask.sum() == (297 - 42 + 1) * (207 - 15 + 1) and mask[15, 42] and mask[207, 297] and not mask[208, 297]
    assert fan.regions_mask(((0, 0, 320, 239),), (240, 320)) is None  # past the right edge
    assert fan.regions_mask(((5, 5, 4, 20),), (240, 320)) is None  # inverted
    assert fan.regions_mask((), (240, 320)) is None
    # A box inside the image is used, whatever its size: it can only narrow the estimate.
    assert fan.regions_mask(((0, 0, 319, 239),), (240, 320)).all()


def test_a_box_that_leaves_too_little_of_the_fan_skips_the_clip(rgb):
    frames = np.clip(np.round(luma(rgb)), 0, 255).astype(np.uint8)
    with pytest.raises(SkipFile, match="no_sector") as info:
        fan.sector_mask(frames, ((0, 0, 20, 20),), "file 2/3 [ab]")
    assert "file 2/3 [ab]" in str(info.value)


@pytest.mark.parametrize("noise", [0.0, 3.0])
def test_estimated_sector_leaves_out_burned_in_text_ecg_and_counter(rgb, noise):
    """Clean digital frames, and frames with Gaussian noise everywhere (a frame-grabber export):
    the noisy estimate may lose the faint fan edges, never take in the overlays."""
    noisy = luma(with_overlays(rgb)) + np.random.default_rng(0).normal(0, noise, rgb.shape[:3])
    frames = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    mask = fan.estimate_sector(frames)
    x0, y0, x1, y1 = TEXT_BOX
    assert not mask[y0:y1, x0:x1].any()
    assert not mask[ECG_BAND[1] : ECG_BAND[3], ECG_BAND[0] : ECG_BAND[2]].any()
    assert not mask[195:215, 0:30].any(), "frame counter"
    ys, xs = np.nonzero(mask)
    if noise == 0:
        assert np.allclose([xs.min(), ys.min(), xs.max(), ys.max()], FAN_BOX, atol=8)
    else:
        inside = (xs.min() >= FAN_BOX[0] - 8) & (ys.min() >= FAN_BOX[1] - 8) & (xs.max() <= FAN_BOX[2] + 8)
        assert inside and ys.max() <= FAN_BOX[3] + 8 and mask.mean() > 0.2
    # A clip with no motion has no sector to find.
    with pytest.raises(SkipFile, match="no_sector"):
        fan.estimate_sector(np.repeat(frames[:1], 5, axis=0))


def test_crop_to_sector_masks_crops_and_pads_keeping_aspect():
    frames = np.full((3, 120, 300), 200, np.uint8)
    frames[:, :, :20] = 255  # "text" left of the sector
    mask = np.zeros((120, 300), bool)
    mask[10:110, 40:240] = True  # 100 x 200 box
    mask[10:30, 40:60] = False  # a notch inside the box, outside the sector
    out = fan.crop_to_sector(frames, mask, (112, 112))
    assert out.shape == (3, 112, 112) and out.dtype == np.uint8
    # 100x200 scales to 56x112, centred: rows 28..83 hold the image, the rest is padding.
    assert (out[:, :28] == 0).all() and (out[:, 84:] == 0).all()
    assert (out[:, 40:80, 20:100] == 200).all()
    assert (out[:, 28:36, 0:8] == 0).all(), "the notch stays masked after resizing"
    assert out.max() == 200, "nothing of the text left of the sector survives"
