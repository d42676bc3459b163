"""Was a self-supervised objective learned? Gates measured on frozen features of held-out patients.

- same-patient retrieval: each video whose patient has another video queries all the other
  videos by cosine similarity of standardised features; top-1 is right when the nearest one
  is the same patient's. Chance: the mean over queries of (the patient's other videos) /
  (all other videos). What MI-SimCLR and EchoCLR are trained for.
- frame order: every permutation of one centred clip per video through the frame-order
  head; top-1 against ``1 / clip_len!``. EchoCLR only.
- valve probe: ridge regression of the generator's latent valve severity (manifest column
  ``valve_severity``) from standardised features, alpha by generalised cross-validation
  inside each fold, R^2 of the out-of-fold predictions over patient-grouped folds.

Thresholds (issue 16): retrieval top-1 >= 5 x chance, frame order >= 2 x chance (EchoCLR);
the benchmark also asks retrieval to beat a random-init encoder's (``gate_passed``).
Used by ``echo-ssl pretrain`` at each probe epoch (validation patients) and by the
label-efficiency benchmark (patients never seen in pretraining).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pandas as pd
import torch

from echo.data.dataset import EvalClipDataset, SampleSkipped
from echo.data.order import permutations

__all__ = [
    "RETRIEVAL_FACTOR",
    "ORDER_FACTOR",
    "retrieval_top1",
    "order_top1",
    "valve_probe_r2",
    "held_out_outputs",
    "gate_metrics",
    "gate_passed",
    "gate_summary",
]

log = logging.getLogger(__name__)

RETRIEVAL_FACTOR = 5.0
ORDER_FACTOR = 2.0


def _standardise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(0)
    return (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)


def retrieval_top1(features: np.ndarray, patients: np.ndarray) -> tuple[float, float]:
    """Same-patient retrieval top-1 and its chance level.

    ``features`` ``(N, D)``, ``patients`` ``(N,)`` (any hashable IDs). Queries are the videos
    whose patient has at least one other video; the gallery is every other video. Returns
    ``(nan, nan)`` when no patient has two videos.
    """
    patients = np.asarray(patients)
    n = len(patients)
    if n < 2:
        return math.nan, math.nan
    z = _standardise(features)
    z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    _, codes = np.unique(patients, return_inverse=True)
    same_count = np.bincount(codes)[codes] - 1  # the patient's other videos
    queries = np.flatnonzero(same_count > 0)
    if len(queries) == 0:
        return math.nan, math.nan
    sim = z[queries] @ z.T
    sim[np.arange(len(queries)), queries] = -np.inf
    nearest = sim.argmax(1)
    top1 = float(np.mean(codes[nearest] == codes[queries]))
    chance = float(np.mean(same_count[queries] / (n - 1)))
    return top1, chance


@torch.no_grad()
def order_top1(model: torch.nn.Module, clips: torch.Tensor) -> float:
    """Frame-order top-1 of ``model``'s order head over every permutation of each clip.

    ``clips`` ``(N, 1, T, H, W)`` in ``[0, 1]``, in true frame order; ``model(x)["order_logits"]``
    scores the ``T!`` permutations of ``echo.data.order.permutations`` (row k = class k).
    """
    perms = permutations(clips.shape[2])
    right = 0
    for clip in clips:
        shuffled = clip[:, perms].transpose(0, 1)  # (K, 1, T, H, W): permutation k in row k
        pred = model(shuffled)["order_logits"].float().argmax(1).cpu()
        right += int((pred == torch.arange(len(perms))).sum())
    return right / (len(clips) * len(perms))


def valve_probe_r2(features: np.ndarray, severity: np.ndarray, groups: np.ndarray, folds: int = 5) -> float:
    """Out-of-fold R^2 of ridge regression of ``severity`` ``(N,)`` from ``features`` ``(N, D)``.

    Folds group rows by ``groups`` (patients: no patient in both sides); features are
    standardised on each training fold; alpha from ``RidgeCV``'s efficient leave-one-out over
    1e-2..1e4. ``nan`` with fewer than 2 groups or constant severity.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(severity, dtype=np.float64)
    groups = np.asarray(groups)
    k = min(folds, len(np.unique(groups)))
    if k < 2 or np.ptp(y) == 0:
        return math.nan
    pred = np.empty_like(y)
    for train, test in GroupKFold(n_splits=k).split(features, y, groups):
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
        pred[test] = model.fit(features[train], y[train]).predict(features[test])
    return float(r2_score(y, pred))


