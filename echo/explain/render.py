"""Saliency maps drawn over echo frames: an animated GIF per clip and a PNG strip of key frames.

Each frame is the echo frame in gray with the map alpha-blended on top through a colormap,
upscaled by an integer factor (nearest neighbour, so pixels stay pixels), with a colour bar
for the normalised map on the right. Images are composed with numpy and pillow; only the
colour bar is drawn by matplotlib (on its Agg canvas, never through ``pyplot``), once per file.
Files are written through ``echo.data.storage.write_bytes``, so a path may be local or ``s3://``.

Layout, in pixels, for frames (T, H, W) and ``upscale`` u:

- GIF: ``W*u + COLORBAR_WIDTH`` wide, ``H*u + PROGRESS_HEIGHT`` high, T frames. A bar under
  the image grows with the frame index, so the loop point is visible and no two frames are
  identical (pillow would otherwise merge repeated frames and the GIF would have fewer than T).
- PNG strip: ``k*W*u + (k-1)*GAP + COLORBAR_WIDTH`` wide, ``HEADER_HEIGHT + H*u`` high, with
  ``k = min(n_key, T)`` evenly spaced key frames, each labelled with its frame index.
"""

from __future__ import annotations

import io

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colorbar import ColorbarBase
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from echo.data import storage

__all__ = [
    "COLORBAR_WIDTH",
    "PROGRESS_HEIGHT",
    "HEADER_HEIGHT",
    "GAP",
    "gif_size",
    "strip_size",
    "key_frame_indices",
    "overlay",
    "write_gif",
    "write_strip",
]

COLORBAR_WIDTH = 72
PROGRESS_HEIGHT = 4
HEADER_HEIGHT = 14
GAP = 4

_DPI = 100
_BACKGROUND = (0, 0, 0)
_FOREGROUND = (255, 255, 255)


def gif_size(height: int, width: int, upscale: int = 2) -> tuple[int, int]:
    """(width, height) in pixels of :func:`write_gif`'s frames for (H, W) echo frames."""
    return width * upscale + COLORBAR_WIDTH, height * upscale + PROGRESS_HEIGHT


def strip_size(height: int, width: int, n_frames: int, n_key: int = 4, upscale: int = 2) -> tuple[int, int]:
    """(width, height) in pixels of :func:`write_strip`'s PNG for T = ``n_frames`` frames of (H, W)."""
    k = len(key_frame_indices(n_frames, n_key))
    return k * width * upscale + (k - 1) * GAP + COLORBAR_WIDTH, HEADER_HEIGHT + height * upscale


def key_frame_indices(n_frames: int, n_key: int) -> list[int]:
    """``min(n_key, T)`` evenly spaced frame indices from 0 to T - 1 (first and last included)."""
    if n_frames < 1 or n_key < 1:
        raise ValueError(f"key frames: need T >= 1 and n_key >= 1, got T = {n_frames}, n_key = {n_key}")
    k = min(n_key, n_frames)
    return [int(i) for i in np.round(np.linspace(0, n_frames - 1, k)).astype(int)]


def _gray_uint8(frames: np.ndarray) -> np.ndarray:
    f = np.asarray(frames)
    if f.ndim != 3:
        raise ValueError(f"frames must be (T, H, W); got shape {f.shape}")
    if f.dtype == np.uint8:
        return f
    if not np.issubdtype(f.dtype, np.floating):
        raise ValueError(f"frames must be uint8 or float in [0, 1]; got dtype {f.dtype}")
    if not np.isfinite(f).all() or f.min() < 0 or f.max() > 1:
        raise ValueError(
            f"float frames must be finite and in [0, 1]; got range [{np.nanmin(f):.4g}, {np.nanmax(f):.4g}]"
        )
    return np.round(f * 255).astype(np.uint8)


def overlay(frames: np.ndarray, sal: np.ndarray, cmap: str = "jet", alpha: float = 0.45) -> np.ndarray:
    """Blend a map over gray frames.

    Args:
        frames: (T, H, W) uint8, or float in [0, 1].
        sal: (T, H, W) map in [0, 1] (values outside are clipped to the colour scale).
        cmap: a matplotlib colormap name (``"jet"``, ``"inferno"``, ...).
        alpha: weight of the colour (0 = echo only, 1 = map only).

    Returns:
        (T, H, W, 3) uint8 RGB: ``(1 - alpha) * gray + alpha * cmap(sal)``.
    """
    gray = _gray_uint8(frames)
    m = np.asarray(sal, dtype=np.float64)
    if m.shape != gray.shape:
        raise ValueError(f"saliency map shape {m.shape} differs from the frames' {gray.shape}")
    if not np.isfinite(m).all():
        raise ValueError("the saliency map has NaN or infinite values")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colour = matplotlib.colormaps[cmap](np.clip(m, 0.0, 1.0))[..., :3]
    rgb = (1 - alpha) * (gray[..., None] / 255.0) + alpha * colour
    return np.round(rgb * 255).astype(np.uint8)


