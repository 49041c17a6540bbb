"""Uncertainty across references and users: mean +- sd over references, and the two-level
(hierarchical) bootstrap CI of a paired difference.

A study fine-tunes every row from R independently trained references and evaluates each on the
same U users, so the paired per-user differences form a matrix d[r, u]. Users are not the only
source of variation: a different reference gives a different gain. The per-reference paired
bootstrap (`recsys_dpo.evaluation.metrics.paired_bootstrap_ci`) answers "on this reference";
`hierarchical_bootstrap_ci` answers "on a reference trained by this recipe".
"""

from __future__ import annotations

import numpy as np


def mean_sd(values: np.ndarray | list[float]) -> tuple[float, float]:
    """(mean, sample sd with ddof=1; 0 for a single value) of per-reference figures."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def hierarchical_bootstrap_ci(
    deltas: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    chunk_elements: int = 10_000_000,
) -> tuple[float, float, float]:
    """(mean, lo, hi): the percentile (1 - alpha) CI of the mean paired difference under a
    two-level bootstrap of deltas [R references, U users].

    Each resample draws R references with replacement, then, independently within each drawn
    reference, U users with replacement, and takes the grand mean

        theta* = 1/R sum_{j=1..R} 1/U sum_{v=1..U} d[r*_j, u*_{j,v}],

    the estimate being theta = mean over references of each reference's mean over users. This is
    the two-stage resampling of Davison & Hinkley (1997), "Bootstrap Methods and their
    Application", section 3.8 (randomly resampling both stages), as applied by Saravanan,
    Berman & Sober (2020), "Application of the hierarchical bootstrap to multi-level data in
    neuroscience", Neurons, Behavior, Data analysis and Theory 3(5). Resampling the references
    carries the between-reference variance into the CI, resampling users the within-reference
    one (resampling both stages slightly overstates the variance, so the CI errs wide).

    With one reference it is exactly the paired bootstrap over users: the users are drawn from
    `np.random.default_rng(seed)` in the same order and chunks as
    `metrics.paired_bootstrap_ci(a, b, n_resamples, seed, alpha, chunk_elements)` with
    b - a = deltas[0] (the references from a stream of their own), so both give the same CI.
    """
    d = np.asarray(deltas, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"deltas must be [references, users] and non-empty, got {d.shape}")
    if np.isnan(d).any():
        raise ValueError("deltas hold NaN: every reference must have a value for every user")
    n_refs, n_users = d.shape
    users = np.random.default_rng(seed)
    refs = np.random.default_rng([seed, 1])
    chunk = max(1, chunk_elements // (n_refs * n_users))
    means = []
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        drawn = refs.integers(0, n_refs, (size, n_refs)) if n_refs > 1 else np.zeros(
            (size, 1), dtype=np.int64)  # fmt: skip
        picks = users.integers(0, n_users, (size, n_refs, n_users))
        means.append(d[drawn[:, :, None], picks].mean(axis=(1, 2)))
    lo, hi = np.quantile(np.concatenate(means), [alpha / 2, 1 - alpha / 2])
    return float(d.mean(axis=1).mean()), float(lo), float(hi)
