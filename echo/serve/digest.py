"""Digests that make a model's files tamper-evident, and where they are recorded.

A bundle digest is one SHA-256 over a ``{path: sha256}`` listing of files
(:func:`combined_digest`). Two listings exist:

- a bundle's own ``digests.json`` (``model.json``, ``weights.pt``; see :mod:`echo.serve.bundle`);
- a logged model's ``artifacts/model_files.json`` (:data:`MODEL_FILES_PATH`): every file the
  logged pyfunc model holds that echo-ssl wrote: the bundle files, the models-from-code entry
  file and every shipped ``code/echo/...`` source file.

The logged model's digest is recorded outside the artifact store's files, in MLflow: as the
run tag :data:`RUN_TAG` when the model is logged and as the version tag :data:`VERSION_TAG`
when it is registered. Whoever loads the model (``models pull``, ``load_model``, ``predict``,
``evaluate``, the pyfunc loader under ``mlflow models serve``) checks the listing against the
recorded digest and every file against the listing, and refuses a mismatch naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Mapping

__all__ = [
    "MODEL_FILES_NAME",
    "MODEL_FILES_PATH",
    "RUN_TAG",
    "VERSION_TAG",
    "ALLOW_UNVERIFIED_ENV",
    "BUNDLE_DIGEST_ENV",
    "BundleError",
    "BundleIntegrityError",
    "file_sha256",
    "file_digests",
    "combined_digest",
    "check_files",
    "read_listing",
    "verify_model_files",
    "allow_unverified_env",
    "served_model_digest",
    "verify_served_model",
]

log = logging.getLogger(__name__)

MODEL_FILES_NAME = "model_files.json"
MODEL_FILES_PATH = f"artifacts/{MODEL_FILES_NAME}"  # relative to the logged model's root
RUN_TAG = "echo.bundle_digest"
VERSION_TAG = "bundle_digest"
ALLOW_UNVERIFIED_ENV = "ECHO_SSL_ALLOW_UNVERIFIED"
BUNDLE_DIGEST_ENV = "ECHO_SSL_BUNDLE_DIGEST"


class BundleError(ValueError):
    """A bundle that cannot be used (missing file, bad model.json); the message names the folder."""


class BundleIntegrityError(BundleError):
    """A model whose files do not match their recorded digests, or that has none; the message
    names the file."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a local file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(root: str | os.PathLike, names: Mapping[str, str | os.PathLike] | list[str]) -> dict[str, str]:
    """``{name: sha256}`` of files: ``names`` relative to ``root``, or a ``{name: path}`` mapping."""
    items = names.items() if isinstance(names, Mapping) else ((n, Path(root) / n) for n in names)
    return {str(name): file_sha256(path) for name, path in sorted(items)}


