"""Clip throughput per CPU-second: the published reference approach against this pipeline.

Runs on one synthetic corpus (``echo.ingest.synth``: 112 x 112 H.264, a keyframe every 8 frames)
served by a moto S3 server on 127.0.0.1 that this script starts, in one process pinned to
one core with one torch thread (the S3 server runs on another core when there is one; its
CPU time is not counted, as a real object store's would not be).

- reference, the published pipeline (CarDS-Yale/EchoCLR): fetch the object's bytes, write
  them to a temporary file, decode the whole video to 3-channel BGR frames (PyAV full decode,
  standing in for OpenCV's ``VideoCapture``, which is not installed here), slice the clip,
  zero-pad 8 + random crop, flip, ``scipy.ndimage.rotate`` of every (H, W, 3) frame, min-max;
- ours: ``echo.data.dataset`` through ``echo.data.loader.VideoLoader`` (in process): bytes into memory,
  decord decodes only the clip's frames, one single-channel affine warp per clip, min-max;
- ours from local files, and ours over S3 with the byte cache warm (later epochs), to show
  what S3 costs.

Both arms read objects with ``echo.data.storage.read_bytes`` (obstore, pooled connections).
The script also prints the CPU cost of one GET that way against boto3's ``get_object``, side
by side, and the CPU model.

For 4-frame MI-SimCLR pairs (two videos of a study per pair) and 16-frame fine-tuning clips.
Prints clips per CPU-second (process CPU time) for each, then the ratio ours/reference; then a
separate section (``decoded_cache_section``): the decoded-frame cache of ``echo-ssl pretrain
--cache-decoded-mb`` (videos decoded once into memory, clips augmented from it) against
streaming from local files, same datasets and seeds, with the CPU model.

    python benchmarks/data_throughput.py [--patients 8] [--pairs 200] [--clips 120] [--rounds 5] [--corpus DIR]
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import scipy.ndimage as ndi
import torch

from echo.data import storage
from echo.data.clips import minmax, train_clip_indices
from echo.data.dataset import LabelledClipDataset, SSLClipDataset
from echo.data.loader import VideoLoader
from echo.data.manifest import load_manifest

PAD, MAX_ANGLE = 8, 10


# ------------------------------------------------------------------------------ set-up


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(cpu: int | None) -> tuple[subprocess.Popen, str]:
    """A moto S3 server on 127.0.0.1 in its own process (pinned to ``cpu`` when given)."""
    import socket

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the moto server did not start")
            time.sleep(0.2)
    return proc, f"http://127.0.0.1:{port}"


def corpus(folder: Path, patients: int, seed: int) -> pd.DataFrame:
    """Manifest rows of a synthetic corpus under ``folder`` (made once, then reused)."""
    manifest = folder / "manifest.csv"
    if not manifest.exists():
        from echo.ingest.synth import synthesize

        synthesize(str(folder), patients=patients, seed=seed, workers=min(2, os.cpu_count() or 1))
    return load_manifest(str(manifest)).table


def upload(rows: pd.DataFrame, bucket: str) -> pd.DataFrame:
    storage.s3_client().create_bucket(Bucket=bucket)
    out = rows.copy()
    out["video_uri"] = [f"s3://{bucket}/videos/{Path(u).name}" for u in rows.video_uri]
    for src, dst in zip(rows.video_uri, out.video_uri):
        storage.write_bytes(dst, storage.read_bytes(src))
    return out


# -------------------------------------------------------------------------- reference
# The published pipeline (CarDS-Yale/EchoCLR, imlh-2022/ssl): OpenCV reads every frame of the
# file as 3-channel BGR, a clip is sliced, padded/cropped/flipped, every frame (H, W, 3) is
# rotated with scipy.ndimage.rotate (cubic spline, reshape=False), then min-max in float64.


def reference_decode(uri: str) -> np.ndarray:
    """Fetch, write a temp file, decode every frame as BGR (PyAV, one thread): ``(T, H, W, 3)`` uint8."""
    import av

    data = storage.read_bytes(uri)
    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data)
        f.flush()
        with av.open(f.name) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            return np.stack([frame.to_ndarray(format="bgr24") for frame in container.decode(stream)])


def reference_augment(clip: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Pad + random crop, flip, ``scipy.ndimage.rotate`` per frame, min-max: ``(3, T, H, W)`` float32."""
    t, h, w, c = clip.shape
    padded = np.zeros((t, h + 2 * PAD, w + 2 * PAD, c), clip.dtype)
    padded[:, PAD:-PAD, PAD:-PAD] = clip
    y, x = rng.integers(0, 2 * PAD, size=2)
    out = padded[:, y : y + h, x : x + w]
    if rng.random() > 0.5:
        out = out[:, :, ::-1]
    if rng.random() > 0.5:
        angle = int(rng.integers(-MAX_ANGLE, MAX_ANGLE + 1))
        out = np.stack([ndi.rotate(frame, angle, reshape=False) for frame in out])
    out = (out - out.min()) / (out.max() - out.min())
    return torch.from_numpy(np.transpose(out, (3, 0, 1, 2))).float()


