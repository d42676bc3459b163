"""echo.ingest.dicom on a real ultrasound cine from pydicom's test data and variants derived from
it (tests/dicomfiles.py): header, decoding of every photometric and compression variant, the
pixel budget, and the files that are skipped with a reason."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pydicom
import pytest
from dicomfiles import (
    FAKE_PHI,
    FAN_BOX,
    encapsulated,
    luma,
    native_cine,
    phi_strings,
    real_cine,
    real_rgb,
    to_bytes,
)
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import convert_color_space
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, MPEG2MPML, RLELossless

from echo.ingest import dicom, fan
from echo.ingest.frames import SkipFile

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
    assert fan.regions_mask(header.regions, frames.shape[1:]) is None
    mask, source = fan.sector_mask(frames, header.regions, "x")
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
    with pytest.raises(SkipFile) as info:
        ds = dicom.open_dataset(make(), name)
        dicom.read_header(ds, name)
        dicom.decode_frames(ds, name)
    assert info.value.reason == reason
    assert name in str(info.value)
    assert not any(s in str(info.value) for s in phi_strings())


_BUDGET_RUN = textwrap.dedent(
    """
    import json, resource, sys, time
    import pydicom, pydicom.pixels
    from echo.ingest.pipeline import IngestOptions, ingest

    pydicom.dcmread(sys.argv[1])
    start = time.perf_counter()
    ingest(IngestOptions(src=sys.argv[2], out=sys.argv[3], workers=1))  # the first run also imports
    first = time.perf_counter() - start
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    summary = ingest(IngestOptions(src=sys.argv[2], out=sys.argv[3], workers=1))
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"first_seconds": first, "seconds": seconds, "peak_growth_kb": after - before,
                      "reasons": summary.skipped_by_reason, "detail": [o.detail for o in summary.skipped]}))
    """
)


def test_a_header_declaring_a_huge_clip_is_refused_before_decoding(tmp_path, monkeypatch):
    """Issue 17 item 7: a 50 KB file declaring 10,000 frames of 4096x4096 (JPEG frames of the
    real cine inside) is refused from its header within a second, the process's peak memory
    (ru_maxrss, in a fresh interpreter, measured on a second run once imports are done) unchanged."""
    ds = real_cine()
    ds.NumberOfFrames, ds.Rows, ds.Columns = 10_000, 4096, 4096
    src = tmp_path / "src"
    src.mkdir()
    path = src / "huge.dcm"
    path.write_bytes(to_bytes(ds))
    monkeypatch.setenv("ECHO_SSL_ID_KEY", "test-key-0123456789-not-a-real-secret")
    proc = subprocess.run([sys.executable, "-c", _BUDGET_RUN, str(path), str(src), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["reasons"] == {"over_budget": 1}
    assert "10000 frames of 4096x4096" in result["detail"][0] and "--max-pixels" in result["detail"][0]
    # The first run also imports pydicom's pixel handlers; the refusal itself is the second.
    assert result["first_seconds"] < 10.0 and result["seconds"] < 1.0, result
    # A decode would need 167 GB; the refusal leaves the peak where it was (within 2 MB).
    assert result["peak_growth_kb"] < 2_000, result
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.mp4"))


def test_frames_are_reduced_as_decoded_and_the_budget_is_a_setting(rgb):
    ds = dicom.open_dataset(to_bytes(native_cine(rgb[:6], "RGB")), "r")
    small = dicom.decode_frames(ds, "r", shape=(60, 80))
    full = dicom.decode_frames(ds, "r")
    assert small.shape == (6, 60, 80) and full.shape == (6, 240, 320)
    reference = np.stack([np.asarray(Image.fromarray(f).resize((80, 60), Image.Resampling.BOX)) for f in full])
    assert np.abs(small.astype(int) - reference).mean() < 2.0
    with pytest.raises(SkipFile, match="over_budget") as info:
        dicom.decode_frames(ds, "file 1/1 [x]", max_pixels=6 * 240 * 320 - 1)
    assert "6 frames of 240x320" in str(info.value)
    assert dicom.decode_frames(ds, "r", max_pixels=6 * 240 * 320).shape == (6, 240, 320)


def test_palette_color_lookup_is_bounded():
    """A PALETTE COLOR header declaring 32 bits stored would make a 2**32-entry lookup: refused."""
    src = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    ds = real_cine()
    for elem in src:
        if elem.tag.group == 0x0028:
            ds[elem.tag] = elem
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([src.pixel_array] * 2).tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.BitsStored = 32
    ds = dicom.open_dataset(to_bytes(ds), "p")
    with pytest.raises(SkipFile, match="unsupported_photometric") as info:
        dicom.decode_frames(ds, "p")
    assert "32 bits" in str(info.value)
