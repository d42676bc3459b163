"""Video encoding and decoding: canonical MP4s, frame-accurate decode, errors that name the video."""

from __future__ import annotations

import io
import logging
import pickle

import numpy as np
import pytest

from echo.data import native_stderr, video
from echo.data.video import (
    KEYFRAME_INTERVAL,
    UnsupportedVideo,
    VideoDecodeError,
    check_video,
    decode_frames,
    encode_mp4,
    probe,
)
from videofiles import encode_as, write_video


def _frames(n: int = 24, size: int = 112, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.tile(np.linspace(0, 255, size, dtype=np.float32), (size, 1))
    moving = np.stack([np.roll(base, 3 * t, axis=1) for t in range(n)])
    return np.clip(moving + rng.normal(0, 8, moving.shape), 0, 255).astype(np.uint8)


def test_same_frames_same_bytes_at_112_px():
    # 112 px leaves row padding in the chroma planes; it must not leak into the encoding.
    frames = _frames()
    assert len({encode_mp4(frames, 30.0) for _ in range(12)}) == 1


def test_x264_encodes_without_avx512():
    # x264's AVX-512 code gave another encoding of the same frames about once in 1,000 runs here
    import av.logging

    old = av.logging.get_level()
    av.logging.set_level(av.logging.INFO)
    try:
        with av.logging.Capture(local=False) as logs:
            encode_mp4(_frames(n=2), 30.0)
    finally:
        av.logging.set_level(old)
    caps = [message for _, name, message in logs if name == "libx264" and "cpu capabilities" in message]
    assert len(caps) == 1 and "AVX512" not in caps[0]
    with open("/proc/cpuinfo") as f:
        if " avx2 " in f.read():
            assert "AVX2" in caps[0]  # and nothing below it was dropped


def test_round_trip_is_frame_accurate_with_short_gop_and_no_edit_list():
    frames = _frames(n=40)
    data = encode_mp4(frames, 25.0)
    info = probe(data, "mem://v.mp4")
    assert (info.n_frames, info.fps, info.height, info.width) == (40, 25.0, 112, 112)
    assert info.keyframe_interval <= KEYFRAME_INTERVAL and not info.has_edit_list
    decoded = decode_frames(data, [0, 17, 39], "mem://v.mp4").astype(int)
    # Each decoded frame is closest to its own source frame (not a neighbour): seeking is exact.
    for got, want in zip(decoded, (0, 17, 39)):
        errors = [np.abs(got - frames[k]).mean() for k in range(40)]
        assert int(np.argmin(errors)) == want and errors[want] < 6


@pytest.mark.parametrize("height, width", [(32, 32), (48, 96), (32, 48), (40, 112)])
def test_every_frame_width_decodes_to_its_own_pixels(height, width):
    # decord hands out FFmpeg's padded RGB rows as extra channels when the padded row length is a
    # multiple of the width: (32, 32, 6) at 32 px, (H, 96, 4) at 96 px with FFmpeg 8 on AVX-512
    frames = _frames(n=12, size=max(height, width))[:, :height, :width].copy()
    decoded = decode_frames(encode_mp4(frames, 30.0), [0, 5, 11], "mem://v.mp4").astype(int)
    assert decoded.shape == (3, height, width)
    assert np.abs(decoded - frames[[0, 5, 11]]).mean() < 6


@pytest.mark.parametrize("data,reason", [(b"", "empty"), (b"not a video at all", "not a readable video")])
def test_decode_errors_name_the_video(data, reason):
    with pytest.raises(VideoDecodeError, match=f"s3://b/clip.mp4.*{reason}"):
        decode_frames(data, [0], "s3://b/clip.mp4")


def test_index_past_the_end_and_truncated_files_raise():
    data = encode_mp4(_frames(n=12), 30.0)
    with pytest.raises(VideoDecodeError, match="outside"):
        decode_frames(data, [12], "v.mp4")
    with pytest.raises(VideoDecodeError, match="v.mp4"):
        decode_frames(data[: len(data) // 2], [0, 11], "v.mp4")


def test_errors_survive_pickling_between_processes():
    err = pickle.loads(pickle.dumps(VideoDecodeError("s3://b/x.mp4", "empty object")))
    assert (err.uri, err.reason) == ("s3://b/x.mp4", "empty object") and "s3://b/x.mp4" in str(err)


def test_colour_or_odd_sized_frames_are_refused():
    with pytest.raises(ValueError, match="gray"):
        encode_mp4(np.zeros((2, 16, 16, 3), np.uint8), 30.0)
    with pytest.raises(ValueError, match="even"):
        encode_mp4(np.zeros((2, 15, 16), np.uint8), 30.0)


def test_the_canonical_format_and_other_allowed_ones_pass_the_header_check():
    header = check_video(encode_mp4(_frames(n=4, size=64), 30.0), "v.mp4")
    assert "mp4" in header.container.split(",") and (header.codec, header.width, header.height) == ("h264", 64, 64)
    header = check_video(write_video(_frames(n=4, size=64), "mjpeg.avi"), "v.avi")
    assert (header.container, header.codec) == ("avi", "mjpeg")


@pytest.mark.parametrize(
    "data, reason",
    [
        (lambda: encode_as(_frames(n=4, size=64), "mpegts", "libx264", "yuv420p"), "container 'mpegts' is not allowed"),
        (lambda: encode_as(_frames(n=4, size=64), "matroska", "ffv1", "yuv420p"), "codec 'ffv1' is not allowed"),
        (lambda: b"\x00\x00\x00\x18ftypmp42" + b"not really a video" * 40, "not a readable video"),
        (lambda: b"", "empty object"),
    ],
    ids=["container", "codec", "fake-header", "empty"],
)
def test_what_the_allow_lists_refuse_never_reaches_the_decoder(data, reason, monkeypatch):
    def no_decoder(*args, **kwargs):
        raise AssertionError("decord opened a refused video")

    monkeypatch.setattr(video._decord(), "VideoReader", no_decoder)
    with pytest.raises(UnsupportedVideo, match=f"cannot decode s3://b/x.mp4: {reason}") as err:
        decode_frames(data(), [0], "s3://b/x.mp4")
    assert isinstance(err.value, VideoDecodeError) and err.value.uri == "s3://b/x.mp4"


def test_a_frame_size_over_the_cap_is_refused():
    data = encode_mp4(_frames(n=2, size=128), 30.0)
    assert check_video(data, "v.mp4", max_pixels=128 * 128).width == 128
    with pytest.raises(UnsupportedVideo, match="frame size 128x128 is outside 1 to 16383 pixels"):
        check_video(data, "v.mp4", max_pixels=128 * 128 - 1)


SECRET = b"AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEKEY"


def test_a_text_file_posing_as_a_video_is_one_clean_error(capfd, caplog):
    text = (b"root:x:0:0:root:/root:/bin/bash\n" + SECRET + b" not a video\n") * 50
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(VideoDecodeError, match="not a readable video") as err:
            decode_frames(text, [0], "videos/notes.mp4")
    out, errors = capfd.readouterr()
    assert (out, errors) == ("", "")
    for shown in (str(err.value), caplog.text):
        assert "SECRET" not in shown and "root:x" not in shown


def test_decoder_output_goes_to_the_debug_log_never_with_the_file_s_bytes(capfd, caplog):
    data = encode_mp4(_frames(n=24, size=64), 30.0)
    corrupt = data[:2000] + bytes(b ^ 0x55 for b in data[2000:4000]) + data[4000:]
    with caplog.at_level(logging.DEBUG, logger="echo.data.video"):
        with pytest.raises(VideoDecodeError, match="decoding frames failed"):
            decode_frames(corrupt, list(range(24)), "corrupt.mp4")
        decoder = [r for r in caplog.records if "corrupt.mp4: decoder: [h264 @" in r.getMessage()]
        assert decoder and all(r.levelno == logging.DEBUG for r in decoder)
        caplog.clear()
        # decord itself echoes input it cannot open: the routed section screens it out
        text = (SECRET + b"\n") * 20
        with native_stderr.routed_to(logging.getLogger("echo.data.video"), text, "notes.mp4"):
            with pytest.raises(Exception):
                video._decord().VideoReader(io.BytesIO(text))
    assert capfd.readouterr() == ("", "")
    assert "bytes of the input, not shown" in caplog.text and "SECRET" not in caplog.text
