"""The pyfunc flavour: logging a bundle as an MLflow model, and ``mlflow models serve`` scoring
videos by URI with it.

``POST /invocations`` with a ``video_uri`` column, e.g.
``{"dataframe_split": {"columns": ["video_uri"], "data": [["clips/a.mp4"]]}}``, answers one
row per video: ``video_uri``, ``probability`` (of severe aortic stenosis), ``prediction``
(1 = severe at the threshold stored in the bundle), ``call`` and ``error``; the numbers are
those of ``echo-ssl predict`` (same scoring code, :mod:`echo.model.scoring`). A video that
cannot be read or decoded gets ``probability`` null, ``prediction`` -1, ``call`` ``"error"``
and the reason in ``error``; the other rows are scored as usual.

Untrusted bytes. Videos are decoded in a child process with memory and time limits
(:class:`echo.serve.sandbox.IsolatedDecoder`: ``ECHO_SSL_SERVE_DECODE_MB``, default 1024 MB
of address space beyond the child's imports; ``ECHO_SSL_SERVE_DECODE_TIMEOUT_S``, default
60 s), replaced when it dies, so a hostile file costs one row, not the server.

What the server may open. The MLflow scoring server has no authentication and would read any
path a client sends, so every URI is checked against allowed prefixes before it is read
(a URI outside them fails the whole request with HTTP 400):

- ``ECHO_SSL_SERVE_ALLOWED_PREFIXES``: comma-separated local folders and/or ``s3://bucket/prefix``
  entries (read when the model loads). A local URI is allowed when its real path (symlinks
  resolved) lies inside a listed folder; an ``s3://`` URI when it starts with a listed prefix
  (taken as a folder) and has no ``.``/``..`` segments. Other schemes are refused.
- Unset or empty: only local files under the server's working directory; no ``s3://`` at all.

Integrity. :func:`log_model_bundle` records the SHA-256 of every file it writes into the
model (bundle, entry file, shipped ``code/echo`` sources) in ``artifacts/model_files.json``
and that listing's digest as the run tag ``echo.bundle_digest``
(:mod:`echo.serve.digest`). When the server loads the model, the entry file first runs
:func:`echo.serve.digest.verify_served_model` (before any other shipped module is imported):
every listed file is checked, shipped code or entry files that are not listed are refused,
and the listing is checked against the digest recorded in MLflow (the run tag, and the
``bundle_digest`` tag of every registered version of the run; ``$ECHO_SSL_BUNDLE_DIGEST``
instead, where the server has no tracking access). A mismatch or a missing digest stops the
server with a message naming the file; ``ECHO_SSL_ALLOW_UNVERIFIED=1`` serves a model without
recorded digest (logged).

Trust: loading this flavour runs code (the ``echo`` sources shipped with the model in
``code/`` go first on ``sys.path``, and the models-from-code entry file is executed). The
check runs from shipped files too (the entry file, ``echo/__init__.py``, ``echo/serve/digest.py``
and what they import), so it detects any other changed file, but not a rewrite of those
first files by someone who can also write ``MLmodel``. Serve models only from registries
whose writers you trust. ``echo-ssl models pull`` and ``echo.load_model`` are the paths that
run no registry code.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema

from echo.data import storage
from echo.data.video import VideoDecodeError
from echo.serve.bundle import BUNDLE_FILES, load_bundle, verify_bundle
from echo.serve.digest import MODEL_FILES_NAME, RUN_TAG, allow_unverified_env, combined_digest, file_digests
from echo.serve.predict import EchoModel
from echo.serve.registry import BUNDLE_PATH, MODEL_NAME
from echo.serve.sandbox import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S, IsolatedDecoder

__all__ = [
    "ALLOWED_PREFIXES_ENV",
    "DECODE_MB_ENV",
    "DECODE_TIMEOUT_ENV",
    "ENTRY_FILE",
    "ENTRY_SOURCE",
    "REQUIREMENTS",
    "URINotAllowedError",
    "allowed_prefixes",
    "check_allowed",
    "EchoPyfunc",
    "signature",
    "pip_requirements",
    "write_entry",
    "log_model_bundle",
]

log = logging.getLogger(__name__)

ALLOWED_PREFIXES_ENV = "ECHO_SSL_SERVE_ALLOWED_PREFIXES"
DECODE_MB_ENV = "ECHO_SSL_SERVE_DECODE_MB"
DECODE_TIMEOUT_ENV = "ECHO_SSL_SERVE_DECODE_TIMEOUT_S"
ERROR_CALL = "error"
ENTRY_FILE = "echo_pyfunc_entry.py"
ENTRY_SOURCE = '''"""MLflow models-from-code entry of an echo-ssl model (see echo.serve.pyfunc)."""
import mlflow

from echo.serve.digest import verify_served_model

verify_served_model(__file__)  # before any other shipped module is imported

from echo.serve.pyfunc import EchoPyfunc  # noqa: E402

mlflow.models.set_model(EchoPyfunc())
'''
# Distributions the served model imports; pinned to the versions installed when it is logged.
REQUIREMENTS = ("mlflow", "torch", "torchvision", "numpy", "pandas", "decord2", "boto3")


class URINotAllowedError(PermissionError):
    """A URI outside the prefixes the scoring server may read."""


def allowed_prefixes(value: str | None = None) -> list[str]:
    """Allowed prefixes from ``value`` (default: ``$ECHO_SSL_SERVE_ALLOWED_PREFIXES``).

    Local entries become absolute real paths (relative ones against the working directory);
    ``s3://`` entries end with ``/``. Unset or empty: the working directory only.
    """
    raw = os.environ.get(ALLOWED_PREFIXES_ENV, "") if value is None else value
    entries = [e.strip() for e in raw.split(",") if e.strip()] or [os.getcwd()]
    out = []
    for entry in entries:
        if entry.startswith("s3://"):
            if len(entry.rstrip("/")) <= len("s3://"):
                raise ValueError(f"{ALLOWED_PREFIXES_ENV}: {entry!r} names no bucket")
            out.append(entry.rstrip("/") + "/")
        elif "://" in entry:
            raise ValueError(f"{ALLOWED_PREFIXES_ENV}: {entry!r}: only local folders and s3:// prefixes are supported")
        else:
            out.append(os.path.realpath(entry))
    return out


def check_allowed(uri: str, prefixes: Sequence[str]) -> None:
    """Raise :class:`URINotAllowedError` unless ``uri`` lies under one of ``prefixes``."""
    if uri.startswith("s3://"):
        key_parts = uri[len("s3://") :].split("/")[1:]
        if any(p in (".", "..") for p in key_parts):
            raise URINotAllowedError(f"{uri}: '.' and '..' segments are not allowed")
        if any(p.startswith("s3://") and uri.startswith(p) for p in prefixes):
            return
        raise URINotAllowedError(f"{uri}: not under an allowed s3:// prefix (set {ALLOWED_PREFIXES_ENV})")
    if "://" in uri:
        raise URINotAllowedError(f"{uri}: only local paths and s3:// URIs can be scored")
    real = os.path.realpath(uri)
    for p in prefixes:
        if not p.startswith("s3://") and os.path.commonpath([real, p]) == p:
            return
    raise URINotAllowedError(f"{uri}: outside the allowed local folders (set {ALLOWED_PREFIXES_ENV})")


class EchoPyfunc(PythonModel):
    """Scores a DataFrame with a ``video_uri`` column; see the module docstring."""

    def load_context(self, context: Any) -> None:
        # The entry file has verified the model's files (verify_served_model) before importing this.
        model, meta = load_bundle(context.artifacts["bundle"], allow_unverified=allow_unverified_env())
        self._model = EchoModel(model, meta, source="pyfunc")
        self._prefixes = allowed_prefixes()
        self._decoder = IsolatedDecoder(int(os.environ.get(DECODE_MB_ENV, DEFAULT_MEMORY_MB)),
                                        float(os.environ.get(DECODE_TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        self._decoder.start()
        log.info("echo-ssl pyfunc: may read URIs under %s", ", ".join(self._prefixes))

    def _score(self, uri: str) -> tuple[float, str]:
        """``(probability, "")`` for a readable video, ``(nan, reason)`` otherwise."""
        try:
            data = storage.read_bytes(uri)
            clips = self._decoder.clips(self._model.preprocessing, data, uri)
        except (OSError, VideoDecodeError) as e:
            return math.nan, str(e)
        return self._model.clips_probability(clips), ""

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """``model_input`` (n rows, a ``video_uri`` column) -> (n rows: video_uri, probability,
        prediction, call, error)."""
        if "video_uri" not in model_input.columns:
            raise MlflowException(
                f"input needs a 'video_uri' column, got columns {list(model_input.columns)}",
                error_code=INVALID_PARAMETER_VALUE,
            )
        uris = [str(u) for u in model_input["video_uri"]]
        try:
            for uri in uris:
                check_allowed(uri, self._prefixes)
        except URINotAllowedError as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None
        scored = [self._score(uri) for uri in uris]
        out = self._model.table(uris, [p for p, _ in scored])
        failed = [bool(err) for _, err in scored]
        out.loc[failed, "prediction"] = -1
        out.loc[failed, "call"] = ERROR_CALL
        if any(failed):  # null in the JSON answer, not NaN (which strict JSON parsers refuse)
            out["probability"] = out["probability"].astype(object).where(~pd.Series(failed), None)
        out["error"] = [err for _, err in scored]
        return out


def signature() -> ModelSignature:
    """Input: a string column ``video_uri``; output: video_uri, probability, prediction, call, error."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", "video_uri")]),
        outputs=Schema(
            [
                ColSpec("string", "video_uri"),
                ColSpec("double", "probability"),
                ColSpec("long", "prediction"),
                ColSpec("string", "call"),
                ColSpec("string", "error", required=False),
            ]
        ),
    )