def reference_clip(frames: np.ndarray, clip_len: int, rng: np.random.Generator) -> torch.Tensor:
    return reference_augment(frames[train_clip_indices(len(frames), clip_len, 1, rng)], rng)


def reference_pairs(rows: pd.DataFrame, order: Iterable[int], seed: int) -> Iterator[int]:
    """MI-SimCLR pairs the reference way (a one-video study's video decoded once); 2 clips each."""
    studies = rows.study_id.to_numpy()
    for index in order:
        rng = np.random.default_rng([seed, index])
        others = np.flatnonzero((studies == studies[index]) & (np.arange(len(rows)) != index))
        partner = int(rng.choice(others)) if len(others) else index
        first = reference_decode(rows.video_uri[index])
        second = first if partner == index else reference_decode(rows.video_uri[partner])
        reference_clip(first, 4, rng), reference_clip(second, 4, rng)
        yield 2


def reference_clips(rows: pd.DataFrame, order: Iterable[int], seed: int) -> Iterator[int]:
    for index in order:
        rng = np.random.default_rng([seed, index])
        reference_clip(reference_decode(rows.video_uri[index]), 16, rng)
        yield 1


# ------------------------------------------------------------------------------- ours


def ours(dataset, clips_per_sample: int, batch_size: int = 16) -> Iterator[int]:
    """This pipeline, in process; yields clips per sample, epoch after epoch."""
    loader = VideoLoader(dataset, batch_size=batch_size, num_workers=0, max_skipped_fraction=0.0)
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        for batch in loader:
            for _ in range(len(batch["index"])):
                yield clips_per_sample


# ---------------------------------------------------------------------------- measure


def get_cost(rows: pd.DataFrame, rounds: int = 3) -> dict[str, float]:
    """CPU milliseconds per object GET: boto3's ``get_object`` against ``storage.read_bytes`` (obstore)."""
    client = storage.s3_client()
    paths = [storage.split_s3(uri) for uri in rows.video_uri]

    def boto3_get() -> None:
        for bucket, key in paths:
            client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def ours_get() -> None:
        for uri in rows.video_uri:
            storage.read_bytes(uri)

    cost = {"boto3 get_object": 0.0, "obstore (echo.data.storage.read_bytes)": 0.0}
    for _ in range(rounds):
        for name, read in zip(cost, (boto3_get, ours_get)):
            start = time.process_time()
            read()
            cost[name] += (time.process_time() - start) * 1e3 / (len(paths) * rounds)
    return cost


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where there is none): printed with every figure."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def measure(arms: dict[str, Iterator[int]], samples: dict[str, int], rounds: int) -> dict[str, float]:
    """Clips per CPU-second (process time) of each arm, run in interleaved rounds so that
    every arm meets the same machine load."""
    clips = dict.fromkeys(arms, 0)
    cpu = dict.fromkeys(arms, 0.0)
    for r in range(rounds):
        for name, it in arms.items():
            n = samples[name] // rounds + (r < samples[name] % rounds)
            start = time.process_time()
            clips[name] += sum(next(it) for _ in range(n))
            cpu[name] += time.process_time() - start
    return {name: clips[name] / cpu[name] for name in arms}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=8, help="synthetic patients (1-4 videos each)")
    p.add_argument("--pairs", type=int, default=200, help="4-frame SSL pairs per arm")
    p.add_argument("--clips", type=int, default=120, help="16-frame clips per arm")
    p.add_argument("--corpus", default=None, help="folder for the synthetic corpus (reused when present)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved measuring rounds")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")  # the local moto server only
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    cpus = sorted(os.sched_getaffinity(0))
    me, server_cpu = cpus[0], (cpus[1] if len(cpus) > 1 else None)

    folder = Path(a.corpus) if a.corpus else Path(tempfile.mkdtemp(prefix="echo-bench-"))
    local = corpus(folder, a.patients, a.seed)
    moto, url = start_moto(server_cpu)
    try:
        os.environ["AWS_ENDPOINT_URL"] = url
        remote = upload(local, f"bench-{uuid.uuid4().hex[:8]}")
        os.sched_setaffinity(0, {me})
        torch.set_num_threads(1)

        rng = np.random.default_rng(a.seed)
        pair_order = rng.integers(0, len(local), a.pairs)
        clip_order = rng.integers(0, len(local), a.clips)
        ssl = lambda rows, cache=0: SSLClipDataset(rows, "mi-simclr", clip_len=4, seed=a.seed, cache_bytes=cache)
        fine = lambda rows, cache=0: LabelledClipDataset(rows, clip_len=16, seed=a.seed, cache_bytes=cache)
        arms = {
            "4-frame, reference, S3": reference_pairs(remote, itertools.cycle(pair_order), a.seed),
            "4-frame, ours, S3": ours(ssl(remote), 2),
            "4-frame, ours, local": ours(ssl(local), 2),
            "4-frame, ours, S3 + byte cache": ours(ssl(remote, 2**30), 2),
            "16-frame, reference, S3": reference_clips(remote, itertools.cycle(clip_order), a.seed),
            "16-frame, ours, S3": ours(fine(remote), 1),
            "16-frame, ours, local": ours(fine(local), 1),
            "16-frame, ours, S3 + byte cache": ours(fine(remote, 2**30), 1),
        }
        for name, it in arms.items():  # warm up: imports, S3 client, first decodes, a filled cache
            for _ in range(len(local) if "cache" in name else 2):
                next(it)
        samples = {name: a.pairs * 2 if name.startswith("4") else a.clips for name in arms}
        rate = measure(arms, samples, a.rounds)
        gets = get_cost(remote)

        frames = local.n_frames.to_numpy()
        print(f"CPU: {cpu_model()}")
        print(
            f"corpus: {len(local)} synthetic videos (echo.ingest.synth), 112x112, {int(frames.min())}-{int(frames.max())} frames, "
            f"keyframe every 8; moto S3 on {url}; this process pinned to CPU {me}, 1 torch thread; "
            f"{a.rounds} interleaved rounds"
        )
        print(
            "reference: fetch + temp file + whole-video BGR decode (PyAV; OpenCV is not installed) + slice + "
            "pad/crop/flip + scipy.ndimage.rotate per frame + min-max; 4-frame = MI-SimCLR pairs, 16-frame = fine-tuning clips"
        )
        for name, value in rate.items():
            print(f"{name:<34} {value:8.1f} clips per CPU-second")
        sizes = local.video_uri.map(lambda uri: os.path.getsize(uri))
        print(
            f"one GET of a {sizes.mean() / 1e3:.0f} KB video: "
            + ", ".join(f"{name} {ms:.2f} ms CPU" for name, ms in gets.items())
            + f" (obstore {gets['boto3 get_object'] / gets['obstore (echo.data.storage.read_bytes)']:.1f}x less)"
        )
        kinds = ("4-frame", "16-frame")
        s3_local = [rate[f"{k}, ours, S3"] / rate[f"{k}, ours, local"] for k in kinds]
        cached = [rate[f"{k}, ours, S3 + byte cache"] / rate[f"{k}, ours, local"] for k in kinds]
        print(
            f"ours S3 / ours local: 4-frame {s3_local[0]:.2f}, 16-frame {s3_local[1]:.2f} (target >= 0.85); "
            f"with the byte cache: {cached[0]:.2f}, {cached[1]:.2f}"
        )
        ratio = [rate[f"{k}, ours, S3"] / rate[f"{k}, reference, S3"] for k in kinds]
        print(f"ratio ours/reference: 4-frame {ratio[0]:.2f}x (target >= 5x), 16-frame {ratio[1]:.2f}x (target >= 2x)")
    finally:
        moto.terminate()
        moto.wait(timeout=15)
    decoded_cache_section(local, a.pairs, a.clips, a.rounds, a.seed)
    return 0


