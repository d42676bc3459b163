"""Where a clip classifier looks: saliency maps for one clip, and how much of a map falls in a region.

Methods (all for the severe-AS *logit*, the model's pre-sigmoid output):

- ``"gradient"``: vanilla gradient, ``|d logit / d x|`` maximised over input channels
  (Simonyan et al., 2014).
- ``"smoothgrad"``: the mean of ``|d logit / d x|`` over ``n`` copies of the clip with Gaussian
  noise of std ``sigma * (max(x) - min(x))`` added (Smilkov et al., 2017), then maximised over
  channels. The noise follows ``seed``.
- ``"gradcam"``: Grad-CAM (Selvaraju et al., 2017) on the last convolutional block,
  ``ReLU(sum_k mean(dlogit/dA_k) * A_k)``, upsampled trilinearly to the clip's (T, H, W).

Every map is a float32 numpy array (T, H, W), non-negative, divided by its maximum so that it
lies in [0, 1] (a map with no signal at all stays zero). Models are run in eval mode (BatchNorm
running statistics, no dropout); each module's train/eval flag is restored afterwards, and no
parameter's ``.grad`` is touched.

The region measure: the share of a map's mass (the sum of its values) inside a box, and the
box's share of the frame area, which is what a uniform map would score.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "METHODS",
    "Box",
    "vanilla_gradient",
    "smoothgrad",
    "grad_cam",
    "gradcam_layer",
    "saliency_map",
    "scale_box",
    "pixel_box",
    "region_energy_share",
    "area_share",
    "region_measure",
]

METHODS = ("gradient", "smoothgrad", "gradcam")

Box = tuple[float, float, float, float]
"""``(x0, y0, x1, y1)`` in pixels: x along columns (W), y along rows (H); x0, y0 inclusive,
x1, y1 exclusive, i.e. the pixels ``[y0:y1, x0:x1]``."""


# ---------------------------------------------------------------------------- model plumbing


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def _as_batch(model: nn.Module, clip: Tensor | np.ndarray) -> Tensor:
    """(C, T, H, W) float clip (tensor or numpy) -> (1, C, T, H, W) tensor, detached, on the
    model's device and in its parameters' float dtype."""
    x = torch.as_tensor(clip)
    if x.ndim != 4:
        raise ValueError(f"saliency: expected one clip of shape (C, T, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"saliency: expected a float clip (values in [0, 1]), got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("saliency: the clip has NaN or infinite values")
    param = next(model.parameters(), None)
    if param is not None and param.is_floating_point():
        x = x.to(device=param.device, dtype=param.dtype)
    return x.detach().unsqueeze(0)


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    """Run ``model`` on (N, C, T, H, W) and return its (N,) logits, checking the output shape."""
    out = model(x)
    if not isinstance(out, Tensor):
        raise TypeError(f"saliency: the model must return a logits tensor (N,), got {type(out).__name__}")
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.shape != (x.shape[0],):
        raise ValueError(
            f"saliency: the model must map (N, C, T, H, W) clips to logits (N,) or (N, 1); "
            f"got output shape {tuple(out.shape)} for N = {x.shape[0]}"
        )
    return out


def _normalise(m: Tensor) -> np.ndarray:
    """Non-negative (T, H, W) tensor -> float32 numpy array divided by its maximum (zeros stay zero)."""
    m = m.detach().float().clamp_min(0).cpu()
    peak = float(m.max())
    return (m / peak if peak > 0 else m).numpy().astype(np.float32)


def _input_gradient(model: nn.Module, x: Tensor) -> Tensor:
    """d(sum of logits)/dx for a batch x (N, C, T, H, W); the clips are independent in eval mode,
    so row i is the gradient of logit i."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(_logits(model, x).sum(), x)
    return grad


# ---------------------------------------------------------------------------- methods


