"""Video backbones, the self-supervised model and the aortic-stenosis classifier.

Backbones are torchvision's 3-D ResNets (``r3d_18``, the paper's; ``r2plus1d_18``; ``mc3_18``)
with the classifier replaced by ``Identity``, plus ``tiny3d``, a small 3-D CNN that trains in
seconds on a CPU. Every backbone maps clips (N, C, T, H, W), C = 1 (grayscale echo, broadcast
to 3 channels as a view) or 3, to features (N, D). A backbone's ``state_dict`` is the
torchvision model's without ``fc.*``: the "encoder" state dict that pretraining saves and
fine-tuning loads.

Weights are only ever read with ``torch.load(..., weights_only=True)``: a weights file or a
registry entry is a trust boundary, and a pickle can run code. Loading reports missing and
unexpected keys, and refuses weights for another architecture (more than half of the
backbone's keys missing, or any shape mismatch).
"""

from __future__ import annotations

import io
import logging
import math
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from echo.data import storage
from echo.data.order import MAX_ORDER_CLIP_LEN

__all__ = [
    "BACKBONES",
    "KINETICS_MEAN",
    "KINETICS_STD",
    "NORMALIZATIONS",
    "CONFIG_FORMAT_VERSION",
    "WeightsLoadError",
    "LoadReport",
    "Tiny3D",
    "as_rgb",
    "build_backbone",
    "load_state_dict_file",
    "load_backbone_state",
    "SSLModel",
    "ASClassifier",
]

log = logging.getLogger(__name__)

BACKBONES = ("r3d_18", "r2plus1d_18", "mc3_18", "tiny3d")
NORMALIZATIONS = ("minmax", "kinetics")
CONFIG_FORMAT_VERSION = 1
# torchvision's Kinetics-400 video transforms (per RGB channel, on [0, 1] inputs).
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)

_TORCHVISION_WEIGHTS = {
    "r3d_18": "R3D_18_Weights",
    "r2plus1d_18": "R2Plus1D_18_Weights",
    "mc3_18": "MC3_18_Weights",
}
# Prefixes that wrappers put on a module's keys: DDP, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_KEYS_LISTED = 30


class WeightsLoadError(ValueError):
    """Weights that cannot be used: wrong architecture, not a state dict, unreachable source."""


@dataclass
class LoadReport:
    """What loading a state dict into a backbone did (key names only)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def as_rgb(x: Tensor) -> Tensor:
    """(N, 1, T, H, W) -> (N, 3, T, H, W) as a broadcast view; (N, 3, T, H, W) unchanged."""
    if x.ndim != 5 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected clips of shape (N, C, T, H, W) with C = 1 or 3, got {tuple(x.shape)}")
    return x.expand(-1, 3, -1, -1, -1) if x.shape[1] == 1 else x


def _rgb_input_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (as_rgb(args[0]), *args[1:])


class Tiny3D(nn.Module):
    """A small 3-D CNN: 4 conv-BN-ReLU blocks (16-32-64-128 channels), global average pool.

    Spatial size shrinks 4x in the first block and 2x in each later one, time 2x in blocks
    3 and 4, so a (N, 3, 16, 112, 112) clip costs about 0.13 GMAC. Maps (N, C, T, H, W),
    C = 1 or 3, to features (N, 128).
    """

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()
        widths = (16, 32, 64, 128)
        kernels = ((3, 7, 7), (3, 3, 3), (3, 3, 3), (3, 3, 3))
        strides = ((1, 4, 4), (1, 2, 2), (2, 2, 2), (2, 2, 2))
        blocks: list[nn.Module] = []
        c_in = 3
        for c_out, k, s in zip(widths, kernels, strides):
            blocks.append(
                nn.Sequential(
                    nn.Conv3d(c_in, c_out, k, stride=s, padding=tuple(i // 2 for i in k), bias=False),
                    nn.BatchNorm3d(c_out),
                    nn.ReLU(inplace=True),
                )
            )
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool3d(1)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, T, H, W) -> (N, 128)."""
        return self.pool(self.blocks(as_rgb(x))).flatten(1)


