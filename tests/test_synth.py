"""The synthetic PLAX generator: manifest contract, determinism, video content, label signal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from echo.data import storage
from echo.ingest import synth
from echo.cli import main
from echo.data.manifest import load_manifest
from echo.data.video import decode_frames, probe

SMALL = dict(size=64, min_frames=12, max_frames=20)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """8 labelled + 2 unlabeled patients, 64 px, short videos (written once for the module)."""
    out = tmp_path_factory.mktemp("synth") / "ds"
    synth.synthesize(str(out), patients=8, seed=3, prevalence=0.25, unlabeled_patients=2, **SMALL)
    return out


def test_manifest_is_valid_with_patient_level_splits(dataset: Path) -> None:
    m = load_manifest(str(dataset / "manifest.csv"), check_objects=True)
    t = m.table
    assert not m.warnings, [str(w) for w in m.warnings]
    assert list(pd.read_csv(dataset / "manifest.csv").columns) == list(synth.MANIFEST_COLUMNS)
    assert t.groupby("patient_id")["split"].nunique().max() == 1
    assert t.groupby("patient_id")["study_id"].nunique().max() == 1
    per_patient = t.groupby("patient_id").size()
    assert per_patient.between(1, 4).all() and per_patient.nunique() > 1
    unlabeled = t[t["split"] == "unlabeled"]
    assert unlabeled["patient_id"].nunique() == 2 and unlabeled["label"].isna().all()
    assert (unlabeled["valve_severity"] == "").all()
    labelled = t[t["split"] != "unlabeled"]
    assert labelled["patient_id"].nunique() == 8 and labelled["label"].isin([0.0, 1.0]).all()
    assert labelled.groupby("patient_id")["label"].max().sum() == 2  # 25% of 8
    assert set(labelled["split"]) == {"train", "val", "test"}
    # object names are opaque: no patient or study identifier in them
    names = [Path(u).name for u in t["video_uri"]]
    assert len(set(names)) == len(names)
    for pid, sid in zip(t["patient_id"], t["study_id"]):
        assert all(pid not in n and sid not in n for n in names)


def test_labels_and_splits_are_stratified_by_patient() -> None:
    cfg = synth.SynthConfig(out="unused", patients=40, seed=5, prevalence=0.15, unlabeled_patients=10)
    labels, splits = synth.assign_labels_and_splits(cfg)
    assert splits[40:] == ["unlabeled"] * 10 and sum(labels[:40]) == 6 and sum(labels[40:]) == 2
    counts = {s: sum(1 for x in splits[:40] if x == s) for s in ("train", "val", "test")}
    assert counts == {"train": 28, "val": 4, "test": 8}
    positives = {s: sum(lab for lab, x in zip(labels, splits) if x == s) for s in ("train", "val", "test")}
    assert positives["train"] >= 4 and positives["test"] >= 1
    assert synth.assign_labels_and_splits(cfg) == (labels, splits)
    other = synth.assign_labels_and_splits(synth.SynthConfig(out="unused", patients=40, seed=6, unlabeled_patients=10))
    assert other != (labels, splits)


def test_same_seed_same_bytes_with_any_worker_count(dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    synth.synthesize(str(again), patients=8, seed=3, prevalence=0.25, unlabeled_patients=2, workers=2, **SMALL)
    files = sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (dataset / rel).read_bytes() == (again / rel).read_bytes(), rel

    other = tmp_path / "other"
    synth.synthesize(str(other), patients=8, seed=4, prevalence=0.25, unlabeled_patients=2, **SMALL)
    assert (other / "manifest.csv").read_bytes() != (dataset / "manifest.csv").read_bytes()


def test_videos_decode_black_outside_sector_and_hold_the_valve(dataset: Path) -> None:
    t = load_manifest(str(dataset / "manifest.csv")).table
    assert t["n_frames"].between(12, 20).all() and t["n_frames"].nunique() > 1
    for rec in t.itertuples(index=False):
        data = storage.read_bytes(rec.video_uri)
        info = probe(data, rec.video_uri)
        assert (info.n_frames, info.height, info.width) == (rec.n_frames, 64, 64)
        assert info.fps == pytest.approx(rec.fps)
        frames = decode_frames(data, range(int(rec.n_frames)), rec.video_uri)
        inside = synth.sector_mask(64, float(rec.sector_apex_x), float(rec.sector_apex_y), float(rec.sector_radius),
                                   float(rec.sector_half_angle_deg))
        # H.264 rings for a few pixels past the sector's sharp edge; farther out it is black
        dist = ndimage.distance_transform_edt(~inside)
        assert frames[:, dist >= 3].mean() < 1 and np.percentile(frames[:, dist >= 3], 99.9) <= 10
        assert frames[:, dist >= 6].max() <= 16
        assert frames[:, inside].mean() > 40
        x0, y0, x1, y1 = (int(c) for c in (rec.valve_x0, rec.valve_y0, rec.valve_x1, rec.valve_y1))
        assert 0 < x0 < x1 < 64 and 0 < y0 < y1 < 64
        assert inside[y0:y1, x0:x1].mean() > 0.95


def _pair(seed: int, patient: int, video: int = 0, **kw) -> tuple[tuple, tuple]:
    """The same patient and view rendered as not severe and as severe, with the same noise."""
    out = []
    for label in (0, 1):
        p = synth.sample_patient(seed, patient, label)
        rng = np.random.default_rng([seed, patient, video])
        vp = synth.sample_video(p, rng, **kw)
        out.append((*synth.render_video(vp, rng), vp))
    return out[0], out[1]


def test_raw_frames_are_exactly_black_outside_the_sector() -> None:
    (frames, _, vp), _ = _pair(1, 0, **SMALL)
    assert frames.shape == (vp.n_frames, 64, 64) and frames.dtype == np.uint8
    inside = synth.sector_mask(64, (64 - 1) / 2, vp.apex_y, vp.radius, vp.half_angle_deg)
    assert frames[:, ~inside].max() == 0 and frames[:, inside].min() >= 0 and frames[:, inside].mean() > 40


def test_label_changes_only_the_valve() -> None:
    for seed in range(4):
        (f0, box0, vp), (f1, box1, _) = _pair(seed, 2, **SMALL)
        assert box0 != (0, 0, 64, 64)
        x0, y0 = min(box0[0], box1[0]), min(box0[1], box1[1])
        x1, y1 = max(box0[2], box1[2]), max(box0[3], box1[3])
        outside = np.ones(f0.shape[1:], dtype=bool)
        outside[y0:y1, x0:x1] = False
        np.testing.assert_array_equal(f0[:, outside], f1[:, outside])
        # the severe valve is brighter (thick, calcified leaflets), most of all in systole
        peak = int(np.argmax(synth.cardiac_timeline(vp)["av_open"]))
        v0, v1 = f0[peak, y0:y1, x0:x1].astype(float), f1[peak, y0:y1, x0:x1].astype(float)
        assert v1.mean() > v0.mean() + 5


def test_valve_differs_by_label_across_patients_and_nothing_else_does() -> None:
    """Independent patients (not paired): the middle of the valve box at peak systole (where
    stenotic leaflets stay) separates the labels; a box of the same size away from the valve
    does not (only label-independent variation there)."""
    stats: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
    for i in range(40):
        label = i % 2
        p = synth.sample_patient(21, i, label)
        rng = np.random.default_rng([21, i, 0])
        vp = synth.sample_video(p, rng, size=64, min_frames=32, max_frames=32)  # about one beat
        frames, (x0, y0, x1, y1) = synth.render_video(vp, rng)
        peak = frames[int(np.argmax(synth.cardiac_timeline(vp)["av_open"]))].astype(float)
        tissue = np.median(peak[synth.sector_mask(64, 31.5, vp.apex_y, vp.radius, vp.half_angle_deg)])
        h, w = y1 - y0, x1 - x0
        ay, ax = 56 - h, 32 - w // 2  # deep, mid-sector: myocardium, pericardium, atrium

        def middle(y: int, x: int) -> float:  # the central half of an h x w box, relative to tissue
            return float(peak[y + h // 4 : y + 3 * h // 4, x + w // 4 : x + 3 * w // 4].mean() / tissue)

        stats[label].append((middle(y0, x0), middle(ay, ax)))
    neg, pos = np.array(stats[0]), np.array(stats[1])

    def t_stat(a: np.ndarray, b: np.ndarray) -> float:
        return float((b.mean() - a.mean()) / np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))

    assert t_stat(neg[:, 0], pos[:, 0]) > 4
    assert abs(t_stat(neg[:, 1], pos[:, 1])) < 2.5


def test_difficulty_narrows_the_severity_gap() -> None:
    def gap(difficulty: float) -> float:
        sev = [[synth.sample_patient(0, i, label, difficulty).severity for i in range(200)] for label in (0, 1)]
        return float(np.mean(sev[1]) - np.mean(sev[0]))

    easy, default, hard = gap(0.5), gap(1.0), gap(2.0)
    assert easy > default > hard > 0
    # at the default the latent severities of the two classes overlap (graded, not a switch)
    sev0 = [synth.sample_patient(0, i, 0).severity for i in range(200)]
    sev1 = [synth.sample_patient(0, i, 1).severity for i in range(200)]
    assert max(sev0) > min(sev1)


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="splits"):
        synth.SynthConfig(out="x", patients=3, seed=0, splits=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="size"):
        synth.SynthConfig(out="x", patients=3, seed=0, size=63)
    with pytest.raises(ValueError, match="min_frames"):
        synth.SynthConfig(out="x", patients=3, seed=0, min_frames=50, max_frames=40)


def test_cli_bad_flags_exit_non_zero(tmp_path: Path, capsys) -> None:
    assert main(["synth", "--out", str(tmp_path / "d"), "--patients", "2", "--seed", "0", "--difficulty", "0"]) == 2
    assert "difficulty" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "d"), "--patients", "2"]) == 2
    assert "--seed" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(tmp_path / "d"), "--patients", "2", "--seed", "0", "--splits", "0.5,0.5"])
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(tmp_path / "d"), "--patients", "2", "--seed", "0", "--view-jitter", "large"])
    assert "--view-jitter" in capsys.readouterr().err


def test_cli_takes_a_yaml_config_under_flags(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "synth.yaml"
    cfg.write_text(f"out: {tmp_path / 'ds'}\npatients: 3\nseed: 2\nsize: 64\nmin-frames: 8\nmax_frames: 10\n"
                   "splits: [0.34, 0.33, 0.33]\nprevalence: 0.9\n")
    assert main(["synth", "--config", str(cfg), "--seed", "5"]) == 0
    t = load_manifest(str(tmp_path / "ds" / "manifest.csv")).table
    assert t["n_frames"].between(8, 10).all() and t["patient_id"].nunique() == 3
    assert set(t["split"]) <= {"train", "val", "test"} and "unlabeled" not in set(t["split"])
    assert t.groupby("patient_id")["label"].max().sum() == 2  # prevalence 0.9 of 3 keeps one negative
    flagged = synth.synthesize(str(tmp_path / "direct"), 3, 5, size=64, min_frames=8, max_frames=10,
                               splits=(0.34, 0.33, 0.33), prevalence=0.9)
    assert Path(flagged).read_bytes() == (tmp_path / "ds" / "manifest.csv").read_bytes()  # --seed 5 won


def test_synth_to_s3_then_manifest_check(s3_bucket: str, capsys) -> None:
    prefix = f"s3://{s3_bucket}/synth/v1"
    argv = ["synth", "--out", prefix, "--patients", "6", "--seed", "9", "--size", "64",
            "--min-frames", "12", "--max-frames", "16", "--splits", "0.5,0.17,0.33"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == f"{prefix}/manifest.csv"
    assert main(["manifest", "check", f"{prefix}/manifest.csv", "--check-objects"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "total" in out and "warning" not in out
    keys = storage.list_prefix(prefix)
    assert f"{prefix}/manifest.csv" in keys and all(k.endswith(".mp4") for k in keys if "/videos/" in k)
    assert not any("P0000" in k or "S0000" in k for k in keys)


def test_example_frames(tmp_path: Path) -> None:
    from PIL import Image

    paths = synth.save_example_frames(tmp_path, size=64)
    assert [p.name for p in paths] == ["synth-not-severe.png", "synth-severe.png"]
    images = [np.asarray(Image.open(p)) for p in paths]
    assert all(im.shape == (64, 64) and im.dtype == np.uint8 for im in images)
    assert (images[0] != images[1]).any()


def test_view_jitter_levels_set_how_alike_a_studys_videos_are() -> None:
    """Per study settings with per-video jitter: the spread of a setting within a study is the
    level's jitter (``independent``: the population's), and the videos of one patient look
    more alike than two patients' at ``moderate`` and ``small``, not at ``independent``."""
    depth = synth.ACQUISITION["depth_cm"]
    spread = {}
    for level in synth.VIEW_JITTER:
        within = []
        for i in range(60):
            p, study = synth.sample_patient(4, i, 0), synth.sample_study(4, i)
            depths = [synth.sample_video(p, np.random.default_rng([4, i, v]), 64, study=study, view_jitter=level).depth_cm
                      for v in range(4)]
            within.append(np.std(depths, ddof=1))
        spread[level] = float(np.mean(within))
    population = (depth.high - depth.low) / np.sqrt(12)
    assert spread["independent"] == pytest.approx(population, rel=0.25)
    assert spread["moderate"] == pytest.approx(depth.moderate, rel=0.3)
    assert spread["small"] == pytest.approx(depth.small, rel=0.3)

    def clip(patient: int, video: int, level: str) -> np.ndarray:
        p, study = synth.sample_patient(8, patient, 0), synth.sample_study(8, patient)
        rng = np.random.default_rng([8, patient, video])
        vp = synth.sample_video(p, rng, 64, min_frames=8, max_frames=8, study=study, view_jitter=level)
        return synth.render_video(vp, rng)[0][:4].astype(np.float32).ravel()

    def gap(level: str) -> float:
        same = [np.corrcoef(clip(i, 0, level), clip(i, 1, level))[0, 1] for i in range(10)]
        other = [np.corrcoef(clip(i, 0, level), clip(i + 1, 1, level))[0, 1] for i in range(10)]
        return float(np.mean(same) - np.mean(other))

    assert gap("moderate") > 0.1 and gap("moderate") > gap("independent") + 0.1
    with pytest.raises(ValueError, match="view_jitter"):
        synth.SynthConfig(out="x", patients=3, seed=0, view_jitter="large")


