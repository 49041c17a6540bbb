"""Every metric against an independent pure-Python brute force on random cases, plus closed
forms (perfect and random rankings) and the bootstrap's coverage."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_dpo.evaluation.metrics import (
    average_popularity,
    coverage_at_k,
    gini_index,
    hit_rate_at_k,
    impression_auc,
    impression_mrr,
    impression_ndcg_at_k,
    mrr,
    ndcg_at_k,
    paired_bootstrap_ci,
    preference_accuracy,
    ranking_metrics,
    recall_at_k,
    reward_margin_mean,
    tail_share,
    user_mean,
)

# Brute forces ------------------------------------------------------------------------------


def bf_ranking(row: list, rel: set, k: int) -> dict:
    """HR@k, recall_at_k, NDCG@k and MRR of one user by direct summation (NaN without relevant)."""
    if not rel:
        return dict.fromkeys(("hr", "recall", "ndcg", "mrr"), math.nan)
    top = [x for x in row[:k] if x >= 0]
    dcg = sum(1 / math.log2(r + 2) for r, x in enumerate(row[:k]) if x in rel)
    idcg = sum(1 / math.log2(r + 2) for r in range(min(len(rel), k)))
    first = next((r for r, x in enumerate(row) if x in rel), None)
    return {
        "hr": float(any(x in rel for x in top)),
        "recall": sum(x in rel for x in top) / len(rel),
        "ndcg": dcg / idcg,
        "mrr": 0.0 if first is None else 1 / (first + 1),
    }


def bf_group_rank(pairs: list) -> list:
    """(score, label) pairs sorted by score desc, negatives first on ties (pessimistic)."""
    return sorted(pairs, key=lambda p: (-p[0], p[1]))


def bf_auc(pairs: list) -> float:
    pos = [s for s, y in pairs if y]
    neg = [s for s, y in pairs if not y]
    if not pos or not neg:
        return math.nan
    credit = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return credit / (len(pos) * len(neg))


def bf_impression_mrr(pairs: list) -> float:
    ranked = bf_group_rank(pairs)
    rr = [1 / (r + 1) for r, (_, y) in enumerate(ranked) if y]
    return sum(rr) / len(rr) if rr else math.nan


def bf_impression_ndcg(pairs: list, k: int) -> float:
    ranked = bf_group_rank(pairs)
    n_pos = sum(y for _, y in pairs)
    if n_pos == 0:
        return math.nan
    dcg = sum(1 / math.log2(r + 2) for r, (_, y) in enumerate(ranked[:k]) if y)
    return dcg / sum(1 / math.log2(r + 2) for r in range(min(n_pos, k)))


def same(a, b) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


# Strategies --------------------------------------------------------------------------------


@st.composite
def ranking_case(draw):
    """A catalog of n_items (incl. padding 0), ranked lists of distinct real items with
    trailing -1 slots, and per-user relevant sets (some empty)."""
    n_items = draw(st.integers(2, 30))
    n_users = draw(st.integers(1, 12))
    k_max = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    ranked = np.full((n_users, k_max), -1, dtype=np.int64)
    relevant = []
    for u in range(n_users):
        filled = rng.integers(0, min(k_max, n_items - 1) + 1)
        ranked[u, :filled] = rng.choice(np.arange(1, n_items), filled, replace=False)
        size = rng.integers(0, min(4, n_items - 1) + 1)
        relevant.append(set(rng.choice(np.arange(1, n_items), size, replace=False).tolist()))
    k = draw(st.integers(1, k_max))
    return n_items, ranked, relevant, k, rng


@settings(max_examples=150, deadline=None)
@given(ranking_case())
def test_ranking_metrics_match_brute_force_with_sets(case):
    _, ranked, relevant, k, _ = case
    got = {
        "hr": hit_rate_at_k(ranked, relevant, k),
        "recall": recall_at_k(ranked, relevant, k),
        "ndcg": ndcg_at_k(ranked, relevant, k),
        "mrr": mrr(ranked, relevant),
    }
    for u, rel in enumerate(relevant):
        expected = bf_ranking(ranked[u].tolist(), rel, k)
        for name, value in expected.items():
            assert same(got[name][u], value), (name, u)


@settings(max_examples=100, deadline=None)
@given(ranking_case())
def test_single_target_matches_set_form_and_brute_force(case):
    n_items, ranked, _, k, rng = case
    # Target: often taken from the list itself, else any real item, sometimes absent (-1).
    target = np.where(
        rng.random(len(ranked)) < 0.5, ranked[:, 0], rng.integers(1, n_items, len(ranked))
    )
    target[rng.random(len(ranked)) < 0.2] = -1
    as_sets = [set() if t < 0 else {int(t)} for t in target]
    got = {
        "hr": hit_rate_at_k(ranked, target, k),
        "recall": recall_at_k(ranked, target, k),
        "ndcg": ndcg_at_k(ranked, target, k),
        "mrr": mrr(ranked, target),
    }
    for u, rel in enumerate(as_sets):
        for name, value in bf_ranking(ranked[u].tolist(), rel, k).items():
            assert same(got[name][u], value), (name, u)
    np.testing.assert_array_equal(got["hr"], got["recall"])  # one target: recall is HR


@settings(max_examples=100, deadline=None)
@given(ranking_case(), st.floats(0.0, 1.0))
def test_beyond_accuracy_match_brute_force(case, head_fraction):
    n_items, ranked, _, k, rng = case
    counts = rng.integers(0, 5, n_items)  # small range: popularity ties
    recs = [x for row in ranked.tolist() for x in row[:k] if x >= 0]

    assert same(coverage_at_k(ranked, k, n_items), len(set(recs)) / (n_items - 1))

    per_user = [[counts[x] for x in row[:k] if x >= 0] for row in ranked.tolist()]
    per_user = [sum(p) / len(p) for p in per_user if p]
    assert same(
        average_popularity(ranked, k, counts),
        sum(per_user) / len(per_user) if per_user else math.nan,
    )

    # Gini by mean absolute difference: sum_ij |x_i - x_j| / (2 n sum x).
    x = [recs.count(i) for i in range(1, n_items)]
    expected_gini = (
        sum(abs(a - b) for a in x for b in x) / (2 * len(x) * sum(x)) if sum(x) else math.nan
    )
    assert same(gini_index(ranked, k, n_items), expected_gini)

    by_pop = sorted(range(1, n_items), key=lambda i: (-counts[i], i))
    head = set(by_pop[: math.ceil(head_fraction * (n_items - 1))])
    expected_tail = sum(r not in head for r in recs) / len(recs) if recs else math.nan
    assert same(tail_share(ranked, k, counts, head_fraction), expected_tail)


def test_beyond_accuracy_closed_forms():
    n_items = 11
    everyone_same = np.tile(np.arange(1, 6), (4, 1))  # 4 users, the same 5 items
    assert coverage_at_k(everyone_same, 5, n_items) == 0.5
    # Each of 10 items recommended exactly once: uniform.
    uniform = np.arange(1, 11).reshape(2, 5)
    assert gini_index(uniform, 5, n_items) == 0.0
    assert coverage_at_k(uniform, 5, n_items) == 1.0
    # All recommendations on one item of n: G = (n - 1) / n.
    one_item = np.ones((3, 1), dtype=np.int64)
    assert math.isclose(gini_index(one_item, 1, n_items), 9 / 10)
    counts = np.arange(n_items)[::-1]  # item 1 most popular ... item 10 least
    assert tail_share(np.array([[1, 2, 3, 4]]), 4, counts) == 0.5  # head = items 1, 2
    # counts[1], counts[2], counts[3] = 9, 8, 7; the -1 slot is ignored.
    assert average_popularity(np.array([[1, 2], [3, -1]]), 2, counts) == (8.5 + 7) / 2


@st.composite
def impression_case(draw):
    n = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    groups = rng.choice(np.array(["a", "b", "c", "d", "e"])[: draw(st.integers(1, 5))], n)
    scores = rng.integers(0, 4, n).astype(np.float64)  # few distinct values: many ties
    labels = rng.random(n) < draw(st.floats(0.0, 1.0))
    return scores, labels, groups, draw(st.integers(1, 8))


@settings(max_examples=150, deadline=None)
@given(impression_case())
def test_impression_metrics_match_brute_force(case):
    scores, labels, groups, k = case
    names = np.unique(groups)
    auc = impression_auc(scores, labels, groups)
    imp_mrr = impression_mrr(scores, labels, groups)
    ndcg = impression_ndcg_at_k(scores, labels, groups, k)
    assert len(auc) == len(imp_mrr) == len(ndcg) == len(names)
    for g, name in enumerate(names):
        pairs = [(s, bool(y)) for s, y, h in zip(scores, labels, groups, strict=True) if h == name]
        assert same(auc[g], bf_auc(pairs))
        assert same(imp_mrr[g], bf_impression_mrr(pairs))
        assert same(ndcg[g], bf_impression_ndcg(pairs, k))


def test_impression_auc_closed_forms():
    groups = np.array([1, 1, 1, 1, 2, 2, 3, 3])
    scores = np.array([0.9, 0.1, 0.2, 0.3, 0.5, 0.5, 0.4, 0.2])
    labels = np.array([1, 0, 0, 0, 1, 0, 0, 0])
    auc = impression_auc(scores, labels, groups)
    assert auc[0] == 1.0 and auc[1] == 0.5 and math.isnan(auc[2])  # group 3 has no click


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 10), st.integers(1, 5), st.integers(0, 2**31))
def test_preference_metrics_match_brute_force(n_pairs, n_neg, seed):
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, 3, n_pairs).astype(np.float64)
    rejected = rng.integers(0, 3, (n_pairs, n_neg)).astype(np.float64)
    mask = rng.random((n_pairs, n_neg)) < 0.7
    acc, margin = [], []
    for p in range(n_pairs):
        valid = [rejected[p, j] for j in range(n_neg) if mask[p, j]]
        if valid:
            acc.append(sum(chosen[p] > r for r in valid) / len(valid))
            margin.append(sum(chosen[p] - r for r in valid) / len(valid))
    expected_acc = sum(acc) / len(acc) if acc else math.nan
    expected_margin = sum(margin) / len(margin) if margin else math.nan
    assert same(preference_accuracy(chosen, rejected, mask), expected_acc)
    assert same(reward_margin_mean(chosen, rejected, mask), expected_margin)


def test_preference_accuracy_without_mask_and_ties():
    assert preference_accuracy(np.array([1.0, 1.0]), np.array([[0.0, 2.0], [1.0, 1.0]])) == 0.25


def test_perfect_model_scores_one():
    rng = np.random.default_rng(0)
    target = rng.integers(1, 1000, 200)
    ranked = np.column_stack([target, rng.integers(1000, 2000, (200, 9))])
    for values in (
        hit_rate_at_k(ranked, target, 10),
        ndcg_at_k(ranked, target, 10),
        mrr(ranked, target),
    ):
        assert (values == 1.0).all()
    report = ranking_metrics(ranked, target, [1, 10])
    assert report["hr_at_1"] == report["ndcg_at_10"] == report["mrr_at_10"] == 1.0
    assert report["users"] == 200 and report["users_excluded"] == 0


def test_random_ranking_hit_rate_is_k_over_n():
    rng = np.random.default_rng(1)
    n_real, n_users, k = 500, 4000, 20
    ranked = np.stack([rng.permutation(np.arange(1, n_real + 1))[:k] for _ in range(n_users)])
    target = rng.integers(1, n_real + 1, n_users)
    hr, _ = user_mean(hit_rate_at_k(ranked, target, k))
    # Binomial standard error sqrt(p(1-p)/U) ~ 0.0031; allow ~4 of them.
    assert abs(hr - k / n_real) < 0.013
    # E[NDCG@k] = (1/N) sum_{r<k} 1/log2(r+2) for a uniformly placed target.
    expected_ndcg = sum(1 / math.log2(r + 2) for r in range(k)) / n_real
    assert abs(user_mean(ndcg_at_k(ranked, target, k))[0] - expected_ndcg) < 0.006


def test_users_without_relevant_items_are_excluded_and_counted():
    ranked = np.array([[1, 2], [3, 4], [5, 6]])
    relevant = [{2}, set(), {9}]
    hr = hit_rate_at_k(ranked, relevant, 2)
    assert hr[0] == 1.0 and math.isnan(hr[1]) and hr[2] == 0.0
    assert user_mean(hr) == (0.5, 1)
    assert ranking_metrics(ranked, relevant, [2])["users_excluded"] == 1
    # Arrays work like sets: duplicates and negative fillers do not count as relevant items.
    as_arrays = [np.array([2, 2, -1]), np.array([-1]), np.array([9, 6])]
    np.testing.assert_array_equal(recall_at_k(ranked, as_arrays, 2), [1.0, np.nan, 0.5])


def test_k_out_of_range_raises():
    ranked = np.array([[1, 2, 3]])
    for fn in (hit_rate_at_k, recall_at_k, ndcg_at_k):
        with pytest.raises(ValueError, match="k must be"):
            fn(ranked, np.array([1]), 4)
    with pytest.raises(ValueError, match="targets"):
        hit_rate_at_k(ranked, np.array([1, 2]), 1)


def test_bootstrap_ci_covers_known_difference_and_is_seeded():
    rng = np.random.default_rng(7)
    a = rng.random(1000)
    b = a + rng.normal(0.05, 0.1, 1000)
    mean, lo, hi = paired_bootstrap_ci(a, b, n_resamples=1000, seed=3)
    assert lo < 0.05 < hi and lo > 0
    assert math.isclose(mean, float(np.mean(b - a)))
    # Standard error 0.1 / sqrt(1000) ~ 0.0032: a 95% interval is ~ +-0.0062 wide.
    assert 0.009 < hi - lo < 0.016
    assert paired_bootstrap_ci(a, b, seed=3) == (mean, lo, hi)
    assert paired_bootstrap_ci(a, b, seed=4) != (mean, lo, hi)
    # Chunked resampling (tiny memory bound) gives a statistically equivalent interval.
    _, lo_c, hi_c = paired_bootstrap_ci(a, b, seed=3, chunk_elements=5000)
    assert abs(lo_c - lo) < 0.002 and abs(hi_c - hi) < 0.002


def test_bootstrap_is_paired_and_drops_nan_users():
    rng = np.random.default_rng(8)
    a = rng.normal(0, 1, 500)
    b = a + 0.01  # huge per-user noise, constant paired difference
    mean, lo, hi = paired_bootstrap_ci(a, b)
    assert math.isclose(mean, 0.01) and math.isclose(lo, 0.01) and math.isclose(hi, 0.01)
    a[:10] = np.nan
    assert paired_bootstrap_ci(a, b)[0] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="no user"):
        paired_bootstrap_ci(np.array([np.nan]), np.array([1.0]))