def build_backbone(name: str, init: str = "random") -> tuple[nn.Module, int]:
    """A backbone without classifier, and its feature width D.

    Args:
        name: one of :data:`BACKBONES`.
        init: ``"random"``; ``"kinetics"`` (torchvision's Kinetics-400 weights, downloaded or
            taken from ``$TORCH_HOME/hub/checkpoints``; not for ``tiny3d``); or a local path or
            ``s3://`` URI of a state dict (a full torchvision model's, whose ``fc.*`` is dropped,
            or a bare backbone's, optionally under ``module.``/``backbone.`` prefixes).

    Returns:
        ``(module, D)``: module maps clips (N, C, T, H, W), C = 1 or 3, to features (N, D);
        D = 512 for the ResNets, 128 for ``tiny3d``.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if name == "tiny3d":
        module: nn.Module = Tiny3D()
        dim = Tiny3D.feature_dim
    else:
        from torchvision.models import video

        module = getattr(video, name)(weights=None)
        dim = module.fc.in_features
        module.fc = nn.Identity()
        module.register_forward_pre_hook(_rgb_input_hook)
    _initialise(module, name, init)
    return module, dim


def _initialise(backbone: nn.Module, name: str, init: str) -> None:
    if init == "random":
        return
    if init == "kinetics":
        load_backbone_state(backbone, _kinetics_state(name), source=f"torchvision Kinetics-400 weights for {name}")
        return
    if not storage.is_s3(init) and not storage.exists(init):
        raise WeightsLoadError(
            f"init must be 'random', 'kinetics', or a local file / s3:// URI of a state dict; "
            f"no such file: {init!r}"
        )
    load_backbone_state(backbone, init)


def _kinetics_state(name: str) -> dict[str, Tensor]:
    if name not in _TORCHVISION_WEIGHTS:
        raise WeightsLoadError(
            f"backbone {name!r} has no Kinetics-400 weights; use init='random' or a state-dict file"
        )
    from torchvision.models import video

    weights = getattr(video, _TORCHVISION_WEIGHTS[name]).KINETICS400_V1
    try:
        return weights.get_state_dict(progress=False)
    except OSError as e:  # URLError, HTTPError, timeouts, refused connections
        filename = weights.url.rsplit("/", 1)[-1]
        raise WeightsLoadError(
            f"could not download the Kinetics-400 weights for {name} from {weights.url} ({e}). "
            f"Where the network is unreachable, fetch {filename} elsewhere and pass its "
            f"local path (or an s3:// URI) as init instead of 'kinetics', e.g. --init /path/to/{filename}"
        ) from e


def load_state_dict_file(uri: str) -> dict[str, Tensor]:
    """Read a state dict (a mapping of names to tensors) from a local path or ``s3://`` URI.

    Uses ``torch.load(weights_only=True, map_location="cpu")`` on the bytes in memory, so a
    file holding arbitrary pickled objects is refused rather than executed.
    """
    data = storage.read_bytes(uri)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise WeightsLoadError(f"{uri} is not a loadable weights file (weights_only=True): {e}") from e
    if not isinstance(obj, Mapping):
        raise WeightsLoadError(f"{uri} holds a {type(obj).__name__}, not a state dict of tensors")
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise WeightsLoadError(
            f"{uri} is not a state dict of tensors: entries {_listing(bad)} are not (name, tensor) pairs"
        )
    return dict(obj)


def _strip_wrappers(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _backbone_keys(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Weights under the backbone's own key names, and the names dropped (classifier, heads)."""
    stripped = {_strip_wrappers(k): v for k, v in state.items()}
    # A full SSLModel/ASClassifier state dict (attribute ``backbone``): keep only the backbone.
    if any(k.startswith("backbone.") for k in stripped):
        kept = {_strip_wrappers(k[len("backbone.") :]): v for k, v in stripped.items() if k.startswith("backbone.")}
        dropped = [k for k in stripped if not k.startswith("backbone.")]
    else:
        kept, dropped = stripped, []
    dropped += [k for k in kept if k.startswith("fc.")]
    return {k: v for k, v in kept.items() if not k.startswith("fc.")}, dropped


