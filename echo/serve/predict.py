"""Prediction with a registered or pulled model: per-video and per-study probabilities.

A video's probability of severe aortic stenosis is computed by :mod:`echo.model.scoring`
with the bundle's preprocessing (the same code as ``echo-ssl evaluate`` and the REST server).
A study's probability is the mean over its videos. The call is severe (``prediction`` 1) when
the probability is at least the threshold stored in the bundle (chosen on validation).

Outputs never carry patient or study identifiers: studies are named by keyed hashes
(``echo.data.ids.pseudonyms``), which group the rows of one output.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd
import torch

from echo.data import storage
from echo.data.ids import pseudonyms
from echo.data.manifest import SPLITS, load_manifest
from echo.model.networks import ASClassifier
from echo.model.scoring import clip_logits, video_clips, video_probabilities
from echo.serve.bundle import BundleMeta, load_bundle
from echo.serve.registry import REGISTRY_INFO_FILE, pull

__all__ = ["SEVERE", "NOT_SEVERE", "EchoModel", "load_model", "study_table"]

log = logging.getLogger(__name__)

SEVERE = "severe"
NOT_SEVERE = "not severe"
_READ_AHEAD = 4  # videos fetched from storage ahead of the one being scored


def _call(prediction: int) -> str:
    return SEVERE if prediction else NOT_SEVERE


class EchoModel:
    """A classifier with the preprocessing and threshold of its bundle.

    Args:
        model: the :class:`~echo.model.networks.ASClassifier` (weights loaded).
        meta: the bundle's metadata (``meta.registry`` set when pulled from a registry).
        source: where it came from (a URI or folder), for messages.
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available, else CPU.
    """

    def __init__(self, model: ASClassifier, meta: BundleMeta, source: str, device: str | None = None) -> None:
        self.meta = meta
        self.source = source
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.threshold = meta.threshold
        self.preprocessing = meta.preprocessing

    def info(self) -> dict[str, Any]:
        """A JSON-ready description: source, registry version, threshold, AUROC, digests."""
        return {"source": self.source, **self.meta.describe()}

    def clips(self, data: bytes, uri: str) -> torch.Tensor:
        """MP4 bytes of one video -> its clips ``(K, 1, T, H, W)`` float32 in [0, 1]
        (``echo.model.scoring.video_clips``)."""
        return video_clips(self.preprocessing, data, uri)

    def clips_probability(self, clips: torch.Tensor) -> float:
        """Probability of severe aortic stenosis of one video from its clips ``(K, 1, T, H, W)``:
        the mean over clips of the sigmoid of the logit, in float64 (``echo.model.scoring``)."""
        return float(video_probabilities(clip_logits(self.model, clips, self.device)))

    def probability(self, data: bytes, uri: str) -> float:
        """Probability of severe aortic stenosis for one video's MP4 bytes."""
        return self.clips_probability(self.clips(data, uri))

    def _videos(self, uris: Sequence[str]) -> Iterator[tuple[str, bytes]]:
        """``(uri, bytes)`` in order, fetched a few ahead in threads; decoding stays in this thread."""
        with ThreadPoolExecutor(max_workers=_READ_AHEAD) as pool:
            pending: deque = deque()
            todo = iter(uris)
            for uri in todo:
                pending.append((uri, pool.submit(storage.read_bytes, uri)))
                if len(pending) >= _READ_AHEAD:
                    break
            while pending:
                uri, future = pending.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(storage.read_bytes, nxt)))
                yield uri, future.result()

    def predict_videos(self, uris: Sequence[str]) -> pd.DataFrame:
        """One row per URI (local path or ``s3://``), in order: ``video_uri``, ``probability``,
        ``prediction`` (1 = severe at the stored threshold) and ``call``.

        Raises ``FileNotFoundError`` or ``echo.data.video.VideoDecodeError`` naming the video.
        """
        uris = [str(u) for u in uris]
        return self.table(uris, [self.probability(data, uri) for uri, data in self._videos(uris)])

    def table(self, uris: Sequence[str], probs: Sequence[float]) -> pd.DataFrame:
        """The :meth:`predict_videos` table of already scored videos: calls at the stored threshold."""
        preds = [int(p >= self.threshold) for p in probs]
        return pd.DataFrame(
            {
                "video_uri": pd.Series(uris, dtype=object),
                "probability": pd.Series(probs, dtype="float64"),
                "prediction": pd.Series(preds, dtype="int64"),
                "call": pd.Series([_call(p) for p in preds], dtype=object),
            }
        )

    def predict_manifest(self, manifest_uri: str, split: str | None = None,
                         data_roots: Sequence[str] = ()) -> pd.DataFrame:
        """Predictions for the videos of a manifest (one split, or all rows), whose videos must lie
        in ``data_roots`` (default: the manifest's folder or bucket; ``echo.data.roots``).

        Columns: ``video_uri``, ``split``, ``label``, ``study`` (``echo.data.ids.pseudonyms`` of
        the study ID: keyed by ``$ECHO_SSL_ID_KEY`` when set, else fresh per call), ``probability``, ``prediction``, ``call``, and the study's
        ``study_probability`` (mean over its videos), ``study_prediction`` and ``study_call``.
        """
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        manifest = load_manifest(manifest_uri, data_roots=data_roots)
        rows = manifest.table if split is None else manifest.split(split)
        if rows.empty:
            raise ValueError(f"manifest {manifest_uri} has no rows in split {split!r}")
        out = self.predict_videos(rows["video_uri"].tolist())
        out.insert(1, "split", rows["split"].to_numpy())
        out.insert(2, "label", rows["label"].to_numpy(dtype="float64"))
        out.insert(3, "study", pseudonyms(rows["study_id"], "study"))
        study_prob = out.groupby("study", sort=False)["probability"].transform("mean")
        out["study_probability"] = study_prob
        out["study_prediction"] = (study_prob >= self.threshold).astype("int64")
        out["study_call"] = [_call(p) for p in out["study_prediction"]]
        return out


