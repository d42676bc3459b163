"""Benchmark: stratified-bootstrap AUROC CI, vectorised (echo.evaluation.metrics) vs a loop of sklearn calls.

Synthetic, seeded study-level scores (default 10,000 studies, 20% positive, continuous scores so
every score is distinct: the most bins, the hardest case for the vectorised path). Both sides use
the very same resamples (``echo.evaluation.metrics.stratified_bootstrap_indices`` replays the draws of
``bootstrap_distribution``), so they must produce the same numbers; the script checks every
resampled AUROC to 1e-9 before reporting.

The reference time includes drawing the resample indices (the loop needs them too). Ours is the
median of ``--repeats`` runs of ``bootstrap_auroc_ci``; the reference runs once (it is slow).
Both are single-threaded; the ratio uses CPU seconds of this process (``time.process_time``),
which a busy shared machine disturbs much less than wall time. Wall seconds are printed too.

    .venv/bin/python benchmarks/auc_ci.py [--n-studies 10000] [--n-resamples 2000]

The last line reads ``ratio ours/reference speedup: <x>x``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from echo.evaluation.metrics import (
    bootstrap_auroc_ci,
    bootstrap_distribution,
    delong_ci,
    percentile_interval,
    stratified_bootstrap_indices,
)


def synthetic_scores(n: int, prevalence: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,) labels in {0, 1} and (N,) probabilities; positives score higher on average."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(np.int64)
    logit = rng.normal(size=n) + 1.2 * y - 1.0
    return y, 1.0 / (1.0 + np.exp(-logit))


def reference_distribution(y: np.ndarray, p: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """(B,) AUROC of each resample, one ``roc_auc_score`` call per resample."""
    out = []
    for block in stratified_bootstrap_indices(y, p, n_resamples, seed):
        for rows in block:
            out.append(roc_auc_score(y[rows], p[rows]))
    return np.asarray(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-studies", type=int, default=10_000)
    ap.add_argument("--n-resamples", type=int, default=2000)
    ap.add_argument("--prevalence", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="runs of ours; the median is reported")
    args = ap.parse_args()

    y, p = synthetic_scores(args.n_studies, args.prevalence, args.seed)
    print(f"{args.n_studies} studies ({int(y.sum())} positive), {args.n_resamples} stratified resamples, seed {args.seed}")

    cpu, wall = [], []
    for _ in range(args.repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        ours_ci = bootstrap_auroc_ci(y, p, args.n_resamples, args.seed)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    ours_cpu, ours_wall = statistics.median(cpu), statistics.median(wall)

    c0, w0 = time.process_time(), time.perf_counter()
    ref = reference_distribution(y, p, args.n_resamples, args.seed)
    ref_ci = percentile_interval(ref)
    ref_cpu, ref_wall = time.process_time() - c0, time.perf_counter() - w0

    ours = bootstrap_distribution(y, p, args.n_resamples, args.seed, with_auprc=False).auroc
    worst = float(np.max(np.abs(ours - ref)))
    if worst > 1e-9:
        raise SystemExit(f"mismatch: resampled AUROCs differ by up to {worst:.3g}")
    if max(abs(a - b) for a, b in zip(ours_ci, ref_ci)) > 1e-9:
        raise SystemExit(f"mismatch: CIs differ: {ours_ci} vs {ref_ci}")

    d_low, d_high = delong_ci(y, p)
    print(f"all {ref.size} resampled AUROCs agree (max abs difference {worst:.1e})")
    print(f"{'':<28}{'CPU s':>9}{'wall s':>9}  95% CI")
    print(f"{'ours (vectorised)':<28}{ours_cpu:>9.3f}{ours_wall:>9.3f}  {ours_ci[0]:.4f}-{ours_ci[1]:.4f}"
          f"   (median of {args.repeats} runs)")
    print(f"{'reference (sklearn loop)':<28}{ref_cpu:>9.3f}{ref_wall:>9.3f}  {ref_ci[0]:.4f}-{ref_ci[1]:.4f}")
    print(f"{'DeLong (for comparison)':<28}{'':>18}  {d_low:.4f}-{d_high:.4f}")
    print(f"wall-time speedup: {ref_wall / ours_wall:.1f}x")
    print(f"ratio ours/reference speedup: {ref_cpu / ours_cpu:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
