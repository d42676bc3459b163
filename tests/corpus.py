"""Small test videos and the manifest rows that describe them (for dataset and loader tests).

Video ``k`` shows a bright bar that moves one pixel per frame over a background whose grey
level encodes ``k``; frames are ``size x size`` and videos 20 to 60 frames long (some
shorter than a clip, on request), H.264 with a keyframe every 8 frames.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from echo.data import storage
from echo.data.video import encode_mp4

__all__ = ["video_frames", "write_corpus"]


def video_frames(k: int, n_frames: int, size: int = 64) -> np.ndarray:
    """``(n_frames, size, size)`` uint8 frames of test video ``k``."""
    frames = np.empty((n_frames, size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    base = (20 + 7 * k) % 160
    for t in range(n_frames):
        f = base + 40 * (np.sin((xx + 2 * t) / 6.0) > 0) + (yy // 8)
        f[:, (t + k) % size : (t + k) % size + 4] = 250
        frames[t] = f
    return frames


def write_corpus(
    folder: str,
    n_videos: int = 12,
    size: int = 64,
    videos_per_study: tuple[int, ...] = (1, 2, 3),
    short: int = 0,
    seed: int = 0,
) -> pd.DataFrame:
    """Encode ``n_videos`` videos under ``folder`` (a local path or ``s3://`` prefix).

    Returns manifest rows as ``echo.data.manifest.Manifest.table`` holds them: ``row``,
    ``video_uri``, ``patient_id``, ``study_id``, ``split``, ``label``, ``n_frames``. Studies
    take ``videos_per_study`` videos in turn; the first ``short`` videos have 3 frames.
    """
    rng = np.random.default_rng(seed)
    records, study, left = [], -1, 0
    for k in range(n_videos):
        if left == 0:
            study += 1
            left = videos_per_study[study % len(videos_per_study)]
        left -= 1
        n_frames = 3 if k < short else int(rng.integers(20, 61))
        uri = storage.join(folder, f"videos/v{k:03d}.mp4")
        storage.write_bytes(uri, encode_mp4(video_frames(k, n_frames, size), fps=30))
        records.append(
            {
                "row": k + 1,
                "video_uri": uri,
                "patient_id": f"P{study:03d}",
                "study_id": f"S{study:03d}",
                "split": "train",
                "label": float(study % 2),
                "n_frames": n_frames,
            }
        )
    return pd.DataFrame(records)
