"""echo.evaluation.plots: every figure is a valid PNG, locally and on S3; the ROC band holds the curve."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from echo.evaluation import metrics as M
from echo.evaluation import plots
from echo.data import storage


@pytest.fixture(scope="module")
def scores() -> tuple[np.ndarray, np.ndarray]:
    """(N,) labels and (N,) probabilities with some ties."""
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(int)
    p = np.round(1 / (1 + np.exp(-(rng.normal(size=300) + 1.3 * y - 0.8))), 2)
    return y, p


def _assert_png(data: bytes) -> tuple[int, int]:
    assert len(data) > 0
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        im.load()
        assert im.width > 100 and im.height > 100
        return im.size


def test_roc_png_and_band_contains_curve(tmp_path, scores):
    y, p = scores
    ci = M.bootstrap_auroc_ci(y, p, 300, seed=1)
    points = {"Youden": M.youden_threshold(y, p), "90% sens.": M.threshold_for_sensitivity(y, p, 0.9)}
    band = plots.plot_roc(y, p, ci, points, str(tmp_path / "roc.png"), n_resamples=300, seed=1)
    _assert_png((tmp_path / "roc.png").read_bytes())

    assert band.fpr.shape == band.tpr.shape == band.tpr_low.shape == band.tpr_high.shape
    assert band.fpr[0] == 0.0 and band.fpr[-1] == 1.0
    assert np.all(band.tpr_low <= band.tpr) and np.all(band.tpr <= band.tpr_high)
    # A real band: wide somewhere in the middle, and monotone like a ROC curve.
    assert (band.tpr_high - band.tpr_low).max() > 0.05
    assert np.all(np.diff(band.tpr) >= 0)
    # The grid curve is the ROC curve: its area matches AUROC up to the grid's resolution.
    assert np.trapezoid(band.tpr, band.fpr) == pytest.approx(M.auroc(y, p), abs=0.01)
    # Each operating point on the curve: TPR at its FPR equals its sensitivity (to the grid).
    for name, (x, t) in M.roc_points(y, p, points).items():
        assert np.interp(x, band.fpr, band.tpr) == pytest.approx(t, abs=0.03), name


def test_pr_and_calibration_png(tmp_path, scores):
    y, p = scores
    plots.plot_pr(y, p, str(tmp_path / "pr.png"))
    _assert_png((tmp_path / "pr.png").read_bytes())
    bins = plots.plot_calibration(y, p, str(tmp_path / "sub" / "calibration.png"), n_bins=5)
    _assert_png((tmp_path / "sub" / "calibration.png").read_bytes())
    assert bins.count.sum() == y.size


def _label_efficiency_table() -> pd.DataFrame:
    rows = []
    for init, base in [("random", 0.55), ("kinetics", 0.62), ("MI-SimCLR+FO", 0.75)]:
        for f in [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0]:
            auc = base + 0.04 * np.log10(f * 100)
            rows.append({"init": init, "label_fraction": f, "auroc": auc, "ci_low": auc - 0.03, "ci_high": auc + 0.03})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # any row order


def test_label_efficiency_png(tmp_path):
    path = tmp_path / "label_efficiency.png"
    plots.plot_label_efficiency(_label_efficiency_table(), str(path))
    width, height = _assert_png(path.read_bytes())
    assert width > height  # the wide layout


def test_label_efficiency_rejects_bad_tables(tmp_path):
    table = _label_efficiency_table()
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['ci_high'\]"):
        plots.plot_label_efficiency(table.drop(columns="ci_high"), str(tmp_path / "x.png"))
    bad = table.reset_index(drop=True)
    bad.loc[3, "label_fraction"] = 5.0
    with pytest.raises(ValueError, match=r"label_fraction must lie in \(0, 1\]; row\(s\) \[4\]"):
        plots.plot_label_efficiency(bad, str(tmp_path / "x.png"))
    bad = table.reset_index(drop=True)
    bad.loc[0, "auroc"] = np.nan
    with pytest.raises(ValueError, match=r"column 'auroc' is not a finite number in row\(s\) \[1\]"):
        plots.plot_label_efficiency(bad, str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_plots_write_to_s3(s3_bucket, scores):
    y, p = scores
    uri = f"s3://{s3_bucket}/eval/pr.png"
    plots.plot_pr(y, p, uri)
    _assert_png(storage.read_bytes(uri))
