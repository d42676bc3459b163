"""Fine-tuning a severe-AS classifier on (a label fraction of) the training split.

``finetune_loop`` trains with early stopping on the validation split (study-level AUROC by
default) and keeps the best weights in its checkpoints; it runs on Ray Train workers
(``run_finetune``, CLI ``echo-ssl finetune``) or inside a Ray Tune trial (``echo.train.tune``).
``finalize`` turns the best weights into a result: thresholds chosen on validation, the test
split evaluated once with 95% CIs, plots and predictions, and a model bundle in MLflow.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from echo import tracking
from echo.data import storage
from echo.data.dataset import LabelledClipDataset
from echo.data.loader import VideoLoader
from echo.data.ids import ID_KEY_ENV, env_id_key, pseudonyms
from echo.data.manifest import Manifest, absolute_uri, label_fraction_patients
from echo.data.video import probe
from echo.evaluation.evaluate import (choose_thresholds, log_evaluation, predict_videos, split_report,
                                      study_predictions, summary_line, write_evaluation)
from echo.evaluation.metrics import MIN_CASES_PER_CLASS, auroc
from echo.model.networks import ASClassifier
from echo.model.preprocessing import Preprocessing
from echo.serve.bundle import BundleMeta, save_bundle
from echo.train.checkpoint import load_state, resume_state, training_state
from echo.train.distributed import all_reduce_sum, lockstep
from echo.train.launch import RayOptions, fit_tracked, open_tracked_run
from echo.train.optim import build_optimizer, optimizer_step
from echo.train.session import RayTrainSession, Session, SkipReport, progress, rank0_logger
from echo.train.settings import RunState, TrainConfig, from_loop_config, job_manifest, setting, with_default

__all__ = [
    "FinetuneConfig",
    "finetune_loop",
    "finalize",
    "label_subset_record",
    "finalize_checkpoint",
    "run_finetune",
    "pretrain_run_id",
    "resolve_init",
    "training_rows",
    "check_splits",
    "resample_rows",
]

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig(TrainConfig):
    """Every setting of a fine-tuning run; defaults follow the published recipe (method.md)."""

    experiment: str = with_default(TrainConfig, "experiment", "echo-ssl-finetune")
    init: str = setting("random", "random, kinetics, a state-dict file (local or s3://), or runs:/<pretraining run id>")
    label_fraction: float = setting(1.0, "fraction of training patients with labels used (nested, stratified subsets)")
    subset_seed: int = setting(0, "seed of the label subset")
    dropout: float = setting(0.25, "dropout before the classifier")
    label_smoothing: float = setting(0.1, "label smoothing of the BCE targets")
    class_weights: bool = setting(True, "weight positives by the class balance")
    freeze_epochs: int = setting(0, "epochs of linear probing (frozen backbone) before full fine-tuning")
    patience: int = setting(5, "epochs without validation improvement before stopping")
    monitor: str = setting("auroc", "validation metric (study level) for early stopping: auroc or loss")
    steps_per_epoch: int = setting(0, "batches per epoch drawn with replacement from the labelled videos "
                                      "(0: one pass over them)")
    val_clips: int = setting(2, "clips per video in the per-epoch validation")
    eval_clips: int = setting(4, "clips per video in the final evaluation")
    n_resamples: int = setting(2000, "bootstrap resamples for the 95% CIs")
    evaluate_test: bool = setting(True, "evaluate the best weights on the test split at the end")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.label_fraction <= 1:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        if self.monitor not in ("auroc", "loss"):
            raise ValueError(f"monitor must be 'auroc' or 'loss', got {self.monitor!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("patience", "val_clips", "eval_clips"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps_per_epoch < 0:
            raise ValueError(f"steps_per_epoch must be >= 0, got {self.steps_per_epoch}")

    @property
    def normalization(self) -> str:
        return "kinetics" if self.init == "kinetics" else "minmax"


def pretrain_run_id(init: str) -> str | None:
    """The pretraining run of an ``--init runs:/<id>``; None for ``random``, ``kinetics`` or a file."""
    return init[len("runs:/"):].strip("/").split("/")[0] if init.startswith("runs:/") else None


@contextmanager
def resolve_init(init: str, tracking_uri: str | None) -> Iterator[str]:
    """The init for the model builder, valid inside the ``with`` block.

    ``runs:/<id>`` downloads that pretraining run's ``encoder/encoder.pt`` into a temporary
    folder (removed on leaving the block), checks the SHA-256 recorded beside it and gives
    its path; any other init is given as it is.
    """
    run_id = pretrain_run_id(init)
    if run_id is None:
        yield init
        return
    c = tracking.client(tracking.resolve_tracking_uri(tracking_uri))
    with tempfile.TemporaryDirectory(prefix="echo-init-") as folder:
        try:
            local = c.download_artifacts(run_id, "encoder", folder)
        except Exception as e:
            raise ValueError(f"--init {init}: the run has no encoder artifact ({e})") from None
        weights = Path(local) / "encoder.pt"
        meta = json.loads((Path(local) / "encoder.json").read_text())
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        if digest != meta["sha256"]:
            raise ValueError(f"--init {init}: encoder.pt SHA-256 {digest[:12]} does not match encoder.json")
        yield str(weights)


def resample_rows(rows: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """``n`` rows drawn from ``rows`` with replacement (seeded): a fixed number of optimiser
    steps whatever the number of labelled videos."""
    pick = np.random.default_rng([seed, len(rows), n]).integers(0, len(rows), size=n)
    return rows.iloc[pick].reset_index(drop=True)


def training_rows(manifest, label_fraction: float, subset_seed: int) -> tuple[pd.DataFrame, list[str]]:
    """The training rows of a label fraction (patient-level, stratified, nested) and its patients."""
    train = manifest.split("train")
    patients = label_fraction_patients(train, label_fraction, subset_seed)
    return train[train["patient_id"].isin(set(patients))].reset_index(drop=True), patients


def _build_model(cfg: FinetuneConfig, tracking_uri: str | None):
    with resolve_init(cfg.init, tracking_uri) as init:
        backbone_init = init if init in ("random", "kinetics") else "random"
        model = ASClassifier(cfg.backbone, dropout=cfg.dropout, normalization=cfg.normalization, init=backbone_init)
        if backbone_init == "random" and init != "random":
            model.load_encoder(init)
    return model


def _validate(model, val: pd.DataFrame, cfg: FinetuneConfig, session: Session) -> dict[str, float]:
    pre = Preprocessing(cfg.clip_len, cfg.val_clips, cfg.stride)
    videos = predict_videos(model, val, pre, session.device, batch_size=8, workers=min(cfg.loader_workers, 1),
                            rank=session.rank, world_size=session.world_size)
    studies = study_predictions(videos)
    p = studies["probability"].clip(1e-6, 1 - 1e-6).to_numpy()
    y = studies["label"].to_numpy()
    loss = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    return {"val_loss": loss, "val_auroc": float(auroc(y, p))}


def check_splits(manifest: Manifest, train: pd.DataFrame, evaluate_test: bool) -> None:
    """Refuse, before any training, a data set whose final evaluation would fail.

    The training rows (of the label fraction) need both classes; the validation split (and the
    test split when it is evaluated) needs :data:`~echo.evaluation.metrics.MIN_CASES_PER_CLASS`
    severe and as many non-severe studies, for the AUROC's DeLong interval. The error names the
    manifest, the split and its counts.
    """
    if train["label"].nunique() < 2:
        raise ValueError(f"manifest {manifest.uri}: the train split (label fraction) needs both severe and "
                         "non-severe videos")
    need = MIN_CASES_PER_CLASS
    for split in ("val", "test") if evaluate_test else ("val",):
        studies = manifest.split(split).groupby("study_id")["label"].max()
        severe, other = int((studies == 1).sum()), int((studies == 0).sum())
        if severe < need or other < need:
            raise ValueError(
                f"manifest {manifest.uri}: the {split} split has {severe} severe and {other} non-severe "
                f"studies; the final evaluation (AUROC with DeLong's 95% CI) needs at least {need} of each. "
                f"Move studies into {split}" + ("" if split == "val" else ", or pass --no-evaluate-test")
            )


def finetune_loop(config: dict[str, Any], session: Session | None = None,
                  decoded: dict[str, np.ndarray] | None = None) -> None:
    """The per-worker (or per-trial) loop. ``config``: a ``FinetuneConfig`` and its run
    (``echo.train.settings.loop_config``); ``decoded`` as in ``echo.train.pretrain.pretrain_loop``
    (a shared store of decoded videos)."""
    cfg, run = from_loop_config(FinetuneConfig, config)
    session = session or RayTrainSession()
    device = session.device
    torch.manual_seed(cfg.seed)
    manifest = job_manifest(cfg)
    train, _ = training_rows(manifest, cfg.label_fraction, cfg.subset_seed)
    if cfg.steps_per_epoch:
        train = resample_rows(train, cfg.steps_per_epoch * cfg.batch_size * session.world_size, cfg.seed)
    val_rows = manifest.split("val")
    core = _build_model(cfg, run.tracking_uri)
    model = session.wrap_model(core)
    n_pos = float((train["label"] == 1).sum())
    pos_weight = torch.tensor((len(train) - n_pos) / max(n_pos, 1.0)) if cfg.class_weights else torch.tensor(1.0)
    dataset = LabelledClipDataset(train, clip_len=cfg.clip_len, stride=cfg.stride, seed=cfg.seed, augment=True,
                                  max_object_bytes=manifest.max_object_bytes)
    if cfg.cache_decoded_mb:
        progress(dataset.cache_decoded(cfg.cache_decoded_mb * 2**20, decoded).describe(cfg.cache_decoded_mb))
    loader = VideoLoader(
        dataset,
        batch_size=cfg.batch_size, num_workers=cfg.loader_workers, rank=session.rank, world_size=session.world_size,
        seed=cfg.seed, sample_timeout_s=cfg.sample_timeout_s, drop_last=False,
        max_skipped_fraction=cfg.max_skipped_fraction,
    )
    optimizer, scheduler = build_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.epochs,
                                           cfg.warmup_epochs, cfg.schedule)
    start_epoch, step, state = resume_state(session.latest_state(), core, optimizer, scheduler)
    best = state["best"] if state else {"metric": None, "epoch": 0, "model": copy.deepcopy(core.state_dict()), "bad": 0}
    skips = SkipReport()
    logger = rank0_logger(session, run.tracking_uri, run.run_id, key="val_auroc")
    use_amp = cfg.amp and device.type == "cuda"
    sign = 1.0 if cfg.monitor == "auroc" else -1.0
    if state is not None and (start_epoch >= cfg.epochs or best["bad"] >= cfg.patience):
        # Restored after it had finished (e.g. a resumed search): report its result again, train nothing.
        session.report(state["metrics"], None)
        return

    for epoch in range(start_epoch, cfg.epochs):
        if best["bad"] >= cfg.patience:
            break
        frozen = epoch < cfg.freeze_epochs
        core.freeze_backbone(frozen)
        loader.set_epoch(epoch)
        model.train()
        if frozen:
            core.backbone.eval()  # linear probe: batch-norm statistics stay as pretrained
        sums = np.zeros(2)  # loss sum, samples
        for batch in lockstep(loader, device):
            clips = batch["clip"].to(device, non_blocking=True)
            target = batch["label"].to(device).float() * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(clips).float()
            loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight.to(device))
            optimizer_step(model, optimizer, loss, cfg.grad_clip)
            step += 1
            sums += [loss.item() * len(clips), len(clips)]
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        loss_sum, seen = all_reduce_sum(list(sums), device)
        skipped = skips.epoch(loader.skipped)
        val = _validate(core, val_rows, cfg, session)
        current = val["val_auroc"] if cfg.monitor == "auroc" else val["val_loss"]
        if best["metric"] is None or sign * current > sign * best["metric"]:
            best = {"metric": current, "epoch": epoch + 1, "model": copy.deepcopy(core.state_dict()), "bad": 0}
        else:
            best["bad"] += 1
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1.0),
            **val,
            f"best_val_{cfg.monitor}": best["metric"],
            "best_epoch": best["epoch"],
            "lr": lr,
            "skipped_videos": skipped,
        }
        # Every epoch is checkpointed: the best weights live in the checkpoint.
        state_out = (training_state(core, optimizer, scheduler, epoch + 1, step, cfg, best=best, metrics=metrics)
                     if session.rank == 0 else None)
        session.report(metrics, state_out)
        logger.log(metrics, epoch + 1)
        progress(
            f"finetune epoch {epoch + 1}/{cfg.epochs}  train loss {metrics['train_loss']:.4f}  "
            f"val loss {val['val_loss']:.4f}  val AUROC {val['val_auroc']:.3f}  best {best['metric']:.3f} "
            f"(epoch {best['epoch']})" + ("  [frozen backbone]" if frozen else "") + (f"  skipped {int(skipped)} video(s)" if skipped else "")
        )


def label_subset_record(label_fraction: float, subset_seed: int, patients: Sequence[str]) -> dict[str, Any]:
    """What ``label_subset.json`` holds: the patients a run trained on, as HMAC-SHA256 of their
    manifest IDs (``echo.data.ids``, kind ``patient``) under ``$ECHO_SSL_ID_KEY``, so that whoever
    holds the key can check whether a patient was used and nobody else can (a salt stored beside
    plain SHA-256 hashes let anyone hash candidate MRNs). Without a key the hashes are under a
    random key that is discarded: they count the patients and link to nothing, and a warning says so.
    """
    key = env_id_key()
    if key is None:
        log.warning("%s is not set: label_subset.json records the training patients under a random key that is "
                    "discarded (they can be counted, not checked); set it to make the record verifiable", ID_KEY_ENV)
    return {"label_fraction": label_fraction, "subset_seed": subset_seed, "n_patients": len(patients),
            "hash": "hmac-sha256 of 'patient:<patient_id>', 32 hex digits",
            "key": f"${ID_KEY_ENV}" if key else "random, discarded",
            "patient_hashes": pseudonyms(patients, "patient", key)}


def finalize(model, cfg: FinetuneConfig, run: RunState, manifest, device: torch.device, best_epoch: int,
             out_dir: str | None = None) -> dict[str, float]:
    """Evaluate the best weights and record them in the MLflow run ``run``.

    Thresholds come from the validation split; the test split (when ``cfg.evaluate_test``)
    is evaluated once. Logs metrics with CIs, plots, predictions, the subset's keyed patient
    hashes (``label_subset_record``), and the model bundle. The files are also kept in ``out_dir`` when given (else
    written to a temporary folder, removed once logged). Returns the metrics.
    """
    if out_dir:
        return _finalize_in(Path(out_dir), model, cfg, run, manifest, device, best_epoch)
    with tempfile.TemporaryDirectory(prefix="echo-eval-") as folder:
        return _finalize_in(Path(folder), model, cfg, run, manifest, device, best_epoch)


def _finalize_in(folder: Path, model, cfg: FinetuneConfig, run: RunState, manifest, device: torch.device,
                 best_epoch: int) -> dict[str, float]:
    # Here, not at the top: MLflow's import costs seconds in every Ray worker that imports this module.
    import mlflow

    from echo.serve.pyfunc import log_model_bundle

    tracking_uri = run.tracking_uri
    model = model.to(device).eval()
    # The bundle's preprocessing (frame size: the first validation video's), used for the metrics too.
    first = manifest.split("val")["video_uri"].iloc[0]
    info = probe(storage.read_bytes(first), first)
    pre = Preprocessing(cfg.clip_len, cfg.eval_clips, cfg.stride, frame_size=(info.height, info.width))

    def videos_of(split: str) -> pd.DataFrame:
        return predict_videos(model, manifest.split(split), pre, device, batch_size=8,
                              workers=min(cfg.loader_workers, 1))

    val_videos = videos_of("val")
    thresholds = choose_thresholds(study_predictions(val_videos))
    # "val_final_*": the final weights on all evaluation clips ("val_auroc" is the per-epoch metric).
    report = split_report(val_videos, thresholds, cfg.seed, cfg.n_resamples, prefix="val_final")
    train, patients = training_rows(manifest, cfg.label_fraction, cfg.subset_seed)
    report["n_train_studies"] = float(train["study_id"].nunique())
    report["n_train_videos"] = float(len(train))
    report["best_epoch"] = float(best_epoch)
    files = []
    if cfg.evaluate_test:
        test_videos = videos_of("test")
        report.update(split_report(test_videos, thresholds, cfg.seed, cfg.n_resamples, prefix="test"))
        files = write_evaluation(test_videos, val_videos, thresholds, report, folder / "evaluation", "test",
                                 cfg.seed, cfg.n_resamples)
        progress(f"test {summary_line(report)}")
    subset = folder / "label_subset.json"
    subset.write_text(json.dumps(label_subset_record(cfg.label_fraction, cfg.subset_seed, patients), indent=1))
    files.append(subset)
    log_evaluation(tracking_uri, run.run_id, report, files)
    meta = BundleMeta(
        preprocessing=pre, threshold=min(1.0, thresholds.youden), threshold_sens90=min(1.0, thresholds.sens90),
        label_fraction=cfg.label_fraction, subset_seed=cfg.subset_seed, init=cfg.init,
        pretrain_run_id=pretrain_run_id(cfg.init), run_id=run.run_id, manifest_sha256=manifest.sha256,
        val_auroc=report["val_final_auroc"], n_train_studies=int(report["n_train_studies"]),
        n_train_videos=int(report["n_train_videos"]),
        **{k: report[k] for k in ("test_auroc", "test_auroc_ci_low", "test_auroc_ci_high", "test_auroc_delong_ci_low",
                                  "test_auroc_delong_ci_high", "test_auroc_delong_se") if k in report},
    )
    bundle = save_bundle(model.cpu(), meta, str(folder / "bundle"))
    mlflow.set_tracking_uri(tracking_uri)
    # The fluent API refuses a run of another experiment than the process's active one.
    mlflow.set_experiment(experiment_id=tracking.client(tracking_uri).get_run(run.run_id).info.experiment_id)
    with mlflow.start_run(run_id=run.run_id):
        log_model_bundle(bundle)
    return report


def finalize_checkpoint(checkpoint, run: RunState, overrides: dict[str, Any] | None = None) -> dict[str, float]:
    """``finalize`` the best weights held in a fine-tuning checkpoint (a Ray ``Checkpoint``) into ``run``.

    The config comes from the checkpoint; ``overrides`` replaces fields of it (``evaluate_test``).
    Runs in the calling process, on CPU.
    """
    with checkpoint.as_directory() as folder:
        state = load_state(folder)
    cfg = FinetuneConfig(**{**json.loads(state["config"]), **(overrides or {})})
    model = ASClassifier(cfg.backbone, dropout=cfg.dropout, normalization=cfg.normalization)
    model.load_state_dict(state["best"]["model"])
    return finalize(model, cfg, run, job_manifest(cfg), torch.device("cpu"), state["best"]["epoch"])


def run_finetune(cfg: FinetuneConfig, ray_opts: RayOptions, resume: bool = False,
                 ray_address: str | None = None) -> str:
    """Validate, create (or find, with ``resume``) the MLflow run, train on Ray, evaluate the best
    weights; return the run ID. A split the final evaluation needs but cannot score stops it
    here, before training (see :func:`check_splits`)."""
    cfg = dataclasses.replace(cfg, manifest=absolute_uri(cfg.manifest))
    manifest = job_manifest(cfg)
    train, _ = training_rows(manifest, cfg.label_fraction, cfg.subset_seed)
    check_splits(manifest, train, cfg.evaluate_test)
    n_studies = int(train["study_id"].nunique())
    run = open_tracked_run(cfg, ray_opts, resume, "finetune", f"finetune-{cfg.label_fraction:g}", manifest.sha256,
                           tags={"echo.label_fraction": f"{cfg.label_fraction:g}", "echo.init": cfg.init},
                           params={"n_train_studies": n_studies})
    progress(f"fine-tuning {cfg.backbone} from {cfg.init} on {n_studies} training studies "
             f"({cfg.label_fraction:g} of labels); MLflow run {run.run_id}")
    fit_tracked(finetune_loop, cfg, run, ray_opts, ray_address,
                then=lambda result: finalize_checkpoint(result.checkpoint, run))
    print(f"fine-tuning finished; MLflow run {run.run_id} (model runs:/{run.run_id}/model)", flush=True)
    return run.run_id
