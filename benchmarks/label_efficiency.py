"""Label-efficiency benchmark (issue 16): does self-supervised pretraining pay with few labelled studies?

One command synthesizes a PLAX data set (``echo.ingest.synth``, ``--view-jitter``: how alike a
study's videos are), pretrains SimCLR, MI-SimCLR and EchoCLR for the same number of optimiser
steps from the decoded-frame cache, checks on patients never seen in pretraining whether each
objective was learned (``echo.evaluation.gates``), and measures test AUROC against the number
of labelled training studies for each pretrained encoder and a random initialisation:

- x-axis: labelled training studies (``Profile.counts``; the last is all of them), drawn as
  nested, label-stratified, patient-level subsets; ``Profile.draws`` draws per count, the same
  draws for every initialisation;
- primary readout ``probe``: logistic regression on frozen, standardised features (mean over
  ``probe_clips`` clips per video), regularisation chosen on validation (study-level AUROC);
- secondary readout ``finetune``: full fine-tuning with a fixed number of optimiser steps at
  every count (batches drawn with replacement), the learning rate chosen on validation from
  the paper's grid; fewer counts and draws than the probe (``ft_counts``, ``ft_draws``);
- statistics: per draw the paired difference in test AUROC against random init; 95% intervals
  from one bootstrap over draws and test patients together (``echo.evaluation.metrics.draw_bootstrap``).

The decision rules are written into the report (``.md``) before anything is trained, and the
report is completed at the end. Outputs under ``--out`` (default ``./label-efficiency-out``):
``data/``, ``logs/<stage>.log``, and ``label_efficiency_<name>.csv`` (one row per init, readout,
count and draw), ``_summary.csv``, ``_gates.csv``, ``.md``, ``.png``, where ``<name>`` is the
profile's name, plus ``-<jitter>`` unless the jitter is ``moderate``. All under one MLflow parent
run (experiment ``echo-ssl-benchmark``) with a child run per pretraining.

    python benchmarks/label_efficiency.py --profile cpu [--view-jitter moderate] [--out DIR]
        [--tracking-uri URI] [--draw-scale F] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data_throughput import cpu_model  # noqa: E402
from echo import tracking  # noqa: E402
from echo.data.dataset import SSL_METHODS  # noqa: E402
from echo.data.manifest import Manifest, load_manifest  # noqa: E402
from echo.evaluation.evaluate import predict_videos, study_predictions  # noqa: E402
from echo.evaluation.gates import gate_metrics, gate_passed, held_out_outputs  # noqa: E402
from echo.evaluation.metrics import aggregate_by_group, auroc, draw_bootstrap  # noqa: E402
from echo.evaluation.plots import plot_label_curves  # noqa: E402
from echo.ingest.synth import MANIFEST_COLUMNS, VIEW_JITTER, leaflet_px_by_label, synthesize  # noqa: E402
from echo.model.networks import ASClassifier, SSLModel  # noqa: E402
from echo.model.preprocessing import Preprocessing  # noqa: E402
from echo.train import checkpoint as ckpt  # noqa: E402
from echo.train.finetune import FinetuneConfig, finetune_loop  # noqa: E402
from echo.train.pretrain import PretrainConfig, pretrain_loop  # noqa: E402
from echo.train.session import LocalSession  # noqa: E402
from echo.train.settings import RunState, loop_config  # noqa: E402

__all__ = [
    "Profile",
    "PROFILES",
    "METHODS",
    "INITS",
    "EXPERIMENT",
    "ROW_COLUMNS",
    "SUMMARY_COLUMNS",
    "GATE_COLUMNS",
    "quick_profile",
    "subset_draws",
    "probe_scores",
    "summarise",
    "decide",
    "decision_rules",
    "run_benchmark",
    "main",
]

METHODS = SSL_METHODS
INITS = ("random", *METHODS)
EXPERIMENT = "echo-ssl-benchmark"
ROW_COLUMNS = ("init", "readout", "n_labelled_studies", "n_positive", "subset_seed", "test_auroc")
SUMMARY_COLUMNS = ("init", "readout", "n_labelled_studies", "draws", "auroc_mean", "auroc_ci_low", "auroc_ci_high",
                   "delta_vs_random", "delta_ci_low", "delta_ci_high")
GATE_COLUMNS = ("method", "pretrain_steps", "retrieval_top1", "retrieval_chance", "order_top1", "order_chance",
                "valve_probe_r2", "passed")
PROBE_C = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


@dataclass(frozen=True)
class Profile:
    """Data, pretraining and readout settings of one profile. Sizes in pixels, clip lengths in
    frames, learning rates per Adam step, counts in labelled training studies (0 = all)."""

    name: str
    # data (echo.ingest.synth)
    patients: int
    unlabeled_patients: int
    prevalence: float
    splits: tuple[float, float, float]
    size: int
    min_frames: int
    max_frames: int
    difficulty: float
    synth_workers: int
    # pretraining, identical for the three methods
    backbone: str
    pretrain_steps: int  # at least; rounded up to whole epochs, the same for every method
    pretrain_batch: int
    pretrain_clip_len: int
    pretrain_lr: float
    temperature: float
    cache_decoded_mb: int
    # protocol
    counts: tuple[int, ...]
    draws: tuple[int, ...]  # per count
    probe_clips: int
    order_videos: int
    # fine-tuning readout (fixed steps at every count, lr chosen on validation)
    ft_counts: tuple[int, ...]
    ft_draws: tuple[int, ...]
    ft_epochs: int
    ft_steps_per_epoch: int
    ft_lrs: tuple[float, ...]
    ft_batch: int
    ft_clip_len: int
    ft_stride: int
    dropout: float
    label_smoothing: float
    eval_clips: int
    n_resamples: int
    seed: int = 0


PROFILES: dict[str, Profile] = {
    # 2 CPU cores: tiny3d at 96 px (the leaflets of the two classes differ by 2.0 px there).
    "cpu": Profile(
        name="cpu", patients=1000, unlabeled_patients=600, prevalence=0.25, splits=(0.5, 0.12, 0.38), size=96,
        min_frames=16, max_frames=32, difficulty=1.25, synth_workers=2, backbone="tiny3d", pretrain_steps=800,
        pretrain_batch=32, pretrain_clip_len=4, pretrain_lr=1e-3, temperature=0.1, cache_decoded_mb=4096,
        counts=(6, 12, 26, 51, 126, 0), draws=(20, 20, 10, 10, 10, 1), probe_clips=4, order_videos=256,
        ft_counts=(6, 12, 0), ft_draws=(4, 2, 1), ft_epochs=3, ft_steps_per_epoch=200, ft_lrs=(1e-4, 5e-5, 1e-5),
        ft_batch=16, ft_clip_len=8, ft_stride=2, dropout=0.25, label_smoothing=0.1, eval_clips=1, n_resamples=1000,
    ),
    # One H200-class GPU, about 10 minutes: r3d_18 at 112 px, bf16 (PretrainConfig.amp), data
    # synthesised on the machine (16 cores) and decoded once into memory.
    "gpu": Profile(
        name="gpu", patients=2000, unlabeled_patients=2000, prevalence=0.25, splits=(0.5, 0.12, 0.38), size=112,
        min_frames=24, max_frames=48, difficulty=1.25, synth_workers=16, backbone="r3d_18", pretrain_steps=800,
        pretrain_batch=128, pretrain_clip_len=4, pretrain_lr=1e-3, temperature=0.1, cache_decoded_mb=24000,
        counts=(6, 12, 26, 51, 126, 0), draws=(20, 20, 10, 10, 10, 1), probe_clips=4, order_videos=512,
        ft_counts=(6, 12, 26, 126, 0), ft_draws=(5, 5, 3, 3, 1), ft_epochs=3, ft_steps_per_epoch=50,
        ft_lrs=(1e-4, 5e-5, 1e-5), ft_batch=32, ft_clip_len=16, ft_stride=1, dropout=0.25, label_smoothing=0.1,
        eval_clips=4, n_resamples=1000,
    ),
}


def quick_profile(profile: Profile, patients: int = 60) -> Profile:
    """A minutes-long smoke version of ``profile``: few patients, steps, counts and draws; the
    ``gpu`` profile keeps its backbone (r3d_18) at 32 px so that it runs on a CPU too."""
    return dataclasses.replace(
        profile, name=f"{profile.name}-quick", patients=patients, unlabeled_patients=patients // 3,
        splits=(0.5, 0.2, 0.3), size=64 if profile.backbone == "tiny3d" else 32, min_frames=12, max_frames=16,
        synth_workers=min(profile.synth_workers, 2), pretrain_steps=6, pretrain_batch=8,
        cache_decoded_mb=256, counts=(6, 12, 0), draws=(3, 2, 1), probe_clips=1, order_videos=8, ft_counts=(6,),
        ft_draws=(1,), ft_epochs=1, ft_steps_per_epoch=2, ft_batch=4, ft_clip_len=4, ft_stride=1, eval_clips=1,
        n_resamples=100,
    )


class _DeviceSession(LocalSession):
    """``LocalSession`` on a chosen device (CUDA for the ``gpu`` profile)."""

    def __init__(self, folder: Path, device: torch.device) -> None:
        super().__init__(folder)
        self._device = device

    @property
    def device(self) -> torch.device:
        return self._device


class _Clock:
    """Prints one progress line per stage: elapsed minutes, the 1-minute load average, the message."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.loads: list[float] = []

    def minutes(self) -> float:
        return (time.monotonic() - self.start) / 60

    def say(self, message: str) -> None:
        elapsed = time.monotonic() - self.start
        load = os.getloadavg()[0]
        self.loads.append(load)
        print(f"[{int(elapsed // 60):3d}:{int(elapsed % 60):02d} load {load:4.1f}] {message}", flush=True)


