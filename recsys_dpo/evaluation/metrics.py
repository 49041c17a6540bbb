"""Ranking, beyond-accuracy, impression, random-exposure (MCAR) and preference metrics as pure
numpy functions.

DESIGN.md "Evaluation". Conventions shared by the ranking metrics:

- `ranked` [U, K_max] int: each user's recommendations, best first, distinct within a row;
  -1 marks an empty slot (retrieval ran out of unseen items) and is never relevant.
- `relevant`: either `target` [U] int, one held-out item per user (leave-one-out; a negative
  target means the user has none), or a sequence of U collections of relevant item ids
  (arrays or sets; duplicates and negative ids are ignored).
- Per-user functions return float arrays [U]; a user with no relevant item gets NaN, and
  `user_mean` averages over the others and reports how many were excluded.
- Item ids follow the vocab: real items are 1..n_items-1, where n_items counts the padding
  row 0 (the number of rows of an item-embedding table).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

Relevant = np.ndarray | Sequence[Collection[int]]


def _discounts(length: int) -> np.ndarray:
    """1 / log2(rank + 2) for 0-based ranks 0..length-1 (Jarvelin & Kekalainen, TOIS 2002)."""
    return 1.0 / np.log2(np.arange(length) + 2.0)


def _check_k(ranked: np.ndarray, k: int) -> None:
    if not 1 <= k <= ranked.shape[1]:
        raise ValueError(f"k must be in [1, {ranked.shape[1]}] (the ranked list length), got {k}")


def relevance_matrix(ranked: np.ndarray, relevant: Relevant) -> tuple[np.ndarray, np.ndarray]:
    """hits [U, K_max] bool (ranked[u, r] is relevant to u) and n_relevant [U] int."""
    ranked = np.asarray(ranked, dtype=np.int64)
    if isinstance(relevant, np.ndarray):
        target = relevant.astype(np.int64).reshape(-1)
        if len(target) != len(ranked):
            raise ValueError(f"{len(target)} targets for {len(ranked)} ranked lists")
        has_target = target >= 0
        return (ranked == target[:, None]) & has_target[:, None], has_target.astype(np.int64)
    if len(relevant) != len(ranked):
        raise ValueError(f"{len(relevant)} relevant sets for {len(ranked)} ranked lists")
    per_user = [np.fromiter(r, dtype=np.int64) for r in relevant]
    owner = np.repeat(np.arange(len(per_user)), [len(r) for r in per_user])
    rel_items = np.concatenate([np.empty(0, dtype=np.int64), *per_user])
    owner, rel_items = owner[rel_items >= 0], rel_items[rel_items >= 0]
    # One key per (user, item) pair: deduplicates, and a single isin tests every user's list
    # against their own set.
    width = max(int(ranked.max(initial=0)), int(rel_items.max(initial=0))) + 1
    rel_keys = np.unique(owner * width + rel_items)
    n_relevant = np.bincount(rel_keys // width, minlength=len(ranked))
    ranked_keys = np.arange(len(ranked))[:, None] * width + ranked
    return np.isin(ranked_keys, rel_keys) & (ranked >= 0), n_relevant


def _per_user(values: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    return np.where(n_relevant > 0, values, np.nan)


def hit_rate_at_k(ranked: np.ndarray, relevant: Relevant, k: int) -> np.ndarray:
    """HR@k per user: 1 if any relevant item is in the top k, else 0."""
    _check_k(ranked, k)
    hits, n_relevant = relevance_matrix(ranked, relevant)
    return _per_user(hits[:, :k].any(axis=1).astype(np.float64), n_relevant)


def recall_at_k(ranked: np.ndarray, relevant: Relevant, k: int) -> np.ndarray:
    """Recall@k per user: |relevant in top k| / |relevant| (equals HR@k for one target)."""
    _check_k(ranked, k)
    hits, n_relevant = relevance_matrix(ranked, relevant)
    return _per_user(hits[:, :k].sum(axis=1) / np.maximum(n_relevant, 1), n_relevant)


def ndcg_at_k(ranked: np.ndarray, relevant: Relevant, k: int) -> np.ndarray:
    """NDCG@k per user with binary relevance (Jarvelin & Kekalainen, TOIS 2002):
    DCG = sum_{r<k} rel_r / log2(r+2), IDCG = sum_{r<min(|rel|,k)} 1 / log2(r+2)."""
    _check_k(ranked, k)
    hits, n_relevant = relevance_matrix(ranked, relevant)
    discounts = _discounts(k)
    dcg = hits[:, :k] @ discounts
    idcg = np.concatenate([[0.0], np.cumsum(discounts)])[np.minimum(n_relevant, k)]
    return _per_user(dcg / np.where(idcg > 0, idcg, 1.0), n_relevant)


def mrr(ranked: np.ndarray, relevant: Relevant) -> np.ndarray:
    """Reciprocal rank per user of the first relevant item within the K_max list, 0 if absent
    (Voorhees, TREC-8 QA 1999)."""
    hits, n_relevant = relevance_matrix(ranked, relevant)
    first = hits.argmax(axis=1)
    return _per_user(np.where(hits.any(axis=1), 1.0 / (first + 1), 0.0), n_relevant)


def user_mean(values: np.ndarray) -> tuple[float, int]:
    """(mean over users with a value, number of users excluded as NaN)."""
    excluded = int(np.isnan(values).sum())
    return (float(np.nanmean(values)) if excluded < len(values) else float("nan")), excluded


def ranking_metrics(ranked: np.ndarray, relevant: Relevant, ks: Sequence[int]) -> dict[str, float]:
    """Means of hr_at_k, recall_at_k, ndcg_at_k for each k, and mrr_at_<width of `ranked`> (the
    reciprocal rank within the ranked list, named for that cut-off); plus users/excluded counts."""
    report: dict[str, float] = {}
    for k in ks:
        report[f"hr_at_{k}"], _ = user_mean(hit_rate_at_k(ranked, relevant, k))
        report[f"recall_at_{k}"], _ = user_mean(recall_at_k(ranked, relevant, k))
        report[f"ndcg_at_{k}"], _ = user_mean(ndcg_at_k(ranked, relevant, k))
    report[f"mrr_at_{ranked.shape[1]}"], excluded = user_mean(mrr(ranked, relevant))
    report["users"], report["users_excluded"] = float(len(ranked)), float(excluded)
    return report


# Beyond accuracy ---------------------------------------------------------------------------


def recommendation_counts(ranked: np.ndarray, k: int, n_items: int) -> np.ndarray:
    """How often each item idx 0..n_items-1 appears in the top-k lists (-1 slots ignored)."""
    _check_k(ranked, k)
    top = np.asarray(ranked)[:, :k].reshape(-1)
    return np.bincount(top[top >= 0], minlength=n_items)[:n_items]


def coverage_at_k(ranked: np.ndarray, k: int, n_items: int) -> float:
    """Catalog coverage: fraction of the n_items-1 real items recommended to at least one user."""
    return float((recommendation_counts(ranked, k, n_items)[1:] > 0).mean())


def average_popularity(ranked: np.ndarray, k: int, item_counts: np.ndarray) -> float:
    """Average recommendation popularity (ARP; Abdollahpouri et al., FLAIRS 2019): the mean,
    over users, of the mean training count `item_counts[i]` of the items in their top k."""
    _check_k(ranked, k)
    top = np.asarray(ranked)[:, :k]
    valid = top >= 0
    popularity = np.where(
        valid, np.asarray(item_counts, dtype=np.float64)[np.where(valid, top, 0)], 0
    )
    per_user = popularity.sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
    return float(per_user[valid.any(axis=1)].mean()) if valid.any() else float("nan")


def gini_index(ranked: np.ndarray, k: int, n_items: int) -> float:
    """Gini coefficient of recommendation counts over the real items (0 = every item equally
    often, -> 1 = all recommendations on one item): with counts x sorted ascending,
    G = sum_i (2i - n - 1) x_i / (n sum x), i = 1..n (Fleder & Hosanagar, 2009)."""
    counts = np.sort(recommendation_counts(ranked, k, n_items)[1:]).astype(np.float64)
    n, total = len(counts), counts.sum()
    if total == 0:
        return float("nan")
    return float(((2 * np.arange(1, n + 1) - n - 1) @ counts) / (n * total))


def tail_share(
    ranked: np.ndarray, k: int, item_counts: np.ndarray, head_fraction: float = 0.2
) -> float:
    """Share of the top-k recommendations that are not head items. The head is the
    ceil(head_fraction * (n_items-1)) real items with the largest `item_counts` (ties by lower
    item id), n_items = len(item_counts)."""
    counts = np.asarray(item_counts)
    real = np.arange(1, len(counts))
    by_popularity = real[np.lexsort((real, -counts[1:]))]
    is_head = np.zeros(len(counts), dtype=bool)
    is_head[by_popularity[: int(np.ceil(head_fraction * len(real)))]] = True
    _check_k(ranked, k)
    top = np.asarray(ranked)[:, :k].reshape(-1)
    top = top[top >= 0]
    return float((~is_head[top]).mean()) if len(top) else float("nan")


# Impression level (MIND) -------------------------------------------------------------------


def _rank_within_groups(
    scores: np.ndarray, labels: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Sort rows by (group, score desc), negatives before positives on equal scores, so tied
    scores never earn a positive a better rank. Returns group index and label of each sorted
    row, its 0-based rank within its group, and the number of groups (np.unique order)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    _, group = np.unique(np.asarray(groups), return_inverse=True)
    order = np.lexsort((labels, -scores, group))
    group, labels = group[order], labels[order]
    rank = np.arange(len(group)) - np.searchsorted(group, group, side="left")
    return group, labels, rank, int(group.max(initial=-1)) + 1


def impression_auc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """ROC AUC within each impression group, in np.unique(groups) order; NaN for a group with
    no positive or no negative. AUC = P(s_pos > s_neg) + 0.5 P(s_pos = s_neg), computed from
    mid-ranks (Mann-Whitney U: (R_pos - P(P+1)/2) / (P N))."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    _, group = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(group.max(initial=-1)) + 1
    order = np.lexsort((scores, group))
    group, scores, labels = group[order], scores[order], labels[order]
    # Mid-rank (1-based, within group) of each run of equal (group, score).
    new_run = np.ones(len(group), dtype=bool)
    new_run[1:] = (group[1:] != group[:-1]) | (scores[1:] != scores[:-1])
    run = np.cumsum(new_run) - 1
    run_first = np.flatnonzero(new_run)
    run_last = np.append(run_first[1:], len(group)) - 1
    group_start = np.searchsorted(group, group, side="left")
    mid_rank = (run_first[run] + run_last[run]) / 2.0 - group_start + 1
    n_pos = np.bincount(group, weights=labels, minlength=n_groups)
    n_neg = np.bincount(group, minlength=n_groups) - n_pos
    rank_sum = np.bincount(group, weights=mid_rank * labels, minlength=n_groups)
    defined = (n_pos > 0) & (n_neg > 0)
    auc = (rank_sum - n_pos * (n_pos + 1) / 2) / np.where(defined, n_pos * n_neg, 1)
    return np.where(defined, auc, np.nan)


