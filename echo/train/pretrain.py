"""Self-supervised pretraining (SimCLR, MI-SimCLR, EchoCLR) as a DDP loop on Ray Train.

``run_pretrain(config)`` is the job (CLI ``echo-ssl pretrain`` and ``jobs/pretrain.py``):
it validates the manifest, creates or finds the MLflow run, and launches
``pretrain_loop`` on Ray Train workers. Each worker streams SSL pairs from storage (or from a decoded-frame cache), computes
NT-Xent over the global batch (embeddings gathered with gradients), plus frame-order
cross-entropy for EchoCLR, and reports once per epoch; rank 0 writes checkpoints and MLflow,
and at each probe epoch measures on the validation patients whether the objective was learned
(``echo.evaluation.gates``: same-patient retrieval, frame order, valve-severity probe).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from echo import tracking
from echo.data.dataset import SSL_METHODS, SSLClipDataset
from echo.data.loader import VideoLoader
from echo.data.manifest import absolute_uri
from echo.evaluation.evaluate import embed_videos
from echo.evaluation.gates import gate_metrics, gate_summary
from echo.evaluation.metrics import aggregate_by_group, auroc
from echo.model.networks import SSLModel
from echo.train.checkpoint import checkpoint_due, resume_state, training_state
from echo.train.distributed import all_reduce_sum, lockstep
from echo.train.launch import RayOptions, fit_tracked, open_tracked_run
from echo.train.losses import NTXentLoss, frame_order_loss
from echo.train.optim import build_optimizer, optimizer_step
from echo.train.session import RayTrainSession, Session, SkipReport, progress, rank0_logger
from echo.train.settings import (
    RunState,
    TrainConfig,
    from_loop_config,
    job_manifest,
    loop_config,
    setting,
    with_default,
)

__all__ = ["PretrainConfig", "pretrain_loop", "run_pretrain"]

log = logging.getLogger(__name__)

@dataclass
class PretrainConfig(TrainConfig):
    """Every setting of a pretraining run; defaults are the published ones (method.md)."""

    epochs: int = with_default(TrainConfig, "epochs", 300)
    batch_size: int = with_default(TrainConfig, "batch_size", 196, "clip pairs per worker per step")
    clip_len: int = with_default(TrainConfig, "clip_len", 4)
    lr: float = with_default(TrainConfig, "lr", 0.1)
    experiment: str = with_default(TrainConfig, "experiment", "echo-ssl-pretrain")
    method: str = setting("echoclr", f"one of {', '.join(SSL_METHODS)}")
    backbone_init: str = setting("random", "random, kinetics, or a state-dict file (local or s3://)")
    splits: list[str] = setting(help="manifest splits to pretrain on", factory=lambda: ["unlabeled", "train"])
    temperature: float = setting(0.05, "NT-Xent temperature")
    order_weight: float = setting(1.0, "weight of the frame-order loss (echoclr)")
    checkpoint_every: int = setting(1, "epochs between checkpoints")
    probe_every: int = setting(5, "epochs between linear-probe AUROCs and gates on val (0: never)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in SSL_METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(SSL_METHODS)}")
        if isinstance(self.splits, str):
            self.splits = [s.strip() for s in self.splits.split(",") if s.strip()]
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def _probe_auc(model: torch.nn.Module, manifest, cfg: PretrainConfig, device: torch.device) -> float | None:
    """Representation quality: logistic regression on frozen embeddings of train, AUROC on val.

    One centred clip per video; study-level AUROC (mean probability over a study's videos).
    ``None`` when the manifest has no labelled train and val videos of both classes.
    """
    train, val = manifest.split("train"), manifest.split("val")
    if train["label"].nunique() < 2 or val["label"].nunique() < 2:
        return None
    train = train.sample(n=min(len(train), 2000), random_state=cfg.seed) if len(train) > 2000 else train
    xtr = embed_videos(model, train, cfg.clip_len, device)
    xva = embed_videos(model, val, cfg.clip_len, device)
    # Standardised: a random encoder's features are ~1e-3 in scale and would leave the probe at 0.5.
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=2000, C=1.0, class_weight="balanced").fit(scaler.transform(xtr),
                                                                               train["label"].to_numpy())
    prob = clf.predict_proba(scaler.transform(xva))[:, 1]
    studies, p = aggregate_by_group(val["study_id"].to_numpy(), prob)
    _, y = aggregate_by_group(val["study_id"].to_numpy(), val["label"].to_numpy())
    return float(auroc(y, p))


def pretrain_loop(config: dict[str, Any], session: Session | None = None,
                  decoded: dict[str, np.ndarray] | None = None) -> None:
    """The per-worker loop. ``config``: a ``PretrainConfig`` and its run (``echo.train.settings.loop_config``);
    ``decoded``, for in-process callers running several jobs on the same videos, is a store of
    decoded videos shared by their decoded-frame caches (``ClipDataset.cache_decoded``)."""
    cfg, run = from_loop_config(PretrainConfig, config)
    session = session or RayTrainSession()
    device = session.device
    torch.manual_seed(cfg.seed)
    manifest = job_manifest(cfg)
    rows = manifest.split(*cfg.splits)
    dataset = SSLClipDataset(rows, method=cfg.method, clip_len=cfg.clip_len, stride=cfg.stride, seed=cfg.seed,
                             cache_bytes=cfg.cache_mb * 2**20, max_object_bytes=manifest.max_object_bytes)
    cache_metrics: dict[str, float] = {}
    if cfg.cache_decoded_mb:
        stats = dataset.cache_decoded(cfg.cache_decoded_mb * 2**20, decoded)
        progress(stats.describe(cfg.cache_decoded_mb) + (
            f"; each of the {cfg.loader_workers} loader processes holds a copy" if cfg.loader_workers else ""))
        cache_metrics = {"decoded_cache_videos": float(stats.cached), "decoded_cache_fraction": stats.cached / stats.total,
                         "decoded_cache_mb": stats.nbytes / 2**20}
    loader = VideoLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.loader_workers, rank=session.rank,
                         world_size=session.world_size, seed=cfg.seed, sample_timeout_s=cfg.sample_timeout_s,
                         drop_last=True, max_skipped_fraction=cfg.max_skipped_fraction)
    frame_order = cfg.method == "echoclr"
    core = SSLModel(cfg.backbone, cfg.clip_len, frame_order=frame_order, init=cfg.backbone_init)
    use_amp = cfg.amp and device.type == "cuda"
    if use_amp:
        core = core.to(memory_format=torch.channels_last_3d)
    model = session.wrap_model(core)
    optimizer, scheduler = build_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.epochs,
                                           cfg.warmup_epochs, cfg.schedule)
    criterion = NTXentLoss(temperature=cfg.temperature)
    start_epoch, step, _ = resume_state(session.latest_state(), core, optimizer, scheduler)
    logger = rank0_logger(session, run.tracking_uri, run.run_id, key="loss")
    skips = SkipReport()
    if start_epoch:
        progress(f"resuming at epoch {start_epoch + 1}/{cfg.epochs} (step {step})")
        logger.log({"resumed_at_epoch": start_epoch}, start_epoch, once_key="resumed_at_epoch")

    for epoch in range(start_epoch, cfg.epochs):
        loader.set_epoch(epoch)
        model.train()
        sums = np.zeros(5)  # loss, contrastive acc, order acc, clips, batches
        wait_s = 0.0
        started = time.perf_counter()
        mark = started
        for batch in lockstep(loader, device):
            wait_s += time.perf_counter() - mark
            v1 = batch["view1"].to(device, non_blocking=True)
            v2 = batch["view2"].to(device, non_blocking=True)
            if use_amp:
                v1 = v1.contiguous(memory_format=torch.channels_last_3d)
                v2 = v2.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = model(torch.cat([v1, v2]))
            z1, z2 = out["projection"].float().chunk(2)
            loss, acc = criterion(z1, z2)
            order_acc = torch.tensor(0.0)
            if frame_order:
                target = torch.cat([batch["order1"], batch["order2"]]).to(device)
                logits = out["order_logits"].float()
                loss = loss + cfg.order_weight * frame_order_loss(logits, target)
                order_acc = (logits.argmax(1) == target).float().mean().detach()
            optimizer_step(model, optimizer, loss, cfg.grad_clip)
            step += 1
            sums += [loss.item(), float(acc), float(order_acc), 2 * len(v1), 1]
            mark = time.perf_counter()
        elapsed = time.perf_counter() - started
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        loss_sum, acc_sum, order_sum, clips, batches, wait_total, elapsed_max = all_reduce_sum(
            [*sums, wait_s, elapsed], device
        )
        skipped = skips.epoch(loader.skipped)
        batches = max(batches, 1.0)
        metrics = {
            "epoch": epoch + 1,
            "loss": loss_sum / batches,
            "contrastive_top1": acc_sum / batches,
            "lr": lr,
            "clips_per_s": clips / max(elapsed, 1e-9),
            "data_wait_fraction": wait_total / max(elapsed_max, 1e-9),
            "skipped_videos": skipped,
            "steps": float(step),
        }
        if frame_order:
            metrics["frame_order_top1"] = order_sum / batches
        if epoch == start_epoch:
            metrics.update(cache_metrics)
        gate_line = ""
        if session.rank == 0 and cfg.probe_every and ((epoch + 1) % cfg.probe_every == 0 or epoch + 1 == cfg.epochs):
            probe = _probe_auc(core, manifest, cfg, device)
            if probe is not None:
                metrics["probe_val_auroc"] = probe
            val = manifest.split("val")
            if len(val):
                gates = gate_metrics(core, val, cfg.clip_len, device, stride=cfg.stride)
                metrics.update({f"gate_{k}": v for k, v in gates.items() if np.isfinite(v)})
                gate_line = "  " + gate_summary(gates)
        state = None
        if session.rank == 0 and checkpoint_due(epoch, cfg.epochs, cfg.checkpoint_every):
            state = training_state(core, optimizer, scheduler, epoch + 1, step, cfg)
        session.report(metrics, state)
        logger.log(metrics, epoch + 1)
        progress(
            f"pretrain epoch {epoch + 1}/{cfg.epochs}  loss {metrics['loss']:.4f}  top1 {metrics['contrastive_top1']:.3f}"
            + (f"  order {metrics['frame_order_top1']:.3f}" if frame_order else "")
            + (f"  probe AUROC {metrics['probe_val_auroc']:.3f}" if "probe_val_auroc" in metrics else "")
            + gate_line
            + f"  {metrics['clips_per_s']:.0f} clips/s  data wait {100 * metrics['data_wait_fraction']:.0f}%"
            + (f"  skipped {int(skipped)} video(s)" if skipped else "")
        )
    if session.rank == 0 and run.run_id:
        _log_encoder(core, cfg, run)


ENCODER_ARTIFACT = "encoder"


def _log_encoder(model, cfg: PretrainConfig, run: RunState) -> None:
    """Log the encoder (backbone) as a state dict plus a JSON description, under ``encoder/``."""
    with tempfile.TemporaryDirectory() as folder:
        buf = io.BytesIO()
        torch.save(model.encoder_state_dict(), buf)
        data = buf.getvalue()
        (Path(folder) / "encoder.pt").write_bytes(data)
        meta = {
            "backbone": cfg.backbone,
            "method": cfg.method,
            "clip_len": cfg.clip_len,
            "epochs": cfg.epochs,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        (Path(folder) / "encoder.json").write_text(json.dumps(meta, indent=2))
        tracking.client(run.tracking_uri).log_artifacts(run.run_id, folder, ENCODER_ARTIFACT)


def run_pretrain(cfg: PretrainConfig, ray_opts: RayOptions, resume: bool = False, ray_address: str | None = None) -> str:
    """Validate, create (or, with ``resume``, find) the MLflow run, train on Ray; return the run ID."""
    cfg = dataclasses.replace(cfg, manifest=absolute_uri(cfg.manifest))
    manifest = job_manifest(cfg)  # fails fast, before any worker starts
    rows = manifest.split(*cfg.splits)
    if len(rows) < cfg.batch_size * ray_opts.workers:
        raise ValueError(
            f"manifest {cfg.manifest} has {len(rows)} videos in splits {cfg.splits}: fewer than one global batch "
            f"({cfg.batch_size} x {ray_opts.workers} workers); lower --batch-size"
        )
    run = open_tracked_run(cfg, ray_opts, resume, "pretrain", f"pretrain-{cfg.method}", manifest.sha256)
    progress(f"pretraining {cfg.method} on {len(rows)} videos with {ray_opts.workers} worker(s); MLflow run {run.run_id}")
    fit_tracked(pretrain_loop, cfg, run, ray_opts, ray_address)
    print(f"pretraining finished; MLflow run {run.run_id} (fine-tune with --init runs:/{run.run_id})", flush=True)
    return run.run_id
