"""One DICOM ultrasound cine -> grayscale frames of its scan sector, ready for ``encode_mp4``.

Steps, each a function: ``open_dataset`` (bytes -> pydicom Dataset), ``read_header`` (what
ingest needs without pixels: frame rate, size, sector boxes, identifiers), ``decode_frames``
(pixels -> ``(T, H, W)`` uint8 whatever the transfer syntax and photometric interpretation),
``sector_mask`` (the scan sector, from the Sequence of Ultrasound Regions or estimated from the
pixels that change over time) and ``crop_to_sector`` (mask, crop, resize with padding).

A file that cannot become a clip raises ``DicomSkip`` with a short ``reason`` code. Messages
name a file only by the caller's opaque ``name`` and quote an attribute only when its value is
one of the standard's defined terms (a modality, a photometric interpretation), because DICOM
values (and pydicom's own warnings about them) can hold patient data; pydicom's warnings and
log records are silenced while a dataset is read or decoded.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from pydicom.multival import MultiValue

from echo.data.video import _to_gray

__all__ = [
    "DicomSkip",
    "Identifiers",
    "CineHeader",
    "SECTOR_MIN_FRACTION",
    "SECTOR_MAX_FRACTION",
    "MOVING_FRACTION",
    "quiet_pydicom",
    "open_dataset",
    "read_header",
    "frame_rate",
    "ultrasound_regions",
    "decode_frames",
    "regions_mask",
    "estimate_sector",
    "sector_mask",
    "crop_to_sector",
]

# An estimated or declared sector smaller than this fraction of the frame is not a sector; one
# larger leaves no room for burned-in text to be told apart, so it cannot be trusted either.
SECTOR_MIN_FRACTION = 0.05
SECTOR_MAX_FRACTION = 0.95
# Share of consecutive frame pairs in which a sector pixel changes, at least.
MOVING_FRACTION = 0.5

_REGION_SPATIAL_FORMAT_2D = 1
# Defined terms that messages may quote; any other value is shown as "other".
_MODALITIES = frozenset(
    "AR AS ASMT AU BDUS BI BMD CR CT DG DOC DX ECG EPS ES FID GM HC HD IO IOL IVOCT IVUS KER KO LEN LS MG MR "
    "M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTPLAN "
    "RTRECORD RTSTRUCT RWV SEG SM SMR SR SRF STAIN TG US VA XA XC".split()
)
_PHOTOMETRICS = frozenset(
    ["MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL", "YBR_FULL_422",
     "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT"]
)
_MAX_FPS = 1000.0


class DicomSkip(Exception):
    """A file that is not ingested. ``reason``: short code for the summary; the message has no
    attribute values, only the caller's opaque name for the file."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class Identifiers:
    """The raw identifiers ingest hashes. Never logged: ``repr`` hides them."""

    patient_id: str = field(repr=False)
    study_uid: str = field(repr=False)
    sop_uid: str = field(repr=False)
    accession: str = field(repr=False)


@dataclass(frozen=True)
class CineHeader:
    """What ingest needs from a multi-frame ultrasound file, read without decoding pixels.

    ``regions``: the 2-D (tissue/flow) Ultrasound Regions as ``(x0, y0, x1, y1)`` pixel boxes,
    corners inclusive as in the standard. ``attributes``: the allow-list kept in the manifest.
    """

    n_frames: int
    rows: int
    cols: int
    fps: float
    regions: tuple[tuple[int, int, int, int], ...]
    attributes: dict[str, object]
    ids: Identifiers


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings, log records and value validation for the block.

    pydicom quotes offending values (a name in a malformed PN, say) in both, so they must not
    reach logs that leave the machine.
    """
    import pydicom.config

    log = logging.getLogger("pydicom")
    old_disabled, old_mode = log.disabled, pydicom.config.settings.reading_validation_mode
    log.disabled = True
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.disabled = old_disabled
        pydicom.config.settings.reading_validation_mode = old_mode


def open_dataset(data: bytes, name: str):
    """Parse DICOM ``data`` (Part 10 file, or a bare dataset without preamble) into a Dataset.

    Raises ``DicomSkip("not_dicom")`` for other bytes and ``DicomSkip("corrupt")`` for a DICOM
    file that cannot be parsed.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    has_magic = len(data) >= 132 and data[128:132] == b"DICM"
    with quiet_pydicom():
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
        except InvalidDicomError:
            ds = None
        except Exception as e:
            if has_magic:
                raise DicomSkip("corrupt", f"{name}: cannot parse the DICOM file ({type(e).__name__})") from None
            ds = None
        if ds is not None:
            # pydicom returns what it could read; a file cut short inside a sequence or the
            # encapsulated pixel data can come back empty.
            if len(ds) == 0:
                raise DicomSkip("corrupt", f"{name}: the DICOM dataset cannot be read (truncated?)")
            return ds
        # Some exports drop the preamble; a forced read of other bytes yields junk elements,
        # so only a dataset that names its SOP class counts.
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            if "SOPClassUID" in ds and ("Modality" in ds or "PixelData" in ds):
                return ds
        except Exception:
            pass
    raise DicomSkip("not_dicom", f"{name}: not a DICOM file")


