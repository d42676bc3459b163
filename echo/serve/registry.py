"""The MLflow model registry: log a bundle, register it, move the ``champion`` alias, pull it back.

Layout: :func:`echo.serve.pyfunc.log_model_bundle` logs one MLflow model named ``model`` under
the active run. It is a pyfunc (for ``mlflow models serve``) whose artifacts hold the raw bundle
(``artifacts/bundle/``: ``model.json``, ``weights.pt``, ``digests.json``, see
:mod:`echo.serve.bundle`) and ``artifacts/model_files.json``, the SHA-256 of every file
echo-ssl wrote into the model (bundle, entry file, shipped code). That listing's digest is
recorded as the run tag ``echo.bundle_digest`` and, on registration, as the version tag
``bundle_digest`` (:mod:`echo.serve.digest`). :func:`pull` downloads the logged model, checks
the listing against the recorded digest and every file (shipped code included) against the
listing, refuses a mismatch naming the file, and keeps only the bundle; a model without a
recorded digest is refused unless ``allow_unverified``. It never loads the pyfunc, so no code
from the registry runs. The pyfunc flavour does run code when loaded (shipped ``echo``
sources, a models-from-code entry file): it checks the same digests first, but serve it from
trusted registries only.

Champion policy: :func:`register` creates a version tagged with the training record, then
moves the ``champion`` alias to it only when its test AUROC beats the current champion's on
the same test manifest (same ``manifest_sha256``); otherwise an explicit :func:`promote`
moves it. Every alias move is recorded twice: version tags ``<alias>_since`` and
``<alias>_until`` (UTC ISO 8601), and one finished run in the ``echo-ssl-registry``
experiment, which :func:`history` lists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from echo import tracking
from echo.serve.bundle import BUNDLE_FILES, BundleMeta, verify_bundle
from echo.serve.digest import RUN_TAG, VERSION_TAG, verify_model_files

__all__ = [
    "DEFAULT_NAME",
    "MODEL_NAME",
    "BUNDLE_PATH",
    "CHAMPION",
    "HISTORY_EXPERIMENT",
    "REGISTRY_INFO_FILE",
    "RegistryError",
    "ModelRef",
    "AliasMove",
    "resolve",
    "register",
    "promote",
    "history",
    "version_info",
    "pull",
    "format_summary",
]

log = logging.getLogger(__name__)

DEFAULT_NAME = "echo-severe-as"
MODEL_NAME = "model"  # the logged model's name inside a run: runs:/<id>/model
BUNDLE_PATH = "artifacts/bundle"  # the raw bundle, relative to the logged model's root
CHAMPION = "champion"
HISTORY_EXPERIMENT = "echo-ssl-registry"
REGISTRY_INFO_FILE = "registry.json"  # provenance written next to a pulled bundle
_TAG_PREFIX = "echo.serve.registry."
_NAME_OK = re.compile(r"^[\w.\-]+$")
_URI_FORMS = "models:/NAME@ALIAS, models:/NAME/VERSION, models:/<model id>, runs:/RUN_ID[/model]"


class RegistryError(ValueError):
    """A registry request that cannot be served; the message names the URI, model or version."""


@dataclass(frozen=True)
class ModelRef:
    """Where a logged model lives, and which registered version (if any) it is.

    ``artifact_root`` is the logged model's artifact location; the bundle is under
    ``artifact_root/artifacts/bundle``.
    """

    uri: str
    artifact_root: str
    run_id: str | None = None
    model_id: str | None = None
    name: str | None = None
    version: str | None = None
    aliases: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (no tracking URI: it may carry credentials)."""
        return {
            "uri": self.uri,
            "name": self.name,
            "version": self.version,
            "aliases": list(self.aliases),
            "run_id": self.run_id,
            "model_id": self.model_id,
        }


@dataclass(frozen=True)
class AliasMove:
    """One move of an alias, as recorded in the ``echo-ssl-registry`` experiment."""

    moved_at: str
    name: str
    alias: str
    version: str
    previous_version: str | None
    reason: str
    run_id: str


def _client(tracking_uri: str):
    return tracking.client(tracking_uri)


def _check_name(name: str) -> None:
    if not _NAME_OK.match(name):
        raise RegistryError(f"registered model name {name!r} may use only letters, digits, '_', '.' and '-'")


