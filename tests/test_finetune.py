"""Fine-tuning on Ray Train from random and from a pretraining run, evaluation with 95% CIs."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import pytest

from echo import tracking
from echo.data.ids import ID_KEY_ENV, keyed_hash
from echo.train.finetune import FinetuneConfig, label_subset_record, pretrain_run_id, resolve_init, run_finetune
from echo.train.launch import RayOptions


def _finetune(synth_small, tracking_uri, tmp_path, **kw) -> tuple[FinetuneConfig, str]:
    cfg = FinetuneConfig(manifest=synth_small, backbone="tiny3d", epochs=3, batch_size=8, clip_len=8, lr=1e-3,
                         loader_workers=1, n_resamples=300, tracking_uri=tracking_uri, **kw)
    given = dataclasses.asdict(cfg)
    run_id = run_finetune(cfg, RayOptions(workers=1, cpus_per_worker=1, storage=str(tmp_path / "runs")))
    assert dataclasses.asdict(cfg) == given  # the run's state (MLflow run, names, URIs) stays out of the config
    return cfg, run_id


def test_finetune_from_pretraining_run_records_metrics_intervals_plots_and_model(
        ray_cluster, synth_small, tracking_uri, pretrain_run, tmp_path, capsys, monkeypatch):
    driver_tmp = tmp_path / "driver-tmp"
    driver_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(driver_tmp))
    cfg, run_id = _finetune(synth_small, tracking_uri, tmp_path, init=f"runs:/{pretrain_run}", label_fraction=0.5,
                            seed=1)
    # the driver's downloaded encoder and evaluation files are gone once logged
    assert not list(driver_tmp.glob("echo-*"))
    out = capsys.readouterr().out
    assert "test AUROC" in out and "95% CI" in out
    c = tracking.client(tracking_uri)
    run = c.get_run(run_id)
    m = run.data.metrics
    for key in ("test_auroc", "test_auroc_ci_low", "test_auroc_ci_high", "test_auroc_delong_ci_low", "test_auprc",
                "test_balanced_accuracy", "test_sensitivity", "test_specificity", "test_brier", "val_auroc",
                "test_video_auroc", "n_train_studies"):
        assert key in m, key
    assert m["test_auroc_ci_low"] <= m["test_auroc"] <= m["test_auroc_ci_high"]
    assert run.data.params["init"] == f"runs:/{pretrain_run}" and run.data.params["label_fraction"] == "0.5"
    assert run.data.params["seed"] == "1" and run.data.params["subset_seed"] == "0"
    files = {f.path for f in c.list_artifacts(run_id, "evaluation")}
    for name in ("test_roc.png", "test_pr.png", "test_calibration.png", "test_study_predictions.csv",
                 "label_subset.json"):
        assert f"evaluation/{name}" in files, files
    # The label subset is recorded as keyed hashes: no raw patient ID, no salt in the artifact.
    subset = json.loads(Path(c.download_artifacts(run_id, "evaluation/label_subset.json", str(tmp_path))).read_text())
    assert subset["label_fraction"] == 0.5 and subset["patient_hashes"] and "salt" not in subset
    assert not any(h.startswith("P0") for h in subset["patient_hashes"])
    # Each epoch logged once, and the model loads back without unpickling code.
    steps = [x.step for x in c.get_metric_history(run_id, "val_auroc")]
    assert len(steps) == len(set(steps)) >= 1
    import echo

    model = echo.load_model(f"runs:/{run_id}/model", tracking_uri=tracking_uri)
    assert model.meta.pretrain_run_id == pretrain_run and model.meta.label_fraction == 0.5


def test_a_pretraining_runs_encoder_is_fetched_for_the_block_only(pretrain_run, tracking_uri) -> None:
    with resolve_init(f"runs:/{pretrain_run}", tracking_uri) as path:
        assert Path(path).name == "encoder.pt" and Path(path).stat().st_size > 0
    assert not Path(path).parent.exists()
    with resolve_init("random", tracking_uri) as init:
        assert init == "random"
    assert pretrain_run_id(f"runs:/{pretrain_run}/") == pretrain_run and pretrain_run_id("kinetics") is None
    with pytest.raises(ValueError, match="no encoder artifact"):
        with resolve_init("runs:/0123456789abcdef0123456789abcdef", tracking_uri):
            pass


def test_finetune_from_random_then_evaluate_with_saliency(ray_cluster, synth_small, tracking_uri, tmp_path, capsys):
    from echo.cli import main

    _, run_id = _finetune(synth_small, tracking_uri, tmp_path, init="random", freeze_epochs=0)
    rc = main(["evaluate", "--model", f"runs:/{run_id}/model", "--manifest", synth_small, "--tracking-uri",
               tracking_uri, "--n-resamples", "300", "--saliency", "2", "--out", str(tmp_path / "eval")])
    assert rc == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("test AUROC") and "studies" in line and "positive" in line
    assert len(list((tmp_path / "eval" / "saliency").glob("*.gif"))) == 2
    runs = tracking.client(tracking_uri).search_runs(
        [tracking.ensure_experiment(tracking_uri, "echo-ssl-evaluate")], order_by=["attributes.start_time DESC"])
    metrics = runs[0].data.metrics
    assert 0 < metrics["saliency_area_share"] < 1 and 0 <= metrics["saliency_valve_share"] <= 1
    assert metrics["test_auroc_ci_low"] <= metrics["test_auroc"] <= metrics["test_auroc_ci_high"]


def _relabelled(synth_small: str, path: Path, split: str, severe_studies: int | None) -> str:
    """The shared manifest with absolute URIs, ``split`` keeping only ``severe_studies`` severe studies."""
    import pandas as pd

    table = pd.read_csv(synth_small, dtype=str, keep_default_na=False)
    base = Path(synth_small).parent
    table["video_uri"] = [str(base / v) for v in table["video_uri"]]
    rows = table["split"] == split
    severe = sorted(table.loc[rows & (table["label"] == "1"), "study_id"].unique())
    keep = set(severe[:severe_studies or 0])
    table.loc[rows & ~table["study_id"].isin(keep), "label"] = "0"
    table.to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize("split,severe,evaluate_test,message", [
    ("val", 0, True, r"the val split has 0 severe and \d+ non-severe studies; .* needs at least 2 of each"),
    ("val", 1, True, r"the val split has 1 severe and \d+ non-severe studies; .* needs at least 2 of each"),
    ("test", 1, True, r"the test split has 1 severe and \d+ non-severe studies; .*--no-evaluate-test"),
], ids=["val one class", "val one severe study", "test one severe study"])
def test_split_the_final_evaluation_cannot_score_is_refused_before_training(synth_small, tmp_path, split, severe,
                                                                           evaluate_test, message):
    """The final step's DeLong interval needs 2 studies of each class: checked before Ray starts
    (no ray_cluster here: a run that got that far would fail to connect in this test)."""
    bad = _relabelled(synth_small, tmp_path / "bad.csv", split, severe)
    with pytest.raises(ValueError, match=message) as info:
        run_finetune(FinetuneConfig(manifest=bad, backbone="tiny3d", evaluate_test=evaluate_test,
                                    data_root=[str(Path(synth_small).parent)]), RayOptions())
    assert bad in str(info.value)


def test_test_split_is_not_checked_when_it_is_not_evaluated(synth_small, tmp_path):
    from echo.data.manifest import load_manifest
    from echo.train.finetune import check_splits, training_rows

    manifest = load_manifest(_relabelled(synth_small, tmp_path / "t.csv", "test", 1),
                             data_roots=[str(Path(synth_small).parent)])
    train, _ = training_rows(manifest, 1.0, 0)
    check_splits(manifest, train, evaluate_test=False)
    with pytest.raises(ValueError, match="test split has 1 severe"):
        check_splits(manifest, train, evaluate_test=True)


def test_label_subset_is_keyed_by_the_id_key_and_unlinkable_without_it(monkeypatch, caplog) -> None:
    """Issue 17, item 9: with ``ECHO_SSL_ID_KEY`` the record holds HMACs under it (checkable by the key's
    holder only) and no salt; without it the hashes are under a discarded random key (two records
    of the same patients differ) and a warning says so."""
    patients = ["MRN0012345", "MRN0012346", "MRN0012347"]
    key = "id-key-for-the-label-subset-test"
    monkeypatch.setenv(ID_KEY_ENV, key)
    record = label_subset_record(0.1, 3, patients)
    assert record["patient_hashes"] == [keyed_hash(key.encode(), "patient", p) for p in patients]
    assert record["n_patients"] == 3 and record["key"] == f"${ID_KEY_ENV}"
    assert "salt" not in record and "MRN" not in json.dumps(record)
    monkeypatch.delenv(ID_KEY_ENV)
    with caplog.at_level("WARNING"):
        first, second = label_subset_record(0.1, 3, patients), label_subset_record(0.1, 3, patients)
    assert ID_KEY_ENV in caplog.text and first["key"] == "random, discarded"
    assert len(set(first["patient_hashes"])) == 3 and not set(first["patient_hashes"]) & set(second["patient_hashes"])
    assert not set(first["patient_hashes"]) & set(record["patient_hashes"])
