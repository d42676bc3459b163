"""Label-efficiency benchmark: does self-supervised pretraining pay at 1% of the labels?

One command synthesizes a PLAX data set (``echo.ingest.synth``: labelled patients split by patient
into train/val/test, plus unlabelled patients), pretrains SimCLR, MI-SimCLR and EchoCLR on
the unlabelled + train videos with the same budget (epochs, batch, optimizer), fine-tunes each
encoder and a random initialisation on 1%, 5%, 10%, 25% and 100% of the training labels
(nested, stratified, patient-level subsets: ``echo.train.finetune.training_rows``), and evaluates the
best-on-validation weights once on the test split with 95% stratified-bootstrap CIs
(``echo.train.finetune.finalize``).

Fine-tuning uses FIXED settings per profile (below), the same for every initialisation and
fraction: no Tune search. Early stopping on validation AUROC. Every stage runs in-process
through ``echo.train.session.LocalSession`` (no Ray: on a 2-core machine Ray's start-up and
worker processes would cost more than the small model's training); the ``gpu`` profile
runs the same way on one CUDA device.

Outputs under ``--out`` (default ``./label-efficiency-out``): ``data/`` (the synthetic set,
reused when its settings match), ``logs/<stage>.log`` (per-epoch lines of each stage), and
``label_efficiency_<profile>.csv`` / ``.md`` / ``.png``. All of it goes to MLflow under one
parent run (experiment ``echo-ssl-benchmark``) with one child run per pretraining (encoder
artifact) and per fine-tuning (metrics with CIs, plots, model bundle).

    python benchmarks/label_efficiency.py --profile cpu [--out DIR] [--tracking-uri URI]
        [--patients N] [--quick] [--kinetics]

The table (one row per initialisation and label fraction) has the columns ``init``,
``label_fraction``, ``auroc``, ``ci_low``, ``ci_high`` (test, study level, 95% bootstrap),
``n_train_studies``, ``n_train_positive``, ``n_train_videos``, ``val_auroc`` (validation
AUROC of the best epoch, the early-stopping criterion), ``test_auprc``, ``best_epoch``, ``epochs_run``, ``seconds``
and ``run_id``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from echo.train import checkpoint as ckpt  # noqa: E402
from echo import tracking  # noqa: E402
from echo.train.finetune import FinetuneConfig, finalize, finetune_loop, training_rows  # noqa: E402
from echo.data.manifest import Manifest, load_manifest  # noqa: E402
from echo.model.networks import ASClassifier  # noqa: E402
from echo.evaluation.plots import plot_label_efficiency  # noqa: E402
from echo.train.pretrain import PretrainConfig, pretrain_loop  # noqa: E402
from echo.ingest.synth import synthesize  # noqa: E402
from echo.train.session import LocalSession  # noqa: E402

__all__ = [
    "Profile",
    "PROFILES",
    "FRACTIONS",
    "METHODS",
    "EXPERIMENT",
    "TABLE_COLUMNS",
    "quick_profile",
    "synthesize_data",
    "pretrain_encoder",
    "finetune_cell",
    "goal_check",
    "markdown_report",
    "run_benchmark",
    "main",
]

FRACTIONS = (0.01, 0.05, 0.1, 0.25, 1.0)
METHODS = ("simclr", "mi-simclr", "echoclr")
EXPERIMENT = "echo-ssl-benchmark"
TABLE_COLUMNS = (
    "init", "label_fraction", "auroc", "ci_low", "ci_high", "n_train_studies", "n_train_positive", "n_train_videos",
    "val_auroc", "test_auprc", "best_epoch", "epochs_run", "seconds", "run_id",
)


@dataclass(frozen=True)
class Profile:
    """Data set, pretraining and (fixed) fine-tuning settings of one benchmark profile.

    Sizes in pixels, clip lengths in frames, learning rates per Adam step.
    """

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
    # model
    backbone: str
    # pretraining, identical for the three methods
    pretrain_epochs: int
    pretrain_batch: int
    pretrain_clip_len: int
    pretrain_lr: float
    pretrain_schedule: str
    temperature: float
    probe_every: int
    # fine-tuning, fixed for every init and fraction
    ft_epochs: tuple[tuple[float, int], ...]  # (label fraction, maximum epochs), same for every init
    ft_batch: int
    ft_clip_len: int
    ft_stride: int
    ft_lr: float
    patience: int
    dropout: float
    label_smoothing: float
    weight_decay: float
    val_clips: int
    eval_clips: int
    n_resamples: int
    loader_workers: int
    seed: int = 0


PROFILES: dict[str, Profile] = {
    # Sized so that the whole run takes about 40 minutes on 2 (shared) CPU cores.
    "cpu": Profile(
        name="cpu", patients=1000, unlabeled_patients=600, prevalence=0.25, splits=(0.5, 0.12, 0.38), size=64,
        min_frames=16, max_frames=32, difficulty=1.25, synth_workers=2, backbone="tiny3d",
        pretrain_epochs=3, pretrain_batch=64, pretrain_clip_len=4, pretrain_lr=1e-3, pretrain_schedule="cosine",
        temperature=0.1, probe_every=3,
        ft_epochs=((0.01, 12), (0.05, 12), (0.1, 10), (0.25, 6), (1.0, 4)), ft_batch=16, ft_clip_len=8, ft_stride=2,
        ft_lr=1e-3, patience=3, dropout=0.25,
        label_smoothing=0.1, weight_decay=0.0, val_clips=1, eval_clips=2, n_resamples=2000, loader_workers=1,
    ),
    # One GPU: published backbone and clip lengths, larger data set.
    "gpu": Profile(
        name="gpu", patients=4000, unlabeled_patients=4000, prevalence=0.25, splits=(0.5, 0.15, 0.35), size=112,
        min_frames=32, max_frames=64, difficulty=1.25, synth_workers=8, backbone="r3d_18",
        pretrain_epochs=60, pretrain_batch=128, pretrain_clip_len=4, pretrain_lr=1e-3, pretrain_schedule="cosine",
        temperature=0.1, probe_every=10,
        ft_epochs=((0.01, 30), (0.05, 30), (0.1, 30), (0.25, 30), (1.0, 30)), ft_batch=32, ft_clip_len=16,
        ft_stride=1, ft_lr=1e-4, patience=5, dropout=0.25,
        label_smoothing=0.1, weight_decay=0.0, val_clips=2, eval_clips=4, n_resamples=2000, loader_workers=6,
    ),
}


def quick_profile(profile: Profile, patients: int = 160) -> Profile:
    """A minutes-long smoke version of ``profile``: few patients, one or two epochs, few resamples."""
    return dataclasses.replace(
        profile, name=f"{profile.name}-quick", patients=patients, unlabeled_patients=patients // 2,
        splits=(0.5, 0.2, 0.3), pretrain_epochs=1, pretrain_batch=16, probe_every=1,
        ft_epochs=tuple((f, 2) for f, _ in profile.ft_epochs), patience=1,
        n_resamples=200, synth_workers=min(profile.synth_workers, 2), loader_workers=0,
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
    """Prints one progress line per stage, prefixed with the elapsed minutes."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def say(self, message: str) -> None:
        elapsed = time.monotonic() - self.start
        print(f"[{int(elapsed // 60):3d}:{int(elapsed % 60):02d}] {message}", flush=True)


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


