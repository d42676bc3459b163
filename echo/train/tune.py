"""Hyperparameter search per label fraction and initialisation with Ray Tune.

For every cell (label fraction x initialisation x label-subset seed) one Tune experiment
searches the declared space (random search with ASHA on validation AUROC by default). Each
trial is a single-process fine-tuning run (``echo.train.finetune.finetune_loop`` in a function
trainable) that reports validation AUROC every epoch. The best trial of a cell, chosen on
validation only, is evaluated once on the test split with 95% CIs. Results: a table (CSV and
Markdown), the label-efficiency plot, and MLflow runs (a parent per search, a child per
trial, ``best=true`` on the chosen ones). ``resume`` restores interrupted cells without
repeating finished trials, after checking that the cell's pickled state is what the search
wrote (``echo.train.tune_state``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from echo import tracking
from echo.data.manifest import absolute_uri
from echo.evaluation import plots
from echo.serve.registry import DEFAULT_NAME, register
from echo.train.finetune import (FinetuneConfig, check_splits, finalize_checkpoint, finetune_loop, resolve_init,
                                 training_rows)
from echo.train.launch import connect, new_run_name, storage_for
from echo.train.session import TuneSession, progress
from echo.train.settings import Flatten, RunState, job_manifest, loop_config, setting

__all__ = ["TuneConfig", "CELL_FIELDS", "TRIAL_DEFAULTS", "DEFAULT_SPACE", "trial_base", "run_search", "search_space",
           "cell_name"]

log = logging.getLogger(__name__)

DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"loguniform": [1e-5, 1e-3]},
    "weight_decay": {"choice": [0.0, 1e-4]},
    "dropout": {"choice": [0.0, 0.25]},
    "label_smoothing": {"choice": [0.0, 0.1]},
    "class_weights": {"choice": [True, False]},
    "freeze_epochs": {"choice": [0]},
}


# Fine-tuning settings that each cell of a search sets, and those only the search's end uses.
CELL_FIELDS = ("init", "label_fraction", "subset_seed")
_NOT_SEARCH_OPTIONS = (*CELL_FIELDS, "evaluate_test", "run_name")
# A search's trials differ from a fine-tuning run in these defaults.
TRIAL_DEFAULTS: dict[str, Any] = {"experiment": "echo-ssl-tune", "loader_workers": 0}


def trial_base(**settings: Any) -> FinetuneConfig:
    """The fine-tuning settings a search's trials share: ``FinetuneConfig`` with :data:`TRIAL_DEFAULTS`."""
    return FinetuneConfig(**{**TRIAL_DEFAULTS, **settings})


