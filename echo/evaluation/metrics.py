"""Binary classification metrics with confidence intervals, and group-level aggregation.

Everything takes a label vector ``y`` of shape (N,) with values in {0, 1} (1 = severe aortic
stenosis, the positive class) and a score vector ``p`` of shape (N,) (a probability in [0, 1]
where the metric needs one, e.g. the Brier score; any real score otherwise). A case is called
positive at a threshold ``t`` when ``p >= t``.

Confidence intervals for AUROC come two ways:

* a **stratified bootstrap**: each resample draws ``n_pos`` positives from the positives and
  ``n_neg`` negatives from the negatives, with replacement, so every resample has both classes
  and the prevalence of the data. All resamples are evaluated at once, in blocks that bound
  memory to a few MB: with each class sorted by score, a block of draws becomes counts
  per case (one ``np.bincount``), the cumulative counts of the negatives give, for every
  positive, how many drawn negatives score below it and at most as high as it (looked up at
  positions found once by ``np.searchsorted``), and AUROC (Mann-Whitney, ties counted one half)
  and average precision are row-wise dot products. Cost O(B N) for B resamples of N cases.
  The interval is the percentile interval (as ``scipy.stats.bootstrap(method="percentile")``).
* **DeLong's method** in the O(N log N) midrank form of Sun & Xu (2014). The default interval
  is the Wald interval ``auc +- z * se`` clipped to [0, 1] (what pROC reports);
  ``transform="logit"`` builds it on the logit scale instead (delta method), which stays inside
  (0, 1) and is less anti-conservative for AUROC near 1.

Random resamples follow ``seed`` only: positives and negatives draw from two independent
streams spawned from ``numpy.random.SeedSequence(seed)``, so the result does not depend on the
block size.

Errors state counts and positions, never identifiers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

__all__ = [
    "MIN_CASES_PER_CLASS",
    "BootstrapDistribution",
    "CalibrationBins",
    "RocBand",
    "check_binary",
    "auroc",
    "auprc",
    "stratified_bootstrap_indices",
    "bootstrap_distribution",
    "bootstrap_auroc_ci",
    "percentile_interval",
    "auroc_rows",
    "draw_bootstrap",
    "delong_auroc_variance",
    "delong_ci",
    "roc_band",
    "roc_points",
    "sensitivity_specificity",
    "balanced_accuracy",
    "youden_threshold",
    "threshold_for_sensitivity",
    "brier_score",
    "calibration_bins",
    "binary_report",
    "aggregate_by_group",
    "group_labels",
]

# DeLong's variance (hence every report's AUROC interval) needs this many cases of each class.
MIN_CASES_PER_CLASS = 2

# Elements of one block of resamples (rows x per-row elements): int64 arrays of a few MB stay
# in cache, which measured faster than larger blocks.
_BLOCK_ELEMENTS = 600_000


# --------------------------------------------------------------------------- input checks


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must lie in (0, 1), got {level}")


def _check_scores(p: np.ndarray | list, n: int | None = None, *, name: str = "scores") -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"{name} must have shape (N,), got {p.shape}")
    if n is not None and p.shape[0] != n:
        raise ValueError(f"labels and {name} differ in length: {n} vs {p.shape[0]}")
    bad = ~np.isfinite(p)
    if bad.any():
        raise ValueError(
            f"{name} contain {int(bad.sum())} non-finite value(s) (first at index {int(np.argmax(bad))})"
        )
    return p


def _check_labels(y: np.ndarray | list) -> np.ndarray:
    """(N,) labels in {0, 1} (bool, int or float) -> (N,) bool."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {y.shape}")
    if y.shape[0] == 0:
        raise ValueError("no cases: labels are empty")
    if y.dtype == bool:
        return y
    yf = y.astype(np.float64)
    bad = ~((yf == 0.0) | (yf == 1.0))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"labels must be 0 or 1; {int(bad.sum())} are not (first at index {i}: {float(yf[i]):g})"
        )
    return yf == 1.0


