"""Running a training loop: on Ray Train (DDP), inside a Ray Tune trial, or in-process.

A loop talks to a ``Session`` only: who am I (rank, world size, device), the checkpoint to
resume from, and ``report(metrics, checkpoint_dir)`` once per epoch on every rank (Ray Train
requires the same number of reports from every worker; only rank 0 attaches a checkpoint).
``fit_on_ray`` builds the ``TorchTrainer`` with explicit failure handling and a collective
timeout, so a dead worker restarts the group from the latest checkpoint instead of leaving
the others blocked.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from echo import checkpoint as ckpt

__all__ = [
    "Session",
    "RayTrainSession",
    "TuneSession",
    "LocalSession",
    "RayOptions",
    "fit_on_ray",
    "storage_for",
    "lockstep",
    "all_reduce_sum",
    "build_optimizer",
    "is_rank0",
    "progress",
    "timer",
    "checkpoint_due",
    "new_run_name",
    "resume_state",
    "training_state",
    "optimizer_step",
    "rank0_logger",
    "open_tracked_run",
    "fit_tracked",
]

log = logging.getLogger(__name__)


class Session:
    """What a training loop needs from whoever runs it."""

    rank: int = 0
    world_size: int = 1

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def latest_state(self) -> dict[str, Any] | None:
        """The state saved in the checkpoint to resume from, or ``None`` for a fresh start."""
        raise NotImplementedError

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        """Report one epoch; ``state`` (rank 0 only) becomes the next checkpoint."""
        raise NotImplementedError

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)


def _load_checkpoint(checkpoint) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return ckpt.load_state(folder)


class RayTrainSession(Session):
    """Inside a ``TorchTrainer`` worker."""

    def __init__(self) -> None:
        import ray.train

        try:  # Train logs every report at INFO under its file's path; one progress line per epoch is ours
            from ray.train.v2._internal.execution import context as train_context

            logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
        except ImportError:
            pass

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()

    @property
    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def latest_state(self) -> dict[str, Any] | None:
        import ray.train

        return _load_checkpoint(ray.train.get_checkpoint())

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        import ray.train

        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="echo-ckpt-") as folder:
            ckpt.save_state(folder, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)


class TuneSession(Session):
    """Inside a Ray Tune function trainable (one process, no DDP)."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def latest_state(self) -> dict[str, Any] | None:
        import ray.tune

        return _load_checkpoint(ray.tune.get_checkpoint())

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        import ray.tune

        if state is None:
            ray.tune.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="echo-ckpt-") as folder:
            ckpt.save_state(folder, state)
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))


