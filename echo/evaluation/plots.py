"""Evaluation figures as PNG: ROC with a bootstrap band, precision-recall, calibration, and the
label-efficiency figure (test AUROC against label fraction, one line per initialisation).

Figures are drawn on matplotlib's Agg canvas directly (``matplotlib.figure.Figure``), never
through ``pyplot``: no global backend switch, no figure registry, safe in worker processes and
threads. Each function writes its PNG through ``echo.data.storage.write_bytes``, so ``path`` may be
local or ``s3://``. The numbers come from ``echo.evaluation.metrics``; nothing is computed twice.
"""

from __future__ import annotations

import io
from typing import Mapping

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator
from sklearn.metrics import precision_recall_curve, roc_curve

from echo.data import storage
from echo.evaluation.metrics import (
    CalibrationBins,
    RocBand,
    auprc,
    auroc,
    brier_score,
    calibration_bins,
    check_binary,
    roc_band,
    roc_points,
)

__all__ = [
    "LABEL_EFFICIENCY_COLUMNS",
    "plot_roc",
    "plot_pr",
    "plot_calibration",
    "plot_label_efficiency",
    "plot_label_curves",
]

LABEL_EFFICIENCY_COLUMNS = ("init", "label_fraction", "auroc", "ci_low", "ci_high")

_DPI = 150


def _figure(width: float = 5.0, height: float = 5.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    storage.write_bytes(path, buf.getvalue())


def plot_roc(
    y: np.ndarray,
    p: np.ndarray,
    ci: tuple[float, float],
    operating_points: Mapping[str, float],
    path: str,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    title: str = "ROC curve",
) -> RocBand:
    """ROC curve with its pointwise stratified-bootstrap band and named operating points.

    ``y``: (N,) in {0, 1}; ``p``: (N,) scores; ``ci``: the AUROC interval to print in the legend
    (e.g. from ``metrics.bootstrap_auroc_ci`` with the same seed); ``operating_points``:
    ``{name: threshold}``, ``p >= threshold`` positive. Returns the band that was drawn.
    """
    yb, pf = check_binary(y, p, what="a ROC plot")
    band = roc_band(yb, pf, n_resamples=n_resamples, seed=seed, level=level, grid_size=201)
    fpr, tpr, _ = roc_curve(yb, pf)
    pct = round(100 * level)

    fig = _figure()
    ax = fig.add_subplot()
    ax.fill_between(band.fpr, band.tpr_low, band.tpr_high, color="C0", alpha=0.25, lw=0,
                    label=f"{pct}% bootstrap band ({n_resamples} resamples)")
    ax.plot(fpr, tpr, color="C0", lw=1.8,
            label=f"AUROC {auroc(yb, pf):.3f} ({pct}% CI {ci[0]:.3f}-{ci[1]:.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--", label="chance")
    for i, (name, (x, t)) in enumerate(roc_points(yb, pf, dict(operating_points)).items()):
        ax.plot([x], [t], marker="o", ls="none", color=f"C{i + 1}", ms=7,
                label=f"{name}: sens {t:.2f}, spec {1 - x:.2f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.005), xlabel="1 - specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)",
           title=f"{title} (n={yb.size}, {int(yb.sum())} positive)")
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=7)
    _save(fig, path)
    return band


def plot_pr(y: np.ndarray, p: np.ndarray, path: str, title: str = "Precision-recall curve") -> None:
    """Precision-recall curve with average precision and the prevalence (a random classifier's
    precision). ``y``: (N,) in {0, 1}; ``p``: (N,) scores."""
    yb, pf = check_binary(y, p, what="a precision-recall plot")
    precision, recall, _ = precision_recall_curve(yb, pf)
    prevalence = float(yb.mean())

    fig = _figure()
    ax = fig.add_subplot()
    ax.step(recall, precision, where="post", color="C0", lw=1.8,
            label=f"AUPRC (average precision) {auprc(yb, pf):.3f}")
    ax.axhline(prevalence, color="0.6", lw=0.8, ls="--", label=f"prevalence {prevalence:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.005), xlabel="recall (sensitivity)", ylabel="precision (PPV)",
           title=f"{title} (n={yb.size}, {int(yb.sum())} positive)")
    ax.legend(loc="upper right", fontsize=7)
    _save(fig, path)