@dataclass
class TuneConfig:
    """A search: the fine-tuning every trial runs, the cells, the space and the trial budget."""

    base: FinetuneConfig = setting(
        help="the fine-tuning settings every trial shares (each is a flag of its own); a cell sets init, "
             "label fraction and subset seed, the space the searched ones",
        flatten=Flatten(omit=_NOT_SEARCH_OPTIONS, defaults=TRIAL_DEFAULTS))
    fractions: list[str] = setting(help="label fractions to search",
                                   factory=lambda: ["0.01", "0.05", "0.1", "0.25", "1.0"])
    inits: list[str] = setting(help="initialisations: random, kinetics, a weights file, runs:/<pretraining run id>",
                               factory=lambda: ["random"])
    subset_seeds: list[str] = setting(help="seeds of the label subsets (several show the spread that subset "
                                           "choice causes)", factory=lambda: ["0"])
    num_samples: int = setting(8, "trials per (fraction, init, subset seed)")
    max_concurrent: int = setting(2, "trials running at once")
    cpus_per_trial: float = setting(1.0, "CPUs per trial (fractions allowed)")
    gpus_per_trial: float = setting(0.0, "GPUs per trial (fractions allowed)")
    search_alg: str = setting("random", "search algorithm: random (Tune's BasicVariantGenerator)")
    scheduler: str = setting("asha", "asha (early stopping on validation AUROC) or fifo")
    grace_period: int = setting(2, "epochs before ASHA may stop a trial")
    space: str = setting("", "search space overrides, JSON/YAML: {lr: {loguniform: [1e-5, 1e-3]}, "
                             "dropout: {choice: [0, 0.25]}}")
    out: str = setting("./tune-out", "folder for the table (CSV, Markdown) and the label-efficiency plot")
    storage: str = setting("./runs", "Tune experiment storage: a local folder or s3://bucket/prefix")
    name: str | None = setting(None, "search name (storage folder and MLflow parent run); give it with --resume")
    register: bool = setting(False, "register the best model per label fraction in the MLflow registry")
    model_name: str = setting(DEFAULT_NAME, "registered model name")

    def __post_init__(self) -> None:
        if isinstance(self.base, dict):
            self.base = FinetuneConfig(**self.base)
        for name in ("fractions", "inits", "subset_seeds"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [v.strip() for v in value.split(",") if v.strip()])
            else:
                setattr(self, name, [str(v) for v in value])
        for f in self.fractions:
            if not 0 < float(f) <= 1:
                raise ValueError(f"label fraction {f} is not in (0, 1]")
        if self.scheduler not in ("asha", "fifo"):
            raise ValueError(f"scheduler must be asha or fifo, got {self.scheduler!r}")
        if self.search_alg != "random":
            raise ValueError(f"search_alg {self.search_alg!r} is not available; use random")

    def params(self, tracking_uri: str) -> dict[str, Any]:
        """Every setting, flat, as the search's MLflow params (the tracking URI as resolved)."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "base"}
        base = {k: v for k, v in dataclasses.asdict(self.base).items() if k not in _NOT_SEARCH_OPTIONS}
        return {**base, **own, "tracking_uri": tracking_uri}


def search_space(overrides: str | dict | None) -> dict[str, Any]:
    """The Tune search space: ``DEFAULT_SPACE`` with ``overrides`` (a mapping, or JSON/YAML text).

    Each entry is ``{"loguniform": [low, high]}``, ``{"uniform": [low, high]}`` or
    ``{"choice": [values...]}``; keys are fine-tuning settings (``lr``, ``dropout``, ...).
    """
    import yaml
    from ray import tune

    spec = dict(DEFAULT_SPACE)
    if overrides:
        extra = yaml.safe_load(overrides) if isinstance(overrides, str) else overrides
        if not isinstance(extra, dict):
            raise ValueError(f"space must be a mapping of setting: {{kind: values}}, got {overrides!r}")
        spec.update(extra)
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    space: dict[str, Any] = {}
    for key, entry in spec.items():
        if key not in known:
            raise ValueError(f"space: {key!r} is not a fine-tuning setting")
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ValueError(f"space: {key!r} needs one of loguniform/uniform/choice, got {entry!r}")
        (kind, values), = entry.items()
        if kind == "loguniform":
            space[key] = tune.loguniform(float(values[0]), float(values[1]))
        elif kind == "uniform":
            space[key] = tune.uniform(float(values[0]), float(values[1]))
        elif kind == "choice":
            space[key] = tune.choice(list(values))
        else:
            raise ValueError(f"space: {key!r} has unknown kind {kind!r} (loguniform, uniform, choice)")
    return space


def cell_name(fraction: str, init: str, subset_seed: str) -> str:
    """A filesystem-safe experiment name for one cell."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", init).strip("-")[:40]
    return f"f{float(fraction):g}-{slug}-s{subset_seed}"