def _zoomed_overlay(frames: np.ndarray, sal: np.ndarray, upscale: int, cmap: str, alpha: float) -> np.ndarray:
    """:func:`overlay` zoomed ``upscale`` times (nearest neighbour): (T, H*upscale, W*upscale, 3) uint8."""
    if not (isinstance(upscale, int) and upscale >= 1):
        raise ValueError(f"upscale must be a positive int, got {upscale!r}")
    return overlay(frames, sal, cmap, alpha).repeat(upscale, axis=-3).repeat(upscale, axis=-2)


def _colorbar(height: int, cmap: str) -> np.ndarray:
    """(height, COLORBAR_WIDTH, 3) uint8: a vertical colour bar for [0, 1], ticks 0, 0.5, 1."""
    fig = Figure(figsize=(COLORBAR_WIDTH / _DPI, height / _DPI), dpi=_DPI, facecolor="black")
    canvas = FigureCanvasAgg(fig)
    pad = min(6, height // 8) / height
    ax = fig.add_axes((0.12, pad, 0.22, 1 - 2 * pad))
    bar = ColorbarBase(ax, cmap=matplotlib.colormaps[cmap], norm=Normalize(0.0, 1.0), ticks=[0.0, 0.5, 1.0])
    bar.ax.tick_params(labelsize=7, colors="white", length=2)
    bar.outline.set_edgecolor("white")
    bar.set_label("saliency", color="white", fontsize=7, labelpad=2)
    canvas.draw()
    img = np.asarray(canvas.buffer_rgba())[..., :3]
    return img[:height, :COLORBAR_WIDTH].copy()


def write_gif(
    frames: np.ndarray,
    sal: np.ndarray,
    path: str,
    fps: float = 10,
    upscale: int = 2,
    cmap: str = "jet",
    alpha: float = 0.45,
) -> str:
    """Write an animated GIF of the map over the frames, looping forever.

    Args:
        frames: (T, H, W) uint8, or float in [0, 1].
        sal: (T, H, W) map in [0, 1] (e.g. from ``echo.explain.saliency.saliency_map``).
        path: local path or ``s3://`` URI of the GIF.
        fps: playback rate in frames per second (GIF delays are stored in 10 ms units).
        upscale: integer zoom of the echo frames.
        cmap, alpha: as in :func:`overlay`.

    Returns:
        ``path``. The GIF has T frames of :func:`gif_size` ``(H, W, upscale)`` pixels.
    """
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    rgb = _zoomed_overlay(frames, sal, upscale, cmap, alpha)
    t, h, w, _ = rgb.shape
    bar = _colorbar(h, cmap)
    width, height = w + COLORBAR_WIDTH, h + PROGRESS_HEIGHT
    images = []
    for i in range(t):
        canvas = np.zeros((height, width, 3), dtype=np.uint8)
        canvas[:h, :w] = rgb[i]
        canvas[:h, w:] = bar
        canvas[h:, : max(1, round(w * (i + 1) / t))] = _FOREGROUND
        images.append(Image.fromarray(canvas))
    buf = io.BytesIO()
    images[0].save(
        buf,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=max(10, round(1000 / fps)),
        loop=0,
        optimize=False,
    )
    storage.write_bytes(path, buf.getvalue())
    return path


def write_strip(
    frames: np.ndarray,
    sal: np.ndarray,
    path: str,
    n_key: int = 4,
    upscale: int = 2,
    cmap: str = "jet",
    alpha: float = 0.45,
) -> str:
    """Write a PNG strip of evenly spaced key frames with the map overlaid and a colour bar.

    Args:
        frames: (T, H, W) uint8, or float in [0, 1].
        sal: (T, H, W) map in [0, 1].
        path: local path or ``s3://`` URI of the PNG.
        n_key: number of key frames (at most T are shown; see :func:`key_frame_indices`).
        upscale: integer zoom of the echo frames.
        cmap, alpha: as in :func:`overlay`.

    Returns:
        ``path``. The PNG is :func:`strip_size` ``(H, W, T, n_key, upscale)`` pixels, RGB.
    """
    rgb = _zoomed_overlay(frames, sal, upscale, cmap, alpha)
    t, h, w, _ = rgb.shape
    keys = key_frame_indices(t, n_key)
    width, height = strip_size(h // upscale, w // upscale, t, n_key, upscale)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for j, i in enumerate(keys):
        x = j * (w + GAP)
        canvas[HEADER_HEIGHT:, x : x + w] = rgb[i]
    canvas[HEADER_HEIGHT:, width - COLORBAR_WIDTH :] = _colorbar(h, cmap)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for j, i in enumerate(keys):
        draw.text((j * (w + GAP) + 2, 1), f"frame {i}", fill=_FOREGROUND)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    storage.write_bytes(path, buf.getvalue())
    return path