def vanilla_gradient(model: nn.Module, clip: Tensor | np.ndarray) -> np.ndarray:
    """Vanilla gradient saliency.

    Args:
        model: maps float clips (N, C, T, H, W) to logits (N,).
        clip: one clip (C, T, H, W), float (the model's input scale, e.g. [0, 1]).

    Returns:
        (T, H, W) float32 in [0, 1]: ``max_c |d logit / d clip[c]|`` over its maximum.
    """
    x = _as_batch(model, clip)
    with _eval_mode(model):
        grad = _input_gradient(model, x)
    return _normalise(grad[0].abs().amax(dim=0))


def smoothgrad(
    model: nn.Module,
    clip: Tensor | np.ndarray,
    n: int = 16,
    sigma: float = 0.1,
    seed: int = 0,
    batch_size: int = 4,
) -> np.ndarray:
    """SmoothGrad: vanilla gradient magnitudes averaged over noisy copies of the clip.

    Args:
        model: maps float clips (N, C, T, H, W) to logits (N,).
        clip: one clip (C, T, H, W), float.
        n: number of noisy copies (>= 1).
        sigma: noise std as a fraction of the clip's value range ``max - min`` (>= 0).
        seed: seed of the noise (a CPU ``torch.Generator``): same seed, same map.
        batch_size: noisy copies per forward/backward pass (memory vs. speed).

    Returns:
        (T, H, W) float32 in [0, 1]: ``max_c mean_i |d logit / d (clip + noise_i)[c]|`` over its
        maximum.
    """
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"smoothgrad: n must be a positive int, got {n!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"smoothgrad: batch_size must be a positive int, got {batch_size!r}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"smoothgrad: sigma must be a finite number >= 0, got {sigma!r}")
    x = _as_batch(model, clip)
    std = sigma * float(x.max() - x.min())
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros_like(x[0])
    with _eval_mode(model):
        for start in range(0, n, batch_size):
            k = min(batch_size, n - start)
            noise = torch.randn((k, *x.shape[1:]), generator=gen, dtype=x.dtype).to(x.device) * std
            total += _input_gradient(model, x + noise).abs().sum(dim=0)
    return _normalise((total / n).amax(dim=0))