class LocalSession(Session):
    """In-process, single rank, checkpoints in a local folder (tests, debugging)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.reports: list[dict[str, float]] = []

    def latest_state(self) -> dict[str, Any] | None:
        return ckpt.load_state(self.folder) if (self.folder / ckpt.STATE_FILE).exists() else None

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        self.reports.append(dict(metrics))
        if state is not None:
            ckpt.save_state(self.folder, state)


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def progress(message: str) -> None:
    """One line of progress, from rank 0 only.

    Written to stdout directly: Ray Train replaces ``print`` in its workers with a logger,
    whose level and handlers would drop or double the line.
    """
    if is_rank0():
        sys.stdout.write(message + "\n")
        sys.stdout.flush()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum ``values`` over all ranks (identity without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def lockstep(batches: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """Yield batches while every rank still has one.

    Skipped videos can leave ranks with different batch counts; DDP needs every rank to
    take the same number of steps, so each step first agrees (one tiny all-reduce) that all
    ranks have a batch. Time spent waiting for data is in ``lockstep.wait_s`` of the iterator.
    """
    it = iter(batches)
    while True:
        try:
            batch = next(it)
            have = 1.0
        except StopIteration:
            batch, have = None, 0.0
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([have], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            have = float(flag.item())
        if have == 0.0:
            # Drain so that loader workers finish their shard cleanly.
            if batch is not None:
                for _ in it:
                    pass
            return
        yield batch


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str,
    lr: float,
    weight_decay: float,
    epochs: int,
    warmup_epochs: int,
    schedule: str,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Optimizer (``adam`` as published, ``adamw`` or ``sgd``) and a per-epoch schedule.

    ``schedule`` is ``constant`` or ``cosine``; both start with ``warmup_epochs`` of linear
    warm-up. The scheduler steps once per epoch, so resuming at epoch k continues it exactly.
    """
    params = [p for p in params if p.requires_grad]
    if name == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif name == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    elif name == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    else:
        raise ValueError(f"unknown optimizer {name!r} (adam, adamw, sgd)")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r} (constant, cosine)")

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return (epoch + 1) / (warmup_epochs + 1)
        if schedule == "constant":
            return 1.0
        span = max(1, epochs - warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (epoch - warmup_epochs) / span)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def storage_for(uri: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray's ``RunConfig``.

    Local folders become absolute paths. ``s3://`` URIs get a pyarrow ``S3FileSystem`` that
    honours ``AWS_ENDPOINT_URL`` / ``ECHO_SSL_S3_ENDPOINT`` (S3-compatible stores) with
    retries for transient errors.
    """
    if not uri.startswith("s3://"):
        return str(Path(uri).resolve()), None
    import pyarrow.fs as pafs

    endpoint = os.environ.get("ECHO_SSL_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {
        "region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=10),
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host, scheme=scheme)
    return uri[len("s3://"):].rstrip("/"), pafs.S3FileSystem(**kwargs)


@dataclass
class RayOptions:
    """How a job runs on Ray Train."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    storage: str = "./runs"
    run_name: str = "echo-run"
    max_failures: int = 2
    collective_timeout_s: int = 300
    num_to_keep: int = 2


def fit_on_ray(loop: Callable[[dict], None], config: dict[str, Any], opts: RayOptions):
    """Run ``loop(config)`` on ``opts.workers`` Ray Train workers and return the ``Result``.

    Re-running with the same ``run_name`` and ``storage`` resumes the run from its latest
    checkpoint (Ray Train V2 semantics).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = opts.gpus_per_worker > 0
    resources: dict[str, float] = {"CPU": opts.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = opts.gpus_per_worker
    storage_path, filesystem = storage_for(opts.storage)
    trainer = TorchTrainer(
        train_loop_per_worker=loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=opts.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=opts.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=opts.run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=opts.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=opts.num_to_keep),
            logging_config=LoggingConfig(log_level="WARNING"),  # our own one line per epoch suffices
        ),
    )
    started = time.monotonic()
    result = trainer.fit()
    log.info("run %s finished in %.0f s", opts.run_name, time.monotonic() - started)
    return result


@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    """``with timer() as t: ...`` then ``t[0]`` holds the elapsed seconds."""
    box = [0.0]
    start = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - start


def checkpoint_due(epoch: int, epochs: int, every: int) -> bool:
    """Whether the 0-based ``epoch`` ends with a checkpoint (every ``every`` epochs, and the last)."""
    return (epoch + 1) % every == 0 or epoch + 1 == epochs


def new_run_name(prefix: str) -> str:
    """A fresh, sortable run name: ``<prefix>-YYYYmmdd-HHMMSS-<4 hex>``."""
    import secrets

    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def resume_state(
    session: Session,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[int, int, dict[str, Any] | None]:
    """Restore the latest checkpoint into the given objects, if there is one.

    Returns ``(completed_epochs, global_step, state)``; ``(0, 0, None)`` for a fresh start.
    """
    state = session.latest_state()
    if state is None:
        return 0, 0, None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    ckpt.set_rng_state(state["rng"])
    return int(state["epoch"]), int(state["step"]), state


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, step: int, config: Any,
                   **extra: Any) -> dict[str, Any]:
    """The checkpoint state that ``resume_state`` restores: weights, optimizer, schedule,
    completed epochs, global step, RNG states and the config (a dataclass, as JSON), plus ``extra``."""
    import dataclasses
    import json

    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "step": step,
        "rng": ckpt.rng_state(),
        "config": json.dumps(dataclasses.asdict(config)),
        **extra,
    }


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                   grad_clip: float) -> None:
    """Backward, optional gradient-norm clipping (``grad_clip`` > 0), and one optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


class _EpochLogger:
    """Writes each epoch's metrics to MLflow once, even when a resumed run repeats an epoch."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, key: str) -> None:
        from echo import tracking

        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.done = tracking.logged_steps(tracking_uri, run_id, key) if run_id else set()

    def log(self, metrics: dict[str, float], step: int, once_key: str | None = None) -> None:
        """Log unless this epoch was logged before; ``once_key`` names a metric with its own record."""
        from echo import tracking

        if once_key:
            tracking.log_metrics(self.tracking_uri, self.run_id, metrics, step)
        elif step not in self.done:
            tracking.log_metrics(self.tracking_uri, self.run_id, metrics, step)
            self.done.add(step)


class _NoLogger:
    def log(self, metrics: dict[str, float], step: int, once_key: str | None = None) -> None:
        pass


def rank0_logger(session: Session, tracking_uri: str | None, run_id: str | None, key: str):
    """An MLflow epoch logger on rank 0 (``key`` is a metric logged every epoch); a no-op elsewhere."""
    if session.rank != 0 or not run_id:
        return _NoLogger()
    return _EpochLogger(tracking_uri, run_id, key)


def open_tracked_run(cfg: Any, ray_opts: RayOptions, resume: bool, job: str, default_name: str,
                     manifest_sha256: str, tags: dict[str, str] | None = None,
                     params: dict[str, Any] | None = None) -> str:
    """Name the run and create its MLflow run (or, with ``resume``, find it); return the run ID.

    ``cfg`` is a job config dataclass with ``tracking_uri``, ``experiment``, ``run_name`` and
    ``mlflow_run_id``; those are filled in, and all of ``cfg``, the Ray options and ``params``
    are logged as the run's parameters. The Ray run name equals the MLflow ``echo.run_name`` tag,
    which is how ``--resume --run-name`` finds both.
    """
    import dataclasses

    from echo import tracking

    cfg.tracking_uri = tracking.resolve_tracking_uri(cfg.tracking_uri)
    if resume and not cfg.run_name:
        raise ValueError("--resume needs --run-name: the name of the run to continue")
    cfg.run_name = cfg.run_name or new_run_name(default_name)
    ray_opts.run_name = cfg.run_name
    run_id = tracking.find_run(cfg.tracking_uri, cfg.experiment, "echo.run_name", cfg.run_name) if resume else None
    if resume and run_id is None:
        raise ValueError(f"--resume: no MLflow run tagged echo.run_name={cfg.run_name} in experiment {cfg.experiment}")
    if run_id is None:
        run_id = tracking.create_run(cfg.tracking_uri, cfg.experiment, cfg.run_name,
                                     tags={"echo.run_name": cfg.run_name, "echo.job": job,
                                           "echo.manifest_sha256": manifest_sha256, **(tags or {})})
    cfg.mlflow_run_id = run_id
    logged = dataclasses.asdict(cfg)
    logged.update(workers=ray_opts.workers, gpus_per_worker=ray_opts.gpus_per_worker, storage=ray_opts.storage,
                  manifest_sha256=manifest_sha256, **(params or {}))
    tracking.log_params(cfg.tracking_uri, run_id, logged)
    return run_id


def fit_tracked(loop: Callable[[dict], None], cfg: Any, ray_opts: RayOptions, ray_address: str | None,
                then: Callable[[Any], None] | None = None):
    """``fit_on_ray`` (then ``then(result)``) with the MLflow run marked FINISHED or FAILED."""
    import dataclasses

    from echo import tracking
    from echo.raycluster import connect

    connect(ray_address)
    try:
        result = fit_on_ray(loop, dataclasses.asdict(cfg), ray_opts)
        if then is not None:
            then(result)
    except Exception:
        tracking.set_terminated(cfg.tracking_uri, cfg.mlflow_run_id, "FAILED")
        raise
    tracking.set_terminated(cfg.tracking_uri, cfg.mlflow_run_id)
    return result
