"""Launching jobs on Ray: connecting (a running cluster, or a local one started in-process), building the
``TorchTrainer`` with explicit failure handling, and the MLflow run that every training job opens and closes.

Connecting: a running cluster (``address``) or a local one started in-process.

A local Ray is single-machine by definition, so it is kept on loopback whatever the caller's
environment (see ``_loopback_only``) with its dashboard on 127.0.0.1. A real multi-node cluster
is reached through its address and is left as configured.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from echo import tracking
from echo.data import storage
from echo.train.settings import RunState, loop_config, setting

__all__ = ["connect", "TRAIN_DRIVER", "RayOptions", "fit_on_ray", "storage_for", "new_run_name", "open_tracked_run",
           "fit_tracked"]

log = logging.getLogger(__name__)

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# A custom resource for Tune trial drivers that launch Train workers (Ray's documented
# pattern), so trials do not hold CPUs the workers need.
TRAIN_DRIVER = "TRAIN_DRIVER"


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (``auto``, ``ray://...``, ``host:port``), or ``RAY_ADDRESS``, or
    start a local Ray on loopback. Does nothing if Ray is already initialised."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    _loopback_only()
    cpus = num_cpus or os.cpu_count() or 1
    # A temp folder of its own: a bare ray.init() would attach to any cluster recorded in the default one.
    temp_dir = tempfile.mkdtemp(prefix="echo-ray-", dir="/tmp")
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "ECHO_SSL_S3_ENDPOINT", "MLFLOW_TRACKING_URI") if k in os.environ}
    ray.init(
        num_cpus=cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        resources={TRAIN_DRIVER: cpus},
        runtime_env={"env_vars": env} if env else None,
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
        _temp_dir=temp_dir,
    )
    log.info("started a local Ray on 127.0.0.1 with %d CPUs", cpus)


def _loopback_only() -> None:
    """Make the local Ray about to start bind, listen and connect on 127.0.0.1 only.

    With ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray takes 127.0.0.1 as the node address;
    otherwise its GCS, raylet, agents and workers listen on every interface and talk through the
    machine's external address. Ray reads the variable once, when ``ray`` is first imported, and
    any module may have imported it before this call: so the value read is overridden in this
    process, and the variable (overriding a caller's other value) is set for every process the
    local Ray starts. Never called for a cluster reached by address, whose nodes must use their
    real addresses.
    """
    from ray._private import ray_constants

    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def storage_for(uri: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray's ``RunConfig``.

    Local folders become absolute paths. ``s3://`` URIs get a pyarrow ``S3FileSystem`` that
    honours ``AWS_ENDPOINT_URL`` / ``ECHO_SSL_S3_ENDPOINT`` (S3-compatible stores) with
    retries for transient errors.
    """
    if not uri.startswith("s3://"):
        return str(Path(uri).resolve()), None
    import pyarrow.fs as pafs

    endpoint = storage.s3_endpoint()
    kwargs: dict[str, Any] = {
        "region": endpoint.region,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=10),
    }
    if endpoint.url:
        scheme, _, host = endpoint.url.partition("://")
        kwargs.update(endpoint_override=host, scheme=scheme)
    return uri[len("s3://"):].rstrip("/"), pafs.S3FileSystem(**kwargs)


@dataclass
class RayOptions:
    """How a job runs on Ray Train."""

    workers: int = setting(1, "Ray Train workers (DDP ranks)")
    cpus_per_worker: float = setting(1.0, "CPUs per worker (fractions allowed)")
    gpus_per_worker: float = setting(0.0, "GPUs per worker (0: CPU with gloo)")
    storage: str = setting("./runs", "checkpoint location: a local folder or s3://bucket/prefix")
    max_failures: int = setting(2, "worker-group restarts allowed")
    collective_timeout_s: int = setting(300, "seconds a collective may block before the group is failed and restarted")
    num_to_keep: int = setting(2, "checkpoints kept per run")


def fit_on_ray(loop: Callable[[dict], None], config: dict[str, Any], opts: RayOptions, run_name: str):
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
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=opts.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=opts.num_to_keep),
            logging_config=LoggingConfig(log_level="WARNING"),  # our own one line per epoch suffices
        ),
    )
    started = time.monotonic()
    result = trainer.fit()
    log.info("run %s finished in %.0f s", run_name, time.monotonic() - started)
    return result


def new_run_name(prefix: str) -> str:
    """A fresh, sortable run name: ``<prefix>-YYYYmmdd-HHMMSS-<4 hex>``."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def open_tracked_run(cfg: Any, ray_opts: RayOptions, resume: bool, job: str, default_name: str,
                     manifest_sha256: str, tags: dict[str, str] | None = None,
                     params: dict[str, Any] | None = None) -> RunState:
    """Name the run and create its MLflow run (or, with ``resume``, find it); return its state.

    ``cfg`` is a job config (:class:`echo.train.settings.TrainConfig`), left as the user gave
    it. All of it, the Ray options and ``params`` are logged as the run's parameters, with the
    resolved tracking URI and the run name. The Ray run name equals the MLflow
    ``echo.run_name`` tag, which is how ``--resume --run-name`` finds both.
    """
    uri = tracking.resolve_tracking_uri(cfg.tracking_uri)
    if resume and not cfg.run_name:
        raise ValueError("--resume needs --run-name: the name of the run to continue")
    name = cfg.run_name or new_run_name(default_name)
    run_id = tracking.find_run(uri, cfg.experiment, "echo.run_name", name) if resume else None
    if resume and run_id is None:
        raise ValueError(f"--resume: no MLflow run tagged echo.run_name={name} in experiment {cfg.experiment}")
    if run_id is None:
        run_id = tracking.create_run(uri, cfg.experiment, name,
                                     tags={"echo.run_name": name, "echo.job": job,
                                           "echo.manifest_sha256": manifest_sha256, **(tags or {})})
    logged = {**dataclasses.asdict(cfg), "tracking_uri": uri, "run_name": name}
    logged.update(workers=ray_opts.workers, gpus_per_worker=ray_opts.gpus_per_worker, storage=ray_opts.storage,
                  manifest_sha256=manifest_sha256, **(params or {}))
    tracking.log_params(uri, run_id, logged)
    return RunState(tracking_uri=uri, run_id=run_id, run_name=name)


def fit_tracked(loop: Callable[[dict], None], cfg: Any, run: RunState, ray_opts: RayOptions, ray_address: str | None,
                then: Callable[[Any], None] | None = None):
    """``fit_on_ray`` (then ``then(result)``) with the MLflow run marked FINISHED or FAILED."""
    connect(ray_address)
    try:
        result = fit_on_ray(loop, loop_config(cfg, run), ray_opts, run.run_name or "echo-run")
        if then is not None:
            then(result)
    except Exception:
        tracking.set_terminated(run.tracking_uri, run.run_id, "FAILED")
        raise
    tracking.set_terminated(run.tracking_uri, run.run_id)
    return result