def _synth_settings(profile: Profile) -> dict[str, Any]:
    return {
        "patients": profile.patients, "unlabeled_patients": profile.unlabeled_patients, "seed": profile.seed,
        "prevalence": profile.prevalence, "splits": list(profile.splits), "size": profile.size,
        "min_frames": profile.min_frames, "max_frames": profile.max_frames, "difficulty": profile.difficulty,
    }


def synthesize_data(profile: Profile, folder: Path) -> str:
    """The profile's synthetic data set under ``folder``; returns the manifest path.

    Reuses an existing set when ``folder/synth.json`` records the same settings.
    """
    settings = _synth_settings(profile)
    record = folder / "synth.json"
    manifest = folder / "manifest.csv"
    if manifest.exists() and record.exists() and json.loads(record.read_text()) == settings:
        return str(manifest)
    _fresh(folder)
    uri = synthesize(str(folder), profile.patients, profile.seed, prevalence=profile.prevalence,
                     splits=profile.splits, unlabeled_patients=profile.unlabeled_patients, size=profile.size,
                     min_frames=profile.min_frames, max_frames=profile.max_frames, difficulty=profile.difficulty,
                     workers=profile.synth_workers)
    record.write_text(json.dumps(settings))
    return uri


def _data_summary(manifest: Manifest) -> dict[str, float]:
    """Counts per split (patients, studies, videos, positive studies); no identifiers."""
    out: dict[str, float] = {}
    table = manifest.table
    for split, rows in table.groupby("split"):
        out[f"data_{split}_patients"] = float(rows["patient_id"].nunique())
        out[f"data_{split}_videos"] = float(len(rows))
        if rows["label"].notna().any():
            out[f"data_{split}_positive_studies"] = float(rows.groupby("study_id")["label"].max().sum())
    return out


