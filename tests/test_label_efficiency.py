"""Smoke run of the label-efficiency benchmark (issue 16) on a tiny synthetic set, and its statistics.

Real components throughout: echo.ingest.synth data on disk, in-process pretraining from the
decoded-frame cache, gates, probe and fine-tuning readouts of tiny3d, MLflow on a local SQLite store.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import label_efficiency as le  # noqa: E402

from echo import tracking  # noqa: E402
from echo.evaluation.gates import retrieval_top1  # noqa: E402
from echo.evaluation.metrics import auroc  # noqa: E402


def _tiny() -> le.Profile:
    quick = le.quick_profile(le.PROFILES["cpu"], patients=40)
    return dataclasses.replace(
        quick, name="cpu-test", unlabeled_patients=10, size=32, min_frames=8, max_frames=10, pretrain_steps=2,
        counts=(6, 0), draws=(3, 1), ft_counts=(6,), ft_draws=(1,), ft_steps_per_epoch=1, ft_batch=4,
        n_resamples=50,
    )


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("le")
    return le.run_benchmark(_tiny(), out / "out", f"sqlite:///{out / 'mlflow.db'}", methods=("echoclr",))


def test_three_files_with_the_issue_columns(result) -> None:
    files = result["files"]
    rows = pd.read_csv(files[".csv"])
    assert list(rows.columns) == list(le.ROW_COLUMNS)
    assert set(rows["init"]) == {"random", "echoclr"} and set(rows["readout"]) == {"probe", "finetune"}
    # Same draws for every init: 3 draws at 6 studies and 1 at all (20 train patients), probe; 1 fine-tune draw.
    probe = rows[rows["readout"] == "probe"]
    assert probe.groupby("init").size().to_dict() == {"random": 4, "echoclr": 4}
    assert sorted(probe["n_labelled_studies"].unique()) == [6, 20]
    assert (probe.groupby(["n_labelled_studies", "subset_seed"])["n_positive"].nunique() == 1).all()
    assert rows["test_auroc"].between(0, 1).all()
    summary = pd.read_csv(files["_summary.csv"])
    assert list(summary.columns) == list(le.SUMMARY_COLUMNS)
    assert ((summary["auroc_ci_low"] <= summary["auroc_mean"]) & (summary["auroc_mean"] <= summary["auroc_ci_high"])).all()
    assert summary.loc[summary["init"] == "random", "delta_vs_random"].isna().all()
    gates = pd.read_csv(files["_gates.csv"])
    assert list(gates.columns) == list(le.GATE_COLUMNS)
    assert gates["method"].tolist() == ["random", "echoclr"]
    echo = gates.set_index("method").loc["echoclr"]
    assert echo["pretrain_steps"] >= 2 and echo["order_chance"] == pytest.approx(1 / 24)
    assert 0 < echo["retrieval_chance"] < 1
    md = files[".md"].read_text()
    assert "Decision rules (written before the run started)" in md and "Wall time" in md and "commit" in md
    assert files[".png"].stat().st_size > 0


def test_paired_difference_matches_a_direct_computation(result) -> None:
    """delta_vs_random = the mean over draws of AUROC(echoclr, draw) - AUROC(random, draw)."""
    rows, summary = result["rows"], result["summary"]
    for readout, n in (("probe", 6), ("probe", 20), ("finetune", 6)):
        pick = rows[(rows["readout"] == readout) & (rows["n_labelled_studies"] == n)]
        a = pick[pick["init"] == "echoclr"].sort_values("subset_seed")["test_auroc"].to_numpy()
        b = pick[pick["init"] == "random"].sort_values("subset_seed")["test_auroc"].to_numpy()
        cell = summary[(summary["init"] == "echoclr") & (summary["readout"] == readout)
                       & (summary["n_labelled_studies"] == n)].iloc[0]
        assert cell["delta_vs_random"] == pytest.approx(np.mean(a - b))
        assert cell["auroc_mean"] == pytest.approx(np.mean(a))
        assert cell["draws"] == len(a)


def test_one_mlflow_parent_run_holds_the_results(result) -> None:
    uri = result["files"][".md"].parent.parent / "mlflow.db"
    c = tracking.client(f"sqlite:///{uri}")
    parent = result["parent"]
    assert c.get_run(parent).info.status == "FINISHED"
    names = {f.path for f in c.list_artifacts(parent, "results")}
    assert {f"results/label_efficiency_cpu-test{k}" for k in (".csv", "_summary.csv", "_gates.csv", ".md", ".png")} <= names
    assert "results/decision_rules.md" in names
    children = c.search_runs([c.get_run(parent).info.experiment_id],
                             filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert {r.info.run_name for r in children} == {"pretrain-echoclr"}


def test_gate_and_subset_draws_on_known_cases() -> None:
    patients = np.repeat(np.arange(10), 2)
    assert retrieval_top1(np.eye(10)[patients], patients)[0] == 1.0
    train = pd.DataFrame({"patient_id": [f"p{i}" for i in range(40)], "label": [1.0] * 10 + [0.0] * 30})
    draws = le.subset_draws(train, (6, 12, 0), (3, 3, 1), seed=0)
    assert sorted(draws) == [(6, 0), (6, 1), (6, 2), (12, 0), (12, 1), (12, 2), (40, 0)]
    for d in range(3):
        assert set(draws[(6, d)]) < set(draws[(12, d)])  # nested
        assert sum(p in {f"p{i}" for i in range(10)} for p in draws[(6, d)]) == 2  # round(6 * 0.25), stratified
    assert draws[(6, 0)] != draws[(6, 1)]


def test_decision_needs_gate_gain_interval_ordering_and_task_range() -> None:
    def cell(init, readout, n, mean, delta=np.nan, low=np.nan):
        return {"init": init, "readout": readout, "n_labelled_studies": n, "draws": 20, "auroc_mean": mean,
                "auroc_ci_low": mean - 0.05, "auroc_ci_high": mean + 0.05, "delta_vs_random": delta,
                "delta_ci_low": low, "delta_ci_high": np.nan}

    summary = pd.DataFrame([
        cell("random", "probe", 6, 0.6), cell("simclr", "probe", 6, 0.65, 0.05, 0.01),
        cell("mi-simclr", "probe", 6, 0.7, 0.1, 0.05), cell("echoclr", "probe", 6, 0.75, 0.15, 0.08),
        cell("random", "probe", 12, 0.62), cell("simclr", "probe", 12, 0.66, 0.04, 0.0),
        cell("mi-simclr", "probe", 12, 0.7, 0.08, 0.03), cell("echoclr", "probe", 12, 0.76, 0.14, 0.06),
        cell("random", "finetune", 500, 0.9),
    ])
    gates = pd.DataFrame({"method": ["echoclr"], "passed": [True]})
    assert le.decide(summary, gates, (6, 12))["goal_met"]
    assert le.decide(summary, gates.assign(passed=False), (6, 12))["verdict"].startswith("inconclusive")
    low = summary.copy()
    low.loc[(low["init"] == "echoclr") & (low["n_labelled_studies"] == 6), "delta_ci_low"] = -0.01
    assert le.decide(low, gates, (6, 12))["verdict"].startswith("effect absent")
    easy = summary.copy()
    easy.loc[easy["readout"] == "finetune", "auroc_mean"] = 0.99
    assert not le.decide(easy, gates, (6, 12))["goal_met"]


def test_gpu_profile_quick_runs_on_cpu(tmp_path: Path) -> None:
    """The ``gpu`` profile's code path (r3d_18, its fine-tuning settings) at ``--quick`` size on
    the CPU: no GPU is lent to CI. One method, probe and fine-tuning readouts."""
    profile = dataclasses.replace(le.quick_profile(le.PROFILES["gpu"], patients=40), unlabeled_patients=10,
                                  min_frames=8, max_frames=10, counts=(6,), draws=(1,), ft_steps_per_epoch=1,
                                  ft_batch=2, ft_clip_len=4, ft_lrs=(1e-4,), n_resamples=20)
    assert profile.backbone == "r3d_18" and profile.size == 32
    out = le.run_benchmark(profile, tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}", methods=("echoclr",))
    assert set(out["rows"]["readout"]) == {"probe", "finetune"}
    assert out["gates"]["method"].tolist() == ["random", "echoclr"]