def _number(ds, keyword: str) -> float | None:
    """A numeric attribute (its first value if several) as float; None when absent or unusable."""
    value = ds.get(keyword)
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def frame_rate(ds, name: str) -> float:
    """Frames per second from Frame Time (0018,1063, ms), Frame Time Vector (0018,1065),
    Cine Rate (0018,0040) or Recommended Display Frame Rate (0008,2144), in that order.

    Raises ``DicomSkip("no_frame_rate")`` naming ``name`` when none gives a rate in (0, 1000].
    """
    candidates: list[float | None] = []
    ft = _number(ds, "FrameTime")
    candidates.append(1000.0 / ft if ft and ft > 0 else None)
    vector = ds.get("FrameTimeVector")
    if vector is not None:
        try:
            # The first entry is the time of frame 1 itself (0); the rest are gaps in ms.
            gaps = [float(v) for v in list(vector)[1:]]
            mean = sum(gaps) / len(gaps) if gaps else 0.0
            candidates.append(1000.0 / mean if mean > 0 else None)
        except (TypeError, ValueError):
            candidates.append(None)
    candidates.append(_number(ds, "CineRate"))
    candidates.append(_number(ds, "RecommendedDisplayFrameRate"))
    for fps in candidates:
        if fps is not None and 0 < fps <= _MAX_FPS:
            return float(fps)
    raise DicomSkip(
        "no_frame_rate",
        f"{name}: no frame rate (none of Frame Time, Frame Time Vector, Cine Rate, "
        "Recommended Display Frame Rate holds a usable value)",
    )


def ultrasound_regions(ds) -> tuple[tuple[int, int, int, int], ...]:
    """The 2-D regions (Region Spatial Format 1) of the Sequence of Ultrasound Regions, as
    ``(x0, y0, x1, y1)`` boxes with inclusive corners; M-mode, Doppler spectra and waveform
    regions (ECG, ...) are left out. Empty when the sequence is absent."""
    out = []
    for item in ds.get("SequenceOfUltrasoundRegions") or []:
        if item.get("RegionSpatialFormat") != _REGION_SPATIAL_FORMAT_2D:
            continue
        try:
            box = tuple(
                int(item[k].value)
                for k in ("RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1", "RegionLocationMaxY1")
            )
        except (KeyError, TypeError, ValueError):
            continue
        out.append(box)
    return tuple(out)


def read_header(ds, name: str) -> CineHeader:
    """Check that ``ds`` is a multi-frame ultrasound image and read its header.

    Raises ``DicomSkip`` with reason ``not_ultrasound`` (Modality is not US), ``no_pixel_data``
    (no image at all), ``corrupt`` (image attributes without readable pixel data, as a
    truncated file reads), ``single_frame``, ``no_frame_rate``, ``no_patient_id`` or
    ``no_study_uid``.
    """
    with quiet_pydicom():
        return _read_header(ds, name)


def _read_header(ds, name: str) -> CineHeader:
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality != "US":
        shown = modality if modality in _MODALITIES else "missing" if not modality else "other"
        raise DicomSkip("not_ultrasound", f"{name}: modality {shown}, not US")
    has_image = "Rows" in ds and "Columns" in ds
    if "PixelData" not in ds:
        if has_image:
            raise DicomSkip("corrupt", f"{name}: image attributes but no readable pixel data (truncated?)")
        raise DicomSkip("no_pixel_data", f"{name}: no pixel data")
    n_frames = int(_number(ds, "NumberOfFrames") or 1)
    if n_frames < 2:
        raise DicomSkip("single_frame", f"{name}: a single frame, not a cine")
    fps = frame_rate(ds, name)
    ids = Identifiers(
        patient_id=str(ds.get("PatientID", "") or "").strip(),
        study_uid=str(ds.get("StudyInstanceUID", "") or "").strip(),
        sop_uid=str(ds.get("SOPInstanceUID", "") or "").strip(),
        accession=str(ds.get("AccessionNumber", "") or "").strip(),
    )
    if not ids.patient_id:
        raise DicomSkip("no_patient_id", f"{name}: no Patient ID, so no patient-level split is possible")
    if not ids.study_uid:
        raise DicomSkip("no_study_uid", f"{name}: no Study Instance UID")
    attributes: dict[str, object] = {
        "n_frames": n_frames,
        "fps": round(fps, 4),
        "rows": int(ds.Rows),
        "cols": int(ds.Columns),
        "manufacturer": str(ds.get("Manufacturer", "") or ""),
        "model": str(ds.get("ManufacturerModelName", "") or ""),
    }
    return CineHeader(
        n_frames=n_frames,
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        fps=fps,
        regions=ultrasound_regions(ds),
        attributes=attributes,
        ids=ids,
    )