def decoded_cache_section(rows: pd.DataFrame, pairs: int, clips: int, rounds: int, seed: int) -> dict[str, float]:
    """Clips per CPU-second from the decoded-frame cache (``ClipDataset.cache_decoded``) against
    streaming (read + decode per sample) from local files, for 4-frame MI-SimCLR pairs and
    16-frame clips, measured in interleaved rounds in this process (1 torch thread). Prints the
    rates, the CPU model and the ratios; returns the rates."""
    torch.set_num_threads(1)
    ssl = lambda: SSLClipDataset(rows, "mi-simclr", clip_len=4, seed=seed)  # noqa: E731
    fine = lambda: LabelledClipDataset(rows, clip_len=16, seed=seed)  # noqa: E731
    cached_ssl, cached_fine = ssl(), fine()
    start = time.process_time()
    stats = cached_ssl.cache_decoded(2**32)
    cached_fine.decoded = cached_ssl.decoded  # the same videos, decoded once
    fill_s = time.process_time() - start
    arms = {
        "4-frame, streaming (local files)": ours(ssl(), 2),
        "4-frame, decoded-frame cache": ours(cached_ssl, 2),
        "16-frame, streaming (local files)": ours(fine(), 1),
        "16-frame, decoded-frame cache": ours(cached_fine, 1),
    }
    for it in arms.values():
        next(it)
    samples = {name: pairs * 2 if name.startswith("4") else clips for name in arms}
    rate = measure(arms, samples, rounds)
    cpu = cpu_model()
    print(f"decoded-frame cache ({stats.cached} videos, {stats.nbytes / 2**20:.0f} MB, filled in {fill_s:.1f} CPU-s) "
          f"vs streaming, 1 torch thread, CPU {cpu}:")
    for name, value in rate.items():
        print(f"{name:<34} {value:8.1f} clips per CPU-second")
    print("ratio decoded cache / streaming: "
          + ", ".join(f"{k} {rate[f'{k}, decoded-frame cache'] / rate[f'{k}, streaming (local files)']:.1f}x"
                      for k in ("4-frame", "16-frame")))
    return rate


if __name__ == "__main__":
    raise SystemExit(main())