def _check_alias(alias: str) -> None:
    if not re.fullmatch(r"[\w\-]+", alias) or re.fullmatch(r"[vV]?\d+|latest", alias):
        raise RegistryError(f"alias {alias!r} may use only letters, digits, '_' and '-', and not look like a version")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _float(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


# --------------------------------------------------------------------------- resolving


def _logged_model_root(client, run_id: str, path: str, uri: str) -> tuple[str, str]:
    """(model_id, artifact_root) of the newest logged model named ``path`` in run ``run_id``."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise RegistryError(f"{uri}: no such run ({e.message})") from None
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{path}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
        max_results=1,
    )
    if not found:
        raise RegistryError(f"{uri}: run {run_id} has no model logged under the name {path!r}")
    return found[0].model_id, found[0].artifact_location


def resolve(uri: str, tracking_uri: str | None = None) -> ModelRef:
    """Resolve a model URI once (an alias is read once, so a concurrent move cannot mix versions).

    Accepts ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/<model id>`` and
    ``runs:/RUN_ID[/model]``.
    """
    from mlflow.exceptions import MlflowException

    tracking_uri = tracking.resolve_tracking_uri(tracking_uri)
    client = _client(tracking_uri)
    uri = uri.rstrip("/")
    if m := re.fullmatch(r"runs:/([0-9a-fA-F]+)(?:/([\w.\-/]+))?", uri):
        run_id, path = m.group(1), m.group(2) or MODEL_NAME
        model_id, root = _logged_model_root(client, run_id, path, uri)
        return ModelRef(uri=uri, artifact_root=root, run_id=run_id, model_id=model_id)
    if m := re.fullmatch(r"models:/(m-[0-9a-f]+)", uri):
        try:
            lm = client.get_logged_model(m.group(1))
        except MlflowException as e:
            raise RegistryError(f"{uri}: no such logged model ({e.message})") from None
        return ModelRef(uri=uri, artifact_root=lm.artifact_location, run_id=lm.source_run_id, model_id=lm.model_id)
    m = re.fullmatch(r"models:/([^/@]+)@([\w\-]+)", uri) or re.fullmatch(r"models:/([^/@]+)/(\d+)", uri)
    if not m:
        raise RegistryError(f"unsupported model URI {uri!r}; expected {_URI_FORMS} or a local bundle folder")
    name, ref = m.group(1), m.group(2)
    try:
        mv = client.get_model_version_by_alias(name, ref) if "@" in uri else client.get_model_version(name, ref)
        root = client.get_model_version_download_uri(name, mv.version)
    except MlflowException as e:
        raise RegistryError(f"{uri}: not found in the registry ({e.message})") from None
    model_id = mv.source[len("models:/") :] if str(mv.source).startswith("models:/") else None
    return ModelRef(
        uri=uri,
        artifact_root=root,
        run_id=mv.run_id,
        model_id=model_id,
        name=name,
        version=str(mv.version),
        aliases=tuple(mv.aliases or ()),
        tags=dict(mv.tags or {}),
    )


def recorded_digest(ref: ModelRef, tracking_uri: str) -> str | None:
    """The bundle digest recorded in MLflow for ``ref``: the version tag ``bundle_digest`` of a
    registered version, else the run tag ``echo.bundle_digest`` of the run that logged it."""
    if ref.version is not None:
        return ref.tags.get(VERSION_TAG) or None
    if ref.run_id is None:
        return None
    return _client(tracking_uri).get_run(ref.run_id).data.tags.get(RUN_TAG) or None


def _download_bundle(ref: ModelRef, dest: Path, tracking_uri: str,
                     allow_unverified: bool = False) -> tuple[Path, BundleMeta, str | None]:
    """Download the logged model of ``ref`` into ``dest`` and verify it; return its bundle folder
    (inside ``dest``), the bundle's metadata and the bundle digest it was verified against
    (``None`` when unverified).

    Every file echo-ssl wrote into the model (bundle, entry file, shipped code) is checked
    against the listing whose digest is recorded in MLflow (:func:`recorded_digest`,
    :func:`~echo.serve.digest.verify_model_files`); nothing downloaded is executed or
    unpickled. A model without a recorded digest is refused unless ``allow_unverified``
    (logged).
    """
    import mlflow  # here, not at the top: mlflow's artifact client is needed only to download

    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.artifact_root, dst_path=str(dest),
                                                    tracking_uri=tracking_uri, registry_uri=tracking_uri))
    digest = recorded_digest(ref, tracking_uri)
    verified = verify_model_files(root, digest, ref.uri, allow_unverified)
    bundle_dir = root / BUNDLE_PATH
    return bundle_dir, verify_bundle(bundle_dir, allow_unverified=not verified), digest if verified else None


# --------------------------------------------------------------------------- registering


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name,
            description=(
                "echo-ssl severe aortic stenosis classifier. The raw bundle (model.json, weights.pt "
                "state dict with SHA-256) is under artifacts/bundle; `echo-ssl models pull` and "
                "echo.load_model read only those and run no code from the registry. The pyfunc "
                "flavour runs code when loaded: serve it from trusted registries only."
            ),
        )
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _current(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _champion_decision(client, name: str, version: str, tags: Mapping[str, str]) -> tuple[bool, str]:
    """Whether ``version`` (with ``tags``) should replace the current champion, and why."""
    auc = _float(tags.get("test_auroc"))
    if math.isnan(auc) or not tags.get("manifest_sha256"):
        return False, "no test AUROC or manifest SHA-256 recorded: promote explicitly"
    current = _current(client, name, CHAMPION)
    if current is None:
        return True, f"first champion (test AUROC {auc:.4f})"
    if str(current.version) == str(version):
        return False, f"version {version} is already the champion"
    if current.tags.get("manifest_sha256") != tags["manifest_sha256"]:
        return False, f"champion version {current.version} was tested on another manifest: promote explicitly"
    best = _float(current.tags.get("test_auroc"))
    if math.isnan(best) or auc > best:
        return True, f"test AUROC {auc:.4f} beats champion version {current.version} ({best:.4f}) on the same manifest"
    return False, f"test AUROC {auc:.4f} does not beat champion version {current.version} ({best:.4f})"


def _move_alias(tracking_uri: str, name: str, alias: str, version: str, reason: str) -> str | None:
    """Point ``alias`` at ``version`` and record the move; return the previous version."""
    client = _client(tracking_uri)
    previous = _current(client, name, alias)
    previous_version = str(previous.version) if previous is not None else None
    moved_at = _now()
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, f"{alias}_since", moved_at)
    if previous_version is not None and previous_version != str(version):
        client.set_model_version_tag(name, previous_version, f"{alias}_until", moved_at)
    record = {
        "model": name,
        "alias": alias,
        "version": str(version),
        "previous_version": previous_version or "",
        "reason": reason,
        "moved_at": moved_at,
    }
    run_id = tracking.create_run(
        tracking_uri,
        HISTORY_EXPERIMENT,
        run_name=f"{name}@{alias}=v{version}",
        tags={_TAG_PREFIX + k: v for k, v in record.items()},
    )
    tracking.set_terminated(tracking_uri, run_id)
    log.info("%s@%s -> version %s (was %s): %s", name, alias, version, previous_version, reason)
    return previous_version


def register(run_or_model_uri: str, name: str = DEFAULT_NAME, tracking_uri: str | None = None) -> str:
    """Register the bundle model of a run as a new version of ``name``; return the version.

    ``run_or_model_uri``: ``runs:/RUN_ID`` (the run's ``model``), ``runs:/RUN_ID/model`` or
    ``models:/<model id>``. The model is downloaded and verified against the run's recorded
    digest first. The version is tagged with the training record
    (:meth:`~echo.serve.bundle.BundleMeta.version_tags`) and the bundle digest, and
    ``champion`` moves to it when its test AUROC beats the champion's on the same test
    manifest; the decision is stored in the version tag ``champion_decision``. The champion
    check and the move are not one transaction: register versions of one model from one
    process at a time (as the Tune search does).
    """
    _check_name(name)
    tracking_uri = tracking.resolve_tracking_uri(tracking_uri)
    if not run_or_model_uri.startswith(("runs:/", "models:/m-")):
        raise RegistryError(
            f"register takes runs:/RUN_ID[/model] or models:/<model id>, got {run_or_model_uri!r} "
            "(a registered version is moved with promote)"
        )
    ref = resolve(run_or_model_uri, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="echo-register-") as tmp:
        _, meta, digest = _download_bundle(ref, Path(tmp), tracking_uri)
    client = _client(tracking_uri)
    _ensure_registered_model(client, name)
    tags = {**meta.version_tags(), VERSION_TAG: digest}
    if ref.run_id:
        tags["source_run_id"] = ref.run_id
    mv = client.create_model_version(
        name, source=f"models:/{ref.model_id}", run_id=ref.run_id, tags=tags, model_id=ref.model_id
    )
    version = str(mv.version)
    move, reason = _champion_decision(client, name, version, tags)
    client.set_model_version_tag(name, version, "champion_decision", ("moved: " if move else "kept: ") + reason)
    if move:
        _move_alias(tracking_uri, name, CHAMPION, version, reason)
    log.info("registered %s version %s from %s; champion %s: %s", name, version, ref.uri, "moved" if move else "kept", reason)
    return version


def promote(
    name: str,
    version: str | int,
    alias: str = CHAMPION,
    tracking_uri: str | None = None,
    reason: str = "explicit promote",
) -> str | None:
    """Point ``alias`` of ``name`` at ``version`` (whatever its AUROC) and record the move.

    Returns the version the alias pointed at before (``None`` if it was unset).
    """
    from mlflow.exceptions import MlflowException

    _check_name(name)
    _check_alias(alias)
    tracking_uri = tracking.resolve_tracking_uri(tracking_uri)
    try:
        _client(tracking_uri).get_model_version(name, str(version))
    except MlflowException as e:
        raise RegistryError(f"{name} version {version}: not found in the registry ({e.message})") from None
    try:
        return _move_alias(tracking_uri, name, alias, str(version), reason)
    except MlflowException as e:
        raise RegistryError(f"{name}@{alias} -> version {version}: {e.message}") from None


def history(name: str, alias: str | None = None, tracking_uri: str | None = None) -> list[AliasMove]:
    """Every recorded alias move of ``name`` (only ``alias``'s when given), oldest first."""
    _check_name(name)
    if alias:
        _check_alias(alias)
    tracking_uri = tracking.resolve_tracking_uri(tracking_uri)
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(HISTORY_EXPERIMENT)
    if exp is None:
        return []
    query = f"tags.`{_TAG_PREFIX}model` = '{name}'"
    if alias:
        query += f" AND tags.`{_TAG_PREFIX}alias` = '{alias}'"
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=query, order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    moves = []
    for run in runs:
        t = {k[len(_TAG_PREFIX) :]: v for k, v in run.data.tags.items() if k.startswith(_TAG_PREFIX)}
        moves.append(
            AliasMove(
                moved_at=t["moved_at"],
                name=t["model"],
                alias=t["alias"],
                version=t["version"],
                previous_version=t["previous_version"] or None,
                reason=t["reason"],
                run_id=run.info.run_id,
            )
        )
    return sorted(moves, key=lambda m: m.moved_at)


def version_info(name: str, version: str | int, tracking_uri: str | None = None) -> ModelRef:
    """The registered version ``name``/``version`` with its tags and aliases."""
    return resolve(f"models:/{name}/{version}", tracking_uri)


# --------------------------------------------------------------------------- pulling


def pull(models_uri: str, out_dir: str, tracking_uri: str | None = None,
         allow_unverified: bool = False) -> tuple[str, BundleMeta]:
    """Download a model's raw bundle (``model.json``, ``weights.pt``, ``digests.json``) into
    ``out_dir`` and verify it.

    Nothing is executed or unpickled. Every file of the logged model is checked against the
    bundle digest recorded in MLflow (see :func:`_download_bundle`) before the bundle files are
    moved into ``out_dir``; a model that fails is refused with
    :class:`~echo.serve.digest.BundleIntegrityError` naming the file and leaves no weights
    behind. ``registry.json`` (where it came from, and the digest) is written next to them.

    Returns ``(out_dir, meta)``; ``meta.registry`` holds the URI, name, version, aliases, run
    and model IDs and the bundle digest.
    """
    tracking_uri = tracking.resolve_tracking_uri(tracking_uri)
    ref = resolve(models_uri, tracking_uri)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=out) as tmp:
        bundle_dir, meta, digest = _download_bundle(ref, Path(tmp), tracking_uri, allow_unverified)
        for name in BUNDLE_FILES:
            if (bundle_dir / name).is_file():
                os.replace(bundle_dir / name, out / name)
    info = {**ref.describe(), "bundle_digest": digest, "pulled_at": _now()}
    (out / REGISTRY_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return str(out), dataclasses.replace(meta, registry=info)


def format_summary(meta: BundleMeta) -> str:
    """Human-readable lines about a pulled or loaded bundle: version, AUROC with CI, data hash."""
    reg = meta.registry or {}
    if reg.get("name"):
        aliases = f" (aliases: {', '.join(reg['aliases'])})" if reg.get("aliases") else ""
        where = f"{reg['name']} version {reg['version']}{aliases}"
    else:
        where = reg.get("uri") or "local bundle"
    auc, low, high, val = (_float(v) for v in (meta.test_auroc, meta.test_auroc_ci_low, meta.test_auroc_ci_high,
                                               meta.val_auroc))
    pre = meta.preprocessing
    size = f"{pre.frame_size[0]}x{pre.frame_size[1]}" if pre.frame_size else "as decoded"
    digest = reg.get("bundle_digest")
    lines = [
        f"model: {where}",
        f"  backbone {meta.backbone}, init {meta.init}, label fraction {meta.label_fraction}, "
        f"{meta.n_train_studies} training studies",
        f"  test AUROC {auc:.3f} (95% CI {low:.3f}-{high:.3f}), validation AUROC {val:.3f}",
        f"  training data: manifest sha256 {meta.manifest_sha256}",
        f"  threshold {meta.threshold:.4f} (validation), clips {pre.num_clips} x {pre.clip_len} frames, frame size {size}",
        f"  weights sha256 {meta.weights_sha256} (verified), code {meta.code_version}",
        f"  bundle digest {digest} (verified)" if digest else "  bundle digest: none recorded (UNVERIFIED)",
    ]
    return "\n".join(lines)
