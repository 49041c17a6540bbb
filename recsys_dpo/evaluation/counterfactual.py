"""Will the candidate win online? Off-policy estimates of its click-through rate on a split.

When the log records how likely the serving system was to show each item (`propensity`,
`recsys_dpo.data.schema`), the split's logged slates say what a candidate would have earned
had it served them (`recsys_dpo.evaluation.ope`). Protocol, for split S:

- the logged slates are every request of S with one row per slot 0..K-1 (K: the log's slate
  size); a request with missing or repeated slots is skipped and counted. Every request is
  kept, clicked or not: a set chosen by its clicks would bias every estimate, which is why a
  leave-one-out split (its held-out requests are each user's last one WITH a click) is
  refused: OPE needs a split by time (`data.split.kind=temporal` or `window`);
- the candidate scores each user's catalog once, from their positives before S (the
  evaluator's query context), the seen policy's items left out (`eval.seen`), and serves its
  scores as a stochastic ranking policy (`eval.ope.policy`, `recsys_dpo.ranking_policy`);
- the reward model of the direct method and doubly robust is a logistic regression of the
  click on the candidate's score and the slot (one-hot), cross-fitted over two halves of the
  requests (each half's predictions from the model fitted on the other; Chernozhukov et al.
  2018, "Double/debiased machine learning"), so no request's click predicts itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch
from scipy.special import expit
from sklearn.linear_model import LogisticRegression

from recsys_dpo.data.datamodule import PreparedDataset
from recsys_dpo.data.schema import ITEM_IDX, PAD_ITEM, USER_IDX
from recsys_dpo.errors import DataError
from recsys_dpo.evaluation import ope
from recsys_dpo.evaluation.evaluator import (
    Comparison,
    Delta,
    EvalResult,
    Queries,
    embed_users,
    item_vectors,
    queries_of,
)
from recsys_dpo.evaluation.truth import synthetic_truth, truth_rows
from recsys_dpo.models.base import Recommender
from recsys_dpo.ranking_policy import RankingPolicy
from recsys_dpo.retrieval.seen import DEFAULT_SEEN

LOGGED_COLUMNS = ("request_id", "position", "propensity")


@dataclass(frozen=True)
class OpeConfig:
    """`eval.ope`: the candidate's ranking policy, weight clipping and the bootstrap."""

    policy: str = "epsilon_greedy"
    epsilon: float = 0.1
    temperature: float = 1.0
    clip: float | None = None
    n_resamples: int = 1000
    ci: float = 0.95
    seed: int = 0

    @property
    def ranking_policy(self) -> RankingPolicy:
        return RankingPolicy(self.policy, self.epsilon, self.temperature)

    @classmethod
    def from_eval(cls, ev: Any, seed: int) -> OpeConfig:
        """From the `eval` config block: eval.ope's policy and clip, eval's bootstrap."""
        return cls(ev.ope.policy, float(ev.ope.epsilon), float(ev.ope.temperature),
                   None if ev.ope.clip is None else float(ev.ope.clip), int(ev.n_resamples),
                   float(ev.ci), seed)


@dataclass(frozen=True)
class LoggedSlates:
    """The split's full logged slates [n, K] and the query context of each slate's user."""

    queries: Queries  # one row per user with a logged slate; targets empty
    request_user: np.ndarray  # [n] the slate's row in `queries`
    items: np.ndarray  # [n, K] item_idx shown in each slot
    clicks: np.ndarray  # [n, K] bool
    propensity: np.ndarray  # [n, K] the logging policy's P(item at slot)
    skipped: int  # requests without exactly one row per slot


def _missing_columns(data: PreparedDataset, split: str) -> list[str]:
    """The logged-slate columns the split lacks (its parquet schema only: no rows are read)."""
    return sorted(set(LOGGED_COLUMNS) - set(pl.read_parquet_schema(data.path / f"{split}.parquet")))


