"""Saliency for a loaded model over videos: maps, GIFs and PNG strips, and the region measure.

Glue between ``echo.serve.predict.EchoModel`` (the clips a model sees), ``echo.explain.saliency`` (the
maps) and ``echo.explain.render`` (the images). The map of a video is that of its first
evaluation clip. Boxes given in video pixels are scaled to the model's frame size.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from echo.data import storage
from echo.data.video import probe
from echo.explain.saliency import Box, area_share, region_energy_share, saliency_map, scale_box
from echo.explain.render import write_gif, write_strip

__all__ = ["explain_videos", "region_boxes", "sample_studies"]

log = logging.getLogger(__name__)


def region_boxes(rows: pd.DataFrame, prefix: str) -> list[Box]:
    """Boxes ``(x0, y0, x1, y1)`` from the columns ``<prefix>_x0 .. <prefix>_y1`` of manifest rows."""
    cols = [f"{prefix}_{c}" for c in ("x0", "y0", "x1", "y1")]
    missing = [c for c in cols if c not in rows.columns]
    if missing:
        raise ValueError(f"manifest has no region column(s) {', '.join(missing)} (--region-columns {prefix})")
    values = rows[cols].apply(pd.to_numeric, errors="coerce")
    bad = values.isna().any(axis=1).to_numpy()
    if bad.any():
        first = rows["row"].to_numpy()[bad][0] if "row" in rows.columns else int(np.argmax(bad))
        raise ValueError(f"row {first}: region columns {', '.join(cols)} must be numbers")
    return [tuple(float(v) for v in r) for r in values.to_numpy()]  # type: ignore[misc]


def sample_studies(rows: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """The first video of ``n`` studies drawn with ``seed`` (all when there are fewer)."""
    firsts = rows.groupby("study_id", sort=True).head(1)
    if len(firsts) <= n:
        return firsts.reset_index(drop=True)
    pick = np.random.default_rng(seed).choice(len(firsts), size=n, replace=False)
    return firsts.iloc[np.sort(pick)].reset_index(drop=True)


def _name(uri: str) -> str:
    """An output name for a video: a short hash of its URI (no identifiers from the path)."""
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def explain_videos(
    model,
    uris: Sequence[str],
    out_dir: str,
    method: str = "gradcam",
    boxes: Sequence[Box] | None = None,
) -> pd.DataFrame:
    """Write ``<hash>.gif`` and ``<hash>_strip.png`` per video under ``out_dir``.

    ``model`` is an ``echo.serve.predict.EchoModel`` (clips and probability as
    ``echo.model.scoring`` makes them). Returns one row per video: ``video_uri``, ``gif``,
    ``strip``, ``probability`` and, with ``boxes`` (video pixels), ``region_share``
    (saliency energy inside the box) and ``area_share`` (the uniform-map baseline).
    """

    records = []
    for i, uri in enumerate(uris):
        data = storage.read_bytes(uri)
        clips = model.clips(data, uri)  # (K, 1, T, H, W)
        clip = clips[0]
        sal = saliency_map(model.model, clip.to(model.device), method)
        prob = model.clips_probability(clips)
        base = storage.join(out_dir, _name(uri))
        frames = clip[0].numpy()
        rec = {"video_uri": uri, "gif": write_gif(frames, sal, base + ".gif"),
               "strip": write_strip(frames, sal, base + "_strip.png"), "probability": prob}
        if boxes is not None:
            info = probe(data, uri)
            box = scale_box(boxes[i], (info.height, info.width), model.preprocessing.frame_size)
            rec["region_share"] = region_energy_share(sal, box)
            rec["area_share"] = area_share(box, *model.preprocessing.frame_size)
        records.append(rec)
    if out_dir and not storage.is_s3(out_dir):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    return pd.DataFrame(records)
