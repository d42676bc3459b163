"""Model bundles: a fine-tuned classifier as plain files that load without running code.

A bundle is a folder holding

- ``weights.pt``: the ``ASClassifier`` state dict (tensors only), written with ``torch.save``;
- ``model.json``: :class:`BundleMeta` as JSON: what is needed to rebuild and use the model
  (architecture, the scoring preprocessing of :mod:`echo.model.scoring`, the decision
  thresholds chosen on validation, ``weights_sha256``) and the training record (label
  fraction, init, pretraining run, AUROCs with CI, training studies, manifest SHA-256, code
  version);
- ``digests.json``: the SHA-256 of ``model.json`` and ``weights.pt``.

:class:`BundleMeta` is the one typed contract for this metadata; it is written and read only
here (:meth:`BundleMeta.to_json`, :meth:`BundleMeta.from_json`), and the registry's version
tags come from :meth:`BundleMeta.version_tags`.

Digests. :func:`file_digests` hashes files, :func:`combined_digest` turns a ``{path: sha256}``
listing into one bundle digest, and :func:`check_files` refuses a listing whose files changed,
naming the file. Loading (:func:`verify_bundle`) checks every bundle file against
``digests.json`` and, when the caller has one from a trusted place (a registry tag), the
listing against that digest; a bundle without digests is refused unless the caller allows
unverified bundles, which is logged. Weights are read with ``torch.load(weights_only=True)``
into the project's own :class:`~echo.model.networks.ASClassifier`: no pickled code runs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from echo.model.preprocessing import PREPROCESSING_VERSION, Preprocessing
from echo.serve.digest import (BundleError, BundleIntegrityError, check_files, combined_digest, file_digests,
                               file_sha256, read_listing)
from echo.version import __version__

if TYPE_CHECKING:
    from echo.model.networks import ASClassifier

__all__ = [
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "CONFIG_FILE",
    "DIGESTS_FILE",
    "BUNDLE_FILES",
    "ALLOW_UNVERIFIED_HELP",
    "BundleError",
    "BundleIntegrityError",
    "BundleMeta",
    "code_version",
    "file_sha256",
    "save_bundle",
    "read_bundle_meta",
    "verify_bundle",
    "load_bundle",
]

if TYPE_CHECKING:
    from echo.model.networks import ASClassifier

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "model.json"
DIGESTS_FILE = "digests.json"
BUNDLE_FILES = (CONFIG_FILE, WEIGHTS_FILE, DIGESTS_FILE)
ALLOW_UNVERIFIED_HELP = (
    "use a model whose bundle digest is not recorded (older models, or tags removed); "
    "the model is then unverified and a warning is logged"
)


def _tag() -> Any:
    """A training-record field (default ``None``) copied to the registry's version tags."""
    return field(default=None, metadata={"tag": True})


