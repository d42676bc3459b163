"""DICOM cines for the ingest tests: pydicom's real ultrasound cine with fake patient data planted,
variants derived from it, and the overlays (burned-in text, ECG sweep, frame counter) the masking
must remove. Shared by tests/test_dicom.py, tests/test_fan.py and tests/test_ingest.py.

``examples_ybr_color.dcm`` is a 30-frame apical echo (SonoSite, JPEG baseline, YBR_FULL_422,
Frame Time 33.333 ms) whose pixels were halved after its Ultrasound Regions box was written,
so its box lies outside the image and the sector must be estimated. It carries a burned-in
patient name at the top left, and "PLA / Gen THI", "MI 0.9 TIS 0.7" and a depth scale beside the fan.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
from PIL import Image, ImageDraw
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence

REAL_CINE = "examples_ybr_color.dcm"
# The file's own 2-D region box, written for the 640x480 original: halved, it bounds the fan.
FAN_BOX = (42, 15, 297, 207)
FAKE_PHI = {
    "PatientName": "ZZTESTPATIENT^SECRETNAME",
    "PatientID": "PID-ZZ-98765",
    "StudyInstanceUID": "1.2.826.0.1.3680043.99999.1.424242",
    "AccessionNumber": "ACCZZ5555",
    "PatientBirthDate": "19010203",
}
TEXT_BOX = (44, 20, 110, 36)  # x0, y0, x1, y1 (exclusive) of a burned-in text overlay, outside the fan
ECG_BAND = (20, 210, 300, 218)  # a sweep just below the fan


def sop_uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.99999.3.{n}"


def phi_strings() -> list[str]:
    """Every fake identifier a test file carries, in forms they could leak as."""
    values = [v for k, v in FAKE_PHI.items() if k != "PatientBirthDate"]
    return values + ["ZZTESTPATIENT", "SECRETNAME", "99999.3.", "99999.1."]


def real_cine(n: int = 1, **phi: str) -> Dataset:
    """The real cine with fake patient data (``phi`` overrides) and SOP Instance UID number ``n``."""
    ds = pydicom.dcmread(get_testdata_file(REAL_CINE))
    for keyword, value in {**FAKE_PHI, **phi}.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid(n)
    return ds


def real_rgb(n_frames: int = 30) -> np.ndarray:
    """The real cine's frames as RGB, ``(T, 240, 320, 3)`` uint8."""
    return pydicom.dcmread(get_testdata_file(REAL_CINE)).pixel_array[:n_frames]


def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of RGB, as float."""
    rgb = rgb.astype(np.float64)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def native_cine(pixels: np.ndarray, photometric: str, n: int = 1, **phi: str) -> Dataset:
    """The real cine's header around new uncompressed ``pixels`` ((T, H, W) or (T, H, W, 3) uint8)."""
    ds = real_cine(n, **phi)
    ds.set_pixel_data(np.ascontiguousarray(pixels), photometric, 8, generate_instance_uid=False)
    return ds


def with_regions(ds: Dataset, *boxes: tuple[int, int, int, int, int]) -> Dataset:
    """Replace the Ultrasound Regions with ``(x0, y0, x1, y1, spatial_format)`` boxes."""
    items = []
    for x0, y0, x1, y1, spatial in boxes:
        item = Dataset()
        item.RegionSpatialFormat = spatial
        item.RegionDataType = 1 if spatial == 1 else 10  # tissue, or ECG trace
        item.RegionFlags = 0
        item.RegionLocationMinX0, item.RegionLocationMinY0 = x0, y0
        item.RegionLocationMaxX1, item.RegionLocationMaxY1 = x1, y1
        items.append(item)
    ds.SequenceOfUltrasoundRegions = Sequence(items)
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def encapsulated(ds: Dataset, frames: list[bytes], syntax, photometric: str) -> Dataset:
    """``ds`` with its pixel data replaced by compressed ``frames`` of transfer syntax ``syntax``."""
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    ds.NumberOfFrames = len(frames)
    ds.PhotometricInterpretation = photometric
    return ds


def with_overlays(rgb: np.ndarray) -> np.ndarray:
    """Burn into every frame, outside the fan: static white text (a fake name) in TEXT_BOX, a
    moving ECG sweep in ECG_BAND and a changing frame counter."""
    out = rgb.copy()
    x = np.arange(ECG_BAND[0], ECG_BAND[2])
    for t in range(len(out)):
        img = Image.fromarray(out[t])
        draw = ImageDraw.Draw(img)
        draw.rectangle((TEXT_BOX[0], TEXT_BOX[1], TEXT_BOX[2] - 1, TEXT_BOX[3] - 1), fill=(0, 0, 0))
        draw.text((TEXT_BOX[0] + 2, TEXT_BOX[1] + 2), "ZZTEST^SECRET", fill=(255, 255, 255))
        draw.text((4, 200), f"{t:03d}", fill=(255, 255, 0))
        out[t] = np.asarray(img)
        y = (213 + 3 * np.sin(2 * np.pi * (x / 40 + t / 10))).astype(int)
        for dy in (0, 1):
            out[t, y + dy, x] = (0, 255, 0)
    return out