def logged_slates(data: PreparedDataset, split: str, seen: str = DEFAULT_SEEN) -> LoggedSlates:
    """The logged slates of `split` (module docstring); DataError when the split cannot be
    evaluated off-policy (`unavailable`) or has no full slate."""
    reason = unavailable(data, split)
    if reason is not None:
        raise DataError(reason)
    rows = data.events(split).filter(pl.col("request_id").is_not_null()).select(
        "request_id", pl.col(USER_IDX).cast(pl.Int64), pl.col(ITEM_IDX).cast(pl.Int64),
        pl.col("position").cast(pl.Int64), "clicked", "propensity",
    )  # fmt: skip
    k = int(rows["position"].max()) + 1 if rows.height else 0
    full = (pl.col("position").sort() == pl.int_range(pl.len())).all() & (pl.len() == k)
    checked = rows.group_by("request_id").agg(full.alias("_full"), pl.col(USER_IDX).first())
    keep = checked.filter(pl.col("_full")).sort(USER_IDX, "request_id")
    if keep.height == 0:
        raise DataError(f"{data.path}: the {split} split has no request with one row per slot "
                        f"0..{k - 1}: nothing to evaluate off-policy")
    slates = (
        rows.join(keep.select("request_id"), on="request_id")
        .sort(USER_IDX, "request_id", "position")
    )
    users = keep.select(USER_IDX).unique(maintain_order=True).with_columns(
        pl.lit([], dtype=pl.List(pl.Int64)).alias("targets"))
    queries = queries_of(data, split, users, seen)
    shape = (keep.height, k)
    return LoggedSlates(
        queries=queries,
        request_user=np.searchsorted(queries.user_idx, keep[USER_IDX].to_numpy()),
        items=slates[ITEM_IDX].to_numpy().reshape(shape),
        clicks=slates["clicked"].to_numpy().astype(bool).reshape(shape),
        propensity=slates["propensity"].to_numpy().reshape(shape),
        skipped=checked.height - keep.height,
    )


@torch.no_grad()
def candidate_scores(model: Recommender, slates: LoggedSlates, batch_size: int = 1024) -> np.ndarray:
    """[users, n_items] float64: the model's scores of the catalog for each slate user, -inf for
    padding and the seen policy's items (a served list never shows them)."""
    user_emb = embed_users(model, slates.queries, batch_size)
    scores = (user_emb @ item_vectors(model).T).double().numpy()
    scores[:, PAD_ITEM] = -np.inf
    for row, seen in enumerate(slates.queries.seen):
        scores[row, seen] = -np.inf
    return scores


def _features(scores: np.ndarray, slots: np.ndarray, k: int) -> np.ndarray:
    """[.., 1 + k]: the candidate's score (0 where -inf: the item is never shown) and the
    one-hot slot."""
    score = np.where(np.isfinite(scores), scores, 0.0)[..., None]
    return np.concatenate([score, np.eye(k)[slots]], axis=-1)