@dataclass(frozen=True)
class BundleMeta:
    """What a model needs to be used, and where it came from (``model.json``).

    ``preprocessing``: how videos become clips and a probability (clip length, clips per
    video, stride, frame size in pixels). ``threshold`` / ``threshold_sens90``: probability
    cut-offs of the severe call chosen on validation (Youden's J; 90% sensitivity).
    ``model``: the architecture (``ASClassifier.config()``); ``weights_sha256``: SHA-256 of
    ``weights.pt``; both set by :func:`save_bundle`. The remaining fields are the training
    record (``None`` when unknown). ``registry``: where a pulled model came from (written to
    ``registry.json``, not to ``model.json``). Never holds patient or study identifiers.
    """

    preprocessing: Preprocessing
    threshold: float
    threshold_sens90: float | None = field(default=None, metadata={"tag": True})
    model: Mapping[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""
    label_fraction: float | None = _tag()
    subset_seed: int | None = None
    init: str | None = _tag()
    pretrain_run_id: str | None = _tag()
    run_id: str | None = None
    val_auroc: float | None = _tag()
    test_auroc: float | None = _tag()
    test_auroc_ci_low: float | None = _tag()
    test_auroc_ci_high: float | None = _tag()
    test_auroc_delong_ci_low: float | None = None
    test_auroc_delong_ci_high: float | None = None
    test_auroc_delong_se: float | None = None
    n_train_studies: int | None = _tag()
    n_train_videos: int | None = None
    manifest_sha256: str | None = _tag()
    code_version: str | None = _tag()
    registry: Mapping[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        threshold = float(self.threshold)
        if not 0.0 <= threshold <= 1.0:  # also refuses NaN
            raise BundleError(f"threshold must be a probability in [0, 1], got {self.threshold!r}")
        object.__setattr__(self, "threshold", threshold)
        if self.threshold_sens90 is not None:
            object.__setattr__(self, "threshold_sens90", float(self.threshold_sens90))

    @property
    def backbone(self) -> str | None:
        return self.model.get("backbone")

    @property
    def normalization(self) -> str | None:
        return self.model.get("normalization")

    def to_json(self) -> dict[str, Any]:
        """The ``model.json`` object (flat keys, format version 1)."""
        pre = self.preprocessing
        out = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name not in ("preprocessing", "registry")}
        out.update(
            format_version=FORMAT_VERSION,
            preprocessing_version=PREPROCESSING_VERSION,
            backbone=self.backbone,
            normalization=self.normalization,
            clip_len=pre.clip_len,
            num_clips=pre.num_clips,
            stride=pre.stride,
            frame_size=None if pre.frame_size is None else list(pre.frame_size),
        )
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], where: str) -> "BundleMeta":
        """Read a ``model.json`` object (or a caller's flat mapping); ``where`` names it in errors.

        Keys set by :func:`save_bundle` itself (``format_version``, ``preprocessing_version``,
        ``backbone``, ``normalization``) are checked, not taken.
        """
        if not isinstance(doc, Mapping):
            raise BundleError(f"{where} must hold a JSON object")
        doc = dict(doc)
        if doc.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise BundleError(f"{where}: format_version {doc['format_version']!r} is not supported "
                              f"(this code reads {FORMAT_VERSION})")
        if doc.get("preprocessing_version", PREPROCESSING_VERSION) != PREPROCESSING_VERSION:
            raise BundleError(f"{where}: preprocessing_version {doc['preprocessing_version']!r} is not supported "
                              f"(this code implements {PREPROCESSING_VERSION})")
        model = doc.get("model") or {}
        for key in ("backbone", "normalization"):
            if doc.get(key) is not None and model and doc[key] != model.get(key):
                raise BundleError(f"{where}: {key} {doc[key]!r} differs from the model's {model.get(key)!r}")
        missing = [k for k in ("clip_len", "frame_size", "threshold") if doc.get(k) is None]
        if missing:
            raise BundleError(f"{where} is missing key(s) {', '.join(missing)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"preprocessing", "registry"}
        derived = {"format_version", "preprocessing_version", "backbone", "normalization",
                   "clip_len", "num_clips", "stride", "frame_size"}
        unknown = sorted(set(doc) - names - derived)
        if unknown:
            raise BundleError(f"{where}: unknown key(s) {', '.join(unknown)}")
        threshold = doc["threshold"]
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise BundleError(f"{where}: threshold must be a number, got {threshold!r}")
        try:
            pre = Preprocessing(**{k: doc[k] for k in ("clip_len", "num_clips", "stride", "frame_size")
                                   if doc.get(k) is not None})
            return cls(preprocessing=pre, **{k: v for k, v in doc.items() if k in names})
        except (TypeError, ValueError) as e:
            raise BundleError(f"{where}: {e}") from None

    def version_tags(self) -> dict[str, str]:
        """Registry version tags: the tagged training-record fields, the architecture and the
        preprocessing, and ``test_auroc_with_ci``; ``None`` values are left out."""
        values: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("tag")}
        doc = self.to_json()
        values.update({k: doc[k] for k in ("backbone", "normalization", "clip_len", "num_clips", "stride", "frame_size",
                                           "threshold", "weights_sha256", "preprocessing_version")})
        tags = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in values.items() if v is not None}
        if self.test_auroc is not None:
            low, high = (math.nan if v is None else v for v in (self.test_auroc_ci_low, self.test_auroc_ci_high))
            tags["test_auroc_with_ci"] = f"{self.test_auroc:.3f} (95% CI {low:.3f}-{high:.3f})"
        return tags

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description for outputs: the training record, threshold, digests, registry."""
        doc = self.to_json()
        keys = ("backbone", "label_fraction", "init", "threshold", "val_auroc", "test_auroc", "test_auroc_ci_low",
                "test_auroc_ci_high", "manifest_sha256", "weights_sha256", "code_version")
        out = {k: doc.get(k) for k in keys}
        if self.registry:
            out["registry"] = dict(self.registry)
        return out


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


def _jsonable(value: Any) -> Any:
    """numpy/torch scalars and tuples as plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_bundle(model: "ASClassifier", meta: BundleMeta | Mapping[str, Any], out_dir: str) -> str:
    """Write ``weights.pt``, ``model.json`` and ``digests.json`` for ``model`` into the local
    folder ``out_dir``; return it.

    ``meta``: a :class:`BundleMeta`, or a flat mapping of its ``model.json`` keys (at least
    ``clip_len``, ``frame_size``, ``threshold``). ``model`` and ``weights_sha256`` are set
    here; ``code_version`` defaults to :func:`code_version`.
    """
    import torch  # here, not at the top: `models pull` and `predict --help` read bundles without torch

    where = f"bundle for {out_dir}"
    if not isinstance(meta, BundleMeta):
        reserved = [k for k in ("format_version", "model", "normalization", "preprocessing_version", "weights_sha256")
                    if k in meta]
        if reserved:
            raise BundleError(f"{where}: meta may not set {', '.join(reserved)} (save_bundle sets them)")
        meta = BundleMeta.from_json(_jsonable(dict(meta)), where)
    arch = _jsonable(model.config())
    if meta.model and meta.backbone != arch["backbone"]:
        raise BundleError(f"{where}: meta says backbone {meta.backbone!r}, the model is {arch['backbone']!r}")
    if meta.preprocessing.frame_size is None:
        raise BundleError(f"{where}: the preprocessing needs a frame_size")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    buf = io.BytesIO()  # in memory: torch.save names the archive after a file, so bytes would vary
    torch.save(state, buf)
    _write(folder / WEIGHTS_FILE, buf.getvalue())
    meta = dataclasses.replace(meta, model=arch, weights_sha256=file_sha256(folder / WEIGHTS_FILE),
                               code_version=meta.code_version or code_version(), registry=None)
    _write(folder / CONFIG_FILE, (json.dumps(meta.to_json(), indent=2, sort_keys=True) + "\n").encode())
    digests = file_digests(folder, [CONFIG_FILE, WEIGHTS_FILE])
    _write(folder / DIGESTS_FILE, (json.dumps({"files": digests}, indent=2, sort_keys=True) + "\n").encode())
    return str(folder)