@contextlib.contextmanager
def _stage_log(path: Path) -> Iterator[None]:
    """Send the stage's per-epoch lines (stdout) to ``path`` instead of the console."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh, contextlib.redirect_stdout(fh):
        yield


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.strip()[:12] + (" (with uncommitted changes)" if dirty.strip() else "")


def synthesize_data(profile: Profile, folder: Path, view_jitter: str) -> str:
    """The profile's synthetic data set under ``folder``; reused when ``folder/synth.json``
    records the same settings. Returns the manifest path."""
    settings = {
        "patients": profile.patients, "unlabeled_patients": profile.unlabeled_patients, "seed": profile.seed,
        "prevalence": profile.prevalence, "splits": list(profile.splits), "size": profile.size,
        "min_frames": profile.min_frames, "max_frames": profile.max_frames, "difficulty": profile.difficulty,
        "view_jitter": view_jitter,
    }
    record, manifest = folder / "synth.json", folder / "manifest.csv"
    if manifest.exists() and record.exists() and json.loads(record.read_text()) == settings:
        return str(manifest)
    _fresh(folder)
    uri = synthesize(str(folder), profile.patients, profile.seed, prevalence=profile.prevalence,
                     splits=profile.splits, unlabeled_patients=profile.unlabeled_patients, size=profile.size,
                     min_frames=profile.min_frames, max_frames=profile.max_frames, difficulty=profile.difficulty,
                     view_jitter=view_jitter, workers=profile.synth_workers)
    record.write_text(json.dumps(settings))
    return uri


def subset_draws(train: pd.DataFrame, counts: tuple[int, ...], draws: tuple[int, ...], seed: int
                 ) -> dict[tuple[int, int], list[str]]:
    """Patients of each (count, draw): nested, label-stratified, patient-level subsets.

    Draw ``d`` orders each class's training patients with one seeded permutation; the subset
    of ``n`` studies takes the first ``round(n * prevalence)`` positives (at least 1 and at
    most ``n - 1``) and the first negatives to make ``n``, so the subsets of one draw are
    nested. Count 0 means all patients (one draw). Draw ``d`` is the same for every count.
    """
    label = train.groupby("patient_id")["label"].max().sort_index()
    pos, neg = label.index[label == 1].to_numpy(), label.index[label == 0].to_numpy()
    prevalence = len(pos) / len(label)
    out: dict[tuple[int, int], list[str]] = {}
    for count, n_draws in zip(counts, draws):
        n = len(label) if count == 0 else count
        if n > len(label):
            raise ValueError(f"{n} labelled studies asked for, the training split has {len(label)}")
        n_pos = len(pos) if count == 0 else min(max(1, round(n * prevalence)), n - 1, len(pos))
        for d in range(1 if count == 0 else n_draws):
            rng = np.random.default_rng([seed, d])
            p, q = pos[rng.permutation(len(pos))], neg[rng.permutation(len(neg))]
            out[(n, d)] = sorted([*p[:n_pos].tolist(), *q[: n - n_pos].tolist()])
    return out


def _study_scores(rows: pd.DataFrame, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Video probabilities -> ``(study ids, study labels, study scores)``, studies sorted."""
    studies, scores = aggregate_by_group(rows["study_id"].to_numpy(), prob)
    _, labels = aggregate_by_group(rows["study_id"].to_numpy(), rows["label"].to_numpy(dtype=float))
    return studies, labels, scores