def gradcam_layer(model: nn.Module) -> nn.Module:
    """The default Grad-CAM layer: the last ``nn.Conv3d`` in ``model.modules()`` order
    (registration order, which is execution order for sequential backbones such as
    torchvision's video ResNets and ``echo.model.networks.Tiny3D``)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    if not convs:
        raise ValueError(
            f"grad_cam: {type(model).__name__} has no nn.Conv3d layer; pass layer= explicitly "
            f"(a module whose output is (N, K, t, h, w))"
        )
    return convs[-1]


def _ancestors(model: nn.Module, target: nn.Module) -> list[nn.Module]:
    """``target`` and the modules that contain it, outermost first (``model`` included)."""
    for name, module in model.named_modules():
        if module is target:
            parts = name.split(".") if name else []
            return [model.get_submodule(".".join(parts[:i])) for i in range(len(parts) + 1)]
    raise ValueError(f"grad_cam: the given layer {type(target).__name__} is not a submodule of the model")


def _resolve_layer(model: nn.Module, layer: nn.Module | str | None) -> tuple[list[nn.Module], bool]:
    """Candidate modules to capture, and whether to widen to the enclosing block (default only)."""
    if layer is None:
        return _ancestors(model, gradcam_layer(model)), True
    if isinstance(layer, str):
        try:
            layer = model.get_submodule(layer)
        except AttributeError as e:
            raise ValueError(f"grad_cam: the model has no submodule named {layer!r}") from e
    return _ancestors(model, layer)[-1:], False


def grad_cam(model: nn.Module, clip: Tensor | np.ndarray, layer: nn.Module | str | None = None) -> np.ndarray:
    """Grad-CAM on a 3-D CNN, upsampled to the clip.

    Args:
        model: maps float clips (N, C, T, H, W) to logits (N,).
        clip: one clip (C, T, H, W), float.
        layer: the module whose output activations A (1, K, t, h, w) are weighted: a module of
            ``model`` or its dotted name (e.g. ``"backbone.layer4"``). Default: the block that
            ends with the last ``nn.Conv3d`` (:func:`gradcam_layer`), i.e. the outermost module
            containing that convolution whose output still has the convolution's (t, h, w):
            ``backbone.layer4`` for torchvision's video ResNets, ``backbone.blocks`` for
            ``Tiny3D`` (after BatchNorm and ReLU, not the raw convolution).

    Returns:
        (T, H, W) float32 in [0, 1]: ``ReLU(sum_k a_k A_k)`` with ``a_k`` the mean over (t, h, w)
        of ``d logit / d A_k``, upsampled trilinearly (``align_corners=False``) to the clip's
        (T, H, W), over its maximum. All zeros when no channel raises the logit.
    """
    x = _as_batch(model, clip)
    candidates, widen = _resolve_layer(model, layer)
    captured: dict[nn.Module, Tensor] = {}

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, Tensor) and output.ndim == 5:
            captured[module] = output
            # Downstream layers get a copy, so an in-place op after this module (ReLU(inplace=True))
            # cannot overwrite the activation we differentiate against.
            return output.clone()
        return None

    handles = [m.register_forward_hook(hook) for m in candidates]
    try:
        with _eval_mode(model), torch.enable_grad():
            logit = _logits(model, x.requires_grad_(True))[0]
            acts = _pick_activation(candidates, captured, widen)
            (grad,) = torch.autograd.grad(logit, acts, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    if grad is None:  # the logit does not depend on this layer
        grad = torch.zeros_like(acts)
    weights = grad.mean(dim=(2, 3, 4), keepdim=True)
    cam = F.relu((weights * acts).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam.detach(), size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)
    return _normalise(cam[0, 0])


def _pick_activation(candidates: list[nn.Module], captured: dict[nn.Module, Tensor], widen: bool) -> Tensor:
    target = candidates[-1]
    if target not in captured:
        raise ValueError(
            f"grad_cam: layer {type(target).__name__} produced no (N, K, t, h, w) output during the "
            f"forward pass (not used by the model, or not a 3-D convolutional layer)"
        )
    acts = captured[target]
    if widen:
        size = acts.shape[2:]
        for module in candidates:  # outermost first
            out = captured.get(module)
            if out is not None and out.shape[2:] == size:
                return out
    return acts


def saliency_map(model: nn.Module, clip: Tensor | np.ndarray, method: str, **kw: Any) -> np.ndarray:
    """Dispatch to a method by name: ``"gradient"`` -> :func:`vanilla_gradient`,
    ``"smoothgrad"`` -> :func:`smoothgrad`, ``"gradcam"`` -> :func:`grad_cam`; ``kw`` goes to it.
    Returns (T, H, W) float32 in [0, 1]."""
    if method == "gradient":
        return vanilla_gradient(model, clip, **kw)
    if method == "smoothgrad":
        return smoothgrad(model, clip, **kw)
    if method == "gradcam":
        return grad_cam(model, clip, **kw)
    raise ValueError(f"unknown saliency method {method!r}; choose one of {', '.join(METHODS)}")


# ---------------------------------------------------------------------------- region measure


def scale_box(box: Box, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> Box:
    """Rescale a box given for frames of size ``from_hw`` = (H, W) to frames of size ``to_hw``
    (e.g. a manifest's box in video pixels to a 112 x 112 clip). Coordinates stay fractional;
    :func:`pixel_box` rounds them."""
    (h0, w0), (h1, w1) = from_hw, to_hw
    if min(h0, w0, h1, w1) <= 0:
        raise ValueError(f"scale_box: frame sizes must be positive, got {from_hw} and {to_hw}")
    x0, y0, x1, y1 = box
    sx, sy = w1 / w0, h1 / h0
    return (x0 * sx, y0 * sy, x1 * sx, y1 * sy)


def pixel_box(box: Box, height: int, width: int) -> tuple[int, int, int, int]:
    """A box in whole pixels of an (H, W) frame: fractional coordinates are rounded outward
    (x0, y0 down, x1, y1 up). Raises ValueError for a non-finite, empty or out-of-frame box."""
    if len(box) != 4:
        raise ValueError(f"a box is (x0, y0, x1, y1); got {box!r}")
    vals = [float(v) for v in box]
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"box {tuple(box)} has a missing or non-finite coordinate")
    x0, y0 = math.floor(vals[0] + 1e-9), math.floor(vals[1] + 1e-9)
    x1, y1 = math.ceil(vals[2] - 1e-9), math.ceil(vals[3] - 1e-9)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(
            f"box (x0, y0, x1, y1) = {tuple(box)} is empty or outside a frame of H x W = {height} x {width} "
            f"(x in [0, W], y in [0, H], x0 < x1, y0 < y1; x1, y1 exclusive)"
        )
    return x0, y0, x1, y1


def _check_map(sal: np.ndarray | Tensor) -> np.ndarray:
    m = np.asarray(sal.detach().cpu() if isinstance(sal, Tensor) else sal, dtype=np.float64)
    if m.ndim != 3:
        raise ValueError(f"a saliency map is (T, H, W); got shape {m.shape}")
    if not np.isfinite(m).all() or (m < 0).any():
        raise ValueError("a saliency map must be finite and non-negative")
    return m


def region_energy_share(sal: np.ndarray | Tensor, box: Box) -> float:
    """Share of a map's mass inside a box, over all frames.

    Args:
        sal: (T, H, W) non-negative saliency map.
        box: ``(x0, y0, x1, y1)`` in the map's pixels, x0/y0 inclusive, x1/y1 exclusive
            (``sal[:, y0:y1, x0:x1]``); fractional coordinates are rounded outward.

    Returns:
        ``sum(sal inside box) / sum(sal)`` in [0, 1]; NaN for an all-zero map (no energy to share).
    """
    m = _check_map(sal)
    x0, y0, x1, y1 = pixel_box(box, m.shape[1], m.shape[2])
    total = m.sum()
    if total == 0:
        return float("nan")
    return float(m[:, y0:y1, x0:x1].sum() / total)


def area_share(box: Box, height: int, width: int) -> float:
    """The box's share of the frame area: what :func:`region_energy_share` gives for a uniform
    map (the baseline). Same box convention and rounding as :func:`region_energy_share`."""
    x0, y0, x1, y1 = pixel_box(box, height, width)
    return (x1 - x0) * (y1 - y0) / (height * width)


def region_measure(maps: Sequence[np.ndarray | Tensor], boxes: Sequence[Box]) -> dict[str, float | int]:
    """Region energy share averaged over videos, with the uniform-map baseline.

    Args:
        maps: one (T, H, W) map per video (sizes may differ between videos).
        boxes: one box per video, in that video's map pixels (see :func:`region_energy_share`).

    Returns:
        ``{"mean_share", "mean_area_share", "n", "n_empty"}``: the mean energy share and mean
        area share over the ``n`` videos whose map is not all zero; ``n_empty`` videos with an
        all-zero map are left out of both means (NaN means when ``n == 0``).
    """
    if len(maps) != len(boxes):
        raise ValueError(f"region_measure: {len(maps)} maps but {len(boxes)} boxes")
    shares, areas = [], []
    for i, (sal, box) in enumerate(zip(maps, boxes)):
        try:
            share = region_energy_share(sal, box)
            h, w = np.shape(sal)[1:]
            area = area_share(box, h, w)
        except ValueError as e:
            raise ValueError(f"region_measure: video {i}: {e}") from e
        if not math.isnan(share):
            shares.append(share)
            areas.append(area)
    n = len(shares)
    return {
        "mean_share": float(np.mean(shares)) if n else float("nan"),
        "mean_area_share": float(np.mean(areas)) if n else float("nan"),
        "n": n,
        "n_empty": len(maps) - n,
    }
