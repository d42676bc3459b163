"""Shared fixtures: real components on 127.0.0.1, started by the tests themselves.

- ``s3_server``: moto's S3 server in its own process over real HTTP; boto3 (and Ray's pyarrow
  S3 filesystem) pointed at it through ``AWS_ENDPOINT_URL``.
- ``s3_bucket``: a fresh bucket per test on that server.
- ``ray_cluster``: one local Ray instance for the whole session, loopback only, own temp dir.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

# Keep every Ray connection on loopback (see shared/docs/ray-notes.md), and Ray Train quick.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("PYTHONUNBUFFERED", "1")
# Test credentials for the moto endpoint only; no real account is reachable from here.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def open_loopback(request, timeout: float):
    """``urllib.request.urlopen`` for a server on 127.0.0.1, never through a proxy: urlopen's
    shared opener keeps the proxies of the environment it was first built in (a test that points
    ``HTTPS_PROXY`` at a closed port to stop downloads would otherwise break every later call)."""
    import urllib.request

    return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=timeout)


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Wait until ``GET url`` answers 200; fail with the tail of ``log`` if ``proc`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open_loopback(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become ready:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)


def stop_process_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a process started with ``start_new_session=True`` and everything in its group."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)


def start_moto(*options: str) -> tuple[subprocess.Popen, int]:
    """A moto S3 server on 127.0.0.1 in its own process group, listening: ``(process, port)``."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_port(port, proc=proc)
    except BaseException:
        stop_process_group(proc)
        raise
    return proc, port


@pytest.fixture(scope="session")
def s3_server():
    """URL of a moto S3 server on 127.0.0.1 (its own process), with AWS_ENDPOINT_URL set."""
    proc, port = start_moto()
    try:
        url = f"http://127.0.0.1:{port}"
        old = os.environ.get("AWS_ENDPOINT_URL")
        os.environ["AWS_ENDPOINT_URL"] = url
        yield url
        if old is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = old
    finally:
        stop_process_group(proc)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new empty bucket on the moto server; returns its name."""
    from echo.data import storage

    name = f"test-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray instance (2 CPUs, loopback, own temp dir) shared by the session's tests.

    Started after the S3 server so every Ray worker inherits ``AWS_ENDPOINT_URL``.
    """
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _temp_dir=temp_dir,
        resources={"TRAIN_DRIVER": 2},
        runtime_env={"env_vars": {"AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]}},
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


# Distinctive fake S3 keys for the MLflow server only, so that a test can scan the server's
# logs, database and artifacts for them (moto accepts any keys).
MLFLOW_SERVER_FAKE_KEYS = ("AKIAECHOSSLFAKE7Q3ZK", "echo-ssl-fake-secret-9d2Hq7LmXw4Rt8Vb")


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (own process group): SQLite backend in a temp folder,
    artifacts proxied to ``s3://<bucket>/mlflow`` on the moto server, so clients need no S3 keys.

    Yields a namespace: ``url``, ``bucket``, ``log`` (server output file), ``db`` (SQLite file),
    ``fake_keys`` (the S3 key pair only the server holds). Start-up takes 10-50 s: share it.
    """
    import types

    from echo.data import storage

    root = tmp_path_factory.mktemp("mlflow-server")
    bucket = f"mlflow-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_S3_ENDPOINT_URL": s3_server,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "AWS_ACCESS_KEY_ID": MLFLOW_SERVER_FAKE_KEYS[0],
        "AWS_SECRET_ACCESS_KEY": MLFLOW_SERVER_FAKE_KEYS[1],
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination", f"s3://{bucket}/mlflow",
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            ],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_port(port, timeout=180, proc=proc)
        wait_for_http(f"{url}/health", proc, log_path, timeout=60)
        yield types.SimpleNamespace(url=url, bucket=bucket, log=log_path, db=root / "mlflow.db",
                                    fake_keys=MLFLOW_SERVER_FAKE_KEYS)
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> str:
    """A small synthetic data set shared by the training tests: 32 labelled + 8 unlabeled
    patients, 64x64 px, 16-24 frames, both classes in every split. Returns the manifest path."""
    from echo.ingest.synth import synthesize

    out = tmp_path_factory.mktemp("synth-small")
    return synthesize(str(out), patients=32, seed=7, prevalence=0.4, splits=(0.5, 0.25, 0.25), unlabeled_patients=8,
                      size=64, min_frames=16, max_frames=24)


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """An MLflow SQLite store shared by the training tests of the session."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-training') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def pretrain_run(synth_small, tracking_uri, tmp_path_factory) -> str:
    """A short EchoCLR pretraining run in ``tracking_uri``, run in-process (the Ray path is tested
    in test_pretrain) from the decoded-frame cache, with the gates at its last epoch; its
    encoder initialises fine-tuning (``--init runs:/<id>``)."""
    from echo import tracking
    from echo.train.pretrain import PretrainConfig, pretrain_loop
    from echo.train.session import LocalSession
    from echo.train.settings import RunState, loop_config

    cfg = PretrainConfig(manifest=synth_small, backbone="tiny3d", epochs=2, batch_size=8, lr=1e-3, loader_workers=0,
                         probe_every=2, cache_decoded_mb=64, tracking_uri=tracking_uri,
                         experiment="pretrain-for-finetune")
    run = RunState(tracking_uri=tracking_uri, run_id=tracking.create_run(tracking_uri, cfg.experiment, "pretrain"))
    pretrain_loop(loop_config(cfg, run), session=LocalSession(tmp_path_factory.mktemp("pre")))
    return run.run_id
