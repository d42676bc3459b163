"""Backbones, weight loading (files, s3, Kinetics without network), SSLModel and ASClassifier."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from conftest import free_port
from echo.data import storage
from echo.model.networks import (
    BACKBONES,
    KINETICS_MEAN,
    KINETICS_STD,
    ASClassifier,
    SSLModel,
    WeightsLoadError,
    build_backbone,
    load_backbone_state,
    load_state_dict_file,
)

FEATURE_DIMS = {"r3d_18": 512, "r2plus1d_18": 512, "mc3_18": 512, "tiny3d": 128}


def _clips(n: int = 2, c: int = 1, t: int = 4, hw: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, t, hw, hw, generator=torch.Generator().manual_seed(seed))


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_maps_gray_and_rgb_clips_to_features(name: str) -> None:
    torch.manual_seed(0)
    backbone, dim = build_backbone(name)
    assert dim == FEATURE_DIMS[name]
    assert not any(k.startswith("fc.") for k in backbone.state_dict())
    backbone.eval()
    gray = _clips()
    with torch.no_grad():
        out = backbone(gray)
        rgb = backbone(gray.repeat(1, 3, 1, 1, 1))
    assert out.shape == (2, dim)
    torch.testing.assert_close(out, rgb)  # grayscale is the same clip in all three channels
    with pytest.raises(ValueError, match=r"C = 1 or 3"):
        backbone(torch.rand(2, 2, 4, 32, 32))


def test_unknown_backbone() -> None:
    with pytest.raises(ValueError, match="r3d_18, r2plus1d_18, mc3_18, tiny3d"):
        build_backbone("resnet50")


@pytest.fixture(scope="module")
def r3d_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A full torchvision r3d_18 state dict (random weights, with fc) saved like a weights file."""
    torch.manual_seed(1)
    state = torchvision.models.video.r3d_18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "r3d_18-random.pth"
    torch.save(state, path)
    return path, state


def test_init_from_torchvision_weights_file(r3d_file) -> None:
    path, state = r3d_file
    torch.manual_seed(2)  # a different random init, so equality proves the load
    backbone, _ = build_backbone("r3d_18", init=str(path))
    _assert_same_state(backbone.state_dict(), {k: v for k, v in state.items() if not k.startswith("fc.")})


def test_weights_for_another_architecture_raise_naming_the_file(r3d_file, tmp_path: Path) -> None:
    path, _ = r3d_file
    # Same key names, other kernel shapes (mc3_18's layers 2-4 are 1x3x3).
    with pytest.raises(WeightsLoadError, match=rf"{path}.*shape mismatch \(file vs model\): layer2\.0\.conv1\.0\.weight \(128, 64, 3, 3, 3\) vs \(128, 64, 1, 3, 3\)"):
        build_backbone("mc3_18", init=str(path))
    tiny_path = tmp_path / "tiny.pt"
    torch.save(build_backbone("tiny3d")[0].state_dict(), tiny_path)
    with pytest.raises(WeightsLoadError, match=rf"{tiny_path} does not fit.*missing \(stem\.0\.weight"):
        build_backbone("r3d_18", init=str(tiny_path))


def test_partial_weights_warn_with_missing_keys(r3d_file, tmp_path: Path, caplog) -> None:
    path, state = r3d_file
    partial = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    partial["extra.weight"] = torch.zeros(1)
    partial_path = tmp_path / "partial.pth"
    torch.save(partial, partial_path)
    torch.manual_seed(3)
    backbone, _ = build_backbone("r3d_18")
    before = {k: v.clone() for k, v in backbone.state_dict().items() if k.startswith("layer4.")}
    with caplog.at_level(logging.WARNING, logger="echo.model.networks"):
        report = load_backbone_state(backbone, str(partial_path))
    assert report.missing == list(before)
    assert report.unexpected == ["extra.weight"]
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(partial_path) in warning and "layer4.1.conv2.0.weight" in warning and "extra.weight" in warning
    after = backbone.state_dict()
    for k in before:
        assert torch.equal(after[k], before[k])  # left as initialised
    assert torch.equal(after["layer3.1.conv2.0.weight"], state["layer3.1.conv2.0.weight"])


def test_kinetics_without_network_asks_for_a_local_file(tmp_path: Path, monkeypatch) -> None:
    # An empty weights cache, and every HTTPS request sent to a closed port on loopback: the
    # download fails at once here, and also on a machine that does have network access.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    proxy = f"http://127.0.0.1:{free_port()}"
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, proxy)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(WeightsLoadError, match=r"mc3_18.*pass its local path .* as init instead of 'kinetics'"):
        build_backbone("mc3_18", init="kinetics")
    with pytest.raises(WeightsLoadError, match="tiny3d.*no Kinetics-400 weights"):
        build_backbone("tiny3d", init="kinetics")


def test_unknown_init_names_the_value() -> None:
    with pytest.raises(WeightsLoadError, match="no such file: 'kinetic'"):
        build_backbone("tiny3d", init="kinetic")


@dataclass
class _NotWeights:
    value: int


def test_load_state_dict_file_refuses_non_weights(tmp_path: Path) -> None:
    pickled = tmp_path / "object.pt"
    torch.save(_NotWeights(1), pickled)  # unpickling would need to import this class
    with pytest.raises(WeightsLoadError, match=rf"{pickled} is not a loadable weights file"):
        load_state_dict_file(str(pickled))
    mixed = tmp_path / "checkpoint.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 3}, mixed)
    with pytest.raises(WeightsLoadError, match=rf"{mixed} is not a state dict of tensors: entries model, epoch"):
        load_state_dict_file(str(mixed))