def read_bundle_meta(bundle_dir: str | os.PathLike) -> BundleMeta:
    """``model.json`` of a bundle as :class:`BundleMeta` (no digest check)."""
    path = Path(bundle_dir) / CONFIG_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"bundle {bundle_dir} holds no {CONFIG_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from None
    meta = BundleMeta.from_json(doc, str(path))
    if not meta.model or not meta.weights_sha256:
        raise BundleError(f"{path} is missing key(s) model or weights_sha256")
    return meta


def read_digests(bundle_dir: str | os.PathLike) -> dict[str, str] | None:
    """The ``{file: sha256}`` listing of ``digests.json``, or ``None`` when the bundle has none."""
    path = Path(bundle_dir) / DIGESTS_FILE
    if not path.is_file():
        return None
    files = read_listing(path, None, str(bundle_dir))
    if set(files) != {CONFIG_FILE, WEIGHTS_FILE}:
        raise BundleIntegrityError(f"{path} must list exactly {CONFIG_FILE} and {WEIGHTS_FILE}; refusing the bundle")
    return files


def verify_bundle(bundle_dir: str | os.PathLike, expected_digest: str | None = None,
                  allow_unverified: bool = False) -> BundleMeta:
    """``model.json`` of a bundle after checking its files.

    ``model.json`` and ``weights.pt`` must match ``digests.json`` and, when given,
    ``digests.json``'s :func:`combined_digest` must equal ``expected_digest``; the weights
    must also match ``weights_sha256``. A bundle without ``digests.json`` is refused unless
    ``allow_unverified`` (then a warning is logged). Raises :class:`BundleIntegrityError`
    naming the file that changed.
    """
    where = str(bundle_dir)
    digests = read_digests(bundle_dir)
    if digests is None:
        if not allow_unverified:
            raise BundleIntegrityError(f"{where} holds no {DIGESTS_FILE}: the bundle cannot be verified; "
                                       "refusing it (pass --allow-unverified to use it anyway)")
        log.warning("%s: no %s, using the bundle UNVERIFIED (--allow-unverified)", where, DIGESTS_FILE)
    else:
        check_files(bundle_dir, digests, where)
        if expected_digest is not None and combined_digest(digests) != expected_digest:
            raise BundleIntegrityError(f"{where}: {DIGESTS_FILE} does not match the recorded bundle digest; refusing it")
    meta = read_bundle_meta(bundle_dir)
    weights = Path(bundle_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"bundle {bundle_dir} holds no {WEIGHTS_FILE}")
    actual = file_sha256(weights)
    if actual != meta.weights_sha256:
        raise BundleIntegrityError(
            f"{weights}: SHA-256 {actual} does not match {meta.weights_sha256} recorded in "
            f"{CONFIG_FILE}; the weights were altered, refusing to load them"
        )
    return meta


def load_bundle(bundle_dir: str | os.PathLike, expected_digest: str | None = None,
                allow_unverified: bool = False) -> tuple["ASClassifier", BundleMeta]:
    """The classifier (CPU, eval mode) and metadata of a bundle checked by :func:`verify_bundle`.

    The weights are read with ``torch.load(weights_only=True)`` and must match the
    architecture in ``model.json`` key for key and shape for shape.
    """
    # Here, not at the top: the networks need torch, which `models pull` and `predict --help` do without.
    from echo.model.networks import ASClassifier, WeightsLoadError, load_state_dict_file

    meta = verify_bundle(bundle_dir, expected_digest, allow_unverified)
    try:
        model = ASClassifier.from_config(meta.model)
    except (ValueError, TypeError, KeyError) as e:
        raise BundleError(f"{Path(bundle_dir) / CONFIG_FILE}: bad model config: {e}") from None
    weights = str(Path(bundle_dir) / WEIGHTS_FILE)
    try:
        model.load_state_dict(load_state_dict_file(weights), strict=True)
    except (WeightsLoadError, RuntimeError) as e:
        raise BundleError(f"{weights} does not fit the model described in {CONFIG_FILE}: {e}") from None
    return model.eval(), meta
