"""MLflow plumbing shared by every job: where runs go, and how params and metrics are written.

The embedded default is ``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlruns``
(both absolute, because Ray workers run in other working directories). A tracking server
(``http://...``) decides its own artifact store (proxied artifacts: clients need no S3 keys).
Runs are addressed by ID through ``MlflowClient`` so that any process (a Ray worker, a Tune
trial) can write to a run that the driver created.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit

__all__ = [
    "DEFAULT_EXPERIMENT",
    "resolve_tracking_uri",
    "client",
    "ensure_experiment",
    "create_run",
    "find_run",
    "log_params",
    "log_metrics",
    "logged_steps",
    "set_terminated",
    "scrub",
]

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "echo-ssl"
_SECRET = re.compile(r"(?i)(secret|password|token|access_key|credential|session_key)")
_URI_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else the embedded SQLite store in the working folder.

    The URI returned never holds credentials: it is what job configs, Ray checkpoints, Tune's
    ``params.json`` / ``tuner.pkl`` and MLflow params keep. A ``user:password@`` in an ``http(s)``
    URI is moved into ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` of this process
    (MLflow reads them; a local Ray started afterwards inherits them), and ``MLFLOW_TRACKING_URI``,
    when it was the source, is rewritten without them. Other schemes with credentials (a database
    URI) are refused: their password would be copied wherever the URI goes.
    """
    from_env = not uri
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if _URI_USERINFO.search(uri):
        uri = _move_credentials_to_env(uri)
        if from_env:
            os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def _move_credentials_to_env(uri: str) -> str:
    """``uri`` without its ``user[:password]@``, which goes to MLflow's credential variables."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"the tracking URI {scrub(uri)} carries credentials; only an http(s) MLflow server's may "
                         "(they are moved to MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD): give the store's "
                         "password another way, or put an MLflow server in front of it")
    if parts.username:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username)
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    log.warning("the MLflow tracking URI carried credentials: they were moved to MLFLOW_TRACKING_USERNAME / "
                "MLFLOW_TRACKING_PASSWORD for this process; set those (or ~/.mlflow/credentials) instead")
    return scrub(uri)


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _default_artifact_root(tracking_uri: str) -> str | None:
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
    return None


def ensure_experiment(tracking_uri: str, name: str = DEFAULT_EXPERIMENT) -> str:
    """The experiment's ID, creating it (with an absolute artifact location) if needed."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=_default_artifact_root(tracking_uri))
    except Exception:
        exp = c.get_experiment_by_name(name)  # created concurrently by another process
        if exp is None:
            raise
        return exp.experiment_id


def create_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Create a run and return its ID. ``parent_run_id`` nests it under another run."""
    tags = dict(tags or {})
    tags["mlflow.runName"] = run_name
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client(tracking_uri).create_run(ensure_experiment(tracking_uri, experiment), run_name=run_name, tags=tags)
    return run.info.run_id


def find_run(tracking_uri: str, experiment: str, tag: str, value: str) -> str | None:
    """The newest run of ``experiment`` whose tag ``tag`` equals ``value``, or ``None``."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{tag}` = '{value}'", order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0].info.run_id if runs else None


def scrub(value: Any) -> str:
    """A parameter value as text with any ``user:password@`` in URIs removed."""
    return _URI_USERINFO.sub("", str(value))


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def log_params(tracking_uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    """Log ``params`` (nested mappings flattened with dots) in one batch.

    Keys that look like secrets are refused rather than logged.
    """
    from mlflow.entities import Param

    flat = _flatten(params)
    bad = [k for k in flat if _SECRET.search(k)]
    if bad:
        raise ValueError(f"refusing to log secret-looking parameter(s): {', '.join(sorted(bad))}")
    c = client(tracking_uri)
    existing = c.get_run(run_id).data.params
    items = [
        Param(k, scrub(json.dumps(v) if isinstance(v, (list, tuple)) else v)[:6000])
        for k, v in sorted(flat.items())
        if k not in existing
    ]
    for start in range(0, len(items), 100):
        c.log_batch(run_id, params=items[start : start + 100])


def log_metrics(tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Log one step's metrics in a single call (non-finite values are skipped)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(k, float(v), now, int(step))
        for k, v in metrics.items()
        if v is not None and float(v) == float(v) and abs(float(v)) != float("inf")
    ]
    if items:
        client(tracking_uri).log_batch(run_id, metrics=items)


def logged_steps(tracking_uri: str, run_id: str, key: str) -> set[int]:
    """The steps at which ``key`` was already logged (used to log each epoch once across resumes)."""
    return {m.step for m in client(tracking_uri).get_metric_history(run_id, key)}


def set_terminated(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri).set_terminated(run_id, status=status)
