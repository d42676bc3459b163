"""Evaluation: clip -> video -> study probabilities, metrics with 95% CIs, plots, MLflow.

Each video contributes K evenly spaced clips (default 4 x 16 frames); a video's probability is
the mean of its clips' probabilities (:mod:`echo.model.scoring`, the same code as
``echo-ssl predict`` and the REST server, with a model's own preprocessing) and a study's the
mean of its videos'. Metrics are at the
study level (video level too, prefixed ``video_``). Thresholds are chosen on the validation
split (Youden's J, and the one giving 90% sensitivity) and applied to the test split.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from echo import tracking
from echo.data.dataset import EvalClipDataset
from echo.data.ids import pseudonyms
from echo.data.loader import VideoLoader
from echo.data.manifest import load_manifest
from echo.data.roots import DEFAULT_MAX_OBJECT_MB
from echo.evaluation import metrics as M
from echo.evaluation import plots
from echo.explain.attribution import explain_videos, region_boxes, sample_studies
from echo.model.preprocessing import Preprocessing
from echo.model.scoring import clip_logits, video_probabilities
from echo.serve.predict import load_model

__all__ = [
    "Thresholds",
    "embed_videos",
    "predict_videos",
    "study_predictions",
    "choose_thresholds",
    "split_report",
    "summary_line",
    "write_evaluation",
    "log_evaluation",
    "evaluate_model",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Thresholds:
    """Operating points chosen on validation: Youden's J and 90% sensitivity (probabilities)."""

    youden: float
    sens90: float


def _eval_batches(rows: pd.DataFrame, pre: Preprocessing, batch_size: int, workers: int, rank: int, world_size: int):
    dataset = EvalClipDataset(rows, clip_len=pre.clip_len, num_clips=pre.num_clips, stride=pre.stride,
                              frame_size=pre.frame_size)
    # Evaluation must see every video: no skip budget beyond the whole split, no drop_last.
    loader = VideoLoader(dataset, batch_size=batch_size, num_workers=workers, rank=rank, world_size=world_size,
                         seed=0, drop_last=False, max_skipped_fraction=1.0)
    loader.set_epoch(0)
    return loader


def _gather(frames: list[pd.DataFrame], world_size: int) -> pd.DataFrame:
    """This rank's predictions, or every rank's when the split is sharded over ``world_size`` ranks."""
    local = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if world_size > 1:
        parts: list[Any] = [None] * world_size
        dist.all_gather_object(parts, local)
        local = pd.concat([p for p in parts if p is not None and len(p)], ignore_index=True)
    return local