def plot_calibration(
    y: np.ndarray, p: np.ndarray, path: str, n_bins: int = 10, title: str = "Calibration"
) -> CalibrationBins:
    """Reliability diagram (observed fraction positive vs mean predicted probability per
    equal-width bin) over a histogram of the predictions by class. ``y``: (N,) in {0, 1};
    ``p``: (N,) probabilities in [0, 1]. Returns the bins drawn."""
    yb, pf = check_binary(y, p, need_both=False)
    bins = calibration_bins(yb, pf, n_bins=n_bins, strategy="uniform")

    fig = _figure(5.0, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--", label="perfectly calibrated")
    top.plot(bins.mean_predicted, bins.fraction_positive, marker="o", color="C0",
             label=f"model (Brier {brier_score(yb, pf):.3f})")
    top.set(xlim=(0, 1), ylim=(-0.02, 1.02), ylabel="observed fraction positive",
            title=f"{title} (n={yb.size}, {n_bins} bins)")
    top.legend(loc="upper left", fontsize=7)
    bottom.hist([pf[~yb], pf[yb]], bins=bins.edges, stacked=True, color=["C7", "C3"],
                label=["negative", "positive"])
    bottom.set(xlabel="predicted probability", ylabel="cases")
    bottom.legend(loc="upper right", fontsize=7)
    _save(fig, path)
    return bins


def _check_label_efficiency(table: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in LABEL_EFFICIENCY_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(
            f"label-efficiency table lacks column(s) {missing}; needs {list(LABEL_EFFICIENCY_COLUMNS)}"
        )
    if table.empty:
        raise ValueError("label-efficiency table has no rows")
    out = table.loc[:, list(LABEL_EFFICIENCY_COLUMNS)].copy()
    for col in LABEL_EFFICIENCY_COLUMNS[1:]:
        values = pd.to_numeric(out[col], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=np.float64))
        if bad.any():
            raise ValueError(
                f"label-efficiency table: column {col!r} is not a finite number in row(s) "
                f"{(np.flatnonzero(bad) + 1).tolist()[:10]} (1-based)"
            )
        out[col] = values.astype(np.float64)
    bad = ~((out["label_fraction"] > 0) & (out["label_fraction"] <= 1)).to_numpy()
    if bad.any():
        raise ValueError(
            f"label-efficiency table: label_fraction must lie in (0, 1]; row(s) "
            f"{(np.flatnonzero(bad) + 1).tolist()[:10]} (1-based) do not"
        )
    return out


def plot_label_efficiency(table: pd.DataFrame, path: str, title: str = "Label efficiency") -> None:
    """Test AUROC against the fraction of labelled training data, on a log x-axis: one line per
    initialisation with its CI band.

    ``table``: one row per (init, label_fraction) with columns ``init`` (name), ``label_fraction``
    in (0, 1], ``auroc``, ``ci_low``, ``ci_high``. Lines keep the order in which inits first
    appear.
    """
    data = _check_label_efficiency(table)
    fractions = np.sort(data["label_fraction"].unique())

    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot()
    for i, (init, rows) in enumerate(data.groupby("init", sort=False)):
        rows = rows.sort_values("label_fraction")
        x = rows["label_fraction"].to_numpy()
        ax.fill_between(x, rows["ci_low"], rows["ci_high"], color=f"C{i}", alpha=0.18, lw=0)
        ax.plot(x, rows["auroc"], marker="o", color=f"C{i}", lw=1.6, label=str(init))
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(fractions))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{100 * f:g}%" for f in fractions], fontsize=8)
    ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
    ax.set(xlabel="labelled training data (log scale)", ylabel="test AUROC (95% CI)", title=title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    _save(fig, path)


def plot_label_curves(summary: pd.DataFrame, path: str, title: str = "Label efficiency") -> None:
    """Test AUROC against the number of labelled training studies (log x-axis), one panel per
    readout, one line per initialisation with its 95% CI band.

    ``summary``: one row per (init, readout, n_labelled_studies) with ``auroc_mean``,
    ``auroc_ci_low`` and ``auroc_ci_high``. Lines keep the order in which inits first appear.
    """
    needed = {"init", "readout", "n_labelled_studies", "auroc_mean", "auroc_ci_low", "auroc_ci_high"}
    missing = sorted(needed - set(summary.columns))
    if missing:
        raise ValueError(f"label-curve summary: missing column(s) {missing}")
    readouts = list(dict.fromkeys(summary["readout"]))
    inits = list(dict.fromkeys(summary["init"]))
    fig = _figure(5.5 * len(readouts), 4.2)
    for k, readout in enumerate(readouts):
        ax = fig.add_subplot(1, len(readouts), k + 1)
        part = summary[summary["readout"] == readout]
        for i, init in enumerate(inits):
            rows = part[part["init"] == init].sort_values("n_labelled_studies")
            if not len(rows):
                continue
            x = rows["n_labelled_studies"].to_numpy(dtype=float)
            ax.fill_between(x, rows["auroc_ci_low"], rows["auroc_ci_high"], color=f"C{i}", alpha=0.15, lw=0)
            ax.plot(x, rows["auroc_mean"], marker="o", color=f"C{i}", lw=1.6, label=str(init))
        counts = np.sort(part["n_labelled_studies"].unique())
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(counts))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(int(c)) for c in counts], fontsize=8)
        ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
        ax.set(xlabel="labelled training studies (log scale)", ylabel="test AUROC, mean over draws (95% CI)",
               title=f"{title}: {readout}")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)
