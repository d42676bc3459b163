"""One DICOM ultrasound cine -> grayscale frames of its scan sector, ready for ``encode_mp4``.

Steps, each a function: ``open_dataset`` (bytes -> pydicom Dataset), ``read_header`` (what
ingest needs without pixels: frame rate, size, sector boxes, identifiers), ``decode_frames``
(pixels -> ``(T, h, w)`` uint8 whatever the transfer syntax and photometric interpretation,
each frame reduced to the working grid as it is decoded, after the header's frame count and
size passed the pixel budget). The scan sector and the crop are ``echo.ingest.fan``'s, shared
with video files; the header's Ultrasound Regions only narrow the estimated sector.

Burned-in annotation rule: ``BurnedInAnnotation`` is read (``CineHeader.burned_in``) but not
trusted either way; every clip is masked to its estimated sector, which removes text, readouts
and scales outside the fan whatever the attribute says. Annotations drawn inside the fan
(calipers, labels over the image) cannot be masked, so a site that must exclude them passes
``--skip-burned-in`` and files saying YES are skipped (reason ``burned_in_annotation``).

A file that cannot become a clip raises ``SkipFile`` with a short ``reason`` code. Messages
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
from echo.ingest.frames import FrameStack, SkipFile, check_pixel_budget

__all__ = [
    "Identifiers",
    "CineHeader",
    "quiet_pydicom",
    "open_dataset",
    "read_header",
    "frame_rate",
    "ultrasound_regions",
    "decode_frames",
]

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
    ``burned_in``: Burned In Annotation (0028,0301) is YES (False for NO or absent).
    """

    n_frames: int
    rows: int
    cols: int
    fps: float
    regions: tuple[tuple[int, int, int, int], ...]
    attributes: dict[str, object]
    ids: Identifiers
    burned_in: bool = False


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

    Raises ``SkipFile("not_dicom")`` for other bytes and ``SkipFile("corrupt")`` for a DICOM
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
                raise SkipFile("corrupt", f"{name}: cannot parse the DICOM file ({type(e).__name__})") from None
            ds = None
        if ds is not None:
            # pydicom returns what it could read; a file cut short inside a sequence or the
            # encapsulated pixel data can come back empty.
            if len(ds) == 0:
                raise SkipFile("corrupt", f"{name}: the DICOM dataset cannot be read (truncated?)")
            return ds
        # Some exports drop the preamble; a forced read of other bytes yields junk elements,
        # so only a dataset that names its SOP class counts.
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            if "SOPClassUID" in ds and ("Modality" in ds or "PixelData" in ds):
                return ds
        except Exception:
            pass
    raise SkipFile("not_dicom", f"{name}: not a DICOM file")


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

    Raises ``SkipFile("no_frame_rate")`` naming ``name`` when none gives a rate in (0, 1000].
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
    raise SkipFile(
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

    Raises ``SkipFile`` with reason ``not_ultrasound`` (Modality is not US), ``no_pixel_data``
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
        raise SkipFile("not_ultrasound", f"{name}: modality {shown}, not US")
    has_image = "Rows" in ds and "Columns" in ds
    if "PixelData" not in ds:
        if has_image:
            raise SkipFile("corrupt", f"{name}: image attributes but no readable pixel data (truncated?)")
        raise SkipFile("no_pixel_data", f"{name}: no pixel data")
    n_frames = int(_number(ds, "NumberOfFrames") or 1)
    if n_frames < 2:
        raise SkipFile("single_frame", f"{name}: a single frame, not a cine")
    fps = frame_rate(ds, name)
    ids = Identifiers(
        patient_id=str(ds.get("PatientID", "") or "").strip(),
        study_uid=str(ds.get("StudyInstanceUID", "") or "").strip(),
        sop_uid=str(ds.get("SOPInstanceUID", "") or "").strip(),
        accession=str(ds.get("AccessionNumber", "") or "").strip(),
    )
    if not ids.patient_id:
        raise SkipFile("no_patient_id", f"{name}: no Patient ID, so no patient-level split is possible")
    if not ids.study_uid:
        raise SkipFile("no_study_uid", f"{name}: no Study Instance UID")
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
        burned_in=str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES",
    )


# PALETTE COLOR data is 8 or 16 bits (PS3.3 C.7.6.3.1.2); its lookup covers every stored value.
_MAX_PALETTE_BITS = 16