def pretrain_encoder(profile: Profile, method: str, manifest_uri: str, tracking_uri: str, parent_run_id: str,
                     work: Path, device: torch.device, experiment: str = EXPERIMENT) -> tuple[str, pd.DataFrame]:
    """Pretrain one method in-process; returns ``(child run ID, per-epoch metrics)``.

    The child run holds the per-epoch loss, contrastive top-1, frame-order top-1 (EchoCLR),
    linear-probe validation AUROC and the encoder artifact ``encoder/encoder.pt``.
    """
    run_id = tracking.create_run(tracking_uri, experiment, f"pretrain-{method}", parent_run_id=parent_run_id,
                                 tags={"echo.job": "pretrain", "echo.method": method,
                                       "echo.benchmark": f"label-efficiency-{profile.name}"})
    cfg = PretrainConfig(
        manifest=manifest_uri, method=method, backbone=profile.backbone, epochs=profile.pretrain_epochs,
        batch_size=profile.pretrain_batch, clip_len=profile.pretrain_clip_len, lr=profile.pretrain_lr,
        optimizer="adam", schedule=profile.pretrain_schedule, temperature=profile.temperature, seed=profile.seed,
        loader_workers=profile.loader_workers, probe_every=profile.probe_every, tracking_uri=tracking_uri,
        experiment=experiment, run_name=f"pretrain-{method}", mlflow_run_id=run_id,
    )
    tracking.log_params(tracking_uri, run_id, dataclasses.asdict(cfg))
    session = _DeviceSession(_fresh(work / "checkpoints" / f"pretrain-{method}"), device)
    try:
        with _stage_log(work / "logs" / f"pretrain-{method}.log"):
            pretrain_loop(dataclasses.asdict(cfg), session)
    except Exception:
        tracking.set_terminated(tracking_uri, run_id, "FAILED")
        raise
    tracking.set_terminated(tracking_uri, run_id)
    return run_id, pd.DataFrame(session.reports)


def _max_epochs(profile: Profile, fraction: float) -> int:
    """The profile's epoch cap for ``fraction``: that of the smallest listed fraction >= it."""
    for listed, epochs in sorted(profile.ft_epochs):
        if fraction <= listed + 1e-12:
            return epochs
    return sorted(profile.ft_epochs)[-1][1]