def probe_scores(features: np.ndarray, rows: pd.DataFrame, patients: list[str]) -> tuple[np.ndarray, float, float]:
    """The linear-probe readout of one draw: test study scores (studies sorted), the chosen C
    and its validation study AUROC.

    ``features`` ``(N, D)`` aligned with ``rows`` (labelled manifest rows of train, val and
    test). Logistic regression (balanced class weights) on the standardised features of the
    draw's training videos, ``C`` from ``PROBE_C`` by validation study-level AUROC.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    split = rows["split"].to_numpy()
    tr = (split == "train") & rows["patient_id"].isin(set(patients)).to_numpy()
    va, te = split == "val", split == "test"
    y = rows["label"].to_numpy(dtype=float)
    scaler = StandardScaler().fit(features[tr])
    x = scaler.transform(features)
    best: tuple[float, float, Any] = (-1.0, math.nan, None)
    for c in PROBE_C:
        clf = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(x[tr], y[tr])
        _, labels, scores = _study_scores(rows[va], clf.predict_proba(x[va])[:, 1])
        val_auc = auroc(labels, scores)
        if val_auc > best[0]:
            best = (val_auc, c, clf)
    _, _, test_scores = _study_scores(rows[te], best[2].predict_proba(x[te])[:, 1])
    return test_scores, best[1], best[0]


def summarise(rows: pd.DataFrame, scores: dict[tuple[str, str, int], np.ndarray], test_labels: np.ndarray,
              n_resamples: int, seed: int = 0) -> pd.DataFrame:
    """One summary row per (init, readout, count): mean test AUROC over draws with its 95%
    interval, and the paired difference to random init on the same draws with its interval,
    both from one bootstrap over draws and test studies (``draw_bootstrap``).

    ``scores[(init, readout, count)]`` is ``(draws, studies)`` in draw order; ``rows`` is the
    per-draw table (for the draw counts).
    """
    out = []
    for (init, readout, count), s in scores.items():
        ref = scores.get(("random", readout, count)) if init != "random" else None
        stats = draw_bootstrap(test_labels, s, ref, n_resamples=n_resamples, seed=seed)
        out.append({
            "init": init, "readout": readout, "n_labelled_studies": count, "draws": int(s.shape[0]),
            "auroc_mean": stats["auroc_mean"], "auroc_ci_low": stats["auroc_ci_low"],
            "auroc_ci_high": stats["auroc_ci_high"], "delta_vs_random": stats.get("delta", math.nan),
            "delta_ci_low": stats.get("delta_ci_low", math.nan), "delta_ci_high": stats.get("delta_ci_high", math.nan),
        })
    return pd.DataFrame(out, columns=list(SUMMARY_COLUMNS))


def decision_rules(profile: Profile, small_counts: tuple[int, ...]) -> str:
    """The rules the result is judged by, written into the report before the run starts
    (``small_counts``: the two smallest labelled-study counts)."""
    at = " and ".join(str(n) for n in small_counts)
    return "\n".join([
        "1. **Gates** (patients never seen in pretraining: validation + test): a method passed when its "
        "same-patient retrieval top-1 >= 5x its chance level and above the random-init encoder's retrieval on the "
        "same patients (a study's videos share acquisition settings, so random features already retrieve well "
        "above 5x chance: the smoke runs showed it), and for EchoCLR also frame-order top-1 >= 2x 1/24. "
        "The issue sets the retrieval gate for MI-SimCLR and EchoCLR; SimCLR is held to it too (features that "
        "carry across a patient's videos). The random-init row (passed = False) is the reference. A method that fails is reported as *objective not learned* and its "
        "cells as inconclusive, never as evidence about the method.",
        f"2. **Goal** (probe readout, primary): EchoCLR passed its gate; at {at} labelled studies, EchoCLR "
        "minus random init in mean test AUROC >= 0.10 with the paired 95% interval (bootstrap over draws and test "
        "patients) above 0; EchoCLR >= MI-SimCLR >= SimCLR in mean AUROC at both counts; and random init "
        "fine-tuned with all labels reaches 0.85-0.97 test AUROC (the task is learnable and not trivial).",
        f"3. **Effect absent**: gates passed and the EchoCLR - random interval at {at} studies includes or "
        "lies below 0. **Effect present but short of the goal**: interval above 0, mean difference < 0.10.",
        "4. Nothing is tuned on the test split: settings, generator levels and these rules are fixed before the "
        "run; the regularisation (probe) and learning rate (fine-tuning) are chosen on validation.",
    ])


def decide(summary: pd.DataFrame, gates: pd.DataFrame, small_counts: tuple[int, ...]) -> dict[str, Any]:
    """The decision rules applied: each part of the goal and the verdict."""
    def cell(init: str, readout: str, count: int) -> pd.Series | None:
        hit = summary[(summary["init"] == init) & (summary["readout"] == readout)
                      & (summary["n_labelled_studies"] == count)]
        return hit.iloc[0] if len(hit) else None

    passed = {r.method: bool(r.passed) for r in gates.itertuples()}
    out: dict[str, Any] = {"echoclr_gate_passed": passed.get("echoclr", False)}
    gains, above = [], []
    for n in small_counts:
        e = cell("echoclr", "probe", n)
        ms, s = cell("mi-simclr", "probe", n), cell("simclr", "probe", n)
        out[f"echoclr_delta_{n}"] = None if e is None else float(e["delta_vs_random"])
        out[f"echoclr_delta_ci_low_{n}"] = None if e is None else float(e["delta_ci_low"])
        gains.append(e is not None and e["delta_vs_random"] >= 0.10)
        above.append(e is not None and e["delta_ci_low"] > 0)
        out[f"ordering_{n}"] = bool(e is not None and ms is not None and s is not None
                                   and e["auroc_mean"] >= ms["auroc_mean"] >= s["auroc_mean"])
    full = summary[(summary["init"] == "random") & (summary["readout"] == "finetune")]
    full = full[full["n_labelled_studies"] == full["n_labelled_studies"].max()] if len(full) else full
    out["random_finetune_all"] = float(full["auroc_mean"].iloc[0]) if len(full) else None
    out["task_learnable_not_trivial"] = bool(len(full) and 0.85 <= full["auroc_mean"].iloc[0] <= 0.97)
    out["goal_met"] = bool(out["echoclr_gate_passed"] and all(gains) and all(above)
                           and all(out[f"ordering_{n}"] for n in small_counts) and out["task_learnable_not_trivial"])
    if not out["echoclr_gate_passed"]:
        verdict = "inconclusive: EchoCLR's objective was not learned (gate failed)"
    elif out["goal_met"]:
        verdict = "goal met"
    elif all(above):
        verdict = "effect present but short of the goal" if not all(gains) else "goal not met (ordering or task range)"
    else:
        verdict = "effect absent: the EchoCLR - random interval includes or lies below 0 at a small count"
    out["verdict"] = verdict
    return out


def _markdown_table(table: pd.DataFrame) -> str:
    def text(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, (float, np.floating)) else str(v)

    head = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "---|" * len(table.columns)
    return "\n".join([head, rule, *("| " + " | ".join(text(v) for v in row) + " |"
                                      for row in table.itertuples(index=False))])


def _report(name: str, profile: Profile, view_jitter: str, rules: str, started: str, commit: str,
            context: dict[str, Any], sections: list[tuple[str, str]]) -> str:
    lines = [
        f"# Label efficiency, `{name}` (profile `{profile.name}`, `--view-jitter {view_jitter}`)",
        "",
        f"Started {started} on commit `{commit}`; CPU: {context['cpu']}; device: {context['device']}.",
        "",
        "## Decision rules (written before the run started)",
        "",
        rules,
        "",
    ]
    for title, body in sections:
        lines += [f"## {title}", "", body, ""]
    lines += ["## Settings", "", "```json", json.dumps({**dataclasses.asdict(profile), "view_jitter": view_jitter},
                                                        indent=1), "```", ""]
    return "\n".join(lines)


def _pretrain(profile: Profile, method: str, manifest_uri: str, n_rows: int, tracking_uri: str, parent: str,
              work: Path, device: torch.device, experiment: str, decoded: dict[str, np.ndarray]
              ) -> tuple[SSLModel, pd.DataFrame, str]:
    """Pretrain one method in-process from the decoded-frame cache (``decoded``: the videos
    decoded once for the whole benchmark); returns the model (last weights), its per-epoch
    reports and the child run ID."""
    per_epoch = n_rows // profile.pretrain_batch
    epochs = max(1, math.ceil(profile.pretrain_steps / max(per_epoch, 1)))
    run_id = tracking.create_run(tracking_uri, experiment, f"pretrain-{method}", parent_run_id=parent,
                                 tags={"echo.job": "pretrain", "echo.method": method,
                                       "echo.benchmark": f"label-efficiency-{profile.name}"})
    cfg = PretrainConfig(
        manifest=manifest_uri, method=method, backbone=profile.backbone, epochs=epochs,
        batch_size=profile.pretrain_batch, clip_len=profile.pretrain_clip_len, lr=profile.pretrain_lr,
        optimizer="adam", schedule="cosine", temperature=profile.temperature, seed=profile.seed, loader_workers=0,
        cache_decoded_mb=profile.cache_decoded_mb, probe_every=epochs, checkpoint_every=epochs,
        tracking_uri=tracking_uri, experiment=experiment, run_name=f"pretrain-{method}",
    )
    tracking.log_params(tracking_uri, run_id, dataclasses.asdict(cfg))
    folder = _fresh(work / "checkpoints" / f"pretrain-{method}")
    session = _DeviceSession(folder, device)
    try:
        with _stage_log(work / "logs" / f"pretrain-{method}.log"):
            pretrain_loop(loop_config(cfg, RunState(tracking_uri=tracking_uri, run_id=run_id)), session, decoded)
    except Exception:
        tracking.set_terminated(tracking_uri, run_id, "FAILED")
        raise
    tracking.set_terminated(tracking_uri, run_id)
    model = SSLModel(profile.backbone, profile.pretrain_clip_len, frame_order=method == "echoclr")
    model.load_state_dict(ckpt.load_state(folder)["model"])
    return model.to(device), pd.DataFrame(session.reports), run_id


def _subset_manifest(manifest: Manifest, patients: list[str], path: Path) -> str:
    """A manifest of the draw's training patients plus the validation split (absolute URIs), written
    beside the full manifest so that its videos lie under its default data root."""
    t = manifest.table
    keep = ((t["split"] == "train") & t["patient_id"].isin(set(patients))) | (t["split"] == "val")
    table = t.loc[keep, list(MANIFEST_COLUMNS)].copy()
    table["label"] = table["label"].map(lambda v: "" if pd.isna(v) else str(int(v)))
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return str(path)


def _finetune_draw(profile: Profile, init: str, subset_uri: str, test_rows: pd.DataFrame, device: torch.device,
                   work: Path, log_name: str, decoded: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
    """Fine-tune at each learning rate of the grid for the profile's fixed number of steps, keep
    the best-on-validation (lr, epoch) weights, and score the test studies (sorted); returns
    ``(test study scores, chosen lr)``."""
    best: tuple[float, float, dict | None] = (-1.0, math.nan, None)
    for lr in profile.ft_lrs:
        cfg = FinetuneConfig(
            manifest=subset_uri, init=init, backbone=profile.backbone, epochs=profile.ft_epochs,
            steps_per_epoch=profile.ft_steps_per_epoch, batch_size=profile.ft_batch, clip_len=profile.ft_clip_len,
            stride=profile.ft_stride, lr=lr, dropout=profile.dropout, label_smoothing=profile.label_smoothing,
            class_weights=True, patience=profile.ft_epochs, monitor="auroc", seed=profile.seed, loader_workers=0,
            val_clips=1, cache_decoded_mb=profile.cache_decoded_mb, evaluate_test=False,
        )
        folder = _fresh(work / "checkpoints" / "finetune")
        with _stage_log(work / "logs" / f"{log_name}-lr{lr:g}.log"):
            finetune_loop(loop_config(cfg, None), _DeviceSession(folder, device), decoded)
        state = ckpt.load_state(folder)["best"]
        if state["metric"] > best[0]:
            best = (float(state["metric"]), lr, state["model"])
    model = ASClassifier(profile.backbone, dropout=profile.dropout)
    model.load_state_dict(best[2])
    videos = predict_videos(model.to(device), test_rows,
                            Preprocessing(profile.ft_clip_len, profile.eval_clips, profile.ft_stride), device)
    studies = study_predictions(videos).sort_values("study_id")
    return studies["probability"].to_numpy(), best[1]


def run_benchmark(profile: Profile, out: Path, tracking_uri: str | None = None, view_jitter: str = "moderate",
                  experiment: str = EXPERIMENT, readouts: tuple[str, ...] = ("probe", "finetune"),
                  methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Run the whole benchmark; returns ``{"rows", "summary", "gates", "decision", "parent", "files"}``.
    ``methods`` selects pretraining methods (tests); the benchmark runs all three."""
    clock = _Clock()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    name = profile.name + ("" if view_jitter == "moderate" else f"-{view_jitter}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if profile.name.startswith("gpu") and torch.cuda.is_available() else "cpu")
    context = {"cpu": cpu_model(), "device": str(device), "cores": os.cpu_count()}
    commit = _commit()
    small = tuple(sorted(c for c in profile.counts if c)[:2])
    rules = decision_rules(profile, small)
    files = {k: out / f"label_efficiency_{name}{k}" for k in (".csv", "_summary.csv", "_gates.csv", ".md", ".png")}
    files[".md"].write_text(_report(name, profile, view_jitter, rules, started, commit, context,
                                    [("Status", "running; results follow when it finishes")]))
    tracking_uri = tracking.resolve_tracking_uri(tracking_uri)
    parent = tracking.create_run(tracking_uri, experiment, f"label-efficiency-{name}",
                                 tags={"echo.job": "benchmark", "echo.benchmark": f"label-efficiency-{name}"})
    tracking.log_params(tracking_uri, parent, {**dataclasses.asdict(profile), "view_jitter": view_jitter,
                                               "device": str(device), "commit": commit})
    c = tracking.client(tracking_uri)
    c.log_text(parent, rules, "results/decision_rules.md")
    clock.say(f"label efficiency {name} on {device} ({context['cpu']}, {context['cores']} cores), commit {commit}; "
              f"MLflow parent run {parent}; work in {out}")
    try:
        manifest_uri = synthesize_data(profile, out / "data", view_jitter)
        manifest = load_manifest(manifest_uri)
        pre_rows = manifest.split("unlabeled", "train")
        labelled = manifest.table[manifest.table["split"].isin(["train", "val", "test"])].reset_index(drop=True)
        held_out = manifest.split("val", "test")
        test_rows = manifest.split("test")
        thin, thick = leaflet_px_by_label(profile.size, profile.difficulty, patients=500)
        clock.say(f"data: {len(manifest.table)} videos; {pre_rows['patient_id'].nunique()} pretraining patients, "
                  f"{held_out['patient_id'].nunique()} held out; leaflets {thin:.2f} vs {thick:.2f} px")

        decoded: dict[str, np.ndarray] = {}  # every video decoded once, shared by every training run
        models: dict[str, torch.nn.Module] = {}
        torch.manual_seed(profile.seed)
        models["random"] = SSLModel(profile.backbone, profile.pretrain_clip_len, frame_order=False).to(device)
        steps: dict[str, int] = {"random": 0}
        encoders: dict[str, str] = {"random": "random"}
        for method in methods:
            t0 = time.monotonic()
            model, reports, _ = _pretrain(profile, method, manifest_uri, len(pre_rows), tracking_uri, parent, out,
                                          device, experiment, decoded)
            models[method], steps[method] = model, int(reports["steps"].iloc[-1])
            path = out / "encoders" / f"{method}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.encoder_state_dict(), path)
            encoders[method] = str(path)
            last = reports.iloc[-1]
            clock.say(f"pretrained {method}: {steps[method]} steps, loss {reports['loss'].iloc[0]:.3f} -> "
                      f"{last['loss']:.3f}, contrastive top-1 {last['contrastive_top1']:.3f} "
                      f"({time.monotonic() - t0:.0f} s)")

        gate_rows = []
        baseline: dict[str, float] = {}
        for init, model in models.items():  # random first: the baseline the others must beat
            g = gate_metrics(model, held_out, profile.pretrain_clip_len, device, order_videos=profile.order_videos)
            baseline = baseline or g
            gate_rows.append({"method": init, "pretrain_steps": steps[init], "retrieval_top1": g["retrieval_top1"],
                              "retrieval_chance": g["retrieval_chance"], "order_top1": g.get("order_top1", math.nan),
                              "order_chance": g.get("order_chance", math.nan),
                              "valve_probe_r2": g.get("valve_probe_r2", math.nan),
                              "passed": gate_passed(init, g, baseline) if init != "random" else False})
            clock.say(f"gates {init}: retrieval {g['retrieval_top1']:.3f} (chance {g['retrieval_chance']:.4f}), "
                      f"order {g.get('order_top1', math.nan):.3f}, valve R2 {g.get('valve_probe_r2', math.nan):.3f}")
        gates = pd.DataFrame(gate_rows, columns=list(GATE_COLUMNS))
        gates.to_csv(files["_gates.csv"], index=False)

        train = manifest.split("train")
        draws = subset_draws(train, profile.counts, profile.draws, profile.seed)
        positives = set(train.loc[train["label"] == 1, "patient_id"])
        test_studies, test_labels = aggregate_by_group(test_rows["study_id"].to_numpy(),
                                                       test_rows["label"].to_numpy(dtype=float))
        rows: list[dict[str, Any]] = []
        scores: dict[tuple[str, str, int], list[np.ndarray]] = {}

        def record(init: str, readout: str, n: int, d: int, patients: list[str], s: np.ndarray) -> None:
            rows.append({"init": init, "readout": readout, "n_labelled_studies": n,
                         "n_positive": sum(p in positives for p in patients), "subset_seed": d,
                         "test_auroc": auroc(test_labels, s)})
            scores.setdefault((init, readout, n), []).append(s)
            pd.DataFrame(rows, columns=list(ROW_COLUMNS)).to_csv(files[".csv"], index=False)

        if "probe" in readouts:
            for init, model in models.items():
                features = held_out_outputs(model, labelled, profile.pretrain_clip_len, device,
                                            num_clips=profile.probe_clips, order_videos=0)["features"]
                for (n, d), patients in draws.items():
                    s, _, _ = probe_scores(features, labelled, patients)
                    record(init, "probe", n, d, patients, s)
                done = [r["test_auroc"] for r in rows if r["init"] == init and r["n_labelled_studies"] == small[0]]
                clock.say(f"probe {init}: {len(draws)} draws; mean test AUROC at {small[0]} studies {np.mean(done):.3f}")
        if "finetune" in readouts:
            ft = subset_draws(train, profile.ft_counts, profile.ft_draws, profile.seed)
            for (n, d), patients in ft.items():
                subset = _subset_manifest(manifest, patients, out / "data" / f"subset-n{n}-d{d}.csv")
                for init, enc in encoders.items():
                    s, lr = _finetune_draw(profile, enc, subset, test_rows, device, out, f"finetune-{init}-n{n}-d{d}",
                                           decoded)
                    record(init, "finetune", n, d, patients, s)
                    clock.say(f"fine-tuned {init} on {n} studies (draw {d}): test AUROC {rows[-1]['test_auroc']:.3f}, "
                              f"lr {lr:g}")

        table = pd.DataFrame(rows, columns=list(ROW_COLUMNS))
        summary = summarise(table, {k: np.stack(v) for k, v in scores.items()}, test_labels, profile.n_resamples,
                            profile.seed)
        summary = summary.sort_values(["readout", "n_labelled_studies", "init"],
                                      key=lambda col: col.map(INITS.index) if col.name == "init" else col)
        summary.to_csv(files["_summary.csv"], index=False)
        decision = decide(summary, gates, small)
        plot_label_curves(summary, str(files[".png"]), title=f"Label efficiency ({name})")
        minutes = clock.minutes()
        loads = clock.loads
        sections = [
            ("Verdict", f"**{decision['verdict']}**\n\n" + "\n".join(
                f"- {k}: {round(v, 3) if isinstance(v, float) else v}" for k, v in decision.items() if k != "verdict")),
            ("Run", f"Wall time **{minutes:.1f} min** on {context['cores']} cores ({context['cpu']}); 1-minute load "
                    f"average during the run {min(loads):.1f}-{max(loads):.1f} (median {np.median(loads):.1f}); "
                    f"{len(manifest.table)} videos; leaflets {thin:.2f} vs {thick:.2f} px (not severe vs severe); "
                    f"{len(test_studies)} test studies ({int(test_labels.sum())} severe)."),
            ("Gates (held-out patients: validation + test)", _markdown_table(gates)),
            ("Summary (mean over draws, 95% bootstrap over draws and test patients)",
             _markdown_table(summary)),
        ]
        files[".md"].write_text(_report(name, profile, view_jitter, rules, started, commit, context, sections))
        for path in files.values():
            c.log_artifact(parent, str(path), "results")
        c.log_artifacts(parent, str(out / "logs"), "logs")
        metrics = {f"auroc_{r.init}_{r.readout}_{r.n_labelled_studies}": r.auroc_mean for r in summary.itertuples()}
        metrics.update({k: float(v) for k, v in decision.items() if isinstance(v, (bool, int, float))})
        metrics["wall_minutes"] = minutes
        tracking.log_metrics(tracking_uri, parent, metrics, 0)
    except BaseException:
        tracking.set_terminated(tracking_uri, parent, "FAILED")
        raise
    tracking.set_terminated(tracking_uri, parent)
    clock.say(f"done in {minutes:.1f} min: {decision['verdict']}; report {files['.md']}")
    return {"rows": table, "summary": summary, "gates": gates, "decision": decision, "parent": parent,
            "files": files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), required=True)
    parser.add_argument("--view-jitter", choices=VIEW_JITTER, default="moderate",
                        help="how alike a study's videos are (docs/synth-frames.md; default: moderate)")
    parser.add_argument("--out", default="./label-efficiency-out", help="working folder (data, logs, results)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI "
                        "or sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--draw-scale", type=float, default=1.0,
                        help="multiply the number of subset draws (at least 1 per count), e.g. 0.5 for a shorter run")
    parser.add_argument("--readouts", default="probe,finetune", help="comma-separated: probe, finetune")
    parser.add_argument("--quick", action="store_true", help="a minutes-long smoke run")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = PROFILES[args.profile]
    if args.quick:
        profile = quick_profile(profile)
    if args.draw_scale != 1.0:
        scale = lambda ds: tuple(max(1, round(d * args.draw_scale)) for d in ds)  # noqa: E731
        profile = dataclasses.replace(profile, draws=scale(profile.draws), ft_draws=scale(profile.ft_draws))
    readouts = tuple(r.strip() for r in args.readouts.split(",") if r.strip())
    if not set(readouts) <= {"probe", "finetune"}:
        parser.error(f"--readouts takes probe and/or finetune, got {args.readouts!r}")
    run_benchmark(profile, Path(args.out), args.tracking_uri, view_jitter=args.view_jitter, readouts=readouts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