def check_binary(
    y: np.ndarray | list, p: np.ndarray | list, *, need_both: bool = True, what: str = "AUROC"
) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels (N,) in {0, 1} and finite scores (N,) -> ((N,) bool, (N,) float64).

    With ``need_both``, raises ``ValueError`` naming ``what`` and the class counts unless both
    classes occur.
    """
    yb = _check_labels(y)
    pf = _check_scores(p, yb.shape[0])
    if need_both:
        n_pos = int(yb.sum())
        n_neg = yb.shape[0] - n_pos
        if n_pos == 0 or n_neg == 0:
            raise ValueError(
                f"{what} needs both classes; got {n_pos} positive and {n_neg} negative case(s)"
            )
    return yb, pf


def _check_probabilities(p: np.ndarray, what: str) -> None:
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(f"{what} needs probabilities in [0, 1]; got scores in [{p.min():g}, {p.max():g}]")


# --------------------------------------------------------------------------- point metrics


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve, P(s+ > s-) + 0.5 P(s+ = s-).

    ``y``: (N,) in {0, 1}; ``p``: (N,) scores. Raises ``ValueError`` unless both classes occur.
    """
    yb, pf = check_binary(y, p)
    return float(roc_auc_score(yb, pf))


def auprc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision (sum over distinct thresholds of
    recall increment x precision; no interpolation). ``y``: (N,) in {0, 1}; ``p``: (N,) scores."""
    yb, pf = check_binary(y, p, what="AUPRC")
    return float(average_precision_score(yb, pf))


def sensitivity_specificity(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) when ``p >= threshold`` is called positive.

    ``y``: (N,) in {0, 1} with both classes; ``p``: (N,) scores.
    """
    yb, pf = check_binary(y, p, what="sensitivity/specificity")
    called = pf >= threshold
    sens = float(called[yb].mean())
    spec = float((~called[~yb]).mean())
    return sens, spec


def balanced_accuracy(y: np.ndarray, p: np.ndarray, threshold: float) -> float:
    """Mean of sensitivity and specificity at ``threshold`` (``p >= threshold`` is positive)."""
    sens, spec = sensitivity_specificity(y, p, threshold)
    return 0.5 * (sens + spec)


