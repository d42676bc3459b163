"""Gates of a pretraining (echo.evaluation.gates) on known cases, and on a real synthetic set."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from echo.data.manifest import load_manifest
from echo.evaluation import gates
from echo.model.networks import SSLModel
from echo.data.order import permutations

from videofiles import write_video


def _patients(n_patients: int = 30, videos: int = 3) -> np.ndarray:
    return np.repeat(np.arange(n_patients), videos)


def test_retrieval_is_one_on_features_that_identify_patients() -> None:
    patients = _patients()
    features = np.eye(30)[patients] + 0.01 * np.random.default_rng(0).standard_normal((90, 30))
    top1, chance = gates.retrieval_top1(features, patients)
    assert top1 == 1.0
    assert chance == pytest.approx(2 / 89)  # two other videos of the patient among 89


def test_retrieval_of_random_features_is_near_chance() -> None:
    patients = _patients(40, 2)
    tops = []
    for seed in range(30):
        top1, chance = gates.retrieval_top1(np.random.default_rng(seed).standard_normal((80, 16)), patients)
        tops.append(top1)
    assert chance == pytest.approx(1 / 79)
    assert np.mean(tops) == pytest.approx(chance, abs=0.01)
    assert max(tops) < 5 * chance  # the gate


def test_retrieval_chance_counts_only_patients_with_another_video() -> None:
    patients = np.array(["a", "a", "b", "c", "c", "c"])  # b has no partner: not a query
    top1, chance = gates.retrieval_top1(np.eye(6), patients)
    assert chance == pytest.approx(np.mean([1, 1, 2, 2, 2]) / 5)
    assert 0 <= top1 <= 1
    assert math.isnan(gates.retrieval_top1(np.eye(3), np.array([1, 2, 3]))[0])


def test_valve_probe_r2_high_for_linear_features_and_low_for_noise() -> None:
    rng = np.random.default_rng(1)
    severity = rng.uniform(0, 1, 120)
    groups = np.repeat(np.arange(60), 2)
    informative = np.c_[severity + 0.05 * rng.standard_normal(120), rng.standard_normal((120, 10))]
    assert gates.valve_probe_r2(informative, severity, groups) > 0.9
    assert gates.valve_probe_r2(rng.standard_normal((120, 10)), severity, groups) < 0.1


class _Oracle(nn.Module):
    """An order head that reads the permutation off frames whose value is their index."""

    order_head = True

    def __init__(self, clip_len: int) -> None:
        super().__init__()
        self.table = permutations(clip_len).float()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        seen = x.mean(dim=(1, 3, 4))  # (N, T): frame t holds its original index
        logits = -torch.cdist(seen, self.table)
        return {"features": seen, "order_logits": logits}


def test_order_top1_of_an_oracle_is_one_and_of_a_constant_head_is_chance() -> None:
    clips = torch.arange(4.0).view(1, 1, 4, 1, 1).expand(3, 1, 4, 8, 8).contiguous()
    assert gates.order_top1(_Oracle(4), clips) == 1.0

    class Constant(_Oracle):
        def forward(self, x):
            return {"order_logits": torch.zeros(len(x), 24)}

    assert gates.order_top1(Constant(4), clips) == pytest.approx(1 / 24)


class _FrameMeans(nn.Module):
    """Features = each frame's mean brightness, in clip order: ``(N, T)``."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": x.mean(dim=(1, 3, 4))}


def test_held_out_clips_take_frames_stride_apart(tmp_path) -> None:
    """Gates see clips as pretraining does: with ``stride`` s, a clip's frames lie s apart.
    Frame t is flat grey at level t mod 4 (x 50): any 4 frames 1 or 3 apart cover the four
    levels, so after the clip's min-max scaling, level = 3 x brightness, and the level steps
    by +1 (mod 4) from frame to frame at stride 1 and by -1 (3 mod 4) at stride 3."""
    levels = np.arange(30) % 4
    frames = np.broadcast_to((40 + 50 * levels).astype(np.uint8)[:, None, None], (30, 32, 32)).copy()
    video = tmp_path / "levels.avi"
    video.write_bytes(write_video(frames, "mjpeg.avi"))
    rows = pd.DataFrame({"video_uri": [str(video)], "patient_id": ["p"], "study_id": ["s"]})
    for stride, step in ((1, 1), (3, 3)):
        feats = gates.held_out_outputs(_FrameMeans(), rows, 4, torch.device("cpu"), order_videos=0,
                                       stride=stride)["features"][0]
        seen = np.round(3 * feats).astype(int)
        assert sorted(seen) == [0, 1, 2, 3], (stride, feats)
        assert (np.diff(seen) % 4 == step).all(), (stride, feats)


def test_gate_passed_thresholds() -> None:
    good = {"retrieval_top1": 0.5, "retrieval_chance": 0.05, "order_top1": 0.1, "order_chance": 1 / 24}
    assert gates.gate_passed("mi-simclr", good) and gates.gate_passed("echoclr", good)
    assert not gates.gate_passed("echoclr", {**good, "order_top1": 0.05})
    assert gates.gate_passed("mi-simclr", {**good, "order_top1": 0.0})
    assert not gates.gate_passed("simclr", {**good, "retrieval_top1": 0.2})
    assert not gates.gate_passed("echoclr", {})
    # Against a random-init baseline that already retrieves as well, the gate fails.
    assert not gates.gate_passed("mi-simclr", good, baseline={"retrieval_top1": 0.5})
    assert gates.gate_passed("mi-simclr", good, baseline={"retrieval_top1": 0.3})


def test_gate_metrics_on_real_videos(synth_small: str) -> None:
    """A random-init encoder on the shared synthetic set: every gate present and in range,
    the valve probe only because the manifest has ``valve_severity``."""
    torch.manual_seed(0)
    rows = load_manifest(synth_small).split("val", "test")
    model = SSLModel("tiny3d", 4, frame_order=True)
    m = gates.gate_metrics(model, rows, 4, torch.device("cpu"), order_videos=8)
    assert set(m) == {"retrieval_top1", "retrieval_chance", "order_top1", "order_chance", "valve_probe_r2"}
    assert 0 < m["retrieval_chance"] < 1 and 0 <= m["retrieval_top1"] <= 1
    assert m["order_chance"] == pytest.approx(1 / 24) and 0 <= m["order_top1"] <= 1
    assert m["valve_probe_r2"] <= 1
    line = gates.gate_summary(m)
    assert "retrieval" in line and "order" in line and "valve R2" in line
    no_sev = gates.gate_metrics(SSLModel("tiny3d", 4, frame_order=False), rows.drop(columns="valve_severity"), 4,
                                torch.device("cpu"))
    assert set(no_sev) == {"retrieval_top1", "retrieval_chance"}