def load_backbone_state(
    backbone: nn.Module, state_or_uri: Mapping[str, Tensor] | str, *, source: str | None = None
) -> LoadReport:
    """Copy matching weights into ``backbone``; report the rest.

    Args:
        backbone: a module from :func:`build_backbone`.
        state_or_uri: a state dict, or a local path / ``s3://`` URI of one. Accepted layouts: a
            full torchvision model (``fc.*`` ignored), a bare backbone, or either under
            ``module.`` / ``_orig_mod.`` / ``backbone.`` prefixes (other keys of a full
            ``SSLModel`` or ``ASClassifier`` are ignored).
        source: the name used in messages (defaults to the URI).

    Returns:
        A :class:`LoadReport`; missing and unexpected keys are logged as a warning (missing
        ones keep their current values). Raises :class:`WeightsLoadError` naming the source
        when the weights are for another architecture: more than half of the backbone's keys
        missing, or any key with another shape.
    """
    if isinstance(state_or_uri, str):
        source = source or state_or_uri
        state = load_state_dict_file(state_or_uri)
    else:
        source = source or "the given state dict"
        state = dict(state_or_uri)
    weights, dropped = _backbone_keys(state)
    own = backbone.state_dict()
    report = LoadReport(source=source)
    mismatched = []
    for key, target in own.items():
        if key not in weights:
            report.missing.append(key)
        elif weights[key].shape != target.shape:
            mismatched.append(f"{key} {tuple(weights[key].shape)} vs {tuple(target.shape)}")
        else:
            report.loaded.append(key)
    report.unexpected = [k for k in weights if k not in own]
    if mismatched or len(report.missing) > len(own) / 2:
        raise WeightsLoadError(
            f"{source} does not fit this {type(backbone).__name__} backbone (another architecture?): "
            f"{len(report.missing)} of its {len(own)} keys missing ({_listing(report.missing)}); "
            f"shape mismatch (file vs model): {_listing(mismatched)}; unexpected: {_listing(report.unexpected)}"
        )
    backbone.load_state_dict({k: weights[k] for k in report.loaded}, strict=False)
    if dropped:
        log.info("%s: ignored %d classifier/head keys", source, len(dropped))
    if report.missing or report.unexpected:
        log.warning(
            "%s: loaded %d of %d backbone keys; missing (left as initialised): %s; unexpected (ignored): %s",
            source,
            len(report.loaded),
            len(own),
            _listing(report.missing),
            _listing(report.unexpected),
        )
    else:
        log.info("%s: loaded all %d backbone keys", source, len(own))
    return report


def _listing(keys: list[str]) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:_KEYS_LISTED])
    more = len(keys) - _KEYS_LISTED
    return f"{shown} (and {more} more)" if more > 0 else shown


class SSLModel(nn.Module):
    """Backbone + SimCLR projection head (+ the EchoCLR frame-order head).

    Projection head: Linear(D, hidden, bias=False) - ReLU - Linear(hidden, proj_dim, bias=False),
    hidden = D // 2 by default (512 -> 256 -> 128 for the ResNets, as published). Frame-order
    head (``frame_order=True``): Linear(D, clip_len!) on the features.

    Attributes: ``backbone``, ``projector``, ``order_head`` (None without frame order),
    ``feature_dim`` (D), ``num_order_classes`` (clip_len! or 0).
    """

    def __init__(
        self,
        backbone: str,
        clip_len: int,
        frame_order: bool,
        init: str = "random",
        proj_hidden: int | None = None,
        proj_dim: int = 128,
    ) -> None:
        super().__init__()
        if not isinstance(clip_len, int) or clip_len < 1:
            raise ValueError(f"SSLModel: clip_len must be a positive int, got {clip_len!r}")
        if frame_order and clip_len > MAX_ORDER_CLIP_LEN:
            raise ValueError(
                f"SSLModel: the frame-order head has clip_len! outputs; clip_len must be <= "
                f"{MAX_ORDER_CLIP_LEN}, got {clip_len}"
            )
        self.backbone, self.feature_dim = build_backbone(backbone, init)
        hidden = proj_hidden if proj_hidden is not None else self.feature_dim // 2
        if hidden < 1 or proj_dim < 1:
            raise ValueError(f"SSLModel: proj_hidden and proj_dim must be >= 1, got {hidden} and {proj_dim}")
        self.backbone_name = backbone
        self.clip_len = clip_len
        self.projector = nn.Sequential(
            nn.Linear(self.feature_dim, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, proj_dim, bias=False),
        )
        self.num_order_classes = math.factorial(clip_len) if frame_order else 0
        self.order_head = nn.Linear(self.feature_dim, self.num_order_classes) if frame_order else None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Clips (N, C, T, H, W), C = 1 or 3, T = clip_len for the order head ->
        ``{"features": (N, D), "projection": (N, proj_dim), "order_logits": (N, clip_len!)}``
        (``order_logits`` only with frame order)."""
        features = self.backbone(x)
        out = {"features": features, "projection": self.projector(features)}
        if self.order_head is not None:
            out["order_logits"] = self.order_head(features)
        return out

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The backbone's state dict (torchvision key names, no ``fc``): the pretrained encoder."""
        return self.backbone.state_dict()


