"""Slot marginals of the stochastic ranking policies against brute-force enumeration of every
slate, closed forms and the synthetic log's own sampler."""

import itertools

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from recsys_dpo.data.synthetic import SyntheticConfig, _sample_slates, simulate
from recsys_dpo.ranking_policy import (
    RankingPolicy,
    epsilon_greedy_marginals,
    plackett_luce_marginals,
)


def brute_force_pl(logits: np.ndarray, k: int) -> np.ndarray:
    """P(i at p) [N, k] by summing the probability of every ordered k-slate."""
    n = len(logits)
    w = np.where(np.isfinite(logits), np.exp(logits - logits[np.isfinite(logits)].max()), 0.0)
    out = np.zeros((n, k))
    for slate in itertools.permutations(range(n), k):
        p = 1.0
        for slot, item in enumerate(slate):
            # The weights left summed afresh: subtracting the placed ones from the total loses
            # a tiny item's weight next to large ones (hypothesis found logits [-10.5, 8, 8]).
            left = w[[j for j in range(n) if j not in slate[:slot]]].sum()
            p *= w[item] / left if left > 0 else 0.0
        for slot, item in enumerate(slate):
            out[item, slot] += p
    return out


@settings(max_examples=40, deadline=None)
@given(
    logits=arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(3, 6)),
                  elements=st.floats(-12, 12)),
    k=st.integers(1, 3),
    hole=st.booleans(),
)
@example(logits=np.array([[-10.5, 8.0, 8.0]]), k=3, hole=False)
def test_plackett_luce_marginals_equal_enumeration(logits, k, hole):
    if hole and logits.shape[1] > k:
        logits = logits.copy()
        logits[:, 0] = -np.inf  # an ineligible item
    got = plackett_luce_marginals(logits, k)
    want = np.stack([brute_force_pl(row, k) for row in logits])
    np.testing.assert_allclose(got, want, rtol=2e-8, atol=1e-300)


def test_plackett_luce_first_slot_is_the_softmax_and_slots_sum_to_one():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 40)) * 3
    marginals = plackett_luce_marginals(logits, 5)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(marginals[:, :, 0], softmax, rtol=1e-8)
    np.testing.assert_allclose(marginals.sum(axis=1), 1.0, rtol=1e-8)  # each slot holds one item
    assert (marginals.sum(axis=2) <= 1 + 1e-9).all()  # an item takes at most one slot


def test_asked_items_equal_the_full_table():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 30))
    items = rng.integers(0, 30, (3, 7))
    full = plackett_luce_marginals(logits, 4)
    np.testing.assert_allclose(plackett_luce_marginals(logits, 4, items),
                               np.take_along_axis(full, items[:, :, None], axis=1), rtol=1e-12)


def test_the_synthetic_sampler_draws_the_marginals():
    """Slot frequencies of 40,000 slates from the generator's own sampler match the marginals
    within 5 binomial standard errors."""
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(1, 12)) * 1.5
    draws = 40_000
    slates = _sample_slates(logits, np.zeros(draws, dtype=np.int64), 4, rng, n_draws=16)
    freq = np.zeros((12, 4))
    np.add.at(freq, (slates, np.broadcast_to(np.arange(4), slates.shape)), 1.0 / draws)
    p = plackett_luce_marginals(logits, 4)[0]
    z = np.abs(freq - p) / np.sqrt(p * (1 - p) / draws + 1e-12)
    assert z.max() < 5


def test_synthetic_propensities_are_the_logging_policys_marginals():
    truth, events = simulate(SyntheticConfig(n_users=30, n_items=25, slate_size=4, dim=4))
    users = np.array([truth.user_index[u] for u in events["user_id"]])
    items = np.array([truth.item_index[i] for i in events["item_id"]])
    logits = truth.logging_logits(np.arange(len(truth.user_index)))
    marginals = plackett_luce_marginals(logits, 4)
    want = marginals[users, items, events["position"].to_numpy()]
    np.testing.assert_allclose(events["propensity"].to_numpy(), want, rtol=1e-12)
    assert ((events["propensity"] > 0) & (events["propensity"] <= 1)).all()


def test_epsilon_greedy_closed_form():
    scores = np.array([[3.0, 1.0, 2.0, -np.inf, 2.0]])
    got = epsilon_greedy_marginals(scores, 2, 0.2)[0]
    # top-2: item 0, then items 2 and 4 tie at 2.0: the lower index first (item 2).
    want = np.full((5, 2), 0.2 / 4)
    want[3] = 0.0
    want[0, 0] += 0.8
    want[2, 1] += 0.8
    np.testing.assert_allclose(got, want)
    np.testing.assert_allclose(got.sum(axis=0), 1.0)


def test_policy_settings_are_checked():
    with pytest.raises(ValueError, match="expected one of"):
        RankingPolicy("softmax")
    with pytest.raises(ValueError, match="epsilon"):
        RankingPolicy(epsilon=1.5)
    with pytest.raises(ValueError, match="at least k eligible"):
        plackett_luce_marginals(np.array([[0.0, -np.inf]]), 2)