def pip_requirements() -> list[str]:
    """:data:`REQUIREMENTS` pinned to their installed versions (explicit: inferring takes 10-20 s)."""
    out = []
    for dist in REQUIREMENTS:
        try:
            out.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(dist)
    return out


def write_entry(folder: str | os.PathLike) -> Path:
    """Write the models-from-code entry file into ``folder``; return its path."""
    path = Path(folder) / ENTRY_FILE
    path.write_text(ENTRY_SOURCE)
    return path


def log_model_bundle(bundle_dir: str) -> str:
    """Log the bundle in ``bundle_dir`` under the active MLflow run; return ``runs:/<id>/model``.

    Logs one pyfunc model (models-from-code, the ``echo`` package as ``code_paths``, explicit
    pip requirements) whose artifacts hold the bundle files and ``model_files.json``, the
    SHA-256 of every file written into the model; that listing's digest is set as the run tag
    ``echo.bundle_digest``. The bundle is verified before it is logged.
    """
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_model_bundle needs an active MLflow run: call it inside mlflow.start_run(...)")
    meta = verify_bundle(bundle_dir)
    package = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="echo-pyfunc-") as tmp:
        bundle = Path(tmp) / "bundle"
        bundle.mkdir()
        for name in BUNDLE_FILES:  # only the bundle's own files, whatever else the folder holds
            shutil.copy2(Path(bundle_dir) / name, bundle / name)
        code = Path(tmp) / "code" / package.name
        shutil.copytree(package, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        entry = write_entry(tmp)
        # Paths as they will lie in the logged model (MLflow's layout for these arguments).
        placed = {f"{BUNDLE_PATH}/{name}": bundle / name for name in BUNDLE_FILES}
        placed[entry.name] = entry
        placed.update({f"code/{p.relative_to(code.parent).as_posix()}": p for p in code.rglob("*") if p.is_file()})
        files = file_digests(tmp, placed)
        listing = Path(tmp) / MODEL_FILES_NAME
        listing.write_text(json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")
        with warnings.catch_warnings():
            # An input example would be scored at logging time; there is no video to score.
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(entry),
                artifacts={"bundle": str(bundle), "model_files": str(listing)},
                code_paths=[str(code)],
                pip_requirements=pip_requirements(),
                signature=signature(),
                metadata={"echo_ssl": {"weights_sha256": meta.weights_sha256, "bundle_digest": combined_digest(files)}},
            )
    mlflow.set_tag(RUN_TAG, combined_digest(files))
    return f"runs:/{run.info.run_id}/{MODEL_NAME}"