def combined_digest(files: Mapping[str, str]) -> str:
    """One hex SHA-256 over a ``{path: sha256}`` listing (``sha256sum`` lines, sorted by path)."""
    lines = "".join(f"{files[name]}  {name}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def check_files(root: str | os.PathLike, files: Mapping[str, str], where: str) -> None:
    """Raise :class:`BundleIntegrityError` naming the first file under ``root`` that is missing
    or whose SHA-256 differs from ``files``; ``where`` names the model in the message."""
    for name in sorted(files):
        path = Path(root) / name
        if not path.is_file():
            raise BundleIntegrityError(f"{where}: {name} is missing; refusing the model")
        actual = file_sha256(path)
        if actual != files[name]:
            raise BundleIntegrityError(
                f"{where}: {name} was changed (SHA-256 {actual[:16]}... does not match the recorded "
                f"{files[name][:16]}...); refusing the model"
            )


def read_listing(path: str | os.PathLike, expected_digest: str | None, where: str) -> dict[str, str]:
    """The ``{path: sha256}`` listing in the JSON file ``path`` (``{"files": {...}}``), checked
    against ``expected_digest`` when given. Raises :class:`BundleIntegrityError` naming the file."""
    name = Path(path).name
    try:
        files = json.loads(Path(path).read_text())["files"]
    except FileNotFoundError:
        raise BundleIntegrityError(f"{where}: {name} is missing; refusing the model") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise BundleIntegrityError(f"{where}: {name} is not a digest listing; refusing the model") from None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise BundleIntegrityError(f"{where}: {name} is not a digest listing; refusing the model")
    if expected_digest is not None and combined_digest(files) != expected_digest:
        raise BundleIntegrityError(
            f"{where}: {name} was changed (its digest does not match the bundle digest recorded in MLflow); "
            "refusing the model"
        )
    return files


def verify_model_files(root: str | os.PathLike, expected_digest: str | None, where: str,
                       allow_unverified: bool = False, how_to_allow: str = "pass --allow-unverified to use it anyway") -> bool:
    """Check a downloaded logged model: its ``artifacts/model_files.json`` against
    ``expected_digest`` (recorded in MLflow), every listed file against the listing, and that
    no entry or shipped code file is unlisted. Returns whether the model was verified:
    ``False`` only when nothing is recorded and ``allow_unverified`` (a warning is logged).

    Raises :class:`BundleIntegrityError` naming the file that changed, or when nothing is
    recorded and unverified models are not allowed (``how_to_allow`` says how to allow them).
    """
    root = Path(root)
    listing = root / MODEL_FILES_PATH
    if expected_digest is None or not listing.is_file():
        what = "no bundle digest is recorded in MLflow" if expected_digest is None else f"it has no {MODEL_FILES_PATH}"
        if not allow_unverified:
            raise BundleIntegrityError(f"{where}: {what}, so its files cannot be verified; refusing it ({how_to_allow})")
        log.warning("%s: %s; using it UNVERIFIED", where, what)
        return False
    files = read_listing(listing, expected_digest, where)
    check_files(root, files, where)
    shipped = [p for p in (root / "code").rglob("*") if p.is_file()] + list(root.glob("*.py"))
    for path in sorted(shipped):
        name = path.relative_to(root).as_posix()
        if name not in files and "__pycache__" not in path.parts:
            raise BundleIntegrityError(f"{where}: {name} is not in the model's digest listing; refusing it")
    return True


def allow_unverified_env() -> bool:
    """Whether ``$ECHO_SSL_ALLOW_UNVERIFIED`` allows serving a model without recorded digest."""
    return os.environ.get(ALLOW_UNVERIFIED_ENV, "").strip().lower() in ("1", "true", "yes")


def served_model_digest(root: str | os.PathLike) -> str | None:
    """The bundle digest recorded for the logged model downloaded to ``root``:
    ``$ECHO_SSL_BUNDLE_DIGEST``, else the run tag of the run its ``MLmodel`` names, which every
    registered version of that run must repeat in its ``bundle_digest`` tag. ``None`` when
    nothing is recorded or MLflow cannot be reached (``$MLFLOW_TRACKING_URI``)."""
    if os.environ.get(BUNDLE_DIGEST_ENV, "").strip():
        return os.environ[BUNDLE_DIGEST_ENV].strip()
    # Here, not at the top: reading bundles (models pull, predict --help) needs no MLflow client.
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from echo import tracking

    run_id = Model.load(str(root)).run_id
    if not run_id:
        return None
    try:
        client = tracking.client(tracking.resolve_tracking_uri(None))
        digest = client.get_run(run_id).data.tags.get(RUN_TAG)
        versions = client.search_model_versions(f"run_id = '{run_id}'")
    except MlflowException as e:
        log.warning("cannot read the bundle digest of run %s from MLflow: %s", run_id, e.message)
        return None
    for mv in versions:
        if mv.tags.get(VERSION_TAG) != digest:
            log.warning("%s version %s does not carry its run's bundle digest", mv.name, mv.version)
            return None
    return digest or None


def verify_served_model(entry_file: str | os.PathLike) -> None:
    """Verify the logged model whose models-from-code entry file is ``entry_file`` (at the
    model's root) before it is served: :func:`verify_model_files` against
    :func:`served_model_digest`, unverified only with ``ECHO_SSL_ALLOW_UNVERIFIED=1``.
    Without ``MLmodel`` beside the entry file, MLflow is running the entry while logging the
    model, and there is nothing to verify yet."""
    root = Path(entry_file).resolve().parent
    if not (root / "MLmodel").is_file():
        return
    verify_model_files(root, served_model_digest(root), f"model {root}", allow_unverified_env(),
                       f"set {ALLOW_UNVERIFIED_ENV}=1 to serve it anyway")
