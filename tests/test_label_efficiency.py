"""Smoke run of the label-efficiency benchmark's functions on a tiny synthetic set.

Real components throughout: echo.ingest.synth data on disk, in-process pretraining and fine-tuning
of tiny3d, MLflow on a local SQLite store.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import label_efficiency as le  # noqa: E402

from echo import tracking  # noqa: E402


def _tiny() -> le.Profile:
    quick = le.quick_profile(le.PROFILES["cpu"], patients=40)
    return dataclasses.replace(
        quick, name="cpu-test", unlabeled_patients=10, size=32, min_frames=8, max_frames=10, pretrain_batch=8,
        pretrain_clip_len=3, ft_clip_len=4, ft_stride=1, ft_batch=8, ft_epochs=((1.0, 1),), probe_every=0,
        val_clips=1, eval_clips=1, n_resamples=50,
    )


def test_smoke_run_writes_table_and_logs_one_parent_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    table, parent = le.run_benchmark(_tiny(), tmp_path / "out", uri, methods=("echoclr",), fractions=(0.5, 1.0))

    assert list(table.columns) == list(le.TABLE_COLUMNS)
    assert {(r.init, r.label_fraction) for r in table.itertuples()} == {
        (i, f) for i in ("random", "echoclr") for f in (0.5, 1.0)
    }
    assert ((table["ci_low"] <= table["auroc"]) & (table["auroc"] <= table["ci_high"])).all()
    # Nested subsets: half the labels means fewer training studies than all of them.
    n = table.groupby("label_fraction")["n_train_studies"].first()
    assert 0 < n[0.5] < n[1.0]
    csv = tmp_path / "out" / "label_efficiency_cpu-test.csv"
    assert pd.read_csv(csv)["run_id"].tolist() == table["run_id"].tolist()
    md = (tmp_path / "out" / "label_efficiency_cpu-test.md").read_text()
    assert "| echoclr |" in md and "goal_met" in md

    c = tracking.client(uri)
    results = {f.path for f in c.list_artifacts(parent, "results")}
    assert results == {f"results/label_efficiency_cpu-test.{ext}" for ext in ("csv", "md", "png")}
    assert c.get_run(parent).info.status == "FINISHED"
    children = c.search_runs([c.get_run(parent).info.experiment_id],
                             filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    names = {r.info.run_name for r in children}
    assert names == {"pretrain-echoclr", *(f"finetune-{i}-{f:g}" for i in ("random", "echoclr") for f in (0.5, 1.0))}
    pretrain = next(r for r in children if r.info.run_name == "pretrain-echoclr")
    assert {f.path for f in c.list_artifacts(pretrain.info.run_id, "encoder")} >= {"encoder/encoder.pt"}
    cell = next(r for r in children if r.info.run_name == "finetune-echoclr-1")
    assert cell.data.metrics["test_auroc"] == pytest.approx(
        float(table.query("init == 'echoclr' and label_fraction == 1.0")["auroc"].iloc[0]))
    assert cell.data.params["init"] == f"runs:/{pretrain.info.run_id}"


def _row(init: str, label_fraction: float, auroc: float, half: float = 0.03) -> dict:
    return {"init": init, "label_fraction": label_fraction, "auroc": auroc, "ci_low": auroc - half,
            "ci_high": auroc + half}


def test_goal_check_needs_gain_separation_and_ordering() -> None:
    rows = [_row("random", 0.01, 0.60), _row("simclr", 0.01, 0.65), _row("mi-simclr", 0.01, 0.70),
            _row("echoclr", 0.01, 0.75), _row("random", 0.05, 0.70), _row("simclr", 0.05, 0.72),
            _row("mi-simclr", 0.05, 0.74), _row("echoclr", 0.05, 0.76)]
    goal = le.goal_check(pd.DataFrame(rows))
    assert goal["echoclr_gain_1pct"] == pytest.approx(0.15)
    assert goal["echoclr_ci_separated_1pct"] and goal["ordering_0.01"] and goal["ordering_0.05"]
    assert goal["goal_met"]

    # Wider CIs at 1%: the same gain no longer separates the intervals.
    wide = pd.DataFrame([_row(r["init"], r["label_fraction"], r["auroc"], 0.08 if r["label_fraction"] == 0.01 else 0.03)
                         for r in rows])
    assert not le.goal_check(wide)["echoclr_ci_separated_1pct"] and not le.goal_check(wide)["goal_met"]

    swapped = pd.DataFrame(rows).replace({"init": {"simclr": "mi-simclr", "mi-simclr": "simclr"}})
    assert le.goal_check(swapped)["ordering_0.01"] is False

    partial = le.goal_check(pd.DataFrame(rows[:1]))
    assert partial["echoclr_gain_1pct"] is None and partial["goal_met"] is False
