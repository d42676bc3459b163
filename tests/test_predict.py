"""Prediction from a bundle: the Python API and ``echo-ssl predict`` agree (test_serving.py also
runs the CLI in another process), probabilities follow their definition (mean over clips of the
sigmoid), calls follow the stored threshold, studies are aggregated and never named by ID."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import echo
from echo.serve.bundle import load_bundle, save_bundle
from echo.cli import main
from echo.data.clips import eval_clips
from echo.data.ids import HASH_HEX
from echo.model.networks import ASClassifier
from echo.data.video import VideoDecodeError, encode_mp4


def write_video(path: Path, n_frames: int, size: int, seed: int) -> str:
    frames = np.random.default_rng(seed).integers(0, 256, (n_frames, size, size), dtype=np.uint8)
    path.write_bytes(encode_mp4(frames, fps=25))
    return str(path)


def make_bundle(folder: Path, threshold: float) -> str:
    torch.manual_seed(11)
    meta = {"clip_len": 8, "num_clips": 2, "stride": 1, "frame_size": [32, 32], "threshold": threshold,
            "label_fraction": 1.0, "init": "random", "test_auroc": 0.5, "manifest_sha256": "0" * 64}
    return save_bundle(ASClassifier("tiny3d", dropout=0.25), meta, str(folder))


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[str]:
    """32x32 (20 frames), 32x32 (5 frames: shorter than a clip, looped), 64x64 (resized)."""
    root = tmp_path_factory.mktemp("videos")
    return [write_video(root / "a.mp4", 20, 32, 1), write_video(root / "b.mp4", 5, 32, 2),
            write_video(root / "c.mp4", 12, 64, 3)]


def test_probabilities_follow_the_definition_and_the_threshold(videos, tmp_path):
    model = echo.load_model(make_bundle(tmp_path / "b", threshold=0.5))
    out = model.predict_videos(videos)
    assert list(out.columns) == ["video_uri", "probability", "prediction", "call"]
    assert out["video_uri"].tolist() == videos
    assert out["probability"].between(0, 1).all() and out["probability"].nunique() == 3

    net, meta = load_bundle(tmp_path / "b")
    assert not net.training  # dropout off: the same video gives the same number
    clips = torch.from_numpy(eval_clips(Path(videos[0]).read_bytes(), videos[0], clip_len=8, num_clips=2))
    with torch.no_grad():
        expected = torch.sigmoid(net(clips.unsqueeze(1)).double()).mean().item()
    assert out["probability"][0] == pytest.approx(expected, abs=1e-6)
    assert model.predict_videos(videos[:1])["probability"][0] == out["probability"][0]

    # A threshold between the probabilities splits the calls at ">= threshold".
    middle = float(np.sort(out["probability"])[1])
    split = echo.load_model(make_bundle(tmp_path / "t", threshold=middle)).predict_videos(videos)
    np.testing.assert_allclose(split["probability"], out["probability"], atol=1e-7)
    assert split["prediction"].tolist() == [int(p >= middle) for p in out["probability"]]
    assert sorted(split["call"]) == ["not severe", "severe", "severe"]


def test_cli_and_api_agree_and_studies_stay_anonymous(videos, tmp_path, capsys):
    bundle = make_bundle(tmp_path / "b", threshold=0.5)
    folder = Path(videos[0]).parent
    manifest = tmp_path / "manifest.csv"
    (tmp_path / "d.mp4").write_bytes(Path(videos[0]).read_bytes())
    pd.DataFrame(
        {
            "video_uri": [str(folder / n) for n in ("a.mp4", "b.mp4", "c.mp4")] + ["d.mp4"],
            "patient_id": ["PAT-SECRET-1", "PAT-SECRET-1", "PAT-SECRET-2", "PAT-SECRET-3"],
            "study_id": ["STUDY-SECRET-A", "STUDY-SECRET-A", "STUDY-SECRET-B", "STUDY-SECRET-C"],
            "split": ["test", "test", "test", "train"],
            "label": [1, 1, 0, 0],
        }
    ).to_csv(manifest, index=False)

    model = echo.load_model(bundle)
    api_videos = model.predict_videos(videos)
    roots = [str(folder), str(tmp_path)]  # the videos live beside the manifest's folder, not in it
    api_manifest = model.predict_manifest(str(manifest), split="test", data_roots=roots)
    assert len(api_manifest) == 3 and set(api_manifest["split"]) == {"test"}
    a, b = api_manifest["study"][0], api_manifest["study"][2]
    assert a == api_manifest["study"][1] != b and len(a) == HASH_HEX
    mean_a = api_videos["probability"][:2].mean()
    assert api_manifest["study_probability"][0] == pytest.approx(mean_a, abs=1e-12)
    assert api_manifest["study_prediction"].tolist() == [int(p >= 0.5) for p in api_manifest["study_probability"]]
    with pytest.raises(ValueError, match="no rows in split 'val'"):
        model.predict_manifest(str(manifest), split="val", data_roots=roots)

    out_file = tmp_path / "pred.json"
    code = main(["predict", "--model", bundle, *videos, "--manifest", str(manifest), "--split", "test",
                 "--format", "json", "--out", str(out_file), "--data-root", ",".join(roots)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    text = out_file.read_text()
    assert "SECRET" not in text + printed.out + printed.err
    doc = json.loads(text)
    assert doc["threshold"] == 0.5 and doc["model"]["weights_sha256"] == model.meta.weights_sha256
    rows = pd.DataFrame(doc["videos"])
    assert rows["video_uri"].tolist() == videos + videos
    np.testing.assert_allclose(rows["probability"][:3], api_videos["probability"], atol=1e-6)
    np.testing.assert_allclose(rows["probability"][3:], api_manifest["probability"], atol=1e-6)
    studies = pd.DataFrame(doc["studies"])
    assert sorted(studies["n_videos"]) == [1, 2] and studies["label"].tolist() == [1.0, 0.0]
    np.testing.assert_allclose(sorted(studies["probability"]), sorted(api_manifest["study_probability"].unique()), atol=1e-6)


def test_bad_inputs_name_the_video(videos, tmp_path):
    model = echo.load_model(make_bundle(tmp_path / "b", threshold=0.5))
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        model.predict_videos([videos[0], str(tmp_path / "missing.mp4")])
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(Path(videos[0]).read_bytes()[:200])
    with pytest.raises(VideoDecodeError, match="broken.mp4"):
        model.predict_videos([str(broken)])
    with pytest.raises(FileNotFoundError, match="no bundle folder at"):
        echo.load_model(str(tmp_path / "nowhere"))


def test_evaluate_scores_exactly_as_predict_on_videos_of_another_size(tmp_path, monkeypatch):
    """A 32 px model on 48 px and 64 px videos: evaluate resizes as predict does (issue 18)."""
    from sklearn.metrics import roc_auc_score

    from echo.evaluation.evaluate import evaluate_model

    monkeypatch.chdir(tmp_path)
    bundle = make_bundle(tmp_path / "b", threshold=0.5)
    folder = tmp_path / "videos"
    folder.mkdir()
    rows = []
    for i in range(8):  # 4 studies of 2 videos, sizes alternating, two severe studies
        size = 48 if i % 2 else 64
        rows.append({"video_uri": write_video(folder / f"v{i}.mp4", 12 + i, size, 100 + i), "patient_id": f"P{i // 2}",
                     "study_id": f"S{i // 2}", "split": "test", "label": int(i // 2 in (1, 2))})
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)

    predicted = echo.load_model(bundle).predict_manifest(str(manifest), split="test")
    report = evaluate_model(bundle, str(manifest), "test", str(tmp_path / "eval"), f"sqlite:///{tmp_path / 'm.db'}",
                            n_resamples=50, workers=0)
    evaluated = pd.read_csv(tmp_path / "eval" / "test_video_predictions.csv")
    assert evaluated["video_uri"].tolist() == predicted["video_uri"].tolist()
    np.testing.assert_allclose(evaluated["probability"], predicted["probability"], rtol=0, atol=1e-6)
    assert report["test_video_auroc"] == pytest.approx(roc_auc_score(predicted["label"], predicted["probability"]))
    studies = predicted.groupby("study", sort=False).agg(label=("label", "max"), p=("study_probability", "first"))
    assert report["test_auroc"] == pytest.approx(roc_auc_score(studies["label"], studies["p"]))
