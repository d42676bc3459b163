"""echo.ingest.dicom on a real ultrasound cine from pydicom's test data and variants derived from it.

``examples_ybr_color.dcm`` is a 30-frame apical echo (SonoSite, JPEG baseline, YBR_FULL_422,
Frame Time 33.333 ms) whose pixels were halved after its Ultrasound Regions box was written,
so its box lies outside the image and the sector must be estimated. It carries a burned-in
patient name at the top left. The helpers here also serve tests/test_ingest.py.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, MPEG2MPML, RLELossless

from echo.ingest import dicom

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


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return real_rgb()


def test_real_cine_header_frames_and_estimated_sector():
    ds = dicom.open_dataset(to_bytes(real_cine()), "file 1/1 [abc]")
    header = dicom.read_header(ds, "file 1/1 [abc]")
    assert (header.n_frames, header.rows, header.cols) == (30, 240, 320)
    assert header.fps == pytest.approx(1000 / 33.333)
    assert set(header.attributes) == {"n_frames", "fps", "rows", "cols", "manufacturer", "model"}
    assert (header.attributes["manufacturer"], header.attributes["model"]) == ("SonoSite, Inc.", "Turbo")
    assert header.ids.patient_id == FAKE_PHI["PatientID"]
    assert not any(s in repr(header) for s in phi_strings())

    frames = dicom.decode_frames(ds, "file 1/1 [abc]")
    assert frames.shape == (30, 240, 320) and frames.dtype == np.uint8
    assert np.abs(frames.astype(float) - luma(real_rgb())).max() <= 1.0

    # The header box (640x480 coordinates) reaches past the 320x240 image: not trusted.
    assert dicom.regions_mask(header.regions, frames.shape[1:]) is None
    mask, source = dicom.sector_mask(frames, header.regions, "x")
    assert source == "estimated"
    ys, xs = np.nonzero(mask)
    assert np.allclose([xs.min(), ys.min(), xs.max(), ys.max()], FAN_BOX, atol=8)
    assert not mask[:40, :35].any(), "the burned-in patient name at the top left must be outside"


def _ybr_422_bytes(rgb: np.ndarray) -> bytes:
    """RGB (T, H, W, 3) -> native YBR_FULL_422 pixel data: per pixel pair Y1 Y2 Cb Cr."""
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL").astype(np.float64)
    y = ybr[..., 0]
    cb = (ybr[..., 0::2, 1] + ybr[..., 1::2, 1]) / 2
    cr = (ybr[..., 0::2, 2] + ybr[..., 1::2, 2]) / 2
    out = np.stack([y[..., 0::2], y[..., 1::2], cb, cr], axis=-1)
    return np.clip(np.round(out), 0, 255).astype(np.uint8).tobytes()


def _j2k(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "JPEG2000", no_jp2=True, irreversible=False)
    return buf.getvalue()


@pytest.mark.parametrize("variant", ["RGB", "YBR_FULL", "YBR_FULL_422", "MONOCHROME2", "MONOCHROME1", "RLE", "JPEG2000"])
def test_photometric_and_compression_variants_decode_to_the_same_gray(rgb, variant):
    clip = rgb[:6]
    gray = np.clip(np.round(luma(clip)), 0, 255).astype(np.uint8)
    if variant == "RGB":
        ds = native_cine(clip, "RGB")
    elif variant == "YBR_FULL":
        ds = native_cine(convert_color_space(clip, "RGB", "YBR_FULL"), "YBR_FULL")
    elif variant == "YBR_FULL_422":
        ds = native_cine(convert_color_space(clip, "RGB", "YBR_FULL"), "YBR_FULL")
        ds.PixelData = _ybr_422_bytes(clip)
        ds.PhotometricInterpretation = "YBR_FULL_422"
    elif variant == "MONOCHROME2":
        ds = native_cine(gray, "MONOCHROME2")
    elif variant == "MONOCHROME1":
        ds = native_cine(255 - gray, "MONOCHROME1")
    elif variant == "RLE":
        ds = native_cine(gray, "MONOCHROME2")
        ds.compress(RLELossless, generate_instance_uid=False)
    else:
        ds = encapsulated(native_cine(gray, "MONOCHROME2"), [_j2k(g) for g in gray], JPEG2000Lossless, "MONOCHROME2")
    ds = dicom.open_dataset(to_bytes(ds), "v")
    frames = dicom.decode_frames(ds, "v")
    assert frames.shape == (6, 240, 320) and frames.dtype == np.uint8
    # Colour round trips through YCbCr lose a level or two; 4:2:2 keeps full-resolution luma.
    tolerance = {"YBR_FULL": 2, "YBR_FULL_422": 3}.get(variant, 1)
    assert np.abs(frames.astype(int) - gray.astype(int)).max() <= tolerance


def test_palette_color_goes_through_its_lookup_table():
    src = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    index = src.pixel_array  # (350, 800) palette indices
    frames = np.stack([np.roll(index, 3 * t, axis=1) for t in range(4)])
    ds = real_cine()
    for elem in src:
        if elem.tag.group == 0x0028:
            ds[elem.tag] = elem
    ds.NumberOfFrames = len(frames)
    ds.PixelData = frames.tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = dicom.open_dataset(to_bytes(ds), "p")
    out = dicom.decode_frames(ds, "p")

    # Independent reading of the 16-bit LUT data: entry i of each channel, 8 most significant bits.
    luts = [np.frombuffer(src[f"{c}PaletteColorLookupTableData"].value, "<u2") >> 8 for c in ("Red", "Green", "Blue")]
    first = src.RedPaletteColorLookupTableDescriptor[1]
    idx = np.clip(frames.astype(int) - first, 0, len(luts[0]) - 1)
    expected = luma(np.stack([lut[idx] for lut in luts], axis=-1))
    assert out.shape == frames.shape
    assert np.abs(out.astype(float) - expected).max() <= 0.5 + 1e-9
    assert len(np.unique(out)) > 20


def test_jpeg_ls_16_bit_is_decoded_and_scaled():
    """JPEG-LS needs pylibjpeg + pylibjpeg-libjpeg; 16-bit data is min-max scaled per clip."""
    src = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    codestream = next(pydicom.encaps.generate_frames(src.PixelData, number_of_frames=1))
    ds = real_cine()
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel"):
        setattr(ds, keyword, src[keyword].value)
    del ds.PlanarConfiguration
    ds = encapsulated(ds, [codestream] * 3, JPEGLSLossless, "MONOCHROME2")
    ds = dicom.open_dataset(to_bytes(ds), "ls")
    out = dicom.decode_frames(ds, "ls")
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(float)
    expected = (reference - reference.min()) * 255 / (reference.max() - reference.min())
    assert out.shape == (3, 64, 64)
    assert np.abs(out.astype(float) - expected[None]).max() <= 0.5 + 1e-6


@pytest.mark.parametrize(
    "attrs, fps",
    [
        ({"FrameTime": "40"}, 25.0),
        ({"FrameTimeVector": ["0", "20", "20", "20"]}, 50.0),
        ({"CineRate": "60"}, 60.0),
        ({"RecommendedDisplayFrameRate": "24"}, 24.0),
        ({"FrameTime": "0", "CineRate": "48"}, 48.0),
    ],
)
def test_frame_rate_sources(attrs, fps):
    ds = real_cine()
    del ds.FrameTime
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    assert dicom.frame_rate(ds, "f") == pytest.approx(fps)


def _without_pixels(ds: Dataset) -> Dataset:
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(ds, keyword)
    return ds


def _single_frame(ds: Dataset) -> Dataset:
    ds.set_pixel_data(real_rgb(1)[0], "RGB", 8, generate_instance_uid=False)
    return ds


def _no_rate(ds: Dataset) -> Dataset:
    del ds.FrameTime
    return ds


def _mpeg2(ds: Dataset) -> Dataset:
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    return ds


def _no_patient(ds: Dataset) -> Dataset:
    ds.PatientID = ""
    return ds


def _setting(ds: Dataset, keyword: str, value: str) -> Dataset:
    setattr(ds, keyword, value)
    return ds


def _bytes(ds: Dataset) -> bytes:
    return to_bytes(ds)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: b"PatientName=ZZTESTPATIENT^SECRETNAME\n" * 50, "not_dicom"),
        (lambda: b"", "not_dicom"),
        (lambda: open(get_testdata_file("CT_small.dcm"), "rb").read(), "not_ultrasound"),
        (lambda: _bytes(_single_frame(real_cine())), "single_frame"),
        (lambda: _bytes(real_cine())[:60000], "corrupt"),  # cut inside the encapsulated frames
        (lambda: _bytes(native_cine(real_rgb(4), "RGB"))[:-5000], "corrupt"),  # native, short pixel data
        (lambda: _bytes(_without_pixels(real_cine())), "no_pixel_data"),
        (lambda: _bytes(_no_rate(real_cine())), "no_frame_rate"),
        (lambda: _bytes(_mpeg2(real_cine())), "unsupported_compression"),
        (lambda: _bytes(_no_patient(real_cine())), "no_patient_id"),
        # Free-text junk in a coded attribute is not quoted back.
        (lambda: _bytes(_setting(real_cine(), "Modality", "ZZTESTPATIENT")), "not_ultrasound"),
        (lambda: _bytes(_setting(native_cine(real_rgb(2), "RGB"), "PhotometricInterpretation", "ZZTESTPATIENT")), "unsupported_photometric"),
    ],
)
def test_files_that_are_not_cines_are_skipped_with_a_reason(make, reason):
    name = "file 7/9 [0123abcd]"
    with pytest.raises(dicom.DicomSkip) as info:
        ds = dicom.open_dataset(make(), name)
        dicom.read_header(ds, name)
        dicom.decode_frames(ds, name)
    assert info.value.reason == reason
    assert name in str(info.value)
    assert not any(s in str(info.value) for s in phi_strings())


def test_regions_mask_keeps_2d_regions_and_rejects_untrustworthy_boxes():
    ds = with_regions(real_cine(), (42, 15, 297, 207, 1), (20, 214, 300, 232, 4))
    regions = dicom.ultrasound_regions(ds)
    assert regions == ((42, 15, 297, 207),), "the ECG waveform region is not part of the sector"
    mask = dicom.regions_mask(regions, (240, 320))
    assert mask.sum() == (297 - 42 + 1) * (207 - 15 + 1) and mask[15, 42] and mask[207, 297] and not mask[208, 297]
    assert dicom.regions_mask(((0, 0, 320, 239),), (240, 320)) is None  # past the right edge
    assert dicom.regions_mask(((0, 0, 319, 239),), (240, 320)) is None  # the whole frame hides nothing
    assert dicom.regions_mask(((10, 10, 20, 20),), (240, 320)) is None  # too small to be a sector
    assert dicom.regions_mask((), (240, 320)) is None


@pytest.mark.parametrize("noise", [0.0, 3.0])
def test_estimated_sector_leaves_out_burned_in_text_ecg_and_counter(rgb, noise):
    """Clean digital frames, and frames with Gaussian noise everywhere (a frame-grabber export):
    the noisy estimate may lose the faint fan edges, never take in the overlays."""
    noisy = luma(with_overlays(rgb)) + np.random.default_rng(0).normal(0, noise, rgb.shape[:3])
    frames = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    mask = dicom.estimate_sector(frames)
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
    with pytest.raises(dicom.DicomSkip, match="no_sector"):
        dicom.estimate_sector(np.repeat(frames[:1], 5, axis=0))


def test_crop_to_sector_masks_crops_and_pads_keeping_aspect():
    frames = np.full((3, 120, 300), 200, np.uint8)
    frames[:, :, :20] = 255  # "text" left of the sector
    mask = np.zeros((120, 300), bool)
    mask[10:110, 40:240] = True  # 100 x 200 box
    mask[10:30, 40:60] = False  # a notch inside the box, outside the sector
    out = dicom.crop_to_sector(frames, mask, (112, 112))
    assert out.shape == (3, 112, 112) and out.dtype == np.uint8
    # 100x200 scales to 56x112, centred: rows 28..83 hold the image, the rest is padding.
    assert (out[:, :28] == 0).all() and (out[:, 84:] == 0).all()
    assert (out[:, 40:80, 20:100] == 200).all()
    assert (out[:, 28:36, 0:8] == 0).all(), "the notch stays masked after resizing"
    assert out.max() == 200, "nothing of the text left of the sector survives"
