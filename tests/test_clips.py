"""Clip index sampling, the short-video loop policy, min-max, and eval clips decoded from bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from echo.data.clips import clip_span, eval_clip_indices, eval_clips, minmax, train_clip_indices
from echo.data.video import VideoDecodeError, encode_mp4


def _video(n_frames: int, size: int = 32) -> np.ndarray:
    """Frame t is a flat grey level 5 * t (so decoded frames identify their index), plus a
    bright square that moves, so no two frames are alike."""
    frames = np.zeros((n_frames, size, size), np.uint8)
    for t in range(n_frames):
        frames[t] = 5 * t
        frames[t, 4:10, t % (size - 10) : t % (size - 10) + 6] = 255
    return frames


def test_train_indices_fit_inside_and_follow_the_seed():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        idx = train_clip_indices(20, clip_len=4, stride=2, rng=rng)
        assert idx.shape == (4,) and idx.dtype == np.int64
        assert np.all(np.diff(idx) == 2) and idx[0] >= 0 and idx[-1] <= 19
        starts.add(int(idx[0]))
    assert starts == set(range(20 - clip_span(4, 2) + 1))  # every start reachable, none past the end
    a = train_clip_indices(100, 16, 1, np.random.default_rng(7))
    b = train_clip_indices(100, 16, 1, np.random.default_rng(7))
    assert np.array_equal(a, b)


def test_short_video_loops_and_never_pads():
    rng = np.random.default_rng(1)
    for _ in range(50):
        idx = train_clip_indices(3, clip_len=4, stride=1, rng=rng)
        assert idx.min() >= 0 and idx.max() <= 2
        assert np.array_equal(idx, (idx[0] + np.arange(4)) % 3)
    ev = eval_clip_indices(5, clip_len=16, num_clips=4, stride=1)
    assert ev.shape == (4, 16) and ev.max() <= 4
    assert np.array_equal(ev[0], np.arange(16) % 5)
    assert len({tuple(r) for r in ev}) > 1  # the clips start at different phases


def test_eval_indices_are_evenly_spaced_and_cover_the_video():
    ev = eval_clip_indices(100, clip_len=16, num_clips=4, stride=1)
    assert ev[0, 0] == 0 and ev[-1, -1] == 99
    assert np.array_equal(ev[:, 0], [0, 28, 56, 84])
    assert np.all(np.diff(ev, axis=1) == 1)
    assert np.array_equal(eval_clip_indices(40, 4, 1, 3), [[0, 3, 6, 9]])


@pytest.mark.parametrize("bad", [dict(n_frames=0), dict(clip_len=0), dict(stride=0)])
def test_bad_arguments_are_refused(bad):
    args = dict(n_frames=10, clip_len=4, stride=1) | bad
    with pytest.raises(ValueError):
        train_clip_indices(args["n_frames"], args["clip_len"], args["stride"], np.random.default_rng(0))


def test_minmax_numpy_and_torch():
    x = np.array([[2.0, 4.0], [6.0, 10.0]])
    out = minmax(x)
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    assert np.allclose(out, (x - 2) / 8)
    t = minmax(torch.tensor([3, 5, 7], dtype=torch.uint8))
    assert t.dtype == torch.float32 and torch.allclose(t, torch.tensor([0.0, 0.5, 1.0]))
    assert np.array_equal(minmax(np.full((2, 3), 9, np.uint8)), np.zeros((2, 3), np.float32))
    assert torch.equal(minmax(torch.full((4,), 2.0)), torch.zeros(4))


def test_eval_clips_decodes_the_right_frames():
    frames = _video(40)
    data = encode_mp4(frames, fps=30)
    clips = eval_clips(data, "mem://v.mp4", clip_len=8, num_clips=3, stride=2)
    assert clips.shape == (3, 8, 32, 32) and clips.dtype == np.float32
    idx = eval_clip_indices(40, 8, 3, 2)
    for k in range(3):
        assert clips[k].min() == 0.0 and clips[k].max() == 1.0
        expected = minmax(frames[idx[k]])
        # the flat background away from the moving square identifies the frame (H.264 is lossy)
        assert np.abs(clips[k][:, 20:, :] - expected[:, 20:, :]).max() < 0.03


def test_eval_clips_on_a_short_video_loops():
    frames = _video(6)
    clips = eval_clips(encode_mp4(frames, fps=30), "mem://short.mp4", clip_len=16, num_clips=2)
    assert clips.shape == (2, 16, 32, 32)
    background = clips[0, :, 28, 28]
    assert np.allclose(background[:6], background[6:12], atol=0.03)  # wrapped, not zero-padded


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "empty"), (b"this is not a video at all" * 10, "not a readable video")],
)
def test_eval_clips_names_the_uri_on_bad_bytes(data, reason):
    with pytest.raises(VideoDecodeError, match=reason) as e:
        eval_clips(data, "s3://bucket/bad.mp4")
    assert e.value.uri == "s3://bucket/bad.mp4"


def test_truncated_video_is_an_error_not_silent_frames():
    data = encode_mp4(_video(40), fps=30)
    for cut in (0.3, 0.6, 0.9):
        with pytest.raises(VideoDecodeError):
            eval_clips(data[: int(len(data) * cut)], "mem://cut.mp4")