def _trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one fine-tuning run, reported every epoch."""
    import ray.tune

    for name in ("ray.train", "ray.tune"):  # one progress line per epoch is ours; no per-report logs
        logging.getLogger(name).setLevel(logging.WARNING)
    job = config["job"]
    hyper = {k: v for k, v in config.items() if k != "job"}
    cfg = FinetuneConfig(**{**job["config"], **hyper})
    trial_id = ray.tune.get_context().get_trial_id()
    uri = cfg.tracking_uri  # resolved by run_search: no credentials
    run_id = tracking.find_run(uri, cfg.experiment, "echo.trial_id", trial_id)
    if run_id is None:
        run_id = tracking.create_run(
            uri, cfg.experiment, f"trial-{trial_id}", parent_run_id=job["parent_run_id"],
            tags={"echo.trial_id": trial_id, "echo.label_fraction": f"{cfg.label_fraction:g}",
                  "echo.init": cfg.init, "echo.subset_seed": str(cfg.subset_seed), "echo.cell": job["cell"]},
        )
        tracking.log_params(uri, run_id, dataclasses.asdict(cfg))  # every setting of the trial, searched or fixed
    torch.set_num_threads(job["threads"])
    finetune_loop(loop_config(cfg, RunState(tracking_uri=uri, run_id=run_id)), session=TuneSession())
    if tracking.client(uri).get_run(run_id).info.status != "FINISHED":
        tracking.set_terminated(uri, run_id)


def _run_cell(cfg: TuneConfig, tracking_uri: str, fraction: str, init: str, subset_seed: str, parent_run_id: str,
              search_name: str, resume: bool):
    """Run (or restore) one cell's Tune experiment; returns its ``ResultGrid``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from echo.train import tune_state  # imports ray.tune: here, so that `echo-ssl tune --help` stays light

    name = cell_name(fraction, init, subset_seed)
    base = dataclasses.replace(cfg.base, init=init, label_fraction=float(fraction), subset_seed=int(subset_seed),
                               evaluate_test=False, tracking_uri=tracking_uri)
    job = {"config": dataclasses.asdict(base), "parent_run_id": parent_run_id, "cell": name,
           "threads": max(1, int(cfg.cpus_per_trial))}
    trainable = tune.with_resources(_trial, {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    storage_path, filesystem = storage_for(os.path.join(cfg.storage, search_name) if not cfg.storage.startswith("s3://")
                                           else f"{cfg.storage.rstrip('/')}/{search_name}")
    path = f"{storage_path}/{name}"
    restorable = tune.Tuner.can_restore(path, storage_filesystem=filesystem) if resume else False
    where = (tracking_uri, parent_run_id, name, path, filesystem)
    if restorable:
        checked = tune_state.verify_experiment(*where)  # before anything there is unpickled
        progress(f"  resuming cell {name} ({checked} state files match the digests recorded in MLflow)")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=filesystem)
    else:
        epochs = cfg.base.epochs
        scheduler = (ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=min(cfg.grace_period, epochs))
                     if cfg.scheduler == "asha" else FIFOScheduler())
        space = search_space(cfg.space)
        space["job"] = job
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            # Tune's own random search, recording its state files as it saves them
            tune_config=tune.TuneConfig(metric="val_auroc", mode="max", num_samples=cfg.num_samples,
                                        scheduler=scheduler,
                                        search_alg=tune_state.RecordingVariantGenerator(
                                            *where, max_concurrent=cfg.max_concurrent)),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem,
                                      failure_config=tune.FailureConfig(max_failures=1), verbose=0,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      callbacks=[tune_state.ErrorRecorder(*where)]),
        )
        tune_state.record_file(*where, "tuner.pkl")  # written once, by Tuner() above
    return tuner.fit()


def _best(grid) -> Any:
    """The trial with the highest best validation AUROC (ties: the earlier trial)."""
    results = [r for r in grid if r.error is None and r.metrics and "best_val_auroc" in r.metrics]
    if not results:
        raise RuntimeError("no trial of this cell finished; see the trial errors above")
    return max(results, key=lambda r: r.metrics["best_val_auroc"])


def _finalize_best(cfg: TuneConfig, tracking_uri: str, result) -> tuple[dict, str]:
    """Evaluate the best trial's best weights on test (once) and log them to its MLflow run."""
    run_id = tracking.find_run(tracking_uri, cfg.base.experiment, "echo.trial_id", result.metrics["trial_id"])
    report = finalize_checkpoint(result.checkpoint, RunState(tracking_uri=tracking_uri, run_id=run_id),
                                 {"evaluate_test": True})
    tracking.client(tracking_uri).set_tag(run_id, "best", "true")
    hyper = {k: result.config[k] for k in result.config if k != "job"}
    return {"report": report, "hyper": hyper, "run_id": run_id}, run_id