def finetune_cell(profile: Profile, init_name: str, init: str, fraction: float, manifest_uri: str,
                  manifest: Manifest, tracking_uri: str, parent_run_id: str, work: Path, device: torch.device,
                  experiment: str = EXPERIMENT) -> dict[str, Any]:
    """Fine-tune one (initialisation, label fraction) cell with the profile's fixed settings and
    evaluate its best-on-validation weights once on test; returns the cell's table row."""
    started = time.monotonic()
    name = f"finetune-{init_name}-{fraction:g}"
    run_id = tracking.create_run(tracking_uri, experiment, name, parent_run_id=parent_run_id,
                                 tags={"echo.job": "finetune", "echo.init": init_name,
                                       "echo.label_fraction": f"{fraction:g}",
                                       "echo.benchmark": f"label-efficiency-{profile.name}"})
    cfg = FinetuneConfig(
        manifest=manifest_uri, init=init, backbone=profile.backbone, label_fraction=fraction,
        subset_seed=profile.seed, epochs=_max_epochs(profile, fraction), batch_size=profile.ft_batch,
        clip_len=profile.ft_clip_len, stride=profile.ft_stride, lr=profile.ft_lr,
        weight_decay=profile.weight_decay, dropout=profile.dropout, label_smoothing=profile.label_smoothing,
        class_weights=True, patience=profile.patience, monitor="auroc", optimizer="adam", seed=profile.seed,
        loader_workers=profile.loader_workers, val_clips=profile.val_clips, eval_clips=profile.eval_clips,
        n_resamples=profile.n_resamples, tracking_uri=tracking_uri, experiment=experiment, run_name=name,
        mlflow_run_id=run_id,
    )
    train, _ = training_rows(manifest, fraction, profile.seed)
    tracking.log_params(tracking_uri, run_id, {**dataclasses.asdict(cfg), "init_name": init_name,
                                               "n_train_studies": int(train["study_id"].nunique())})
    folder = _fresh(work / "checkpoints" / name)
    session = _DeviceSession(folder, device)
    try:
        with _stage_log(work / "logs" / f"{name}.log"):
            finetune_loop(dataclasses.asdict(cfg), session)
            state = ckpt.load_state(folder)
            model = ASClassifier(cfg.backbone, dropout=cfg.dropout, normalization=cfg.normalization)
            model.load_state_dict(state["best"]["model"])
            report = finalize(model, cfg, manifest, device, int(state["best"]["epoch"]), out_dir=str(folder / "final"))
    except Exception:
        tracking.set_terminated(tracking_uri, run_id, "FAILED")
        raise
    tracking.set_terminated(tracking_uri, run_id)
    studies = train.groupby("study_id")["label"].max()
    return {
        "init": init_name,
        "label_fraction": fraction,
        "auroc": report["test_auroc"],
        "ci_low": report["test_auroc_ci_low"],
        "ci_high": report["test_auroc_ci_high"],
        "n_train_studies": int(len(studies)),
        "n_train_positive": int(studies.sum()),
        "n_train_videos": int(len(train)),
        "val_auroc": float(state["best"]["metric"]),
        "test_auprc": report.get("test_auprc", float("nan")),
        "best_epoch": int(state["best"]["epoch"]),
        "epochs_run": len(session.reports),
        "seconds": round(time.monotonic() - started, 1),
        "run_id": run_id,
    }


def _cell(table: pd.DataFrame, init: str, fraction: float) -> pd.Series | None:
    rows = table[(table["init"] == init) & ((table["label_fraction"] - fraction).abs() < 1e-9)]
    return rows.iloc[0] if len(rows) else None


def goal_check(table: pd.DataFrame) -> dict[str, Any]:
    """The issue's goal, checked on ``table``.

    - ``echoclr_gain_1pct``: EchoCLR minus random test AUROC at 1% of labels (goal >= 0.10);
    - ``echoclr_ci_separated_1pct``: EchoCLR's 95% CI lies wholly above random's at 1%;
    - ``ordering_<f>``: EchoCLR >= MI-SimCLR >= SimCLR at 1% and 5%;
    - ``goal_met``: all of them. Missing cells give ``None`` entries and ``goal_met`` False.
    """
    out: dict[str, Any] = {}
    echo1, rand1 = _cell(table, "echoclr", 0.01), _cell(table, "random", 0.01)
    if echo1 is not None and rand1 is not None:
        out["echoclr_gain_1pct"] = float(echo1["auroc"] - rand1["auroc"])
        out["echoclr_ci_separated_1pct"] = bool(echo1["ci_low"] > rand1["ci_high"])
    else:
        out["echoclr_gain_1pct"] = None
        out["echoclr_ci_separated_1pct"] = None
    for fraction in (0.01, 0.05):
        cells = [_cell(table, m, fraction) for m in ("echoclr", "mi-simclr", "simclr")]
        key = f"ordering_{fraction:g}"
        if any(c is None for c in cells):
            out[key] = None
        else:
            out[key] = bool(cells[0]["auroc"] >= cells[1]["auroc"] >= cells[2]["auroc"])
    gain = out["echoclr_gain_1pct"]
    out["goal_met"] = bool(
        gain is not None and gain >= 0.10 and out["echoclr_ci_separated_1pct"]
        and out["ordering_0.01"] and out["ordering_0.05"]
    )
    return out