def brier_score(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared difference between probability ``p`` (N,) in [0, 1] and label ``y`` (N,)."""
    yb, pf = check_binary(y, p, need_both=False)
    _check_probabilities(pf, "the Brier score")
    return float(np.mean((pf - yb) ** 2))


# --------------------------------------------------------------------------- thresholds


def _roc_with_cuts(yb: np.ndarray, pf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points at every distinct score, thresholds made midpoints to the next lower score.

    Returns (fpr, tpr, thresholds), each (K + 1,), thresholds decreasing, the first +inf. The
    threshold of point k sits halfway between distinct score k and the next lower one, so it
    classifies the given data exactly as the score itself does, but leaves a margin on new data.
    """
    fpr, tpr, thr = roc_curve(yb, pf, drop_intermediate=False)
    cuts = thr.copy()
    cuts[1:-1] = 0.5 * (thr[1:-1] + thr[2:])
    return fpr, tpr, cuts


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold that maximises Youden's J = sensitivity + specificity - 1.

    Meant for the validation split. Ties in J go to the highest threshold (the most specific).
    The threshold lies halfway between two neighbouring distinct scores (see ``_roc_with_cuts``),
    so on separable data it falls strictly between the classes.
    """
    yb, pf = check_binary(y, p, what="a Youden threshold")
    fpr, tpr, cuts = _roc_with_cuts(yb, pf)
    return float(cuts[int(np.argmax(tpr - fpr))])


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float = 0.9) -> float:
    """The highest threshold whose sensitivity on ``(y, p)`` is at least ``target``.

    Meant for the validation split; the highest such threshold gives the best specificity.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must lie in (0, 1], got {target}")
    yb, pf = check_binary(y, p, what="a sensitivity threshold")
    _, tpr, cuts = _roc_with_cuts(yb, pf)
    # tpr is non-decreasing and ends at 1, so the first index reaching the target exists; the
    # tolerance keeps e.g. 9/10 from missing 0.9 by rounding.
    return float(cuts[int(np.argmax(tpr >= target - 1e-12))])


# --------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class _Sorted:
    """The two classes, each sorted by score; the bootstrap draws index these sorted orders.

    ``pos``/``neg``: positions into the input of the positives (n_pos,) / negatives (n_neg,) in
    increasing score order (stable). ``neg_below``/``neg_below_eq`` (n_pos,): number of negatives
    scoring below / at most each sorted positive. ``pos_below`` (n_pos,): positives scoring below
    each sorted positive. ``codes_pos``/``codes_neg``: bin of each sorted case among the K
    distinct scores (increasing), for the ROC band.
    """

    pos: np.ndarray
    neg: np.ndarray
    neg_below: np.ndarray
    neg_below_eq: np.ndarray
    pos_below: np.ndarray
    codes_pos: np.ndarray
    codes_neg: np.ndarray
    n_bins: int


def _sorted_classes(yb: np.ndarray, pf: np.ndarray) -> _Sorted:
    pos, neg = np.flatnonzero(yb), np.flatnonzero(~yb)
    pos = pos[np.argsort(pf[pos], kind="stable")]
    neg = neg[np.argsort(pf[neg], kind="stable")]
    xs, vs = pf[pos], pf[neg]
    values, codes = np.unique(pf, return_inverse=True)
    return _Sorted(
        pos=pos,
        neg=neg,
        neg_below=np.searchsorted(vs, xs, side="left"),
        neg_below_eq=np.searchsorted(vs, xs, side="right"),
        pos_below=np.searchsorted(xs, xs, side="left"),
        codes_pos=codes[pos].astype(np.int64),
        codes_neg=codes[neg].astype(np.int64),
        n_bins=int(values.shape[0]),
    )


def _block_rows(row_elements: int, n_resamples: int) -> int:
    return int(max(1, min(n_resamples, _BLOCK_ELEMENTS // max(1, row_elements))))


def _draws(
    n_pos: int, n_neg: int, n_resamples: int, seed: int, block: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Blocks of class-relative draws: ((b, n_pos) in [0, n_pos), (b, n_neg) in [0, n_neg)).

    Two independent streams (positives, negatives), each consumed in order, so concatenating
    the blocks gives the same draws for any ``block``.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    pos_seq, neg_seq = np.random.SeedSequence(seed).spawn(2)
    rng_pos, rng_neg = np.random.default_rng(pos_seq), np.random.default_rng(neg_seq)
    dtype = np.int32 if max(n_pos, n_neg) < 2**31 else np.int64
    for start in range(0, n_resamples, block):
        b = min(block, n_resamples - start)
        yield (
            rng_pos.integers(0, n_pos, size=(b, n_pos), dtype=dtype),
            rng_neg.integers(0, n_neg, size=(b, n_neg), dtype=dtype),
        )


def stratified_bootstrap_indices(
    y: np.ndarray, p: np.ndarray, n_resamples: int = 2000, seed: int = 0, block: int = 256
) -> Iterator[np.ndarray]:
    """The resamples used by ``bootstrap_distribution`` and ``roc_band``, as positions into ``y``.

    Yields blocks of shape (b, N), b <= ``block``: row r holds the drawn positives' positions
    (n_pos columns) then the drawn negatives' (n_neg columns); ``y[rows], p[rows]`` is one
    resample. The draws index each class sorted by score, hence ``p`` is needed. For checking
    against other implementations; the fast path never builds these.
    """
    yb, pf = check_binary(y, p, what="a stratified bootstrap")
    srt = _sorted_classes(yb, pf)
    for dp, dn in _draws(srt.pos.size, srt.neg.size, n_resamples, seed, block):
        yield np.concatenate([srt.pos[dp], srt.neg[dn]], axis=1)


def _counts(draws: np.ndarray, n: int) -> np.ndarray:
    """(b, n_draws) indices in [0, n) -> (b, n) int64 number of times each index was drawn."""
    b = draws.shape[0]
    flat = (draws + (np.arange(b, dtype=np.int64) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n)


def _with_zero(counts: np.ndarray) -> np.ndarray:
    """(b, n) counts -> (b, n + 1) cumulative counts starting at 0: column k sums counts[:, :k]."""
    out = np.zeros((counts.shape[0], counts.shape[1] + 1), dtype=np.int64)
    np.cumsum(counts, axis=1, out=out[:, 1:])
    return out


def _resampled_metrics(
    srt: _Sorted, c_pos: np.ndarray, c_neg: np.ndarray, with_auprc: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Counts per sorted positive (b, n_pos) and negative (b, n_neg) -> AUROC (b,), AP (b,).

    AUROC (Mann-Whitney): sum over positives of count x (negatives below + negatives at most),
    over 2 n_pos n_neg. AP: sum over positives of count x precision at that positive's score,
    over n_pos; precision = TP / (TP + FP) counting cases scoring at least as high.
    """
    n_pos, n_neg = c_pos.shape[1], c_neg.shape[1]
    cum_neg = _with_zero(c_neg)
    below = cum_neg[:, srt.neg_below]
    if np.array_equal(srt.neg_below, srt.neg_below_eq):
        twice = 2 * np.einsum("ij,ij->i", c_pos, below)
    else:
        twice = np.einsum("ij,ij->i", c_pos, below + cum_neg[:, srt.neg_below_eq])
    auc = twice / (2.0 * n_pos * n_neg)
    if not with_auprc:
        return auc, None
    tp = n_pos - _with_zero(c_pos)[:, srt.pos_below]
    fp = n_neg - below
    # tp + fp == 0 only for positives above every drawn case, which were not drawn (count 0).
    ap = np.einsum("ij,ij->i", c_pos, tp / np.maximum(tp + fp, 1)) / n_pos
    return auc, ap


@dataclass(frozen=True)
class BootstrapDistribution:
    """Resampled metrics, one value per resample: ``auroc`` (B,), ``auprc`` (B,) or ``None``."""

    auroc: np.ndarray
    auprc: np.ndarray | None
    n_resamples: int
    seed: int


def bootstrap_distribution(
    y: np.ndarray,
    p: np.ndarray,
    n_resamples: int = 2000,
    seed: int = 0,
    *,
    with_auprc: bool = True,
    block: int | None = None,
) -> BootstrapDistribution:
    """AUROC (and average precision) on ``n_resamples`` stratified bootstrap resamples.

    ``y``: (N,) in {0, 1} with both classes; ``p``: (N,) scores. ``block`` (resamples per
    batch) only trades memory for speed; it does not change the result. No Python loop over
    resamples beyond one iteration per block.
    """
    yb, pf = check_binary(y, p, what="a stratified bootstrap of AUROC")
    srt = _sorted_classes(yb, pf)
    if block is None:
        block = _block_rows(3 * yb.shape[0], n_resamples)
    aurocs, auprcs = [], []
    for dp, dn in _draws(srt.pos.size, srt.neg.size, n_resamples, seed, block):
        auc, ap = _resampled_metrics(srt, _counts(dp, srt.pos.size), _counts(dn, srt.neg.size), with_auprc)
        aurocs.append(auc)
        if ap is not None:
            auprcs.append(ap)
    return BootstrapDistribution(
        auroc=np.concatenate(aurocs),
        auprc=np.concatenate(auprcs) if with_auprc else None,
        n_resamples=n_resamples,
        seed=seed,
    )


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap ``samples`` (B,), linear interpolation as in
    ``scipy.stats.bootstrap(method="percentile")``."""
    _check_level(level)
    alpha = (1.0 - level) / 2.0
    low, high = np.percentile(samples, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return float(low), float(high)


def auroc_rows(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of each row of ``scores`` ``(R, N)`` against labels ``y`` ``(N,)`` (Mann-Whitney
    with mid-ranks, ties counted one half; repeated cases allowed): ``(R,)``."""
    yb = _check_labels(y).astype(bool)
    n_pos, n_neg = int(yb.sum()), int((~yb).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes; got {n_pos} positive(s) and {n_neg} negative(s)")
    ranks = stats.rankdata(np.atleast_2d(scores), axis=1)
    return (ranks[:, yb].sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def draw_bootstrap(y: np.ndarray, scores: np.ndarray, reference: np.ndarray | None = None,
                   n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean AUROC over subset draws, and its paired difference to a reference, with intervals
    from one bootstrap over draws and test cases together.

    ``scores`` ``(D, N)``: the test scores of ``D`` models (one per training-subset draw) on the
    same ``N`` cases with labels ``y``; ``reference`` ``(D, N)``: the reference model trained on
    the same draws (paired). Each resample draws ``D`` draws with replacement and the cases
    stratified by class with replacement, and recomputes the mean AUROC (and the mean paired
    difference) on them. Returns ``auroc_mean, auroc_ci_low, auroc_ci_high`` and, with a
    reference, ``delta, delta_ci_low, delta_ci_high`` (``delta`` = mean over draws of
    AUROC(scores_d) - AUROC(reference_d)). With ``D = 1`` only the cases are resampled.
    """
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    yb = _check_labels(y).astype(bool)
    d = scores.shape[0]
    own = auroc_rows(yb, scores)
    out = {"auroc_mean": float(own.mean())}
    ref = None if reference is None else np.atleast_2d(np.asarray(reference, dtype=np.float64))
    if ref is not None:
        if ref.shape != scores.shape:
            raise ValueError(f"reference scores must have the shape of scores {scores.shape}, got {ref.shape}")
        out["delta"] = float((own - auroc_rows(yb, ref)).mean())
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(yb), np.flatnonzero(~yb)
    means, deltas = np.empty(n_resamples), np.empty(n_resamples)
    for b in range(n_resamples):
        cases = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        draws = rng.integers(0, d, size=d) if d > 1 else np.zeros(1, dtype=int)
        yy = yb[cases]
        a = auroc_rows(yy, scores[draws][:, cases])
        means[b] = a.mean()
        if ref is not None:
            deltas[b] = (a - auroc_rows(yy, ref[draws][:, cases])).mean()
    out["auroc_ci_low"], out["auroc_ci_high"] = percentile_interval(means, level)
    if ref is not None:
        out["delta_ci_low"], out["delta_ci_high"] = percentile_interval(deltas, level)
    return out


def bootstrap_auroc_ci(
    y: np.ndarray, p: np.ndarray, n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Stratified-bootstrap percentile interval for AUROC: (low, high).

    ``y``: (N,) in {0, 1} with both classes; ``p``: (N,) scores. Seeded; vectorised.
    """
    _check_level(level)
    dist = bootstrap_distribution(y, p, n_resamples, seed, with_auprc=False)
    return percentile_interval(dist.auroc, level)


# --------------------------------------------------------------------------- DeLong


def delong_auroc_variance(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """AUROC and DeLong's estimate of its variance: (auc, var).

    Midrank form (Sun & Xu 2014), O(N log N). With m positives X and n negatives Y, and
    midranks taken within X (T_x), within Y (T_y) and over both (T_z):
    V10_i = (T_z(X_i) - T_x(X_i)) / n,  V01_j = 1 - (T_z(Y_j) - T_y(Y_j)) / m,
    auc = mean(V10), var = S10 / m + S01 / n with S10, S01 the sample variances (ddof 1).
    Needs at least two cases of each class.
    """
    yb, pf = check_binary(y, p)
    x, v = pf[yb], pf[~yb]
    m, n = x.size, v.size
    if m < MIN_CASES_PER_CLASS or n < MIN_CASES_PER_CLASS:
        raise ValueError(
            f"DeLong's variance needs at least {MIN_CASES_PER_CLASS} cases of each class; got {m} positive and {n} negative"
        )
    tz = stats.rankdata(np.concatenate([x, v]), method="average")
    v10 = (tz[:m] - stats.rankdata(x, method="average")) / n
    v01 = 1.0 - (tz[m:] - stats.rankdata(v, method="average")) / m
    auc = float(v10.mean())
    var = float(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n)
    return auc, var


def delong_ci(
    y: np.ndarray,
    p: np.ndarray,
    level: float = 0.95,
    transform: Literal["none", "logit"] = "none",
) -> tuple[float, float]:
    """DeLong confidence interval for AUROC: (low, high).

    ``transform="none"`` (default): ``auc +- z * se`` clipped to [0, 1], the interval pROC reports.
    ``transform="logit"``: ``expit(logit(auc) +- z * se / (auc (1 - auc)))``; inside (0, 1).
    When the variance is 0 (e.g. perfectly separated data) both give (auc, auc).
    """
    _check_level(level)
    if transform not in ("none", "logit"):
        raise ValueError(f"transform must be 'none' or 'logit', got {transform!r}")
    auc, var = delong_auroc_variance(y, p)
    z = float(stats.norm.ppf(0.5 + level / 2.0))
    se = float(np.sqrt(var))
    if se == 0.0 or auc in (0.0, 1.0):
        return auc, auc
    if transform == "none":
        return max(0.0, auc - z * se), min(1.0, auc + z * se)
    centre = np.log(auc / (1.0 - auc))
    half = z * se / (auc * (1.0 - auc))
    low, high = 1.0 / (1.0 + np.exp(-(centre - half))), 1.0 / (1.0 + np.exp(-(centre + half)))
    return float(low), float(high)


# --------------------------------------------------------------------------- ROC band


@dataclass(frozen=True)
class RocBand:
    """TPR on a fixed FPR grid: the observed curve and a pointwise bootstrap percentile band.

    All arrays have shape (G,). Where several ROC points share one FPR (a vertical step), the
    upper one counts.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    tpr_low: np.ndarray
    tpr_high: np.ndarray
    level: float


def _tpr_on_grid(h_pos: np.ndarray, h_neg: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """(b, K) counts in increasing score order -> (b, G) TPR at FPR ``grid`` (G,) in [0, 1]."""
    b = h_pos.shape[0]
    tp = np.concatenate([np.zeros((b, 1)), np.cumsum(h_pos[:, ::-1], axis=1)], axis=1)
    fp = np.concatenate([np.zeros((b, 1)), np.cumsum(h_neg[:, ::-1], axis=1)], axis=1)
    n_pos, n_neg = tp[:, -1:], fp[:, -1:]
    width = fp.shape[1]
    # One searchsorted for all rows: shift row r's FP counts by r * (n_neg + 1) so the
    # flattened keys stay increasing; the queries are shifted the same way.
    shift = np.arange(b)[:, None] * (n_neg + 1.0)
    keys = (fp + shift).ravel()
    # FP counts are integers: rounding keeps e.g. 0.3 * 10 from landing just below 3.
    queries = np.round(grid[None, :] * n_neg, 6) + shift
    j = np.searchsorted(keys, queries.ravel(), side="right").reshape(b, -1) - 1
    j -= (np.arange(b) * width)[:, None]
    nxt = np.minimum(j + 1, width - 1)
    f0, f1 = np.take_along_axis(fp, j, 1), np.take_along_axis(fp, nxt, 1)
    t0, t1 = np.take_along_axis(tp, j, 1), np.take_along_axis(tp, nxt, 1)
    frac = np.where(f1 > f0, (queries - shift - f0) / np.where(f1 > f0, f1 - f0, 1.0), 0.0)
    return (t0 + frac * (t1 - t0)) / n_pos


def roc_band(
    y: np.ndarray,
    p: np.ndarray,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    grid_size: int = 101,
) -> RocBand:
    """Observed ROC curve and pointwise stratified-bootstrap band on ``grid_size`` FPR values.

    Uses the same resamples as ``bootstrap_distribution`` with the same seed.
    """
    _check_level(level)
    yb, pf = check_binary(y, p, what="a ROC band")
    srt = _sorted_classes(yb, pf)
    k = srt.n_bins
    grid = np.linspace(0.0, 1.0, grid_size)
    observed = _tpr_on_grid(
        np.bincount(srt.codes_pos, minlength=k)[None, :], np.bincount(srt.codes_neg, minlength=k)[None, :], grid
    )[0]
    block = _block_rows(3 * (yb.shape[0] + k + grid_size), n_resamples)
    rows = []
    for dp, dn in _draws(srt.pos.size, srt.neg.size, n_resamples, seed, block):
        # Class-relative draws -> counts over the K distinct-score bins.
        h_pos, h_neg = _counts(srt.codes_pos[dp], k), _counts(srt.codes_neg[dn], k)
        rows.append(_tpr_on_grid(h_pos, h_neg, grid))
    tprs = np.concatenate(rows)
    alpha = (1.0 - level) / 2.0
    low, high = np.percentile(tprs, [100.0 * alpha, 100.0 * (1.0 - alpha)], axis=0)
    return RocBand(fpr=grid, tpr=observed, tpr_low=low, tpr_high=high, level=level)


def roc_points(y: np.ndarray, p: np.ndarray, thresholds: dict[str, float]) -> dict[str, tuple[float, float]]:
    """(FPR, TPR) of each named threshold (``p >= threshold`` positive)."""
    out = {}
    for name, thr in thresholds.items():
        sens, spec = sensitivity_specificity(y, p, thr)
        out[name] = (1.0 - spec, sens)
    return out


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class CalibrationBins:
    """Non-empty calibration bins, each array (M,): mean predicted probability, observed
    fraction of positives, number of cases, and the bin edges used (n_bins + 1,)."""

    mean_predicted: np.ndarray
    fraction_positive: np.ndarray
    count: np.ndarray
    edges: np.ndarray


def calibration_bins(
    y: np.ndarray, p: np.ndarray, n_bins: int = 10, strategy: Literal["uniform", "quantile"] = "uniform"
) -> CalibrationBins:
    """Reliability-diagram bins of probabilities ``p`` (N,) in [0, 1] against labels ``y`` (N,).

    ``uniform``: equal-width bins on [0, 1]; ``quantile``: bins holding about N / n_bins cases.
    The last bin is closed on the right. Empty bins are dropped.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    yb, pf = check_binary(y, p, need_both=False)
    _check_probabilities(pf, "a calibration curve")
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    elif strategy == "quantile":
        edges = np.quantile(pf, np.linspace(0.0, 1.0, n_bins + 1))
    else:
        raise ValueError(f"strategy must be 'uniform' or 'quantile', got {strategy!r}")
    idx = np.clip(np.searchsorted(edges, pf, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    keep = count > 0
    sum_p = np.bincount(idx, weights=pf, minlength=n_bins)
    sum_y = np.bincount(idx, weights=yb.astype(np.float64), minlength=n_bins)
    return CalibrationBins(
        mean_predicted=sum_p[keep] / count[keep],
        fraction_positive=sum_y[keep] / count[keep],
        count=count[keep],
        edges=edges,
    )


# --------------------------------------------------------------------------- report


def binary_report(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    thr90: float,
    seed: int = 0,
    n_resamples: int = 2000,
    level: float = 0.95,
) -> dict[str, float]:
    """All reported metrics of one split, as a flat ``{name: float}`` (ready for MLflow).

    ``y``: (N,) in {0, 1} with both classes; ``p``: (N,) probabilities in [0, 1]. ``threshold``
    (e.g. Youden's on validation) and ``thr90`` (90% sensitivity on validation) must come from
    another split. Keys: n, n_positive, auroc, auroc_ci_low, auroc_ci_high,
    auroc_delong_ci_low, auroc_delong_ci_high, auroc_delong_se, auprc, auprc_ci_low,
    auprc_ci_high, balanced_accuracy, sensitivity, specificity, threshold, sensitivity_at_90,
    specificity_at_90, threshold_at_90, brier, ci_level, n_resamples, seed.
    """
    yb, pf = check_binary(y, p)
    dist = bootstrap_distribution(yb, pf, n_resamples, seed, with_auprc=True)
    assert dist.auprc is not None
    auc, var = delong_auroc_variance(yb, pf)
    d_low, d_high = delong_ci(yb, pf, level)
    a_low, a_high = percentile_interval(dist.auroc, level)
    pr_low, pr_high = percentile_interval(dist.auprc, level)
    sens, spec = sensitivity_specificity(yb, pf, threshold)
    sens90, spec90 = sensitivity_specificity(yb, pf, thr90)
    return {
        "n": float(yb.shape[0]),
        "n_positive": float(yb.sum()),
        "auroc": auc,
        "auroc_ci_low": a_low,
        "auroc_ci_high": a_high,
        "auroc_delong_ci_low": d_low,
        "auroc_delong_ci_high": d_high,
        "auroc_delong_se": float(np.sqrt(var)),
        "auprc": auprc(yb, pf),
        "auprc_ci_low": pr_low,
        "auprc_ci_high": pr_high,
        "balanced_accuracy": 0.5 * (sens + spec),
        "sensitivity": sens,
        "specificity": spec,
        "threshold": float(threshold),
        "sensitivity_at_90": sens90,
        "specificity_at_90": spec90,
        "threshold_at_90": float(thr90),
        "brier": brier_score(yb, pf),
        "ci_level": float(level),
        "n_resamples": float(n_resamples),
        "seed": float(seed),
    }


# --------------------------------------------------------------------------- aggregation


def _group_index(ids: np.ndarray | list, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"group ids must have shape (N,), got {ids.shape}")
    if n is not None and ids.shape[0] != n:
        raise ValueError(f"group ids and values differ in length: {ids.shape[0]} vs {n}")
    if ids.shape[0] == 0:
        raise ValueError("no rows to group")
    unique, inverse = np.unique(ids, return_inverse=True)
    return unique, inverse.reshape(-1)


def aggregate_by_group(ids: np.ndarray | list, values: np.ndarray | list) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values`` (N,) per group of ``ids`` (N,): (unique_ids (G,), means (G,)).

    Groups come in ``np.unique`` order (sorted). Apply twice for clip -> video -> study, so a
    study is the mean of its videos' means, whatever their clip counts.
    """
    vals = _check_scores(values, name="values")
    unique, inverse = _group_index(ids, vals.shape[0])
    sums = np.bincount(inverse, weights=vals, minlength=unique.shape[0])
    counts = np.bincount(inverse, minlength=unique.shape[0])
    return unique, sums / counts


def group_labels(ids: np.ndarray | list, labels: np.ndarray | list) -> tuple[np.ndarray, np.ndarray]:
    """The one label of each group: (unique_ids (G,), labels (G,) float, NaN = unknown).

    Same group order as ``aggregate_by_group``. Raises ``ValueError`` if a group mixes labels
    (or known and unknown), naming the positions of the first offending group's rows.
    """
    lab = np.asarray(labels, dtype=np.float64)
    if lab.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {lab.shape}")
    if np.isinf(lab).any():
        raise ValueError(f"labels contain infinite values (first at index {int(np.argmax(np.isinf(lab)))})")
    unique, inverse = _group_index(ids, lab.shape[0])
    g = unique.shape[0]
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(g))
    sorted_lab = np.where(np.isnan(lab[order]), np.inf, lab[order])  # unknown -> +inf sentinel
    lo = np.minimum.reduceat(sorted_lab, starts)
    hi = np.maximum.reduceat(sorted_lab, starts)
    bad = lo != hi
    if bad.any():
        first = int(np.argmax(bad))
        rows = np.flatnonzero(inverse == first)[:10].tolist()
        raise ValueError(
            f"{int(bad.sum())} of {g} group(s) have inconsistent labels; "
            f"first such group at row positions {rows} (0-based)"
        )
    return unique, np.where(np.isinf(lo), np.nan, lo)
