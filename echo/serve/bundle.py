"""Model bundles: a fine-tuned classifier as two plain files that load without running code.

A bundle is a folder holding

- ``weights.pt``: the ``ASClassifier`` state dict (tensors only), written with ``torch.save``;
- ``model.json``: what is needed to rebuild and use it: ``format_version``, ``model`` (the
  architecture, ``ASClassifier.config()``), the evaluation preprocessing (``clip_len``,
  ``num_clips``, ``stride``, ``frame_size`` as ``[H, W]`` pixels, ``normalization``,
  ``preprocessing_version``), the decision thresholds chosen on validation (``threshold``,
  Youden's J; ``threshold_sens90``, 90% sensitivity), ``weights_sha256``, and the training
  record passed in by the fine-tuning job (label fraction, init, pretraining run, AUROCs with
  CI, number of training studies, manifest SHA-256, code version).

Loading checks the SHA-256 of ``weights.pt`` against ``model.json`` and reads it with
``torch.load(weights_only=True)`` into the project's own :class:`~echo.model.networks.ASClassifier`:
no pickled code is ever executed.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from echo.version import __version__

if TYPE_CHECKING:
    from echo.model.networks import ASClassifier

__all__ = [
    "FORMAT_VERSION",
    "PREPROCESSING_VERSION",
    "WEIGHTS_FILE",
    "CONFIG_FILE",
    "BUNDLE_FILES",
    "REQUIRED_META",
    "BundleError",
    "BundleIntegrityError",
    "code_version",
    "file_sha256",
    "save_bundle",
    "read_bundle_meta",
    "verify_bundle",
    "load_bundle",
]

FORMAT_VERSION = 1
# Version 1: ``echo.data.clips.eval_clips`` (num_clips evenly spaced clips of clip_len frames,
# each min-max scaled to [0, 1]); frames of another size are resized to frame_size
# (bilinear, antialiased); sigmoid per clip, probabilities averaged over clips.
PREPROCESSING_VERSION = "1"
WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "model.json"
BUNDLE_FILES = (CONFIG_FILE, WEIGHTS_FILE)
REQUIRED_META = ("clip_len", "frame_size", "threshold")
_DEFAULTS = {"num_clips": 4, "stride": 1, "threshold_sens90": None}
# Set by save_bundle itself; a caller's meta may not override them.
_RESERVED = ("format_version", "model", "normalization", "preprocessing_version", "weights_sha256")


class BundleError(ValueError):
    """A bundle that cannot be used (missing file, bad model.json); the message names the folder."""


class BundleIntegrityError(BundleError):
    """A bundle whose weights do not match the SHA-256 recorded for them."""


def code_version() -> str:
    """``echo.__version__``, plus ``+g<commit>`` (and ``.dirty``) when the code is a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "echo"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    if not commit:
        return __version__
    return f"{__version__}+g{commit}{'.dirty' if dirty else ''}"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a local file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    """numpy/torch scalars and tuples as plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def _frame_size(value: Any) -> list[int]:
    size = [value, value] if isinstance(value, int) else list(value)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise BundleError(f"frame_size must be a positive int or [H, W] of positive ints, got {value!r}")
    return size


def save_bundle(model: "ASClassifier", meta: Mapping[str, Any], out_dir: str) -> str:
    """Write ``weights.pt`` and ``model.json`` for ``model`` into the local folder ``out_dir``.

    Args:
        model: the fine-tuned classifier (any device; weights are saved on CPU).
        meta: must hold ``clip_len`` (frames), ``frame_size`` (pixels, int or ``[H, W]``) and
            ``threshold`` (probability cut-off of the severe call); may hold ``num_clips``
            (default 4), ``stride`` (default 1), ``threshold_sens90`` and the training record
            (``label_fraction``, ``init``, ``pretrain_run_id``, ``backbone``, ``val_auroc``,
            ``test_auroc``, ``test_auroc_ci_low``, ``test_auroc_ci_high``, ``n_train_studies``,
            ``manifest_sha256``, ``code_version``; the latter defaults to :func:`code_version`).
            Values must be JSON-serialisable (numpy scalars are converted). Never put patient
            or study identifiers in it.

    Returns:
        ``out_dir``.
    """
    import torch  # here, not at the top: `models pull` and `predict --help` read bundles without torch

    missing = [k for k in REQUIRED_META if meta.get(k) is None]
    if missing:
        raise BundleError(f"bundle for {out_dir}: meta is missing required key(s) {', '.join(missing)}")
    reserved = [k for k in _RESERVED if k in meta]
    if reserved:
        raise BundleError(f"bundle for {out_dir}: meta may not set {', '.join(reserved)} (save_bundle sets them)")
    threshold = float(meta["threshold"])
    if not 0.0 <= threshold <= 1.0:
        raise BundleError(f"bundle for {out_dir}: threshold must be a probability in [0, 1], got {threshold}")

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    buf = io.BytesIO()  # in memory: torch.save names the archive after a file, so bytes would vary
    torch.save(state, buf)
    tmp = folder / f".{WEIGHTS_FILE}.{os.getpid()}.tmp"
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, folder / WEIGHTS_FILE)

    arch = model.config()
    if meta.get("backbone", arch["backbone"]) != arch["backbone"]:
        raise BundleError(f"bundle for {out_dir}: meta says backbone {meta['backbone']!r}, the model is {arch['backbone']!r}")
    record: dict[str, Any] = {**_DEFAULTS, "backbone": arch["backbone"], "code_version": code_version()}
    record.update(_jsonable(dict(meta)))
    record.update(
        format_version=FORMAT_VERSION,
        model=_jsonable(arch),
        normalization=arch["normalization"],
        preprocessing_version=PREPROCESSING_VERSION,
        frame_size=_frame_size(record["frame_size"]),
        clip_len=int(record["clip_len"]),
        num_clips=int(record["num_clips"]),
        stride=int(record["stride"]),
        threshold=threshold,
        weights_sha256=file_sha256(folder / WEIGHTS_FILE),
    )
    text = json.dumps(record, indent=2, sort_keys=True)
    tmp = folder / f".{CONFIG_FILE}.{os.getpid()}.tmp"
    tmp.write_text(text + "\n")
    os.replace(tmp, folder / CONFIG_FILE)
    return str(folder)


def read_bundle_meta(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """``model.json`` of a bundle, checked for the keys loading needs (no hash check)."""
    path = Path(bundle_dir) / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"bundle {bundle_dir} holds no {CONFIG_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{path} must hold a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path}: format_version {meta.get('format_version')!r} is not supported (this code reads {FORMAT_VERSION})"
        )
    needed = ("model", "weights_sha256", "clip_len", "num_clips", "stride", "frame_size", "threshold")
    missing = [k for k in needed if k not in meta]
    if missing:
        raise BundleError(f"{path} is missing key(s) {', '.join(missing)}")
    if meta.get("preprocessing_version") != PREPROCESSING_VERSION:
        raise BundleError(
            f"{path}: preprocessing_version {meta.get('preprocessing_version')!r} is not supported "
            f"(this code implements {PREPROCESSING_VERSION})"
        )
    if not isinstance(meta["threshold"], (int, float)) or math.isnan(meta["threshold"]):
        raise BundleError(f"{path}: threshold must be a number, got {meta['threshold']!r}")
    return meta


def verify_bundle(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """``model.json`` of a bundle after checking ``weights.pt`` against its ``weights_sha256``.

    Raises :class:`BundleIntegrityError` when the weights were altered or replaced.
    """
    meta = read_bundle_meta(bundle_dir)
    weights = Path(bundle_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"bundle {bundle_dir} holds no {WEIGHTS_FILE}")
    actual = file_sha256(weights)
    if actual != meta["weights_sha256"]:
        raise BundleIntegrityError(
            f"{weights}: SHA-256 {actual} does not match {meta['weights_sha256']} recorded in "
            f"{CONFIG_FILE}; the weights were altered, refusing to load them"
        )
    return meta


def load_bundle(bundle_dir: str | os.PathLike) -> tuple["ASClassifier", dict[str, Any]]:
    """The classifier (CPU, eval mode) and ``model.json`` of a verified bundle.

    The weights are read with ``torch.load(weights_only=True)`` and must match the
    architecture in ``model.json`` key for key and shape for shape.
    """
    # Here, not at the top: the networks need torch, which `models pull` and `predict --help` do without.
    from echo.model.networks import ASClassifier, WeightsLoadError, load_state_dict_file

    meta = verify_bundle(bundle_dir)
    try:
        model = ASClassifier.from_config(meta["model"])
    except (ValueError, TypeError, KeyError) as e:
        raise BundleError(f"{Path(bundle_dir) / CONFIG_FILE}: bad model config: {e}") from None
    weights = str(Path(bundle_dir) / WEIGHTS_FILE)
    try:
        model.load_state_dict(load_state_dict_file(weights), strict=True)
    except (WeightsLoadError, RuntimeError) as e:
        raise BundleError(f"{weights} does not fit the model described in {CONFIG_FILE}: {e}") from None
    return model.eval(), meta