def impression_mrr(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """MRR within each impression group as in the MIND benchmark (Wu et al., ACL 2020): the mean
    of 1/rank over the group's clicked items. NaN for a group with no click."""
    group, labels, rank, n_groups = _rank_within_groups(scores, labels, groups)
    n_pos = np.bincount(group, weights=labels, minlength=n_groups)
    reciprocal = np.bincount(group, weights=labels / (rank + 1.0), minlength=n_groups)
    return np.where(n_pos > 0, reciprocal / np.maximum(n_pos, 1), np.nan)


def impression_ndcg_at_k(
    scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int
) -> np.ndarray:
    """nDCG@k within each impression group, binary gains (MIND benchmark); NaN for a group with
    no click. IDCG puts the group's min(#clicks, k) clicks first."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    group, labels, rank, n_groups = _rank_within_groups(scores, labels, groups)
    discounts = _discounts(k)
    gains = np.where(labels & (rank < k), discounts[np.minimum(rank, k - 1)], 0.0)
    dcg = np.bincount(group, weights=gains, minlength=n_groups)
    n_pos = np.bincount(group, weights=labels, minlength=n_groups).astype(np.int64)
    idcg = np.concatenate([[0.0], np.cumsum(discounts)])[np.minimum(n_pos, k)]
    return np.where(n_pos > 0, dcg / np.where(idcg > 0, idcg, 1.0), np.nan)


# Random-exposure test sets (Coat's MCAR ratings) -------------------------------------------


def _group_gains(
    scores: np.ndarray, relevant: np.ndarray, groups: np.ndarray, k: int
) -> tuple[np.ndarray, ...]:
    """Per group (np.unique(groups) order): items, relevant items P, DCG@k of the ranking by
    `scores` (binary gain, ties against the relevant items), the ideal DCG@k over min(k, P)
    relevant items, and relevant items in the top k."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    group, labels, rank, n_groups = _rank_within_groups(scores, relevant, groups)
    n_pos = np.bincount(group, weights=labels, minlength=n_groups)
    top = labels & (rank < k)
    discounts = _discounts(k)
    dcg = np.bincount(group, weights=np.where(top, discounts[np.minimum(rank, k - 1)], 0.0),
                      minlength=n_groups)  # fmt: skip
    idcg = np.concatenate([[0.0], np.cumsum(discounts)])[np.minimum(n_pos, k).astype(np.int64)]
    hits = np.bincount(group, weights=top, minlength=n_groups)
    return np.bincount(group, minlength=n_groups), n_pos, dcg, idcg, hits


def mcar_metrics(
    scores: np.ndarray, relevant: np.ndarray, groups: np.ndarray, k: int = 5
) -> dict[str, np.ndarray]:
    """auc, ndcg_at_k, recall_at_k of each user's ranking of their own random test items.

    The protocol of the debiasing literature on Coat (Schnabel et al., ICML 2016; Wang et al.
    DR-JL, ICML 2019; Li et al. StableDR, ICLR 2023): each user (`groups`) ranks only the items
    drawn for them at random, by `scores`, with binary relevance `relevant` (rating >= 4):

        auc_u       = P(s_pos > s_neg) + 0.5 P(s_pos = s_neg)  (`impression_auc`)
        ndcg_at_k_u = sum_{r < k} rel_r / log2(r + 2)  /  sum_{r < min(k, P_u)} 1 / log2(r + 2)
        recall_at_k_u = (relevant items in the top k) / P_u

    ranks 0-based, ties broken against the relevant items (`_rank_within_groups`). A user
    with no relevant or no non-relevant item gets NaN in all three, so means run over the users
    whose ranking can be told from random (237 of Coat's 290 at rating >= 4). Arrays in
    np.unique(groups) order.
    """
    n_items, n_pos, dcg, idcg, hits = _group_gains(scores, relevant, groups, k)
    defined = (n_pos > 0) & (n_items - n_pos > 0)
    safe = np.where(defined, 1.0, np.nan)
    return {
        "auc": np.where(defined, impression_auc(scores, relevant, groups), np.nan),
        f"ndcg_at_{k}": safe * dcg / np.where(idcg > 0, idcg, 1.0),
        f"recall_at_{k}": safe * hits / np.maximum(n_pos, 1),
    }


def global_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC over ALL rows pooled, not per user: P(s_pos > s_neg) + 0.5 P(s_pos = s_neg)
    over every (relevant, non-relevant) pair of rows, whoever's they are (mid-rank Mann-Whitney,
    `impression_auc` with one group); NaN without a positive or a negative. The AUC of the
    Coat debiasing literature (sklearn `roc_auc_score(y_test, test_pred)` over the 4,640 MCAR
    test ratings, as in the DR-JL / MRDR / StableDR / TDR code family)."""
    labels = np.asarray(labels).astype(bool)
    return float(impression_auc(scores, labels, np.zeros(len(labels), dtype=np.int64))[0])


def coat_paper_ranking(
    scores: np.ndarray, relevant: np.ndarray, groups: np.ndarray, k: int = 5
) -> dict[str, np.ndarray]:
    """ndcg_at_k and recall_at_k of each user's ranking of their own test items, as the public
    code of the Coat debiasing literature computes them (`ndcg_func` / `recall_func` of the
    DR-JL, MRDR, StableDR, TDR-CL implementations; tables e.g. Ha et al., NeurIPS 2024, Table
    2), EVERY user counted, unlike `mcar_metrics`:

        ndcg_at_k_u   = DCG_u / IDCG_u, DCG_u = sum_{r < k} rel_r / log2(r + 2),
                        IDCG_u over the user's min(k, P_u) relevant items first;
                        = 1 for a user with no relevant item (P_u = 0)
        recall_at_k_u = (relevant items in the top k) / max(1, P_u)   (0 when P_u = 0)

    ranks 0-based, ties broken against the relevant items (`_rank_within_groups`; the published
    code's np.argsort breaks them arbitrarily). Arrays in np.unique(groups) order, never NaN.
    The code family is not uniform: NDCG as above everywhere, but some copies of `recall_func`
    divide by min(k, P_u) and count 1 when P_u = 0, and `binarize` marks rating >= 3 relevant
    where the papers' text says "greater than three"; `relevant` is the caller's (Coat here:
    rating >= data.reader.relevant, 4).
    """
    _, n_pos, dcg, idcg, hits = _group_gains(scores, relevant, groups, k)
    return {
        f"ndcg_at_{k}": np.where(n_pos > 0, dcg / np.where(idcg > 0, idcg, 1.0), 1.0),
        f"recall_at_{k}": hits / np.maximum(n_pos, 1),
    }


# Preference pairs -------------------------------------------------------------------------


def _pair_mean(values: np.ndarray, mask: np.ndarray | None) -> float:
    """Mean over pairs of each pair's mean over its valid rejected items (pairs with none are
    skipped), so a pair weighs the same whatever its number of negatives."""
    valid = np.ones(values.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    n_valid = valid.sum(axis=1)
    per_pair = np.where(valid, values, 0.0).sum(axis=1) / np.maximum(n_valid, 1)
    return float(per_pair[n_valid > 0].mean()) if (n_valid > 0).any() else float("nan")


def preference_accuracy(
    chosen_scores: np.ndarray, rejected_scores: np.ndarray, mask: np.ndarray | None = None
) -> float:
    """Share of (chosen, rejected) comparisons the model gets right, chosen [P] strictly above
    rejected [P, K] (a tie counts as wrong, as TRL's rewards/accuracies); mask [P, K] marks
    real rejected items. Averaged per pair, then over pairs."""
    chosen = np.asarray(chosen_scores, dtype=np.float64)[:, None]
    return _pair_mean((chosen > np.asarray(rejected_scores)).astype(np.float64), mask)


def reward_margin_mean(
    chosen_rewards: np.ndarray, rejected_rewards: np.ndarray, mask: np.ndarray | None = None
) -> float:
    """Mean margin r(chosen) - r(rejected) over valid rejected items, per pair then over pairs
    (the form of TRL's rewards/margins), for whatever per-item r the caller passes. The
    evaluator passes the UNSCALED log-ratio r = s_theta - s_ref (no beta: it does not know the
    training beta, and an unscaled margin compares across betas) and reports it as
    `log_ratio_margin`; TRL's beta-scaled margin is beta times it."""
    chosen = np.asarray(chosen_rewards, dtype=np.float64)[:, None]
    return _pair_mean(chosen - np.asarray(rejected_rewards, dtype=np.float64), mask)


# Policy vs reference ------------------------------------------------------------------------


def paired_bootstrap_ci(
    a: np.ndarray,
    b: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    chunk_elements: int = 10_000_000,
) -> tuple[float, float, float]:
    """(mean(b - a), lo, hi): percentile bootstrap (1 - alpha) CI of the mean per-user
    difference, users resampled with replacement jointly for a and b (paired; Efron &
    Tibshirani 1993). Users with NaN in a or b are dropped. Resamples are drawn in chunks of
    at most chunk_elements indices to bound memory on large user counts."""
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    diff = diff[~np.isnan(diff)]
    if len(diff) == 0:
        raise ValueError("no user has a value in both a and b")
    rng = np.random.default_rng(seed)
    chunk = max(1, chunk_elements // len(diff))
    means = np.concatenate(
        [
            diff[rng.integers(0, len(diff), (min(chunk, n_resamples - start), len(diff)))].mean(
                axis=1
            )
            for start in range(0, n_resamples, chunk)
        ]
    )
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(diff.mean()), float(lo), float(hi)
