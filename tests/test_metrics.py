"""echo.evaluation.metrics: AUROC and its intervals (stratified bootstrap, DeLong), thresholds, report,
aggregation by group, and errors."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from echo.evaluation import metrics as M


def _scores(n: int, prevalence: float, seed: int, decimals: int | None = 1) -> tuple[np.ndarray, np.ndarray]:
    """(N,) labels and (N,) scores; rounding to ``decimals`` makes many ties within and across
    classes."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    y[:2] = [0, 1]
    p = rng.normal(size=n) + 1.0 * y
    return y, (np.round(p, decimals) if decimals is not None else p)


def _pairwise_auc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUC of two samples by its definition, P(x > y) + 0.5 P(x = y), over the last axis;
    leading axes are a batch: pos (..., m), neg (..., n) -> (...)."""
    d = pos[..., :, None] - neg[..., None, :]
    return ((d > 0) + 0.5 * (d == 0)).mean(axis=(-2, -1))


# --------------------------------------------------------------------------- AUROC


def test_auroc_equals_sklearn_and_definition_with_ties():
    y, p = _scores(200, 0.3, seed=1, decimals=1)
    assert len(np.unique(p)) < 60  # many ties
    got = M.auroc(y, p)
    assert got == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert got == pytest.approx(_pairwise_auc(p[y == 1], p[y == 0]), abs=1e-12)


def test_auroc_all_tied_is_one_half():
    assert M.auroc([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]) == 0.5


def test_auroc_accepts_bool_and_float_labels():
    p = [0.1, 0.4, 0.35, 0.8]
    assert M.auroc([False, False, True, True], p) == M.auroc([0.0, 0.0, 1.0, 1.0], p) == 0.75


# --------------------------------------------------------------------------- bootstrap


@pytest.mark.parametrize("decimals", [1, None])
def test_bootstrap_resamples_match_sklearn_on_the_same_indices(decimals):
    y, p = _scores(300, 0.25, seed=2, decimals=decimals)
    dist = M.bootstrap_distribution(y, p, n_resamples=40, seed=7)
    rows = np.concatenate(list(M.stratified_bootstrap_indices(y, p, 40, seed=7, block=9)))
    assert rows.shape == (40, y.size)
    # Stratified: every resample keeps the class counts.
    assert (y[rows].sum(axis=1) == y.sum()).all()
    ref_auc = [roc_auc_score(y[r], p[r]) for r in rows]
    ref_ap = [average_precision_score(y[r], p[r]) for r in rows]
    np.testing.assert_allclose(dist.auroc, ref_auc, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dist.auprc, ref_ap, rtol=0, atol=1e-12)
    # The resamples really vary.
    assert np.std(dist.auroc) > 0.005


def test_bootstrap_depends_on_seed_only_not_on_block_size():
    y, p = _scores(120, 0.4, seed=3)
    a = M.bootstrap_distribution(y, p, 100, seed=5, block=7)
    b = M.bootstrap_distribution(y, p, 100, seed=5, block=100)
    c = M.bootstrap_distribution(y, p, 100, seed=6)
    np.testing.assert_array_equal(a.auroc, b.auroc)
    np.testing.assert_array_equal(a.auprc, b.auprc)
    assert not np.array_equal(a.auroc, c.auroc)
    assert M.bootstrap_auroc_ci(y, p, 100, seed=5) == M.percentile_interval(a.auroc)


def test_bootstrap_ci_agrees_with_scipy_percentile_bootstrap():
    y, p = _scores(150, 0.4, seed=4, decimals=1)
    pos, neg = p[y == 1], p[y == 0]
    n_resamples = 2000

    def auc_of_two_samples(x: np.ndarray, v: np.ndarray, axis: int = -1) -> np.ndarray:
        return _pairwise_auc(np.moveaxis(x, axis, -1), np.moveaxis(v, axis, -1))

    # Two independent samples: scipy resamples each within itself, i.e. a stratified bootstrap.
    ref = stats.bootstrap(
        (pos, neg),
        auc_of_two_samples,
        n_resamples=n_resamples,
        vectorized=True,
        batch=250,
        method="percentile",
        confidence_level=0.95,
        rng=np.random.default_rng(11),
    )
    dist = M.bootstrap_distribution(y, p, n_resamples, seed=11, with_auprc=False)
    low, high = M.bootstrap_auroc_ci(y, p, n_resamples, seed=11)
    sd = float(np.std(dist.auroc, ddof=1))

    # Monte-Carlo tolerance. Both endpoints are 2.5%/97.5% sample quantiles of B = 2000 draws
    # from (nearly) the same bootstrap distribution, approximately normal with sd `sd`. The
    # standard error of a q-quantile estimate is sqrt(q (1 - q) / B) / f(x_q); with the normal
    # density f(x_q) = phi(1.96) / sd that is about 0.06 sd. Two independent runs differ with
    # standard error sqrt(2) times that; allow 4 of those (a false alarm about 1 in 16,000).
    q = 0.025
    se_quantile = np.sqrt(q * (1 - q) / n_resamples) / (stats.norm.pdf(stats.norm.ppf(q)) / sd)
    tol = 4 * np.sqrt(2) * se_quantile
    assert 0.0 < tol < 0.02
    assert low == pytest.approx(ref.confidence_interval.low, abs=tol)
    assert high == pytest.approx(ref.confidence_interval.high, abs=tol)
    # The spread: a sample sd from B draws has relative standard error ~ 1 / sqrt(2 (B - 1)),
    # about 1.6%; the difference of two has ~2.2%; allow 4 of those.
    assert sd == pytest.approx(ref.standard_error, rel=4 * np.sqrt(2) / np.sqrt(2 * (n_resamples - 1)))
    assert low < M.auroc(y, p) < high


def test_bootstrap_variance_is_close_to_delong():
    y, p = _scores(400, 0.3, seed=5, decimals=None)
    _, var = M.delong_auroc_variance(y, p)
    boot = M.bootstrap_distribution(y, p, 2000, seed=0, with_auprc=False).auroc
    # Both estimate the same sampling variance; B = 2000 gives ~3% Monte-Carlo error on it.
    assert np.var(boot, ddof=1) / var == pytest.approx(1.0, abs=0.2)


def _upper_tpr(fpr: np.ndarray, tpr: np.ndarray, f: float) -> float:
    """TPR of the ROC polyline at FPR ``f``, the highest where the polyline is vertical there."""
    best = 0.0
    for x0, y0, x1, y1 in zip(fpr[:-1], tpr[:-1], fpr[1:], tpr[1:]):
        if x0 <= f <= x1:
            best = max(best, y0, y1) if x1 == x0 else max(best, y0 + (f - x0) / (x1 - x0) * (y1 - y0))
    return best


def test_roc_band_matches_per_resample_roc_curves():
    y, p = _scores(80, 0.4, seed=12, decimals=1)
    n_resamples, grid = 25, np.linspace(0, 1, 11)
    band = M.roc_band(y, p, n_resamples, seed=4, level=0.8, grid_size=11)
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(band.tpr, [_upper_tpr(fpr, tpr, f) for f in grid], atol=1e-12)
    curves = []
    for rows in np.concatenate(list(M.stratified_bootstrap_indices(y, p, n_resamples, seed=4))):
        fpr, tpr, _ = roc_curve(y[rows], p[rows], drop_intermediate=False)
        curves.append([_upper_tpr(fpr, tpr, f) for f in grid])
    low, high = np.percentile(curves, [10, 90], axis=0)
    np.testing.assert_allclose(band.tpr_low, low, atol=1e-12)
    np.testing.assert_allclose(band.tpr_high, high, atol=1e-12)


# --------------------------------------------------------------------------- DeLong


def test_delong_variance_by_hand():
    # Positives X = (0.8, 0.6, 0.4), negatives Y = (0.7, 0.4, 0.2); psi(x, y) = 1 if x > y,
    # 1/2 if x == y, 0 otherwise.
    y = [1, 1, 1, 0, 0, 0]
    p = [0.8, 0.6, 0.4, 0.7, 0.4, 0.2]
    F = Fraction
    # V10_i = mean_j psi(X_i, Y_j):
    #   0.8: (1 + 1 + 1) / 3 = 1;  0.6: (0 + 1 + 1) / 3 = 2/3;  0.4: (0 + 1/2 + 1) / 3 = 1/2
    v10 = [F(1), F(2, 3), F(1, 2)]
    # V01_j = mean_i psi(X_i, Y_j):
    #   0.7: (1 + 0 + 0) / 3 = 1/3;  0.4: (1 + 1 + 1/2) / 3 = 5/6;  0.2: (1 + 1 + 1) / 3 = 1
    v01 = [F(1, 3), F(5, 6), F(1)]
    auc = sum(v10) / 3
    assert auc == sum(v01) / 3 == F(13, 18)
    # S10 = sum (V10 - auc)^2 / (m - 1) = ((5/18)^2 + (1/18)^2 + (4/18)^2) / 2 = 7/108
    s10 = sum((v - auc) ** 2 for v in v10) / 2
    # S01 = ((7/18)^2 + (2/18)^2 + (5/18)^2) / 2 = 13/108
    s01 = sum((v - auc) ** 2 for v in v01) / 2
    assert (s10, s01) == (F(7, 108), F(13, 108))
    var = s10 / 3 + s01 / 3
    assert var == F(5, 81)

    got_auc, got_var = M.delong_auroc_variance(y, p)
    assert got_auc == pytest.approx(float(auc), abs=1e-15)
    assert got_var == pytest.approx(float(var), abs=1e-15)
    low, high = M.delong_ci(y, p)
    half = stats.norm.ppf(0.975) * np.sqrt(5 / 81)
    assert (low, high) == pytest.approx((13 / 18 - half, 1.0))  # the upper end is clipped to 1


def test_delong_matches_pairwise_structural_components_on_tied_data():
    y, p = _scores(90, 0.35, seed=6, decimals=1)
    pos, neg = p[y == 1], p[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    expected = np.var(v10, ddof=1) / pos.size + np.var(v01, ddof=1) / neg.size
    auc, var = M.delong_auroc_variance(y, p)
    assert auc == pytest.approx(psi.mean(), abs=1e-12)
    assert var == pytest.approx(expected, rel=1e-10)


def test_delong_intervals():
    y, p = _scores(200, 0.3, seed=7, decimals=None)
    auc, var = M.delong_auroc_variance(y, p)
    low, high = M.delong_ci(y, p)
    assert (low + high) / 2 == pytest.approx(auc)
    assert high - low == pytest.approx(2 * stats.norm.ppf(0.975) * np.sqrt(var))
    l90, h90 = M.delong_ci(y, p, level=0.9)
    assert low < l90 < auc < h90 < high
    llo, lhi = M.delong_ci(y, p, transform="logit")
    assert 0 < llo < auc < lhi < 1
    # Perfect separation: variance 0, a degenerate interval at 1.
    assert M.delong_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == (1.0, 1.0)
    with pytest.raises(ValueError, match="transform"):
        M.delong_ci(y, p, transform="probit")
    with pytest.raises(ValueError, match="at least 2 cases of each class"):
        M.delong_auroc_variance([1, 0, 0], [0.9, 0.1, 0.2])


# --------------------------------------------------------------------------- thresholds


def test_sensitivity_specificity_and_balanced_accuracy_by_hand():
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0]
    p = [0.9, 0.7, 0.5, 0.2, 0.6, 0.5, 0.3, 0.1, 0.0]
    # p >= 0.5: positives 3 of 4 called; negatives 0.6 and 0.5 called -> 3 of 5 correct.
    assert M.sensitivity_specificity(y, p, 0.5) == (0.75, 0.6)
    assert M.balanced_accuracy(y, p, 0.5) == pytest.approx(0.675)


def test_youden_threshold_separates_separable_classes():
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    p = np.array([0.05, 0.2, 0.3, 0.41, 0.6, 0.7, 0.95])
    t = M.youden_threshold(y, p)
    assert p[y == 0].max() < t < p[y == 1].min()
    assert M.sensitivity_specificity(y, p, t) == (1.0, 1.0)


def test_youden_threshold_maximises_j():
    y, p = _scores(300, 0.3, seed=8, decimals=2)
    t = M.youden_threshold(y, p)
    j = sum(M.sensitivity_specificity(y, p, t)) - 1
    best = max(sum(M.sensitivity_specificity(y, p, c)) - 1 for c in np.unique(p))
    assert j == pytest.approx(best)
    # The midpoint rule: no score lies between t and the score whose cut it represents.
    assert not np.isin(t, p)


@pytest.mark.parametrize("target", [0.9, 0.8, 1.0])
def test_threshold_for_sensitivity_is_the_highest_reaching_the_target(target):
    y, p = _scores(250, 0.3, seed=9, decimals=2)
    t = M.threshold_for_sensitivity(y, p, target)
    sens, spec = M.sensitivity_specificity(y, p, t)
    assert sens >= target
    # t sits just below the lowest score it calls positive, `cut`; the next cut up drops the target.
    cut, higher = np.unique(p[p > t])[:2]
    assert M.sensitivity_specificity(y, p, cut) == (sens, spec)
    assert M.sensitivity_specificity(y, p, higher)[0] < target
    assert M.sensitivity_specificity(y, p, higher)[1] >= spec


def test_threshold_for_sensitivity_hits_exact_fractions():
    # 9 of 10 positives above the threshold is exactly 90%: no rounding loss.
    y = [1] * 10 + [0] * 5
    p = [0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.1, 0.52, 0.4, 0.3, 0.2, 0.05]
    t = M.threshold_for_sensitivity(y, p, 0.9)
    assert 0.4 < t < 0.5
    assert M.sensitivity_specificity(y, p, t) == (0.9, 0.8)


# --------------------------------------------------------------------------- calibration


def test_brier_and_calibration_bins_by_hand():
    y = [0, 0, 1, 1, 1]
    p = [0.1, 0.15, 0.5, 0.9, 1.0]
    assert M.brier_score(y, p) == pytest.approx((0.01 + 0.0225 + 0.25 + 0.01 + 0.0) / 5)
    bins = M.calibration_bins(y, p, n_bins=2)
    # [0, 0.5): 0.1, 0.15 -> mean 0.125, 0 positive; [0.5, 1]: 0.5, 0.9, 1.0 -> mean 0.8, all positive
    np.testing.assert_allclose(bins.mean_predicted, [0.125, 0.8])
    np.testing.assert_allclose(bins.fraction_positive, [0.0, 1.0])
    np.testing.assert_array_equal(bins.count, [2, 3])
    q = M.calibration_bins(y, p, n_bins=5, strategy="quantile")
    assert q.count.sum() == 5
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        M.brier_score(y, [0.1, 0.2, 0.3, 0.4, 1.5])


# --------------------------------------------------------------------------- report


def test_binary_report():
    y_val, p_val = _scores(300, 0.3, seed=10, decimals=None)
    y, s = _scores(400, 0.3, seed=11, decimals=None)
    p = 1 / (1 + np.exp(-s))
    thr = M.youden_threshold(y_val, 1 / (1 + np.exp(-p_val)))
    thr90 = M.threshold_for_sensitivity(y_val, 1 / (1 + np.exp(-p_val)), 0.9)
    r = M.binary_report(y, p, thr, thr90, seed=3, n_resamples=500)
    assert r["n"] == 400 and r["n_positive"] == y.sum()
    assert r["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert r["auroc_ci_low"] < r["auroc"] < r["auroc_ci_high"]
    assert r["auroc_delong_ci_low"] < r["auroc"] < r["auroc_delong_ci_high"]
    assert (r["auroc_ci_low"], r["auroc_ci_high"]) == M.bootstrap_auroc_ci(y, p, 500, seed=3)
    assert r["auprc"] == pytest.approx(average_precision_score(y, p))
    assert r["auprc_ci_low"] < r["auprc"] < r["auprc_ci_high"]
    assert (r["sensitivity"], r["specificity"]) == M.sensitivity_specificity(y, p, thr)
    assert r["balanced_accuracy"] == pytest.approx((r["sensitivity"] + r["specificity"]) / 2)
    assert r["sensitivity_at_90"] > r["sensitivity"]  # a lower threshold
    assert r["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert all(isinstance(v, float) for v in r.values())


# --------------------------------------------------------------------------- aggregation


def test_aggregate_clips_to_videos_to_studies():
    clip_video = np.array(["v2", "v1", "v1", "v3", "v2", "v1", "v3"])
    clip_prob = np.array([0.2, 0.1, 0.3, 0.9, 0.4, 0.5, 0.7])
    videos, video_prob = M.aggregate_by_group(clip_video, clip_prob)
    assert videos.tolist() == ["v1", "v2", "v3"]
    np.testing.assert_allclose(video_prob, [0.3, 0.3, 0.8])
    video_study = {"v1": "s1", "v2": "s1", "v3": "s2"}
    studies, study_prob = M.aggregate_by_group([video_study[v] for v in videos], video_prob)
    assert studies.tolist() == ["s1", "s2"]
    # A study is the mean of its videos' means, whatever their clip counts (3 and 2 here).
    np.testing.assert_allclose(study_prob, [0.3, 0.8])


def test_group_labels_consistency():
    ids = np.array([7, 3, 7, 3, 5])
    got_ids, labels = M.group_labels(ids, [1.0, 0.0, 1.0, 0.0, np.nan])
    assert got_ids.tolist() == [3, 5, 7]
    np.testing.assert_array_equal(labels, [0.0, np.nan, 1.0])
    with pytest.raises(ValueError, match=r"1 of 2 group\(s\) have inconsistent labels.*\[0, 2\]") as e:
        M.group_labels(["study-secret", "x", "study-secret"], [1, 0, 0])
    assert "study-secret" not in str(e.value)
    with pytest.raises(ValueError, match="inconsistent"):
        M.group_labels(["a", "a"], [1.0, np.nan])
    with pytest.raises(ValueError, match="differ in length"):
        M.aggregate_by_group(["a", "b"], [0.1])


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "fn",
    [
        M.auroc,
        M.bootstrap_auroc_ci,
        M.delong_ci,
        M.youden_threshold,
        lambda y, p: M.binary_report(y, p, 0.5, 0.3),
        lambda y, p: next(M.stratified_bootstrap_indices(y, p)),
    ],
)
def test_single_class_input_is_refused_with_counts(fn):
    with pytest.raises(ValueError, match="needs both classes; got 3 positive and 0 negative"):
        fn([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(ValueError, match="got 0 positive and 2 negative"):
        fn([0, 0], [0.2, 0.5])


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"labels must be 0 or 1; 1 are not \(first at index 2: 2\)"):
        M.auroc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"non-finite value\(s\) \(first at index 1\)"):
        M.auroc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="differ in length: 2 vs 3"):
        M.auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="labels are empty"):
        M.auroc([], [])
    with pytest.raises(ValueError, match="confidence level"):
        M.bootstrap_auroc_ci([0, 1], [0.1, 0.2], level=95)
    with pytest.raises(ValueError, match="n_resamples"):
        M.bootstrap_auroc_ci([0, 1], [0.1, 0.2], n_resamples=0)
