"""The train-only false-negative share against a brute-force count over the events."""

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_dpo.training.false_negatives import (
    false_negative_share,
    later_positive_hits,
    not_future_weights,
)


def random_log(seed: int):
    """Events of 4 users over 8 items with tied timestamps (seq breaks ties), and pair rows
    at some of those events with random rejected items (0 = padding)."""
    rng = np.random.default_rng(seed)
    n = 60
    events = pl.DataFrame({
        "user_idx": rng.integers(0, 4, n), "item_idx": rng.integers(1, 9, n),
        "clicked": rng.random(n) < 0.6, "timestamp": rng.integers(0, 6, n),
        "seq": rng.permutation(n),
    })  # fmt: skip
    at = rng.choice(n, 15, replace=False)
    pairs = events[at].select("user_idx", "timestamp", "seq")
    rejected = torch.from_numpy(rng.integers(0, 9, (15, 3)))
    return events, pairs, rejected


def brute_force(events: pl.DataFrame, pairs: pl.DataFrame, rejected: torch.Tensor) -> list:
    clicks = [e for e in events.iter_rows(named=True) if e["clicked"]]
    out = []
    for row, pair in enumerate(pairs.iter_rows(named=True)):
        out.append([
            item != 0 and any(
                e["user_idx"] == pair["user_idx"] and e["item_idx"] == item
                and (e["timestamp"], e["seq"]) > (pair["timestamp"], pair["seq"])
                for e in clicks
            )
            for item in rejected[row].tolist()
        ])  # fmt: skip
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_later_positive_hits_match_a_brute_force_count(seed):
    events, pairs, rejected = random_log(seed)
    hits = later_positive_hits(pairs, rejected, events)
    want = brute_force(events, pairs, rejected)
    assert hits.tolist() == want
    real = int((rejected != 0).sum())
    assert false_negative_share(hits, rejected) == pytest.approx(sum(map(sum, want)) / real)


def test_a_click_at_the_same_time_counts_only_when_its_row_comes_later():
    events = pl.DataFrame({"user_idx": [0, 0, 1], "item_idx": [5, 6, 5],
                           "clicked": [True, True, True], "timestamp": [10, 10, 30],
                           "seq": [1, 3, 0]})  # fmt: skip
    pairs = pl.DataFrame({"user_idx": [0], "timestamp": [10], "seq": [2]})
    # item 5: clicked at seq 1 (before); item 6: seq 3 (after); item 7 never; 0 padding;
    # user 1's later click on 5 is another user's.
    hits = later_positive_hits(pairs, torch.tensor([[5, 6, 7, 0]]), events)
    assert hits.tolist() == [[False, True, False, False]]
    assert false_negative_share(hits, torch.tensor([[5, 6, 7, 0]])) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="1 pair rows for 2 rejected rows"):
        later_positive_hits(pairs, torch.tensor([[5], [6]]), events)


def test_not_future_weights_closed_form():
    """Scores e^s = 1, 2, 3, 1 for items 1..4; item 3 removed (the chosen one), so the
    candidates {1, 2, 4} have Z = 4: pi = 1/4, 1/2, 1/4. The removed item 3 takes pi over the
    candidates plus itself, 3/7. w = (1 - pi)^H; padding gets 1."""
    logits = torch.log(torch.tensor([[50.0, 1.0, 2.0, 3.0, 1.0]], dtype=torch.float64))
    removed = torch.tensor([[False, False, False, True, False]])
    rejected = torch.tensor([[1, 2, 4, 3, 0]])
    got = not_future_weights(logits, rejected, removed, horizon=2.0)
    want = [(3 / 4) ** 2, (1 / 2) ** 2, (3 / 4) ** 2, (4 / 7) ** 2, 1.0]
    assert got[0].tolist() == pytest.approx(want, rel=1e-6)
    half = not_future_weights(logits, rejected, removed, horizon=0.5)
    assert half[0, 1].item() == pytest.approx(0.5**0.5, rel=1e-6)


def test_not_future_weights_at_horizon_zero_are_one_and_fall_with_the_horizon():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 30, generator=gen) * 3
    removed = torch.rand(4, 30, generator=gen) < 0.3
    rejected = torch.randint(0, 30, (4, 6), generator=gen)
    assert torch.equal(not_future_weights(logits, rejected, removed, 0.0), torch.ones(4, 6))
    real = rejected != 0
    near, far = (not_future_weights(logits, rejected, removed, h) for h in (1.0, 10.0))
    assert ((far <= near) & (near <= 1) & (far > 0))[real].all()
    with pytest.raises(ValueError, match="horizon must be >= 0"):
        not_future_weights(logits, rejected, removed, -1.0)