@torch.no_grad()
def held_out_outputs(model: torch.nn.Module, rows: pd.DataFrame, clip_len: int, device: torch.device,
                     num_clips: int = 1, order_videos: int = 128, batch_size: int = 32,
                     stride: int = 1) -> dict[str, Any]:
    """Frozen features of ``rows`` (manifest rows) and, with an order head, frame-order top-1.

    Features ``(N, D)``: the mean over ``num_clips`` evenly spaced clips of ``clip_len``
    frames ``stride`` frames apart (one centred clip for 1); a video that cannot be decoded gets zeros (logged).
    Frame order is measured on the first clip of the first ``order_videos`` videos.
    Returns ``{"features", "order_top1" (None without an order head)}``.
    """
    was_training = model.training
    model.eval()
    dataset = EvalClipDataset(rows, clip_len=clip_len, num_clips=num_clips, stride=stride)
    has_order = getattr(model, "order_head", None) is not None
    feats: list[np.ndarray | None] = []
    order_clips: list[torch.Tensor] = []
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        x = torch.cat([c for _, c in pending]).to(device)  # (B * K, 1, T, H, W)
        out = model(x)["features"].float().view(len(pending), num_clips, -1).mean(1).cpu().numpy()
        for (i, _), f in zip(pending, out):
            feats[i] = f
        pending.clear()

    for i in range(len(dataset)):
        feats.append(None)
        try:
            clips = dataset.sample(i, 0)["clips"]  # (K, 1, T, H, W)
        except SampleSkipped as e:
            log.warning("gates skipped %s: %s", e.uri, e.reason)
            continue
        pending.append((i, clips))
        if has_order and len(order_clips) < order_videos:
            order_clips.append(clips[0])
        if len(pending) * num_clips >= batch_size:
            flush()
    flush()
    dim = next((f.shape[0] for f in feats if f is not None), 1)
    features = np.stack([f if f is not None else np.zeros(dim, np.float32) for f in feats])
    order = order_top1(model, torch.stack(order_clips).to(device)) if has_order and order_clips else None
    model.train(was_training)
    return {"features": features, "order_top1": order}


def gate_metrics(model: torch.nn.Module, rows: pd.DataFrame, clip_len: int, device: torch.device,
                 num_clips: int = 1, order_videos: int = 128, stride: int = 1) -> dict[str, float]:
    """The gates on ``rows`` (held-out patients): ``retrieval_top1``, ``retrieval_chance``,
    ``order_top1`` and ``order_chance`` (with an order head), ``valve_probe_r2`` (when the rows
    carry ``valve_severity``). Clips are taken as in pretraining: ``clip_len`` frames
    ``stride`` apart. No patient identifier leaves this function."""
    out = held_out_outputs(model, rows, clip_len, device, num_clips, order_videos, stride=stride)
    top1, chance = retrieval_top1(out["features"], rows["patient_id"].to_numpy())
    metrics = {"retrieval_top1": top1, "retrieval_chance": chance}
    if out["order_top1"] is not None:
        metrics.update(order_top1=out["order_top1"], order_chance=1.0 / math.factorial(clip_len))
    if "valve_severity" in rows.columns:
        severity = pd.to_numeric(rows["valve_severity"], errors="coerce").to_numpy(dtype=np.float64)
        known = np.isfinite(severity)
        if known.sum() >= 4:
            metrics["valve_probe_r2"] = valve_probe_r2(out["features"][known], severity[known],
                                                       rows["patient_id"].to_numpy()[known])
    return metrics


def gate_passed(method: str, metrics: dict[str, float], baseline: dict[str, float] | None = None) -> bool:
    """Retrieval top-1 >= 5 x chance for every method (the objective of MI-SimCLR and
    EchoCLR; for SimCLR, evidence that its features carry across a patient's videos), and
    for EchoCLR frame-order top-1 >= 2 x chance as well. With ``baseline`` (the gates of a
    random-init encoder on the same patients) retrieval must also beat the baseline's: when a
    study's videos share acquisition settings, random features already retrieve the patient
    well above 5 x chance."""
    top1 = metrics.get("retrieval_top1", math.nan)
    ok = bool(top1 >= RETRIEVAL_FACTOR * metrics.get("retrieval_chance", math.nan))
    if baseline is not None:
        ok = ok and bool(top1 > baseline.get("retrieval_top1", math.nan))
    if method == "echoclr":
        ok = ok and bool(metrics.get("order_top1", math.nan) >= ORDER_FACTOR * metrics.get("order_chance", math.nan))
    return ok


def gate_summary(metrics: dict[str, float]) -> str:
    """One line for an epoch's progress output, e.g.
    ``retrieval 0.412 (chance 0.009)  order 0.210 (chance 0.042)  valve R2 0.31``."""
    parts = []
    if "retrieval_top1" in metrics:
        parts.append(f"retrieval {metrics['retrieval_top1']:.3f} (chance {metrics['retrieval_chance']:.3f})")
    if "order_top1" in metrics:
        parts.append(f"order {metrics['order_top1']:.3f} (chance {metrics['order_chance']:.3f})")
    if "valve_probe_r2" in metrics:
        parts.append(f"valve R2 {metrics['valve_probe_r2']:.2f}")
    return "  ".join(parts)
