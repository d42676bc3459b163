"""Isolated decoding for the REST server: hostile bytes cost an error, not the process."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from echo.data.video import VideoDecodeError, encode_mp4
from echo.model.preprocessing import Preprocessing
from echo.model.scoring import video_clips
from echo.serve.sandbox import IsolatedDecoder

PRE = Preprocessing(clip_len=4, num_clips=2, stride=1, frame_size=(32, 32))


def _video(n: int, size: int) -> bytes:
    frames = np.zeros((n, size, size), np.uint8)
    frames[:, ::16] = 200
    return encode_mp4(frames, fps=25)


@pytest.fixture(scope="module")
def decoder():
    d = IsolatedDecoder(memory_mb=256, timeout_s=30)
    d.start()
    yield d
    d.close()


def test_good_video_gives_the_in_process_clips(decoder):
    data = encode_mp4(np.random.default_rng(0).integers(0, 256, (10, 48, 48), dtype=np.uint8), fps=25)
    torch.testing.assert_close(decoder.clips(PRE, data, "good.mp4"), video_clips(PRE, data, "good.mp4"), rtol=0, atol=0)


def _gif() -> bytes:
    frames = [Image.fromarray(np.full((32, 32), 40 * i, np.uint8)) for i in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def test_not_a_video_and_a_huge_frame_size_are_errors_and_the_child_keeps_serving(decoder):
    with pytest.raises(VideoDecodeError, match=r"notes.mp4: (not a readable video|.*not allowed)"):
        decoder.clips(PRE, b"patient notes, not a video\n" * 40, "notes.mp4")
    with pytest.raises(VideoDecodeError, match=r"clip.mp4: container 'gif' is not allowed"):
        decoder.clips(PRE, _gif(), "clip.mp4")  # a GIF named .mp4: refused by the allow-list
    # 8 frames of 4096x4096 in 9 KB: decoding needs far more than the 256 MB allowed. Which allocation
    # fails first under the limit varies between runs: a MemoryError (reported as the limit) or
    # decord's filter graph failing to fetch a frame (reported as a decoding failure).
    with pytest.raises(VideoDecodeError, match=r"huge.mp4: (decoding needs more than the 256 MB of memory allowed"
                                               r"|decoding frames failed)"):
        decoder.clips(PRE, _video(8, 4096), "huge.mp4")
    assert decoder.clips(PRE, _video(6, 32), "after.mp4").shape == (2, 1, 4, 32, 32)


def test_a_decode_past_the_time_limit_is_abandoned_and_the_child_replaced():
    d = IsolatedDecoder(memory_mb=1024, timeout_s=0.05)
    try:
        with pytest.raises(VideoDecodeError, match=r"slow.mp4: decoding took longer than 0.05 s"):
            d.clips(PRE, _video(8, 2048), "slow.mp4")
        assert d.restarts == 1
        d.timeout_s = 30
        assert d.clips(PRE, _video(6, 32), "next.mp4").shape == (2, 1, 4, 32, 32)
    finally:
        d.close()