def reward_model(slates: LoggedSlates, scores: np.ndarray, marginals: np.ndarray,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(q [n, K], dm [n]): cross-fitted click probabilities at the logged slots and each
    request's expected clicks under the candidate, sum_p sum_i pi(i at p) qhat(u, i, p)."""
    n, k = slates.items.shape
    logged = scores[slates.request_user[:, None], slates.items]
    x = _features(logged, np.broadcast_to(np.arange(k), (n, k)), k).reshape(-1, k + 1)
    y = slates.clicks.ravel()
    fold = np.repeat(np.random.default_rng(seed).permutation(n) % 2, k)
    q, dm = np.empty(n * k), np.empty(n)
    finite = np.where(np.isfinite(scores), scores, 0.0)
    for part in (0, 1):
        fit, out = fold != part, fold == part
        out_requests = out[::k]
        if y[fit].all() or not y[fit].any():  # one class: the other half's click rate
            q[out] = float(y[fit].mean())
            dm[out_requests] = q[out][::k] * k
            continue
        model = LogisticRegression(max_iter=1000).fit(x[fit], y[fit])
        q[out] = model.predict_proba(x[out])[:, 1]
        # The model is linear in (score, slot): qhat(u, i, p) = sigmoid(a s_ui + b_p + c), a
        # function of the user (not the request), so dm is computed once per user.
        a, b = model.coef_[0, 0], model.coef_[0, 1:] + model.intercept_[0]
        qhat = expit(a * finite[:, :, None] + b[None, None, :])  # [users, N, K]
        per_user = (marginals * qhat).sum(axis=(1, 2))
        dm[out_requests] = per_user[slates.request_user[out_requests]]
    return q.reshape(n, k), dm


@dataclass(frozen=True)
class OpeResult:
    """The off-policy evaluation of one candidate on one split."""

    log: ope.SlateLog
    estimates: dict[str, ope.Estimate]
    diagnostics: dict[str, float]
    exact_ctr: float | None = None  # the synthetic log's true value, when known


def evaluate_ope(model: Recommender, slates: LoggedSlates, data: PreparedDataset,
                 settings: OpeConfig, batch_size: int = 1024) -> OpeResult:
    """Every estimate with its CI and the diagnostics of `model` served as
    `settings.ranking_policy` on the logged slates, and the exact value when the log is the
    synthetic one."""
    k = slates.items.shape[1]
    scores = candidate_scores(model, slates, batch_size)
    marginals = settings.ranking_policy.slot_probabilities(scores, k)
    target = marginals[slates.request_user[:, None], slates.items, np.arange(k)[None, :]]
    q, dm = reward_model(slates, scores, marginals, settings.seed)
    log = ope.SlateLog(target, slates.propensity, slates.clicks, q, dm)
    estimates = ope.estimate(log, settings.clip, settings.n_resamples, settings.ci, settings.seed)
    return OpeResult(log, estimates, ope.diagnostics(log, settings.clip),
                     exact_synthetic_ctr(data, slates, marginals))


def unavailable(data: PreparedDataset, split: str) -> str | None:
    """Why the split cannot be evaluated off-policy, or None when it can."""
    if missing := _missing_columns(data, split):
        return (f"the {split} split of {data.path} has no {', '.join(missing)} column(s): the "
                "log does not record how likely each shown item was (propensity)")
    kind = data.manifest.get("config", {}).get("data", {}).get("split", {}).get("kind")
    if kind == "loo":
        return (f"{data.path} is split leave-one-out, whose held-out requests are each user's "
                "last one WITH a click, a choice made by the outcome that biases every "
                "estimate; prepare it with data.split.kind=temporal")
    return None


def add_ope(outcome: EvalResult | Comparison, models: dict[str, Recommender],
            data: PreparedDataset, enabled: str | bool, settings: OpeConfig,
            seen: str = DEFAULT_SEEN, batch_size: int = 1024) -> None:
    """Add the off-policy evaluation to an evaluation, in place: `ope/<estimator>_ctr` (and
    `ope/exact_ctr` on the synthetic log) to each model's aggregates, the candidate's lift
    over the reference with a paired bootstrap CI to a comparison's deltas (so the candidate
    rule can use it, `pipeline.primary_metric=ope/snips_ctr`), and the `ope` section
    (settings, diagnostics, counts, or why it was skipped). `models` maps the roles of the
    outcome ("model", or "policy" and "reference") to their recommenders. `enabled`: "auto"
    skips a log that cannot be evaluated and says why, True refuses it (DataError), False
    does nothing."""
    if enabled is False:
        return
    main = outcome.policy if isinstance(outcome, Comparison) else outcome
    reason = unavailable(data, main.split)
    if reason is not None:
        if enabled is True:
            raise DataError(f"eval.ope.enabled=true: {reason}")
        outcome.ope = {"skipped": reason}
        return
    slates = logged_slates(data, main.split, seen)
    results = {role: evaluate_ope(m, slates, data, settings, batch_size)
               for role, m in models.items()}
    roles = ({"policy": outcome.policy, "reference": outcome.reference}
             if isinstance(outcome, Comparison) else {"model": outcome})
    for role, result in results.items():
        roles[role].aggregates |= {f"ope/{n}_ctr": e.value for n, e in result.estimates.items()}
        if result.exact_ctr is not None:
            roles[role].aggregates["ope/exact_ctr"] = result.exact_ctr
    section = {
        "policy": {"kind": settings.policy, "epsilon": settings.epsilon,
                   "temperature": settings.temperature, "clip": settings.clip},
        "logged_ctr": float(slates.clicks.mean()),
        "counts": {"requests": len(slates.items), "slots": slates.items.shape[1],
                   "users": len(slates.queries), "requests_skipped": slates.skipped},
        "models": {role: {"estimates": {n: vars(e) for n, e in r.estimates.items()},
                          "diagnostics": r.diagnostics, "exact_ctr": r.exact_ctr}
                   for role, r in results.items()},
    }  # fmt: skip
    if isinstance(outcome, Comparison):
        lift = ope.estimate_lift(results["policy"].log, results["reference"].log, settings.clip,
                                 settings.n_resamples, settings.ci, settings.seed)
        outcome.deltas |= {f"ope/{n}_ctr": Delta(e.value, e.lo, e.hi) for n, e in lift.items()}
        section["lift"] = {n: vars(e) for n, e in lift.items()}
        exact = [results[r].exact_ctr for r in ("policy", "reference")]
        if None not in exact:
            section["exact_lift"] = exact[0] - exact[1]
            outcome.aggregates["ope/exact_lift"] = exact[0] - exact[1]
    outcome.ope = section


def exact_synthetic_ctr(data: PreparedDataset, slates: LoggedSlates,
                        marginals: np.ndarray) -> float | None:
    """The candidate's true click-through rate on the logged slates' requests under the
    synthetic log's click model, mean_r 1/K sum_p sum_i pi(i at p | u_r) P(click | u_r, i, p);
    None unless the dataset was prepared from the synthetic log."""
    truth = synthetic_truth(data)
    if truth is None:
        return None
    user_row, item_row = truth_rows(data, truth)  # padding: never shown (pi = 0)
    k = slates.items.shape[1]
    truth_users = user_row[slates.queries.user_idx]
    p_click = truth.click_probability(truth_users[:, None, None], item_row[None, :, None],
                                      np.arange(k)[None, None, :])  # [users, N, K]
    per_user = (marginals * p_click).sum(axis=(1, 2)) / k
    return float(per_user[slates.request_user].mean())
