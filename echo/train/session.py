"""Running a training loop: on Ray Train (DDP), inside a Ray Tune trial, or in-process.

A loop talks to a ``Session`` only: who am I (rank, world size, device), the checkpoint to
resume from, and ``report(metrics, checkpoint_dir)`` once per epoch on every rank (Ray Train
requires the same number of reports from every worker; only rank 0 attaches a checkpoint).
Loops stay independent of Ray: ``LocalSession`` runs them in-process.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from echo import tracking
from echo.train import checkpoint as ckpt
from echo.train.distributed import gather_objects, is_rank0

__all__ = ["Session", "RayTrainSession", "TuneSession", "LocalSession", "progress", "rank0_logger", "SkipReport"]

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


def _report(api: Any, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
    """Report through ``api`` (``ray.train`` or ``ray.tune``: the same ``report`` and
    ``Checkpoint``), saving ``state`` as the report's checkpoint when there is one."""
    if state is None:
        api.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="echo-ckpt-") as folder:
        ckpt.save_state(folder, state)
        api.report(metrics, checkpoint=api.Checkpoint.from_directory(folder))


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

        _report(ray.train, metrics, state)

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

        _report(ray.tune, metrics, state)


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


def progress(message: str) -> None:
    """One line of progress, from rank 0 only.

    Written to stdout directly: Ray Train replaces ``print`` in its workers with a logger,
    whose level and handlers would drop or double the line.
    """
    if is_rank0():
        sys.stdout.write(message + "\n")
        sys.stdout.flush()


class _EpochLogger:
    """Writes each epoch's metrics to MLflow once, even when a resumed run repeats an epoch."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, key: str) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.done = tracking.logged_steps(tracking_uri, run_id, key) if run_id else set()

    def log(self, metrics: dict[str, float], step: int, once_key: str | None = None) -> None:
        """Log unless this epoch was logged before; ``once_key`` names a metric with its own record."""
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


class SkipReport:
    """The videos a job skipped: each named once per job, on rank 0, and counted per epoch.

    A video can be skipped several times in an epoch (as a row, and as another row's pair
    partner) and on different ranks in different epochs; the count is of distinct videos, and
    the name comes with the first epoch that skips it. Call :meth:`epoch` on every rank (it
    gathers the ranks' skips).
    """

    def __init__(self) -> None:
        self.named: set[str] = set()

    def epoch(self, skips: Any) -> int:
        """``skips``: this rank's ``(uri, reason)`` pairs of the epoch (``VideoLoader.skipped``).
        Returns the number of distinct videos skipped by all ranks."""
        mine = sorted({(str(uri), str(reason)) for uri, reason in skips})
        distinct = dict(pair for part in gather_objects(mine) for pair in part)
        for uri in sorted(distinct.keys() - self.named):
            progress(f"skipped {uri}: {distinct[uri]}")
        self.named.update(distinct)
        return len(distinct)