def study_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """Per-study rows from :meth:`EchoModel.predict_manifest`'s output: ``study``, ``split``,
    ``label`` (max over videos), ``n_videos``, ``probability``, ``prediction``, ``call``."""
    grouped = predictions.groupby("study", sort=False)
    return pd.DataFrame(
        {
            "study": list(grouped.groups),
            "split": grouped["split"].first().to_numpy(),
            "label": grouped["label"].max().to_numpy(),
            "n_videos": grouped.size().to_numpy(),
            "probability": grouped["study_probability"].first().to_numpy(),
            "prediction": grouped["study_prediction"].first().to_numpy(),
            "call": grouped["study_call"].first().to_numpy(),
        }
    )


def load_model(uri: str, tracking_uri: str | None = None, device: str | None = None,
               allow_unverified: bool = False) -> EchoModel:
    """Load a model without running registry code.

    ``uri``: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/<model id>``,
    ``runs:/RUN_ID[/model]`` (downloaded from the tracking server or store, default
    ``$MLFLOW_TRACKING_URI`` else ``sqlite:///mlflow.db`` in the working folder), or a local
    bundle folder (e.g. from ``echo-ssl models pull``). Only the bundle files are read and
    verified (the registry's bundle digest for URIs, ``digests.json`` for folders; see
    :func:`echo.serve.registry.pull`); a model without digests is refused unless
    ``allow_unverified``. The weights are loaded with ``torch.load(weights_only=True)`` into
    :class:`~echo.model.networks.ASClassifier`.
    """
    if os.path.isdir(uri):
        model, meta = load_bundle(uri, allow_unverified=allow_unverified)
        info = Path(uri) / REGISTRY_INFO_FILE
        if info.is_file():
            meta = dataclasses.replace(meta, registry=json.loads(info.read_text()))
        return EchoModel(model, meta, source=uri, device=device)
    if "://" not in uri and ":/" not in uri:
        raise FileNotFoundError(f"no bundle folder at {uri} (expected a folder holding model.json and weights.pt, or a models:/ or runs:/ URI)")
    with tempfile.TemporaryDirectory(prefix="echo-model-") as tmp:
        _, pulled = pull(uri, tmp, tracking_uri, allow_unverified=allow_unverified)
        model, meta = load_bundle(tmp, allow_unverified=allow_unverified)
    return EchoModel(model, dataclasses.replace(meta, registry=pulled.registry), source=uri, device=device)