def test_speckle_decorrelates_gradually_so_frame_order_shows() -> None:
    """AR(1) speckle: frames further apart are less alike, lag after lag (no plateau at lag 1)."""
    p = synth.sample_patient(0, 1, 0)
    rng = np.random.default_rng([0, 1, 0])
    vp = synth.sample_video(p, rng, 64, min_frames=24, max_frames=24, study=synth.sample_study(0, 1),
                            view_jitter="moderate")
    frames = synth.render_video(vp, rng)[0].astype(np.float32)
    inside = frames.mean(0) > 20
    corr = [np.mean([np.corrcoef(frames[t][inside], frames[t + lag][inside])[0, 1] for t in range(16)])
            for lag in (1, 2, 4, 8)]
    assert corr[0] > corr[1] > corr[2] > corr[3]
    assert corr[0] - corr[2] > 0.03


def test_valve_leaflets_differ_by_two_pixels_at_the_cpu_benchmark_size() -> None:
    """The cpu label-efficiency profile draws 96 px frames at difficulty 1.25 (issue 16: the
    severe and not-severe leaflets differ by at least 2 px there; 1.5 vs 3.6 px)."""
    thin, thick = synth.leaflet_px_by_label(96, difficulty=1.25, patients=500)
    assert thick - thin >= 2.0
    small_thin, small_thick = synth.leaflet_px_by_label(64, difficulty=1.25, patients=500)
    assert small_thick - small_thin < 2.0  # why the profile is not at 64 px


@pytest.mark.parametrize("patients", [30, 40, 47, 60])
def test_every_labelled_split_holds_both_classes(patients: int) -> None:
    for seed in range(10):
        labels, splits = synth.assign_labels_and_splits(synth.SynthConfig(out="x", patients=patients, seed=seed))
        for name in ("train", "val", "test"):
            assert {lab for lab, s in zip(labels, splits) if s == name} == {0, 1}, (seed, name)