def run_search(cfg: TuneConfig, resume: bool = False, ray_address: str | None = None) -> pd.DataFrame:
    """Run the whole search; write the table and plot under ``cfg.out``; return the table."""
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    manifest = job_manifest(cfg.base)  # a bad manifest stops the search before it starts
    cfg = dataclasses.replace(cfg, base=dataclasses.replace(cfg.base, manifest=absolute_uri(cfg.base.manifest)))
    uri = tracking.resolve_tracking_uri(cfg.base.tracking_uri)
    experiment = cfg.base.experiment
    if resume and not cfg.name:
        raise ValueError("--resume needs --name: the search to continue")
    name = cfg.name or new_run_name("search")
    cells = [(f, i, s) for f in cfg.fractions for i in cfg.inits for s in cfg.subset_seeds]
    for fraction, _, subset_seed in cells:  # the best trials are evaluated on test: refuse what would fail there
        check_splits(manifest, training_rows(manifest, float(fraction), int(subset_seed))[0], evaluate_test=True)
    for init in cfg.inits:
        if init not in ("random", "kinetics"):
            with resolve_init(init, uri):  # a bad pretraining run fails now, not in every trial
                pass
    parent = tracking.find_run(uri, experiment, "echo.search_name", name) if resume else None
    if parent is None:
        parent = tracking.create_run(uri, experiment, name,
                                     tags={"echo.search_name": name, "echo.job": "tune",
                                           "echo.manifest_sha256": manifest.sha256})
        tracking.log_params(uri, parent, cfg.params(uri))
    connect(ray_address)
    rows = []
    for n, (fraction, init, subset_seed) in enumerate(cells, 1):
        train, _ = training_rows(manifest, float(fraction), int(subset_seed))
        progress(f"[{n}/{len(cells)}] fraction {float(fraction):g}, init {init}, subset seed {subset_seed}: "
                 f"{train['study_id'].nunique()} labelled studies, {cfg.num_samples} trials")
        grid = _run_cell(cfg, uri, fraction, init, subset_seed, parent, name, resume)
        best = _best(grid)
        found, run_id = _finalize_best(cfg, uri, best)
        rep = found["report"]
        rows.append({
            "init": init, "label_fraction": float(fraction), "subset_seed": int(subset_seed),
            "auroc": rep["test_auroc"], "ci_low": rep["test_auroc_ci_low"], "ci_high": rep["test_auroc_ci_high"],
            "val_auroc": rep["val_final_auroc"], "n_train_studies": int(rep["n_train_studies"]),
            "best_run_id": run_id, **{f"hp_{k}": v for k, v in found["hyper"].items()},
        })
        progress(f"  best trial: val AUROC {rep['val_final_auroc']:.3f}; test AUROC {rep['test_auroc']:.3f} "
                 f"(95% CI {rep['test_auroc_ci_low']:.3f}-{rep['test_auroc_ci_high']:.3f})")
    detail = pd.DataFrame(rows)
    table = _summarise(detail)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    detail.to_csv(out / "trials_best.csv", index=False)
    table.to_csv(out / "label_efficiency.csv", index=False)
    (out / "label_efficiency.md").write_text(_markdown(table))
    plots.plot_label_efficiency(table, str(out / "label_efficiency.png"))
    c = tracking.client(uri)
    for f in ("label_efficiency.csv", "label_efficiency.md", "label_efficiency.png", "trials_best.csv"):
        c.log_artifact(parent, str(out / f), "results")
    tracking.set_terminated(uri, parent)
    if cfg.register:
        _register_best(cfg, uri, detail)
    print(_markdown(table), flush=True)
    return table


def _summarise(detail: pd.DataFrame) -> pd.DataFrame:
    """One row per (init, fraction): mean over label-subset seeds, with their spread."""
    groups = detail.groupby(["init", "label_fraction"], sort=False)
    table = groups.agg(auroc=("auroc", "mean"), ci_low=("ci_low", "mean"), ci_high=("ci_high", "mean"),
                       subset_sd=("auroc", "std"), n_subset_seeds=("auroc", "size"),
                       n_train_studies=("n_train_studies", "mean"), best_run_id=("best_run_id", "first"))
    table = table.reset_index()
    table["subset_sd"] = table["subset_sd"].fillna(0.0)
    hp_cols = [c for c in detail.columns if c.startswith("hp_")]
    first = groups[hp_cols].first().reset_index(drop=True)
    return pd.concat([table, first], axis=1).sort_values(["init", "label_fraction"]).reset_index(drop=True)


def _markdown(table: pd.DataFrame) -> str:
    lines = ["| init | label fraction | labelled studies | test AUROC (95% CI) | subset SD | best hyperparameters |",
             "|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        hp = ", ".join(f"{c[3:]}={getattr(r, c):.3g}" if isinstance(getattr(r, c), float) else f"{c[3:]}={getattr(r, c)}"
                       for c in table.columns if c.startswith("hp_"))
        lines.append(f"| {r.init} | {r.label_fraction:g} | {r.n_train_studies:.0f} | {r.auroc:.3f} "
                     f"({r.ci_low:.3f}-{r.ci_high:.3f}) | {r.subset_sd:.3f} | {hp} |")
    return "\n".join(lines) + "\n"


def _register_best(cfg: TuneConfig, tracking_uri: str, detail: pd.DataFrame) -> None:
    """Register, per label fraction, the best run across inits (chosen on validation AUROC)."""
    for fraction, part in detail.groupby("label_fraction"):
        best = part.loc[part["val_auroc"].idxmax()]
        version = register(f"runs:/{best['best_run_id']}/model", name=cfg.model_name, tracking_uri=tracking_uri)
        progress(f"registered {cfg.model_name} version {version} (fraction {fraction:g}, init {best['init']})")
