"""echo.explain.saliency and echo.explain.render: maps find the region a model reads; the region measure
matches its definition; GIFs and PNG strips are valid images of the documented frame count and size."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from echo.explain import saliency as S
from echo.explain import render as R
from echo.data import storage

T, H, W = 8, 64, 64


class BoxReader(nn.Module):
    """A model whose logit depends only on the pixels inside ``box`` = (x0, y0, x1, y1).

    logit = sum over the box (at half resolution) of ReLU(Conv3d(clip * mask)), with a fixed,
    positive Conv3d (kernel (3, 2, 2), stride (1, 2, 2)) so Grad-CAM has a convolutional layer
    whose activations must be upsampled. The input is masked before the convolution: Grad-CAM
    weights whole channels, so a model that only masked its *read-out* would have activations
    over the whole frame and Grad-CAM could not localise anything; here both the gradient and
    the activations are confined to the box (even box coordinates align it with the stride).
    """

    def __init__(self, box: tuple[int, int, int, int]) -> None:
        super().__init__()
        x0, y0, x1, y1 = box
        mask = torch.zeros(1, 1, 1, H, W)
        mask[..., y0:y1, x0:x1] = 1
        self.register_buffer("mask", mask)
        self.register_buffer("mask_half", mask[..., ::2, ::2].clone())
        conv = nn.Conv3d(1, 4, kernel_size=(3, 2, 2), stride=(1, 2, 2), padding=(1, 0, 0), bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.linspace(0.5, 1.5, conv.weight.numel()).view_as(conv.weight))
        self.features = nn.Sequential(conv, nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        a = self.features(x * self.mask)
        return (a * self.mask_half).sum(dim=(1, 2, 3, 4)) - 100.0


def _clip(seed: int = 0) -> Tensor:
    """(1, T, H, W) in [0, 1]: brighter outside any box than inside, so a map that followed image
    intensity instead of the model would put its energy outside."""
    g = torch.Generator().manual_seed(seed)
    return 0.5 + 0.5 * torch.rand((1, T, H, W), generator=g)


BOXES = [(20, 20, 40, 40), (2, 40, 22, 60)]  # 20 x 20 px: 9.8% of a 64 x 64 frame


@pytest.mark.parametrize("box", BOXES)
@pytest.mark.parametrize("method", S.METHODS)
def test_each_method_puts_its_energy_in_the_region_the_model_reads(method, box):
    # Threshold 0.9: the box is 400 / 4096 = 9.8% of the frame, which is what a uniform map (or
    # one that ignored the model) would score. The gradient methods must be exact (the model
    # reads nothing outside, so every gradient outside is exactly zero); Grad-CAM upsamples a
    # half-resolution map trilinearly, which leaks about a quarter of the edge pixels' value into
    # a one-pixel ring outside the box (about 5% of the mass here), so 0.9 leaves room for that
    # and nothing else.
    model = BoxReader(box)
    sal = S.saliency_map(model, _clip(), method)
    assert sal.shape == (T, H, W) and sal.dtype == np.float32
    assert sal.min() >= 0 and sal.max() == pytest.approx(1.0)
    share = S.region_energy_share(sal, box)
    assert share >= 0.9, f"{method}: {share:.3f} of the energy in the box"
    if method != "gradcam":
        assert share == pytest.approx(1.0, abs=1e-6)
    # the other box, which the model ignores, gets almost nothing
    other = BOXES[1] if box == BOXES[0] else BOXES[0]
    assert S.region_energy_share(sal, other) < 0.02
    assert S.area_share(box, H, W) == pytest.approx(400 / 4096)


def _small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.BatchNorm3d(4),
        nn.ReLU(inplace=True),
        nn.Conv3d(4, 8, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(1),
        nn.Linear(8, 1),  # logits (N, 1), which the saliency functions accept as (N,)
    )


def test_smoothgrad_follows_its_seed_and_gradients_leave_no_trace():
    model = _small_cnn()
    model.train()
    bn = model[1]
    stats = bn.running_mean.clone(), bn.running_var.clone()
    clip = _clip(1)[:, :, :16, :16]
    a = S.smoothgrad(model, clip, n=6, sigma=0.2, seed=3, batch_size=4)
    b = S.smoothgrad(model, clip, n=6, sigma=0.2, seed=3, batch_size=2)
    c = S.smoothgrad(model, clip, n=6, sigma=0.2, seed=4)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # the noise follows the seed, not the batching
    assert np.abs(a - c).max() > 1e-3
    # sigma = 0: every copy is the clip itself, so SmoothGrad is the vanilla gradient
    np.testing.assert_allclose(S.smoothgrad(model, clip, n=2, sigma=0.0), S.vanilla_gradient(model, clip), atol=1e-6)
    S.grad_cam(model, clip)
    # eval mode was used (BatchNorm statistics untouched) and each module's flag restored; no .grad
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_grad_cam_layers_and_errors():
    model = _small_cnn()
    clip = _clip(2)[:, :, :16, :16]
    default = S.grad_cam(model, clip)
    # default: the last Conv3d; in a flat Sequential no module encloses it, so its own output
    # (BoxReader and the echo.model.networks test cover widening to an enclosing block)
    assert S.gradcam_layer(model) is model[3]
    np.testing.assert_allclose(default, S.grad_cam(model, clip, layer="3"), atol=1e-6)
    np.testing.assert_allclose(default, S.grad_cam(model, clip, layer=model[3]), atol=1e-6)
    # a layer given explicitly is used as is: after the in-place ReLU the map differs
    post_relu = S.grad_cam(model, clip, layer="4")
    assert post_relu.shape == (T, 16, 16) and np.isfinite(post_relu).all()
    assert np.abs(post_relu - default).max() > 0.1
    # a float64 numpy clip is taken in the model's dtype
    np.testing.assert_allclose(S.grad_cam(model, clip.double().numpy()), default, atol=1e-6)
    with pytest.raises(ValueError, match="no submodule named 'nope'"):
        S.grad_cam(model, clip, layer="nope")
    with pytest.raises(ValueError, match="no nn.Conv3d"):
        S.grad_cam(nn.Sequential(nn.Flatten(), nn.Linear(T * 16 * 16, 1)), clip)
    with pytest.raises(ValueError, match=r"logits \(N,\)"):
        S.vanilla_gradient(nn.Sequential(nn.Flatten(), nn.Linear(T * 16 * 16, 2)), clip)
    with pytest.raises(ValueError, match=r"\(C, T, H, W\)"):
        S.vanilla_gradient(model, clip[0])
    with pytest.raises(ValueError, match="unknown saliency method 'occlusion'"):
        S.saliency_map(model, clip, "occlusion")


def test_echo_models_give_finite_maps_of_the_clip_shape():
    from echo.model.networks import ASClassifier

    torch.manual_seed(0)
    clip = _clip(3)[:, :, :32, :32]
    tiny = ASClassifier("tiny3d")
    for method in S.METHODS:
        sal = S.saliency_map(tiny, clip, method, **({"n": 4} if method == "smoothgrad" else {}))
        assert sal.shape == (T, 32, 32) and np.isfinite(sal).all()
        assert 0 <= sal.min() and sal.max() <= 1
    np.testing.assert_allclose(S.grad_cam(tiny, clip), S.grad_cam(tiny, clip, layer="backbone.blocks"), atol=1e-6)
    r3d = ASClassifier("r3d_18", normalization="kinetics")
    sal = S.grad_cam(r3d, clip)
    assert sal.shape == (T, 32, 32) and np.isfinite(sal).all()
    np.testing.assert_allclose(sal, S.grad_cam(r3d, clip, layer="backbone.layer4"), atol=1e-6)


def test_region_share_definitions():
    uniform = np.full((3, 40, 50), 0.7)
    for box in [(0, 0, 50, 40), (10, 5, 20, 25), (49, 39, 50, 40)]:
        assert S.region_energy_share(uniform, box) == pytest.approx(S.area_share(box, 40, 50))
    assert S.area_share((10, 5, 20, 25), 40, 50) == pytest.approx(10 * 20 / 2000)
    # fractional coordinates round outward, identically for both
    assert S.area_share((10.2, 5.0, 19.5, 24.1), 40, 50) == pytest.approx(10 * 20 / 2000)
    peak = np.zeros((2, 40, 50))
    peak[1, 7, 12] = 3.0
    peak[0, 30, 45] = 1.0
    assert S.region_energy_share(peak, (10, 5, 20, 25)) == pytest.approx(0.75)
    assert S.region_energy_share(peak, (13, 5, 20, 25)) == 0.0  # x0 inclusive: column 12 is outside
    assert S.region_energy_share(peak, (10, 5, 12, 25)) == 0.0  # x1 exclusive: column 12 is outside
    assert np.isnan(S.region_energy_share(np.zeros((2, 40, 50)), (0, 0, 5, 5)))
    with pytest.raises(ValueError, match="outside a frame of H x W = 40 x 50"):
        S.region_energy_share(uniform, (10, 5, 60, 25))
    with pytest.raises(ValueError, match="empty"):
        S.area_share((10, 5, 10, 25), 40, 50)
    with pytest.raises(ValueError, match="non-finite"):
        S.area_share((float("nan"), 5, 10, 25), 40, 50)
    assert S.scale_box((28, 14, 56, 42), (224, 224), (112, 112)) == (14, 7, 28, 21)


def test_region_measure_averages_over_videos():
    inside = np.zeros((2, 10, 10))
    inside[:, 2:4, 2:4] = 1.0
    uniform = np.ones((2, 20, 20))
    box_a, box_b = (2, 2, 4, 4), (0, 0, 10, 10)
    out = S.region_measure([inside, uniform, np.zeros((2, 10, 10))], [box_a, box_b, box_a])
    assert out["n"] == 2 and out["n_empty"] == 1
    assert out["mean_share"] == pytest.approx((1.0 + 0.25) / 2)
    assert out["mean_area_share"] == pytest.approx((0.04 + 0.25) / 2)
    with pytest.raises(ValueError, match="2 maps but 1 boxes"):
        S.region_measure([inside, uniform], [box_a])
    with pytest.raises(ValueError, match="video 1"):
        S.region_measure([inside, inside], [box_a, (0, 0, 11, 5)])


def _gif_frames(data: bytes) -> tuple[int, tuple[int, int], int]:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "GIF"
        n, size, duration = im.n_frames, im.size, im.info["duration"]
        for i in range(n):
            im.seek(i)
            im.load()
    return n, size, duration


def test_gif_and_strip_are_valid_images_of_the_documented_size(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.random((T, 24, 32))  # float in [0, 1]
    yy, xx = np.mgrid[:24, :32]
    sal = np.broadcast_to(np.exp(-((yy - 12) ** 2 + (xx - 10) ** 2) / 40.0), (T, 24, 32))
    path = R.write_gif(frames, sal, str(tmp_path / "a" / "clip.gif"), fps=10, upscale=3)
    assert path == str(tmp_path / "a" / "clip.gif")
    n, size, duration = _gif_frames((tmp_path / "a" / "clip.gif").read_bytes())
    assert n == T and size == (32 * 3 + R.COLORBAR_WIDTH, 24 * 3 + R.PROGRESS_HEIGHT) == R.gif_size(24, 32, 3)
    assert duration == 100
    # static frames and map (a paused loop): still T frames, pillow must not merge them
    still = np.full((5, 24, 32), 128, dtype=np.uint8)
    R.write_gif(still, np.zeros((5, 24, 32)), str(tmp_path / "still.gif"))
    assert _gif_frames((tmp_path / "still.gif").read_bytes())[:2] == (5, R.gif_size(24, 32, 2))

    strip = R.write_strip(frames, sal, str(tmp_path / "strip.png"), n_key=4, upscale=2)
    with Image.open(strip) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == (4 * 64 + 3 * R.GAP + R.COLORBAR_WIDTH, R.HEADER_HEIGHT + 48) == R.strip_size(24, 32, T, 4, 2)
        pixels = np.asarray(im)
    # the overlay is in colour (jet), and the panels keep the echo's structure
    assert (pixels[R.HEADER_HEIGHT :, :64].std(axis=2) > 10).any()
    assert R.key_frame_indices(T, 4) == [0, 2, 5, 7]
    assert R.key_frame_indices(3, 4) == [0, 1, 2]
    assert R.strip_size(24, 32, 3, 4, 2)[0] == 3 * 64 + 2 * R.GAP + R.COLORBAR_WIDTH


def test_overlay_blend_and_input_checks():
    frames = np.zeros((2, 4, 4), dtype=np.uint8)
    sal = np.ones((2, 4, 4))
    rgb = R.overlay(frames, sal, cmap="inferno", alpha=1.0)
    top = np.round(np.array(matplotlib.colormaps["inferno"](1.0)[:3]) * 255)
    assert rgb.shape == (2, 4, 4, 3) and (rgb == top).all()
    assert (R.overlay(np.full((2, 4, 4), 1.0), sal, alpha=0.0) == 255).all()
    with pytest.raises(ValueError, match="differs from the frames"):
        R.overlay(frames, np.ones((2, 4, 5)))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        R.overlay(np.full((2, 4, 4), 2.0), sal)
    with pytest.raises(ValueError, match="upscale"):
        R.write_gif(frames, sal, "unused.gif", upscale=0)


def test_gif_writes_to_s3(s3_bucket):
    frames = np.linspace(0, 1, 4 * 16 * 16).reshape(4, 16, 16)
    uri = R.write_gif(frames, frames, f"s3://{s3_bucket}/saliency/v0.gif")
    assert _gif_frames(storage.read_bytes(uri))[:2] == (4, R.gif_size(16, 16))
    uri = R.write_strip(frames, frames, f"s3://{s3_bucket}/saliency/v0.png", n_key=2)
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as im:
        assert im.size == R.strip_size(16, 16, 4, 2)
