"""Off-policy estimates of a candidate ranking policy's online click-through rate from a log.

The log holds n requests (slates) of K slots. For request r and slot p: the logged item a_rp,
its click c_rp in {0, 1}, the logging policy's propensity mu_rp = P_mu(a_rp at p | x_r) (the
log's `propensity` column) and the candidate's probability pi_rp = P_pi(a_rp at p | x_r)
(`recsys_dpo.ranking_policy`); the importance weight is w_rp = pi_rp / mu_rp, clipped at
lambda when asked (w = min(pi / mu, lambda); Ionides 2008, "Truncated importance sampling").
Every estimator returns the click-through rate per slot, V = E_pi[clicks per request] / K, and
is a function of [n, K] arrays, so a bootstrap resamples requests (`estimate`; the lift of a
candidate over a baseline on the same requests with a paired one, `estimate_lift`).

- `ips`: V = 1/(n K) sum_r sum_p w_rp c_rp. With K = 1 the inverse propensity score estimator
  (Horvitz & Thompson 1952); with K > 1 the independent-item (position-based) IPS of Li et al.
  (2018, "Offline evaluation of ranking policies with click models", KDD), obp's
  SlateIndependentIPS: unbiased when a slot's click depends only on the item in that slot
  (the synthetic log's click model is of this kind).
- `snips`: self-normalised per slot, V = 1/K sum_p (sum_r w_rp c_rp) / (sum_r w_rp)
  (Swaminathan & Joachims 2015, "The self-normalized estimator for counterfactual learning",
  NeurIPS): biased O(1/n), bounded by the largest click rate, lower variance.
- `direct_method`: V = 1/(n K) sum_r dm_r with dm_r = sum_p sum_i pi(i at p | x_r) qhat(x_r, i, p),
  a reward model's expected clicks under pi (Dudik, Langford & Li 2011, "Doubly robust policy
  evaluation and learning", ICML, eq. 1).
- `doubly_robust`: V = 1/(n K) sum_r [dm_r + sum_p w_rp (c_rp - qhat_rp)] (Dudik et al. 2011,
  eq. 3, slot by slot): unbiased when the weights are, whatever the reward model.
- `pseudo_inverse`: V = 1/(n K) sum_r (sum_p w_rp - K + 1) sum_p c_rp (Swaminathan et al. 2017,
  "Off-policy evaluation for slate recommendation", NeurIPS; the slate reward is the sum of
  the slot clicks). Unbiased under an additive slate reward when the logging policy fills the
  slots independently (a factored mu); under sampling without replacement, as in the
  synthetic log and the Open Bandit random policy, its pseudo-inverse takes another form and
  this one is biased (measured in benchmarks/RESULTS.md, "Off-policy evaluation").

Diagnostics (`diagnostics`): the effective sample size ESS = (sum w)^2 / sum w^2 of the slot
weights (Kish 1965), as a share of the logged slots; the largest weight; the share of logged
slots the candidate would never show (pi = 0: a candidate that shows little of what was logged
is estimated from few rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

ESTIMATORS = ("ips", "snips", "direct_method", "doubly_robust", "pseudo_inverse")


def importance_weights(target: np.ndarray, logging: np.ndarray,
                       clip: float | None = None) -> np.ndarray:
    """w = pi / mu, clipped at `clip` (None: unclipped); ValueError for mu outside (0, 1]."""
    logging = np.asarray(logging, dtype=np.float64)
    if not ((logging > 0) & (logging <= 1)).all():
        raise ValueError("logging propensities must lie in (0, 1]")
    w = np.asarray(target, dtype=np.float64) / logging
    return np.minimum(w, clip) if clip is not None else w


def ips(w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """1/(n K) sum_r sum_p w_rp c_rp over the last two axes [.., n, K]."""
    return (w * c).mean(axis=(-2, -1))


def snips(w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """1/K sum_p (sum_r w_rp c_rp) / (sum_r w_rp); a slot whose weights sum to 0 counts 0."""
    total = w.sum(axis=-2)
    ratio = np.divide((w * c).sum(axis=-2), total, out=np.zeros_like(total), where=total > 0)
    return ratio.mean(axis=-1)


def direct_method(dm: np.ndarray, k: int) -> np.ndarray:
    """1/(n K) sum_r dm_r, dm [.., n] each request's expected clicks under pi by the model."""
    return dm.mean(axis=-1) / k


def doubly_robust(w: np.ndarray, c: np.ndarray, q: np.ndarray, dm: np.ndarray) -> np.ndarray:
    """1/(n K) sum_r [dm_r + sum_p w_rp (c_rp - q_rp)], q [.., n, K] the model at the logged slots."""
    k = w.shape[-1]
    return (dm + (w * (c - q)).sum(axis=-1)).mean(axis=-1) / k


