"""Ingest throughput, and what ingesting buys the pretraining loader (issue 19).

1. Writes ``--videos`` raw echo videos shaped like the exports issue 19 describes: H.264 MP4,
   colour, 224x112, 50 fps, ``--frames`` frames, B-frames, one keyframe for the whole video
   (a GOP longer than the clip) and an MP4 edit list; content: pydicom's real apical cine played
   back and forth, with a fake name burned into a corner.
2. Runs ``echo-ssl ingest`` on them (``--workers``, default 2) and prints videos per minute
   (wall clock) and CPU seconds per video (this process and its workers).
3. Feeds the same MI-SimCLR loader (``echo.data.dataset.SSLClipDataset`` through
   ``echo.data.loader.VideoLoader`` in process, 4-frame clips, as ``data_throughput.py`` does)
   from the raw files and from their ingested versions, in interleaved rounds on one core with
   one torch thread, and prints clips per CPU-second of each and, last, the ratio ingested/raw
   with the CPU model.

    python benchmarks/ingest_throughput.py [--videos 12] [--frames 150] [--pairs 150] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pydicom
import torch
from data_throughput import cpu_model, measure, ours
from PIL import Image, ImageDraw
from pydicom.data import get_testdata_file

from echo.data import storage
from echo.data.dataset import SSLClipDataset
from echo.data.ids import ID_KEY_ENV, env_id_key, keyed_hash
from echo.data.manifest import load_manifest
from echo.data.video import decode_frames
from echo.ingest.pipeline import IngestOptions, ingest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from videofiles import encode_as  # noqa: E402  (the test suite's writer of other-format videos)

SIZE = (112, 224)  # (H, W) of the raw videos
FPS = 50


def raw_frames(n_frames: int, shift: int) -> np.ndarray:
    """``(n_frames, 112, 224, 3)`` RGB: the real cine back and forth, rolled by ``shift`` pixels
    (so no two videos are the same bytes), with white text in the top-left corner."""
    cine = pydicom.dcmread(get_testdata_file("examples_ybr_color.dcm")).pixel_array
    order = np.concatenate([np.arange(len(cine)), np.arange(len(cine) - 2, 0, -1)])
    out = []
    for t in range(n_frames):
        img = Image.fromarray(np.roll(cine[order[t % len(order)]], shift, axis=1)).resize(SIZE[::-1])
        ImageDraw.Draw(img).text((2, 1), "ZZTEST^SECRET", fill=(255, 255, 255))
        out.append(np.asarray(img))
    return np.stack(out)


def write_raw(frames: np.ndarray) -> bytes:
    """Long-GOP H.264 MP4 with B-frames (the MP4 muxer adds an edit list for their delay)."""
    gop = len(frames)
    return encode_as(frames, "mp4", "libx264", "yuv420p",
                     {"x264-params": f"bframes=3:keyint={gop}:min-keyint={gop}:scenecut=0"}, fps=FPS)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the ingest pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_figure(raw: Path, manifest_uri: str, path: str, index: int = 20) -> None:
    """Frame ``index`` of ``raw`` (colour, as stored) beside the same frame of its ingested clip,
    both at 3x (nearest neighbour), on one PNG."""
    with av.open(str(raw)) as c:
        before = next(f.to_ndarray(format="rgb24") for i, f in enumerate(c.decode(video=0)) if i == index)
    table = load_manifest(manifest_uri).table
    source_id = keyed_hash(env_id_key(), "path", raw.name)  # how ingest names a source file
    uri = table.loc[table["source_id"] == source_id, "video_uri"].item()
    after = decode_frames(storage.read_bytes(uri), [index], uri)[0]
    scale = 3
    b = Image.fromarray(before).resize((before.shape[1] * scale, before.shape[0] * scale), Image.Resampling.NEAREST)
    g = Image.fromarray(after).convert("RGB").resize((after.shape[1] * scale, after.shape[0] * scale), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (b.width + g.width + 24, max(b.height, g.height) + 28), "white")
    canvas.paste(b, (0, 28))
    canvas.paste(g, (b.width + 24, 28))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 8), "before: raw export (H.264, B-frames, edit list, colour, text in the corner)", fill="black")
    draw.text((b.width + 28, 8), "after: echo-ssl ingest (grey, fan only, 112x112)", fill="black")
    canvas.save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=12, help="raw videos to write and ingest")
    p.add_argument("--frames", type=int, default=150, help="frames per raw video (50 fps)")
    p.add_argument("--pairs", type=int, default=150, help="MI-SimCLR pairs per loader arm")
    p.add_argument("--rounds", type=int, default=5, help="interleaved loader measuring rounds")
    p.add_argument("--workers", type=int, default=2, help="ingest worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figure", help="also write a PNG: a raw frame beside the same frame ingested")
    a = p.parse_args(argv)
    os.environ.setdefault(ID_KEY_ENV, "benchmark-key-not-a-secret-0123456789")
    cores = len(os.sched_getaffinity(0))

    folder = Path(tempfile.mkdtemp(prefix="echo-ingest-bench-"))
    raw = folder / "raw"
    raw.mkdir()
    for i in range(a.videos):
        (raw / f"export_{i:03d}.mp4").write_bytes(write_raw(raw_frames(a.frames, 3 * i)))

    wall, cpu = time.perf_counter(), cpu_seconds()
    summary = ingest(IngestOptions(src=str(raw), out=str(folder / "ingested"), workers=a.workers))
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    assert summary.rows == a.videos, summary.format()

    if a.figure:
        write_figure(raw / "export_000.mp4", summary.manifest_uri, a.figure)
    raw_rows = pd.DataFrame({
        "video_uri": sorted(str(p) for p in raw.iterdir()),
        "patient_id": [f"p{i}" for i in range(a.videos)],
        "study_id": [f"s{i}" for i in range(a.videos)],
        "split": "unlabeled",
        "label": np.nan,
    })
    ingested_rows = load_manifest(summary.manifest_uri).table
    arms = {
        "raw long-GOP MP4 (B-frames, edit list, 224x112 colour)": ours(
            SSLClipDataset(raw_rows, "mi-simclr", clip_len=4, seed=a.seed), 2),
        "ingested (short-GOP H.264, 112x112 grey, masked)": ours(
            SSLClipDataset(ingested_rows, "mi-simclr", clip_len=4, seed=a.seed), 2),
    }
    # The loader arms: one core, one torch thread, as in data_throughput.py (after the ingest,
    # whose workers use every core).
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    rate = measure(arms, dict.fromkeys(arms, a.pairs), a.rounds)

    print(f"CPU: {cpu_model()} ({cores} cores available)")
    print(f"ingest: {a.videos} videos of {a.frames} frames, {a.workers} worker(s): {wall:.1f} s wall, "
          f"{a.videos / wall * 60:.1f} videos/min, {cpu / a.videos:.2f} CPU-s per video")
    for name, value in rate.items():
        print(f"loader, {name}: {value:.1f} clips per CPU-second")
    names = list(rate)
    print(f"ratio ingested/raw: {rate[names[1]] / rate[names[0]]:.2f}x clips per CPU-second (CPU: {cpu_model()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