def _markdown_table(table: pd.DataFrame) -> str:
    """``table`` as a GitHub Markdown table, floats with 3 decimals."""

    def text(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "---|" * len(table.columns)
    return "\n".join([head, rule, *("| " + " | ".join(text(v) for v in row) + " |"
                                      for row in table.itertuples(index=False))])


def markdown_report(table: pd.DataFrame, pretraining: pd.DataFrame, profile: Profile, goal: dict[str, Any],
                    data: dict[str, float], minutes: float) -> str:
    """The results as Markdown: the AUROC grid, the full table, the pretraining summary and the goal."""
    grid = table.assign(cell=[f"{a:.3f} ({lo:.3f}-{hi:.3f})" for a, lo, hi in
                              zip(table["auroc"], table["ci_low"], table["ci_high"])])
    grid = grid.pivot(index="init", columns="label_fraction", values="cell")
    grid = grid.reindex([i for i in ("random", *METHODS, "kinetics") if i in grid.index])
    grid.columns = [f"{100 * f:g}%" for f in grid.columns]
    n_studies = table.groupby("label_fraction")["n_train_studies"].first()
    lines = [
        f"# Label efficiency, profile `{profile.name}`",
        "",
        f"Test AUROC (study level) with 95% stratified-bootstrap CI ({profile.n_resamples} resamples); "
        f"wall time {minutes:.1f} min.",
        "",
        "| init | " + " | ".join(grid.columns) + " |",
        "|---" * (len(grid.columns) + 1) + "|",
    ]
    lines += [f"| {init} | " + " | ".join(str(v) for v in row) + " |" for init, row in grid.iterrows()]
    lines += ["| training studies | " + " | ".join(str(int(n)) for n in n_studies) + " |", ""]
    lines += ["## Goal", ""]
    lines += [f"- {k}: {v if not isinstance(v, float) else round(v, 3)}" for k, v in goal.items()]
    lines += ["", "## Pretraining (last epoch)", "", _markdown_table(pretraining), ""]
    lines += ["## All cells", "", _markdown_table(table.drop(columns=["run_id"])), ""]
    lines += ["## Data", "", *[f"- {k}: {int(v)}" for k, v in sorted(data.items())], ""]
    lines += ["## Settings", "", "```json", json.dumps(dataclasses.asdict(profile), indent=1), "```", ""]
    return "\n".join(lines)


def run_benchmark(profile: Profile, out: Path, tracking_uri: str | None = None, kinetics: bool = False,
                  experiment: str = EXPERIMENT, methods: tuple[str, ...] = METHODS,
                  fractions: tuple[float, ...] = FRACTIONS) -> tuple[pd.DataFrame, str]:
    """Run the whole benchmark; returns ``(table, parent run ID)`` and writes the CSV/MD/PNG into ``out``.

    ``methods`` and ``fractions`` select a subset (tests); the benchmark uses all of them.
    """
    clock = _Clock()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if profile.name.startswith("gpu") and torch.cuda.is_available() else "cpu")
    tracking_uri = tracking.resolve_tracking_uri(tracking_uri)
    parent = tracking.create_run(tracking_uri, experiment, f"label-efficiency-{profile.name}",
                                 tags={"echo.job": "benchmark", "echo.benchmark": f"label-efficiency-{profile.name}"})
    tracking.log_params(tracking_uri, parent, {**dataclasses.asdict(profile), "device": str(device),
                                               "fractions": list(fractions), "methods": list(methods),
                                               "search": "none (fixed settings)"})
    clock.say(f"label efficiency, profile {profile.name} on {device}; MLflow parent run {parent} "
              f"({tracking_uri}); work in {out}")
    try:
        manifest_uri = synthesize_data(profile, out / "data")
        manifest = load_manifest(manifest_uri)
        data = _data_summary(manifest)
        tracking.log_metrics(tracking_uri, parent, data, 0)
        clock.say(f"data: {len(manifest.table)} videos, {int(data.get('data_train_patients', 0))} train / "
                  f"{int(data.get('data_val_patients', 0))} val / {int(data.get('data_test_patients', 0))} test / "
                  f"{int(data.get('data_unlabeled_patients', 0))} unlabelled patients")

        inits: dict[str, str] = {"random": "random"}
        summaries = []
        for method in methods:
            started = time.monotonic()
            run_id, epochs = pretrain_encoder(profile, method, manifest_uri, tracking_uri, parent, out, device,
                                              experiment)
            inits[method] = f"runs:/{run_id}"
            last = epochs.iloc[-1]
            probe = epochs["probe_val_auroc"].dropna() if "probe_val_auroc" in epochs else pd.Series(dtype=float)
            summaries.append({
                "method": method, "epochs": int(last["epoch"]), "steps": int(last["steps"]),
                "first_loss": float(epochs["loss"].iloc[0]), "loss": float(last["loss"]),
                "contrastive_top1": float(last["contrastive_top1"]),
                "frame_order_top1": float(last.get("frame_order_top1", float("nan"))),
                "probe_val_auroc": float(probe.iloc[-1]) if len(probe) else float("nan"),
                "seconds": round(time.monotonic() - started, 1),
            })
            s = summaries[-1]
            clock.say(f"pretrained {method}: {s['steps']} steps, loss {s['first_loss']:.3f} -> {s['loss']:.3f}, "
                      f"top1 {s['contrastive_top1']:.3f}, probe val AUROC {s['probe_val_auroc']:.3f} "
                      f"({s['seconds']:.0f} s)")
        if kinetics:
            inits["kinetics"] = "kinetics"
        pretraining = pd.DataFrame(summaries)

        rows: list[dict[str, Any]] = []
        csv_path = out / f"label_efficiency_{profile.name}.csv"
        for fraction in fractions:  # the low fractions first: they decide the goal
            for name, init in inits.items():
                row = finetune_cell(profile, name, init, fraction, manifest_uri, manifest, tracking_uri, parent, out,
                                    device, experiment)
                rows.append(row)
                pd.DataFrame(rows, columns=list(TABLE_COLUMNS)).to_csv(csv_path, index=False)  # partial results
                clock.say(f"fine-tuned {name} on {fraction:g} of labels ({row['n_train_studies']} studies): "
                          f"test AUROC {row['auroc']:.3f} ({row['ci_low']:.3f}-{row['ci_high']:.3f}), "
                          f"val {row['val_auroc']:.3f}, best epoch {row['best_epoch']}/{row['epochs_run']} "
                          f"({row['seconds']:.0f} s)")
        table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
        goal = goal_check(table)
        minutes = (time.monotonic() - clock.start) / 60
        table.to_csv(csv_path, index=False)
        md_path = out / f"label_efficiency_{profile.name}.md"
        md_path.write_text(markdown_report(table, pretraining, profile, goal, data, minutes))
        png_path = out / f"label_efficiency_{profile.name}.png"
        plot_label_efficiency(table, str(png_path), title=f"Label efficiency ({profile.name} profile)")
        c = tracking.client(tracking_uri)
        for path in (csv_path, md_path, png_path):
            c.log_artifact(parent, str(path), "results")
        c.log_artifacts(parent, str(out / "logs"), "logs")
        metrics = {f"auroc_{r['init']}_{r['label_fraction']:g}": r["auroc"] for r in rows}
        metrics.update({k: float(v) for k, v in goal.items() if v is not None})
        metrics["wall_minutes"] = minutes
        tracking.log_metrics(tracking_uri, parent, metrics, 0)
    except BaseException:
        tracking.set_terminated(tracking_uri, parent, "FAILED")
        raise
    tracking.set_terminated(tracking_uri, parent)
    clock.say(f"done in {minutes:.1f} min; goal {'met' if goal['goal_met'] else 'NOT met'}: "
              + ", ".join(f"{k}={v if not isinstance(v, float) else round(v, 3)}" for k, v in goal.items())
              + f"; table {csv_path}")
    return table, parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), required=True)
    parser.add_argument("--out", default="./label-efficiency-out", help="working folder (data, logs, results)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI "
                        "or sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--patients", type=int, default=None, help="labelled patients (overrides the profile)")
    parser.add_argument("--quick", action="store_true", help="a minutes-long smoke run (few patients, 1-2 epochs)")
    parser.add_argument("--kinetics", action="store_true",
                        help="also fine-tune from torchvision's Kinetics-400 weights (r3d_18 only; needs them in "
                             "$TORCH_HOME/hub/checkpoints or a network)")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.quick:
        profile = quick_profile(profile, args.patients or 160)
    elif args.patients:
        profile = dataclasses.replace(profile, patients=args.patients)
    if args.kinetics and profile.backbone == "tiny3d":
        parser.error("--kinetics needs a torchvision backbone; the cpu profile uses tiny3d")
    run_benchmark(profile, Path(args.out), args.tracking_uri, kinetics=args.kinetics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