def pseudo_inverse(w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """1/(n K) sum_r (sum_p w_rp - K + 1) sum_p c_rp."""
    k = w.shape[-1]
    return ((w.sum(axis=-1) - k + 1) * c.sum(axis=-1)).mean(axis=-1) / k


@dataclass(frozen=True)
class SlateLog:
    """A logged slate log as [n requests, K slots] arrays (module docstring): the candidate's
    and the logging policy's probabilities of each logged (item, slot), the clicks, and
    optionally a reward model's click probability at each logged slot (`q`) and its expected
    clicks per request under the candidate (`dm`), which the direct method and doubly robust
    need."""

    target: np.ndarray
    logging: np.ndarray
    clicks: np.ndarray
    q: np.ndarray | None = None
    dm: np.ndarray | None = None

    def __post_init__(self) -> None:
        shape = np.shape(self.clicks)
        if len(shape) != 2 or shape[0] == 0:
            raise ValueError(f"clicks must be [requests, slots] and non-empty, got {shape}")
        if np.shape(self.target) != shape or np.shape(self.logging) != shape:
            raise ValueError("target, logging and clicks must have the same [requests, slots]")
        if (self.q is None) != (self.dm is None):
            raise ValueError("give both q and dm (a reward model) or neither")

    @property
    def n_requests(self) -> int:
        return int(np.shape(self.clicks)[0])


@dataclass(frozen=True)
class Estimate:
    """An estimated click-through rate and its bootstrap CI over requests."""

    value: float
    lo: float
    hi: float


def _statistics(log: SlateLog, clip: float | None) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Each available estimator as a function of resampled request indices [.., n]."""
    w = importance_weights(log.target, log.logging, clip)
    c = np.asarray(log.clicks, dtype=np.float64)
    k = c.shape[1]
    out = {
        "ips": lambda idx: ips(w[idx], c[idx]),
        "snips": lambda idx: snips(w[idx], c[idx]),
        "pseudo_inverse": lambda idx: pseudo_inverse(w[idx], c[idx]),
    }
    if log.q is not None and log.dm is not None:
        q, dm = np.asarray(log.q, dtype=np.float64), np.asarray(log.dm, dtype=np.float64)
        out["direct_method"] = lambda idx: direct_method(dm[idx], k)
        out["doubly_robust"] = lambda idx: doubly_robust(w[idx], c[idx], q[idx], dm[idx])
    return out


def _bootstrap(statistic: Callable[[np.ndarray], np.ndarray], n: int, width: int,
               n_resamples: int, ci: float, seed: int) -> Estimate:
    """The statistic of all n requests and its percentile bootstrap CI over requests
    (scipy.stats.bootstrap on the request indices; one seed: the same resamples each call)."""
    index = np.arange(n)
    value = float(statistic(index))
    if n < 2:
        return Estimate(value, float("nan"), float("nan"))
    result = stats.bootstrap(
        (index,), lambda idx, axis=-1: statistic(idx), vectorized=True,
        n_resamples=n_resamples, batch=max(1, (1 << 24) // (n * width)),  # ~16M floats a batch
        confidence_level=ci, method="percentile", rng=np.random.default_rng(seed),
    )  # fmt: skip
    ends = result.confidence_interval
    return Estimate(value, float(ends.low), float(ends.high))


def estimate(log: SlateLog, clip: float | None = None, n_resamples: int = 1000,
             ci: float = 0.95, seed: int = 0) -> dict[str, Estimate]:
    """Every estimator the log allows, each with its percentile bootstrap CI over requests."""
    width = log.clicks.shape[1]
    return {name: _bootstrap(f, log.n_requests, width, n_resamples, ci, seed)
            for name, f in _statistics(log, clip).items()}


def estimate_lift(candidate: SlateLog, baseline: SlateLog, clip: float | None = None,
                  n_resamples: int = 1000, ci: float = 0.95,
                  seed: int = 0) -> dict[str, Estimate]:
    """V(candidate) - V(baseline) by every estimator both logs allow, on the same logged
    requests (the logs differ only in the target policy and the reward model's dm), with a
    paired bootstrap CI: each resample draws the same requests for both."""
    if np.shape(candidate.clicks) != np.shape(baseline.clicks):
        raise ValueError("the candidate's and the baseline's logs must hold the same slates")
    a, b = _statistics(candidate, clip), _statistics(baseline, clip)
    width = candidate.clicks.shape[1]
    return {
        name: _bootstrap(lambda idx, f=a[name], g=b[name]: f(idx) - g(idx),
                         candidate.n_requests, width, n_resamples, ci, seed)
        for name in a if name in b
    }


def diagnostics(log: SlateLog, clip: float | None = None) -> dict[str, float]:
    """ESS share (Kish), the largest weight and the share of logged slots with pi = 0."""
    w = importance_weights(log.target, log.logging, clip)
    square = float((w**2).sum())
    ess = float(w.sum()) ** 2 / square if square > 0 else 0.0
    return {
        "ess": ess,
        "ess_share": ess / w.size,
        "max_weight": float(w.max()),
        "zero_support_share": float((np.asarray(log.target) == 0).mean()),
        "requests": float(log.n_requests),
    }