def _palette_gray_lut(ds) -> np.ndarray:
    """Stored value -> gray uint8 for PALETTE COLOR (every possible stored value mapped once)."""
    from pydicom.pixels import apply_color_lut

    bits = int(ds.BitsStored)
    rgb = apply_color_lut(np.arange(2**bits, dtype=np.uint16 if bits > 8 else np.uint8), ds)
    if rgb.dtype != np.uint8:
        # 16-bit entries; some writers fill them with 8-bit values, so scale by the real maximum.
        rgb = (rgb >> 8).astype(np.uint8) if rgb.max() > 255 else rgb.astype(np.uint8)
    return _to_gray(rgb)


def decode_frames(ds, name: str) -> np.ndarray:
    """Every frame of ``ds`` as grayscale ``(T, H, W)`` uint8.

    MONOCHROME2 is kept, MONOCHROME1 inverted; RGB, YBR_FULL, YBR_FULL_422, YBR_RCT/ICT
    (converted to RGB by pydicom) and PALETTE COLOR (through its lookup table) go to BT.601
    luma. Data of more than 8 bits is scaled by the clip's own minimum and maximum.
    Raises ``DicomSkip`` with reason ``unsupported_compression`` (no installed decoder for the
    transfer syntax), ``unsupported_photometric`` or ``corrupt``.
    """
    with quiet_pydicom():
        return _decode_frames(ds, name)


_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420")