class ASClassifier(nn.Module):
    """Backbone + optional dropout + Linear(D, 1): a severe-aortic-stenosis logit per clip.

    Inputs are clips min-max normalised to [0, 1] by the data pipeline. With
    ``normalization="kinetics"`` the model itself subtracts the Kinetics-400 mean and divides
    by its std per channel (fixed, non-persistent buffers rebuilt from :meth:`config`), so a
    saved model carries its own input normalisation.
    """

    def __init__(
        self,
        backbone: str,
        dropout: float = 0.0,
        normalization: str = "minmax",
        init: str = "random",
    ) -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"ASClassifier: normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"ASClassifier: dropout must be in [0, 1), got {dropout!r}")
        if init == "kinetics" and normalization != "kinetics":
            log.warning("ASClassifier: Kinetics-400 weights expect normalization='kinetics', got %r", normalization)
        self.backbone_name = backbone
        self.dropout_p = float(dropout)
        self.normalization = normalization
        self.backbone, self.feature_dim = build_backbone(backbone, init)
        self.dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        self.head = nn.Linear(self.feature_dim, 1)
        self.register_buffer("mean", torch.tensor(KINETICS_MEAN).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(KINETICS_STD).view(1, 3, 1, 1, 1), persistent=False)
        self._frozen = False

    def forward(self, x: Tensor) -> Tensor:
        """Clips (N, C, T, H, W), C = 1 or 3, values in [0, 1] -> logits (N,)."""
        if self.normalization == "kinetics":
            x = (as_rgb(x) - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.head(self.dropout(self.backbone(x))).squeeze(1)

    def config(self) -> dict[str, Any]:
        """JSON-serialisable architecture description; :meth:`from_config` rebuilds the model."""
        return {
            "backbone": self.backbone_name,
            "dropout": self.dropout_p,
            "normalization": self.normalization,
            "format_version": CONFIG_FORMAT_VERSION,
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ASClassifier":
        """A randomly initialised model of the architecture ``cfg`` describes (load weights next)."""
        expected = {"backbone", "dropout", "normalization", "format_version"}
        unknown = sorted(set(cfg) - expected)
        missing = sorted(expected - set(cfg))
        if unknown or missing:
            raise ValueError(f"ASClassifier config: unknown keys {unknown}, missing keys {missing}")
        if cfg["format_version"] != CONFIG_FORMAT_VERSION:
            raise ValueError(
                f"ASClassifier config: format_version {cfg['format_version']!r} is not supported "
                f"(this code reads {CONFIG_FORMAT_VERSION})"
            )
        return cls(cfg["backbone"], dropout=cfg["dropout"], normalization=cfg["normalization"])

    def load_encoder(self, state_or_uri: Mapping[str, Tensor] | str) -> LoadReport:
        """Load pretrained encoder weights (e.g. ``SSLModel.encoder_state_dict()`` or its file)
        into the backbone; see :func:`load_backbone_state` for layouts and key reporting."""
        return load_backbone_state(self.backbone, state_or_uri)

    def freeze_backbone(self, flag: bool = True) -> None:
        """Stop (or resume) training the backbone: no gradients, and its BatchNorm statistics
        stay fixed (the backbone stays in eval mode while frozen, whatever ``train()`` says)."""
        self._frozen = bool(flag)
        for p in self.backbone.parameters():
            p.requires_grad_(not self._frozen)
        self.backbone.train(self.training and not self._frozen)

    def train(self, mode: bool = True) -> "ASClassifier":
        super().train(mode)
        if self._frozen:
            self.backbone.eval()
        return self
