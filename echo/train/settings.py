"""The settings every training job shares, and the run state kept apart from them.

A job's config is a dataclass whose every field carries its help text in ``metadata["help"]``:
the ``echo-ssl`` flags and YAML keys (``echo.commands._options``) and the MLflow params are
built from the fields, so a setting is declared once. :class:`TrainConfig` holds what
pretraining and fine-tuning share; each job's subclass adds its own fields and sets its
recipe's defaults with :func:`with_default`.

What a job learns once it starts (the MLflow run, the tracking URI with its credentials moved
to the environment, the run's generated name) is :class:`RunState`, never written into the
user's config. Ray workers and Tune trials receive both as one dict (:func:`loop_config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

from echo.data.roots import DEFAULT_MAX_OBJECT_MB

__all__ = ["OPTIMIZERS", "SCHEDULES", "Flatten", "setting", "with_default", "help_of", "TrainConfig", "RunState",
           "loop_config", "from_loop_config", "job_manifest"]

C = TypeVar("C")

OPTIMIZERS = ("adam", "adamw", "sgd")  # see echo.train.optim.build_optimizer
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class Flatten:
    """How a nested config's fields appear as flags: ``omit`` those the outer config sets itself,
    and give ``defaults`` of their own to others."""

    omit: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
            flatten: Flatten | None = None) -> Any:
    """A dataclass field with its help text; ``factory`` for mutable defaults (lists).

    ``flatten`` (for a field holding another config dataclass): its fields become flags of
    their own, as if declared here (see :class:`Flatten`).
    """
    if not help:
        raise ValueError("every setting needs its help text")
    metadata: dict[str, Any] = {"help": help}
    if flatten is not None:
        metadata["flatten"] = flatten
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


def with_default(cls: type, name: str, default: Any, help: str | None = None) -> Any:
    """Field ``name`` of dataclass ``cls`` with another default (and, optionally, help)."""
    f = cls.__dataclass_fields__[name]  # type: ignore[attr-defined]
    return setting(default, help or f.metadata["help"])


def help_of(f: dataclasses.Field) -> str:
    """The help text of a config field (raises KeyError naming it when missing)."""
    try:
        return f.metadata["help"]
    except KeyError:
        raise KeyError(f"config field {f.name!r} has no help text (declare it with echo.train.settings.setting)") from None


@dataclass
class TrainConfig:
    """What pretraining and fine-tuning share: data, model size, optimisation, loading, tracking."""

    manifest: str = setting(help="manifest URI (CSV/Parquet, local or s3://)")
    backbone: str = setting("r3d_18", "r3d_18, r2plus1d_18, mc3_18 or tiny3d")
    epochs: int = setting(30, "training epochs")
    batch_size: int = setting(88, "clips per worker per step")
    clip_len: int = setting(16, "frames per clip")
    stride: int = setting(1, "frame sampling stride")
    lr: float = setting(1e-4, "peak learning rate")
    optimizer: str = setting("adam", f"one of {', '.join(OPTIMIZERS)}")
    schedule: str = setting("constant", f"learning-rate schedule after warm-up: {' or '.join(SCHEDULES)}")
    warmup_epochs: int = setting(0, "epochs of linear learning-rate warm-up")
    weight_decay: float = setting(0.0, "weight decay")
    grad_clip: float = setting(0.0, "max gradient norm (0: off)")
    seed: int = setting(0, "seed of every random choice (recorded with the run)")
    loader_workers: int = setting(2, "decoding processes per worker")
    sample_timeout_s: float = setting(60.0, "seconds before a hung decode is abandoned and its video skipped")
    max_skipped_fraction: float = setting(0.01, "stop when more than this fraction of an epoch's videos cannot be decoded")
    data_root: list[str] = setting(help="folders or s3://bucket/prefix every video_uri must resolve into (default: "
                                        "the manifest's folder, or its bucket for an s3:// manifest)", factory=list)
    max_object_mb: int = setting(DEFAULT_MAX_OBJECT_MB, "videos larger than this (MiB) are skipped and reported, "
                                                        "never read whole")
    cache_mb: int = setting(0, "in-memory cache of compressed videos per decoding process (MiB)")
    cache_decoded_mb: int = setting(0, "decode the training videos once into memory, up to this many MiB per training "
                                       "worker (each loader process holds a copy: use --loader-workers 0 with it); "
                                       "videos past the budget are streamed (0: off)")
    amp: bool = setting(True, "bf16 autocast and channels_last_3d on CUDA")
    tracking_uri: str | None = setting(None, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                             "sqlite:///mlflow.db in the working folder)")
    experiment: str = setting("echo-ssl", "MLflow experiment")
    run_name: str | None = setting(None, "run name (also the Ray run folder); give it with --resume")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "clip_len", "stride", "max_object_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_epochs", "weight_decay", "grad_clip", "loader_workers", "cache_mb", "cache_decoded_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.sample_timeout_s > 0:
            raise ValueError(f"sample_timeout_s must be > 0, got {self.sample_timeout_s}")
        if not 0 <= self.max_skipped_fraction <= 1:
            raise ValueError(f"max_skipped_fraction must be in [0, 1], got {self.max_skipped_fraction}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")


def job_manifest(cfg: TrainConfig):
    """``cfg.manifest`` read and validated under the config's data roots and object cap
    (``echo.data.manifest.load_manifest``); raises ``ManifestError``."""
    from echo.data.manifest import load_manifest  # here: flags and --help need no pandas

    return load_manifest(cfg.manifest, data_roots=cfg.data_root, max_object_mb=cfg.max_object_mb)


@dataclass(frozen=True)
class RunState:
    """A started job's run: where its MLflow records go. Never part of the user's config.

    ``tracking_uri`` is resolved (``echo.tracking.resolve_tracking_uri``: credentials moved to
    the environment), so it may be written to checkpoints and params. ``run_id`` None: nothing
    is logged (a loop run in-process without MLflow). ``run_name`` is also the Ray run folder.
    """

    tracking_uri: str
    run_id: str | None = None
    run_name: str | None = None


def loop_config(cfg: Any, run: RunState | None) -> dict[str, Any]:
    """What a Ray Train worker or Tune trial receives: ``{"config": ..., "run": ...}``.

    The config's ``tracking_uri`` is replaced by the run's resolved one, so a URI's credentials
    never reach Ray's storage (checkpoints, ``params.json``, ``tuner.pkl``).
    """
    if run is not None:
        cfg = dataclasses.replace(cfg, tracking_uri=run.tracking_uri)
    return {"config": dataclasses.asdict(cfg), "run": dataclasses.asdict(run) if run else None}


def from_loop_config(cls: type[C], payload: dict[str, Any]) -> tuple[C, RunState]:
    """``(config, run)`` from :func:`loop_config`'s dict; a missing run logs nowhere."""
    cfg = cls(**payload["config"])
    run = payload.get("run")
    return cfg, (RunState(**run) if run else RunState(tracking_uri=cfg.tracking_uri or ""))  # type: ignore[attr-defined]