def _palette_gray_lut(ds, name: str) -> np.ndarray:
    """Stored value -> gray uint8 for PALETTE COLOR (every possible stored value mapped once,
    at most ``2**16`` entries; a header declaring more bits is refused)."""
    from pydicom.pixels import apply_color_lut

    bits = int(_number(ds, "BitsStored") or 0)
    if not 1 <= bits <= _MAX_PALETTE_BITS:
        raise SkipFile("unsupported_photometric", f"{name}: PALETTE COLOR with {bits} bits stored (at most 16)")
    rgb = apply_color_lut(np.arange(2**bits, dtype=np.uint16 if bits > 8 else np.uint8), ds)
    if rgb.dtype != np.uint8:
        # 16-bit entries; some writers fill them with 8-bit values, so scale by the real maximum.
        rgb = (rgb >> 8).astype(np.uint8) if rgb.max() > 255 else rgb.astype(np.uint8)
    return _to_gray(rgb)


def decode_frames(ds, name: str, shape: tuple[int, int] | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Every frame of ``ds`` as grayscale ``(T, h, w)`` uint8, each frame resized to ``shape``
    ``(h, w)`` as it is decoded (default: the stored size).

    With ``max_pixels``, the header's frames x rows x columns is checked first and a larger
    file raises ``SkipFile("over_budget")`` before any pixel is decoded.
    MONOCHROME2 is kept, MONOCHROME1 inverted; RGB, YBR_FULL, YBR_FULL_422, YBR_RCT/ICT
    (converted to RGB by pydicom) and PALETTE COLOR (through its lookup table) go to BT.601
    luma. Data of more than 8 bits is scaled by the clip's own minimum and maximum.
    Raises ``SkipFile`` with reason ``unsupported_compression`` (no installed decoder for the
    transfer syntax), ``unsupported_photometric`` or ``corrupt``.
    """
    with quiet_pydicom():
        return _decode_frames(ds, name, shape, max_pixels)


_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420")


def _decode_frames(ds, name: str, shape: tuple[int, int] | None, max_pixels: int | None) -> np.ndarray:
    from pydicom.pixels import get_decoder, iter_pixels, pixel_array

    n_expected = int(_number(ds, "NumberOfFrames") or 1)
    rows, cols = int(_number(ds, "Rows") or 0), int(_number(ds, "Columns") or 0)
    if max_pixels is not None:
        check_pixel_budget(n_expected, rows, cols, max_pixels, name)
    tsyntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if tsyntax is not None and tsyntax.is_compressed:
        try:
            available = get_decoder(tsyntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise SkipFile("unsupported_compression", f"{name}: no installed decoder for {tsyntax.name}")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", *_COLOUR):
        shown = photometric if photometric in _PHOTOMETRICS else "missing" if not photometric else "other"
        raise SkipFile("unsupported_photometric", f"{name}: photometric interpretation {shown}")
    stack = FrameStack(shape or (rows, cols), n_expected, name)
    try:
        palette = _palette_gray_lut(ds, name) if photometric == "PALETTE COLOR" else None
        native_422 = photometric == "YBR_FULL_422" and not (tsyntax is not None and tsyntax.is_compressed)
        # pydicom 3.0 miscounts the frame length of native 4:2:2 data frame by frame, so that
        # (rare) case is decoded whole (native data: the bytes are in memory already, and the
        # budget bounds them); every other one a frame at a time.
        for arr in pixel_array(ds) if native_422 else iter_pixels(ds):
            if palette is not None:
                arr = palette[arr]
            elif arr.ndim == 3 and arr.dtype == np.uint8:
                arr = _to_gray(arr)
            elif arr.ndim == 3:
                arr = _luma_float(arr)
            stack.add(arr)
    except SkipFile:
        raise
    except Exception as e:
        raise SkipFile("corrupt", f"{name}: pixel data cannot be decoded ({type(e).__name__})") from None
    if len(stack) != n_expected:
        raise SkipFile("corrupt", f"{name}: {len(stack)} frames decoded, Number of Frames says {n_expected}")
    clip = stack.array()
    if photometric == "MONOCHROME1":
        clip = 255 - clip
    return clip


def _luma_float(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` float RGB of any range -> ``(H, W)`` float32 BT.601 luma (scaled later)."""
    return (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114).astype(np.float32)
