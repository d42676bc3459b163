"""Video encoding and decoding: canonical MP4s, frame-accurate decode, errors that name the video."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from echo.data.video import KEYFRAME_INTERVAL, VideoDecodeError, decode_frames, encode_mp4, probe


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