def predict_videos(
    model: torch.nn.Module,
    rows: pd.DataFrame,
    pre: Preprocessing,
    device: torch.device | None = None,
    batch_size: int = 8,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> pd.DataFrame:
    """Video-level probabilities for ``rows`` (manifest rows), gathered from all ranks.

    ``model`` maps clips ``(N, 1, T, H, W)`` in [0, 1] to logits ``(N,)``; ``pre`` says how videos
    become clips (a model's own preprocessing, e.g. ``EchoModel.preprocessing``). Returns one row
    per decoded video with the manifest columns ``video_uri, study_id, label`` and ``logit``
    (mean clip logit) and ``probability`` (``echo.model.scoring.video_probabilities``), in
    manifest order. Videos that cannot be decoded are logged and left out.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    frames = []
    skipped: list[tuple[str, str]] = []
    for batch in _eval_batches(rows, pre, batch_size, workers, rank, world_size):
        skipped.extend(batch.get("skipped", []))
        logits = clip_logits(model, batch["clips"], device)  # (B, K)
        frames.append(
            pd.DataFrame(
                {
                    "position": batch["index"].numpy(),
                    "logit": logits.double().mean(1).numpy(),
                    "probability": video_probabilities(logits).numpy(),
                }
            )
        )
    model.train(was_training)
    for uri, reason in skipped:
        log.warning("evaluation skipped %s: %s", uri, reason)
    out = _gather(frames, world_size)
    if len(out) == 0:
        return pd.DataFrame(columns=["video_uri", "study_id", "label", "logit", "probability"])
    out = out.sort_values("position").drop_duplicates("position")
    base = rows.reset_index(drop=True).iloc[out["position"].to_numpy()]
    return pd.DataFrame(
        {
            "video_uri": base["video_uri"].to_numpy(),
            "study_id": base["study_id"].to_numpy(),
            "label": base["label"].to_numpy(dtype=float),
            "logit": out["logit"].to_numpy(),
            "probability": out["probability"].to_numpy(),
        }
    )


@torch.no_grad()
def embed_videos(model: torch.nn.Module, rows: pd.DataFrame, clip_len: int, device: torch.device,
                 batch_size: int = 16) -> np.ndarray:
    """Frozen features ``(N, D)`` of one centred clip per video; ``model(x)["features"]``.

    Videos that cannot be decoded get a row of zeros (and are logged), so rows stay aligned.
    """
    was_training = model.training
    model.eval()
    feats: dict[int, np.ndarray] = {}
    for batch in _eval_batches(rows, Preprocessing(clip_len, 1, 1), batch_size, 0, 0, 1):
        for uri, reason in batch.get("skipped", []):
            log.warning("embedding skipped %s: %s", uri, reason)
        out = model(batch["clips"][:, 0].to(device))["features"].float().cpu().numpy()
        for pos, f in zip(batch["index"].tolist(), out):
            feats[pos] = f
    model.train(was_training)
    dim = next(iter(feats.values())).shape[0] if feats else 1
    return np.stack([feats.get(i, np.zeros(dim, np.float32)) for i in range(len(rows))])


def study_predictions(videos: pd.DataFrame) -> pd.DataFrame:
    """Study-level rows ``study_id, label, probability, n_videos`` from video predictions."""
    ids = videos["study_id"].to_numpy()
    studies, prob = M.aggregate_by_group(ids, videos["probability"].to_numpy())
    _, labels = M.group_labels(ids, videos["label"].to_numpy())
    _, counts = np.unique(ids, return_counts=True)
    return pd.DataFrame({"study_id": studies, "label": labels, "probability": prob, "n_videos": counts})


def choose_thresholds(val_studies: pd.DataFrame) -> Thresholds:
    y, p = val_studies["label"].to_numpy(), val_studies["probability"].to_numpy()
    return Thresholds(youden=M.youden_threshold(y, p), sens90=M.threshold_for_sensitivity(y, p, 0.9))


def split_report(videos: pd.DataFrame, thresholds: Thresholds, seed: int = 0, n_resamples: int = 2000,
                 prefix: str = "test") -> dict[str, float]:
    """Study-level metrics (``<prefix>_auroc``, ``<prefix>_auroc_ci_low``, ...) and video-level
    ones (``<prefix>_video_auroc``, ...)."""
    studies = study_predictions(videos)
    out: dict[str, float] = {}
    for level, table in (("", studies), ("video_", videos)):
        rep = M.binary_report(table["label"].to_numpy(), table["probability"].to_numpy(), thresholds.youden,
                              thresholds.sens90, seed=seed, n_resamples=n_resamples)
        out.update({f"{prefix}_{level}{k}": v for k, v in rep.items()})
    return out


def summary_line(report: dict[str, float], prefix: str = "test") -> str:
    """``AUROC 0.812 (95% CI 0.790-0.835), n=412 studies, 61 positive``."""
    r = {k[len(prefix) + 1:]: v for k, v in report.items() if k.startswith(prefix + "_")}
    return (
        f"AUROC {r['auroc']:.3f} (95% CI {r['auroc_ci_low']:.3f}-{r['auroc_ci_high']:.3f}), "
        f"n={int(r['n'])} studies, {int(r['n_positive'])} positive"
    )


def write_evaluation(videos: pd.DataFrame, val_videos: pd.DataFrame | None, thresholds: Thresholds,
                     report: dict[str, float], out_dir: str | os.PathLike, prefix: str = "test",
                     seed: int = 0, n_resamples: int = 2000) -> list[Path]:
    """Write the predictions CSVs (study IDs as ``echo.data.ids.pseudonyms``: keyed by
    ``$ECHO_SSL_ID_KEY`` when set, else by a key that is never stored) and the ROC, PR and
    calibration plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    studies = study_predictions(videos)
    names = dict(zip(studies["study_id"], pseudonyms(studies["study_id"], "study")))  # one key for both files
    study_csv = studies.assign(study_id=studies["study_id"].map(names))
    video_csv = videos.drop(columns=["study_id"]).assign(study=videos["study_id"].map(names))
    paths = [out / f"{prefix}_study_predictions.csv", out / f"{prefix}_video_predictions.csv"]
    study_csv.to_csv(paths[0], index=False)
    video_csv.to_csv(paths[1], index=False)
    y, p = studies["label"].to_numpy(), studies["probability"].to_numpy()
    ci = (report[f"{prefix}_auroc_ci_low"], report[f"{prefix}_auroc_ci_high"])
    points = {"Youden (val)": thresholds.youden, "90% sensitivity (val)": thresholds.sens90}
    roc, pr, cal = (out / f"{prefix}_{kind}.png" for kind in ("roc", "pr", "calibration"))
    plots.plot_roc(y, p, ci, points, str(roc), n_resamples=n_resamples, seed=seed)
    plots.plot_pr(y, p, str(pr))
    plots.plot_calibration(y, p, str(cal))
    paths += [roc, pr, cal]
    return paths


def log_evaluation(tracking_uri: str, run_id: str, report: dict[str, float], files: list[Path],
                   artifact_path: str = "evaluation") -> None:
    """Metrics (one batch) and files (plots, predictions) into an MLflow run."""
    tracking.log_metrics(tracking_uri, run_id, report, step=0)
    c = tracking.client(tracking_uri)
    with tempfile.TemporaryDirectory() as folder:
        for f in files:
            (Path(folder) / f.name).write_bytes(f.read_bytes())
        c.log_artifacts(run_id, folder, artifact_path)


def evaluate_model(
    model_uri: str,
    manifest_uri: str,
    split: str = "test",
    out_dir: str = "./eval-out",
    tracking_uri: str | None = None,
    experiment: str = "echo-ssl-evaluate",
    seed: int = 0,
    n_resamples: int = 2000,
    workers: int = 1,
    saliency: int = 0,
    saliency_method: str = "gradcam",
    allow_unverified: bool = False,
    data_roots: Sequence[str] = (),
    max_object_mb: int = DEFAULT_MAX_OBJECT_MB,
) -> dict[str, float]:
    """Evaluate a registered, logged or pulled model on one split of a manifest.

    The model is loaded and verified as by ``echo.load_model`` (``allow_unverified`` accepts a
    model without recorded digests, logged and recorded in the run's params) and scores
    videos exactly as ``echo-ssl predict`` does (its own preprocessing, frame size included).

    Thresholds are chosen on the manifest's validation split when it has both classes, else
    the model's stored ones are used. Writes predictions and plots under ``out_dir``, logs
    everything to a new MLflow run, and with ``saliency`` > 0 adds GIFs and PNG strips for
    that many studies (seeded sample) and, where the manifest has ``valve_*`` boxes, the
    valve-energy share against the area baseline.
    """
    manifest = load_manifest(manifest_uri, data_roots=data_roots, max_object_mb=max_object_mb)
    model = load_model(model_uri, tracking_uri=tracking_uri, allow_unverified=allow_unverified)
    meta = model.meta

    def videos_of(name: str) -> pd.DataFrame:
        return predict_videos(model.model, manifest.split(name), model.preprocessing, model.device, batch_size=8,
                              workers=workers)

    val = manifest.split("val")
    if split != "val" and len(val) and val["label"].nunique() == 2:
        thresholds = choose_thresholds(study_predictions(videos_of("val")))
        source = "val split of this manifest"
    else:
        thresholds = Thresholds(meta.threshold, meta.threshold_sens90 if meta.threshold_sens90 is not None else meta.threshold)
        source = "stored with the model"
    videos = videos_of(split)
    report = split_report(videos, thresholds, seed, n_resamples, prefix=split)
    files = write_evaluation(videos, None, thresholds, report, out_dir, split, seed, n_resamples)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    run_id = tracking.create_run(uri, experiment, f"evaluate-{split}",
                                 tags={"echo.job": "evaluate", "echo.manifest_sha256": manifest.sha256})
    tracking.log_params(uri, run_id, {"model": model_uri, "manifest": manifest_uri, "split": split, "seed": seed,
                                      "n_resamples": n_resamples, "threshold_source": source,
                                      "model_weights_sha256": meta.weights_sha256,
                                      "model_bundle_digest": (meta.registry or {}).get("bundle_digest") or "unverified",
                                      "allow_unverified": allow_unverified})
    if saliency > 0:
        picked = sample_studies(manifest.split(split), saliency, seed)
        has_boxes = "valve_x0" in picked.columns
        table = explain_videos(model, picked["video_uri"].tolist(), str(Path(out_dir) / "saliency"), saliency_method,
                               region_boxes(picked, "valve") if has_boxes else None)
        if has_boxes:
            report["saliency_valve_share"] = float(table["region_share"].mean())
            report["saliency_area_share"] = float(table["area_share"].mean())
        saliency_files = [Path(p) for p in (*table["gif"], *table["strip"])]
        log_evaluation(uri, run_id, {}, saliency_files, "saliency")
    log_evaluation(uri, run_id, report, files)
    tracking.set_terminated(uri, run_id)
    print(f"{split} {summary_line(report, split)}  [thresholds: {source}; MLflow run {run_id}]", flush=True)
    return report