def _decode_frames(ds, name: str) -> np.ndarray:
    from pydicom.pixels import get_decoder, iter_pixels, pixel_array

    tsyntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if tsyntax is not None and tsyntax.is_compressed:
        try:
            available = get_decoder(tsyntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise DicomSkip("unsupported_compression", f"{name}: no installed decoder for {tsyntax.name}")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", *_COLOUR):
        shown = photometric if photometric in _PHOTOMETRICS else "missing" if not photometric else "other"
        raise DicomSkip("unsupported_photometric", f"{name}: photometric interpretation {shown}")
    n_expected = int(_number(ds, "NumberOfFrames") or 1)
    frames: list[np.ndarray] = []
    try:
        palette = _palette_gray_lut(ds) if photometric == "PALETTE COLOR" else None
        native_422 = photometric == "YBR_FULL_422" and not (tsyntax is not None and tsyntax.is_compressed)
        # pydicom 3.0 miscounts the frame length of native 4:2:2 data frame by frame, so that
        # (rare) case is decoded whole; every other one a frame at a time.
        for arr in pixel_array(ds) if native_422 else iter_pixels(ds):
            if palette is not None:
                arr = palette[arr]
            elif arr.ndim == 3 and arr.dtype == np.uint8:
                arr = _to_gray(arr)
            elif arr.ndim == 3:
                arr = _luma_float(arr)
            frames.append(arr)
    except Exception as e:
        raise DicomSkip("corrupt", f"{name}: pixel data cannot be decoded ({type(e).__name__})") from None
    if len(frames) != n_expected:
        raise DicomSkip("corrupt", f"{name}: {len(frames)} frames decoded, Number of Frames says {n_expected}")
    clip = np.stack(frames)
    if clip.dtype != np.uint8:
        clip = _scale_to_uint8(clip)
    if photometric == "MONOCHROME1":
        clip = 255 - clip
    return clip


def _luma_float(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` float RGB of any range -> ``(H, W)`` float32 BT.601 luma (scaled later)."""
    return (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114).astype(np.float32)


def _scale_to_uint8(clip: np.ndarray) -> np.ndarray:
    """Min-max scale a clip of any numeric dtype to uint8 (a constant clip becomes zeros)."""
    lo, hi = float(clip.min()), float(clip.max())
    if hi <= lo:
        return np.zeros(clip.shape, np.uint8)
    out = (clip.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def regions_mask(regions: tuple[tuple[int, int, int, int], ...], shape: tuple[int, int]) -> np.ndarray | None:
    """The union of the region boxes as an ``(H, W)`` bool mask, or None when the boxes cannot
    be trusted: one reaching outside the image (the pixels were rescaled after the header was
    written), an inverted box, or a union too small or too large to be a scan sector."""
    h, w = shape
    if not regions:
        return None
    mask = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in regions:
        if not (0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h):
            return None
        mask[y0 : y1 + 1, x0 : x1 + 1] = True
    fraction = mask.mean()
    if not SECTOR_MIN_FRACTION <= fraction <= SECTOR_MAX_FRACTION:
        return None
    return mask


def _disk(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def _fill_polygon(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(N, 2)`` (x, y) polygon vertices -> filled ``(H, W)`` bool mask, border included."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(img).polygon([(float(x), float(y)) for x, y in points], fill=1, outline=1)
    return np.asarray(img, dtype=bool)


def estimate_sector(frames: np.ndarray, name: str = "clip") -> np.ndarray:
    """The scan sector of ``frames`` (``(T, H, W)`` uint8, T >= 2) as an ``(H, W)`` bool mask.

    A pixel is moving when it changes between consecutive frames in more than
    ``MOVING_FRACTION`` of the frame pairs (changes within twice the background noise level
    do not count). Speckle inside the sector changes nearly every frame; burned-in text never,
    and an ECG sweep or scrolling trace only when the trace passes, so a trace swept right
    below the sector stays apart from it. An opening removes thin moving lines (timers), a
    closing joins the speckle, and the convex hull of the largest component is the sector.
    Raises ``DicomSkip("no_sector")`` when the result is not between ``SECTOR_MIN_FRACTION``
    and ``SECTOR_MAX_FRACTION`` of the frame.
    """
    from scipy import ndimage, spatial

    t, h, w = frames.shape
    if t < 2:
        raise DicomSkip("no_sector", f"{name}: one frame cannot show which pixels move")
    sample = np.linspace(0, t - 2, min(16, t - 1)).round().astype(int)
    noise = np.median(np.abs(frames[sample + 1].astype(np.int16) - frames[sample]), axis=0)
    floor = 2.0 * float(np.percentile(noise, 20))
    # One (H, W) counter whatever the clip length.
    changes = np.zeros((h, w), np.uint16)
    for i in range(t - 1):
        changes += np.abs(frames[i + 1].astype(np.int16) - frames[i]) > floor
    moving = changes > MOVING_FRACTION * (t - 1)
    radius = max(2, round(min(h, w) / 100))
    moving = ndimage.binary_opening(moving, _disk(radius))
    moving = ndimage.binary_closing(moving, _disk(2 * radius))
    labels, n = ndimage.label(moving)
    if n == 0:
        raise DicomSkip("no_sector", f"{name}: no pixels change over time")
    sizes = ndimage.sum_labels(moving, labels, index=np.arange(1, n + 1))
    component = labels == int(np.argmax(sizes)) + 1
    ys, xs = np.nonzero(component)
    points = np.stack([xs, ys], axis=1)
    try:
        mask = _fill_polygon(points[spatial.ConvexHull(points).vertices], (h, w))
    except spatial.QhullError:  # a degenerate (flat) component
        mask = component
    fraction = float(mask.mean())
    if not SECTOR_MIN_FRACTION <= fraction <= SECTOR_MAX_FRACTION:
        raise DicomSkip(
            "no_sector",
            f"{name}: the moving area covers {fraction:.0%} of the frame; cannot tell the scan sector from the rest",
        )
    return mask


def sector_mask(frames: np.ndarray, regions: tuple[tuple[int, int, int, int], ...], name: str = "clip") -> tuple[np.ndarray, str]:
    """``(mask, source)``: the Ultrasound Regions mask when the boxes are usable
    (``source == "regions"``), else the estimate from motion (``"estimated"``)."""
    mask = regions_mask(regions, frames.shape[1:])
    if mask is not None:
        return mask, "regions"
    return estimate_sector(frames, name), "estimated"


def crop_to_sector(frames: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Zero everything outside ``mask``, crop to its bounding box and resize to ``size``
    ``(H, W)`` keeping the aspect ratio (centred, zero padding).

    ``frames``: ``(T, H, W)`` uint8; returns ``(T, size[0], size[1])`` uint8 in which every pixel
    outside the resized mask is exactly 0.
    """
    from PIL import Image

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