def test_prefixed_and_full_model_state_dicts_load(tmp_path: Path) -> None:
    torch.manual_seed(4)
    ssl = SSLModel("tiny3d", clip_len=4, frame_order=True)
    encoder = ssl.encoder_state_dict()
    assert encoder.keys() == ssl.backbone.state_dict().keys()
    # What a DDP-wrapped SSLModel's state_dict looks like: module.backbone.*, module.projector.*, ...
    ddp_style = {f"module.{k}": v for k, v in ssl.state_dict().items()}
    # A bare encoder under "backbone." only.
    prefixed = {f"backbone.{k}": v for k, v in encoder.items()}
    for state in (ddp_style, prefixed, encoder):
        torch.manual_seed(5)
        clf = ASClassifier("tiny3d")
        report = clf.load_encoder(state)
        assert report.missing == [] and report.unexpected == []
        _assert_same_state(clf.backbone.state_dict(), encoder)
    path = tmp_path / "encoder.pt"
    torch.save(encoder, path)
    _assert_same_state(ASClassifier("tiny3d", init=str(path)).backbone.state_dict(), encoder)


def test_init_from_s3(s3_bucket: str) -> None:
    torch.manual_seed(6)
    encoder = build_backbone("tiny3d")[0].state_dict()
    buf = io.BytesIO()
    torch.save(encoder, buf)
    uri = f"s3://{s3_bucket}/pretrain/encoder.pt"
    storage.write_bytes(uri, buf.getvalue())
    _assert_same_state(build_backbone("tiny3d", init=uri)[0].state_dict(), encoder)
    with pytest.raises(FileNotFoundError, match=f"s3://{s3_bucket}/missing.pt"):
        build_backbone("tiny3d", init=f"s3://{s3_bucket}/missing.pt")


def test_ssl_model_outputs() -> None:
    torch.manual_seed(7)
    model = SSLModel("r3d_18", clip_len=4, frame_order=True)
    shapes = [tuple(m.weight.shape) for m in model.projector if isinstance(m, nn.Linear)]
    assert shapes == [(256, 512), (128, 256)]
    assert all(m.bias is None for m in model.projector if isinstance(m, nn.Linear))
    out = model(_clips(t=4, hw=16))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "features": (2, 512),
        "projection": (2, 128),
        "order_logits": (2, 24),
    }
    assert not any(k.startswith(("fc.", "projector", "order_head")) for k in model.encoder_state_dict())

    tiny = SSLModel("tiny3d", clip_len=3, frame_order=False, proj_dim=32)
    out = tiny(_clips(c=3, t=3))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"features": (2, 128), "projection": (2, 32)}
    assert tiny.order_head is None and tiny.num_order_classes == 0
    with pytest.raises(ValueError, match="clip_len must be <= 8"):
        SSLModel("tiny3d", clip_len=16, frame_order=True)


def test_classifier_config_round_trip() -> None:
    torch.manual_seed(8)
    model = ASClassifier("tiny3d", dropout=0.25, normalization="kinetics").eval()
    cfg = json.loads(json.dumps(model.config()))
    assert cfg == {"backbone": "tiny3d", "dropout": 0.25, "normalization": "kinetics", "format_version": 1}
    clone = ASClassifier.from_config(cfg)
    clone.load_state_dict(model.state_dict())  # strict: the same architecture
    clone.eval()
    x = _clips()
    with torch.no_grad():
        assert model(x).shape == (2,)
        torch.testing.assert_close(clone(x), model(x))
    with pytest.raises(ValueError, match=r"unknown keys \['lr'\]"):
        ASClassifier.from_config({**cfg, "lr": 0.1})
    with pytest.raises(ValueError, match="format_version 2"):
        ASClassifier.from_config({**cfg, "format_version": 2})
    with pytest.raises(ValueError, match="normalization"):
        ASClassifier("tiny3d", normalization="imagenet")


def test_classifier_applies_kinetics_normalisation() -> None:
    torch.manual_seed(9)
    x = _clips()
    mean = torch.tensor(KINETICS_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(KINETICS_STD).view(1, 3, 1, 1, 1)
    kinetics = ASClassifier("tiny3d", normalization="kinetics").eval()
    minmax = ASClassifier("tiny3d", normalization="minmax").eval()
    minmax.load_state_dict(kinetics.state_dict())
    with torch.no_grad():
        expected = kinetics.head(kinetics.backbone((x.expand(-1, 3, -1, -1, -1) - mean) / std)).squeeze(1)
        torch.testing.assert_close(kinetics(x), expected)
        torch.testing.assert_close(minmax(x), kinetics.head(kinetics.backbone(x)).squeeze(1))
        assert not torch.allclose(kinetics(x), minmax(x))


def test_freeze_backbone_keeps_it_fixed() -> None:
    model = ASClassifier("tiny3d")
    model.freeze_backbone(True)
    model.train()
    assert not model.backbone.training and model.head.training
    assert all(not p.requires_grad for p in model.backbone.parameters())
    stats = model.backbone.blocks[0][1].running_mean.clone()
    model(_clips()).sum().backward()
    assert torch.equal(model.backbone.blocks[0][1].running_mean, stats)
    assert model.head.weight.grad is not None
    model.freeze_backbone(False)
    assert model.backbone.training and all(p.requires_grad for p in model.backbone.parameters())
