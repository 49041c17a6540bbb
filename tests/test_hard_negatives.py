"""`reference_hard` negatives against a brute-force full-catalog ranking of the same model."""

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_dpo.data.datamodule import pair_examples
from recsys_dpo.models import build_model
from recsys_dpo.retrieval.hard_negatives import reference_hard_negatives

N_ITEMS = 40  # 39 real items


def random_rows(seed: int, n_rows: int):
    """Pair rows with random contexts and chosen items, and per-row random excluded items."""
    rng = np.random.default_rng(seed)
    frame = pl.DataFrame(
        {"user_idx": rng.integers(0, 5, n_rows).tolist(),
         "context": [rng.integers(1, N_ITEMS, rng.integers(1, 6)).tolist() for _ in range(n_rows)],
         "chosen": rng.integers(1, N_ITEMS, n_rows).tolist(),
         "rejected": [[1]] * n_rows, "weight": [1.0] * n_rows},
        schema={"user_idx": pl.Int32, "context": pl.List(pl.Int32), "chosen": pl.Int32,
                "rejected": pl.List(pl.Int32), "weight": pl.Float32},
    )  # fmt: skip
    exclude = [rng.choice(np.arange(1, N_ITEMS), rng.integers(0, 30), replace=False)
               for _ in range(n_rows)]  # fmt: skip
    return pair_examples(frame, max_len=6, max_negatives=None), exclude


def brute_force_rankings(reference, rows, exclude) -> list[tuple[list[int], set[int]]]:
    """Per row, by enumeration: the reference's ranking of every item neither chosen nor
    excluded (score descending, ties by item id), and that row's banned items."""
    batch = rows.__getitems__(list(range(len(rows))))
    with torch.no_grad():
        scores = reference.full_scores(batch).double()
    out = []
    for row in range(len(rows)):
        banned = set(exclude[row].tolist()) | {int(batch["chosen"][row])}
        allowed = [i for i in range(1, N_ITEMS) if i not in banned]
        out.append((sorted(allowed, key=lambda i: (-scores[row, i].item(), i)), banned))
    return out


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 1000),
    num=st.integers(1, 8),
    skip=st.integers(0, 3),
    model=st.sampled_from(["sasrec", "two_tower"]),
)
def test_reference_hard_is_the_top_of_the_unexcluded_catalog(seed, num, skip, model):
    torch.manual_seed(seed)
    config = {"n_items": N_ITEMS, "n_users": 5, "dim": 8, "max_len": 6}
    reference = build_model(model, **config).eval()
    rows, exclude = random_rows(seed, 25)
    got = reference_hard_negatives(reference, rows, exclude, num, skip, batch_size=7)
    for row, (ranking, _) in enumerate(brute_force_rankings(reference, rows, exclude)):
        want = ranking[skip : skip + num]
        want += [0] * (num - len(want))  # fewer candidates than asked: padding
        assert got[row].tolist() == want


def test_reference_hard_refuses_impossible_settings():
    reference = build_model("two_tower", n_items=N_ITEMS, n_users=5, dim=8, max_len=6)
    rows, exclude = random_rows(0, 3)
    with pytest.raises(ValueError, match="need num_negatives >= 1 and skip >= 0"):
        reference_hard_negatives(reference, rows, exclude, 0)
    with pytest.raises(ValueError, match="need num_negatives >= 1 and skip >= 0"):
        reference_hard_negatives(reference, rows, exclude, 2, skip=-1)
    with pytest.raises(ValueError, match="leaves no room"):
        reference_hard_negatives(reference, rows, exclude, N_ITEMS - 3, skip=2)
    with pytest.raises(ValueError, match="exclude has 2 rows for 3 pairs"):
        reference_hard_negatives(reference, rows, exclude[:2], 2)


def test_rows_with_fewer_candidates_than_asked_are_padded():
    torch.manual_seed(0)
    reference = build_model("sasrec", n_items=N_ITEMS, n_users=5, dim=8, max_len=6).eval()
    rows, _ = random_rows(1, 2)
    chosen = rows.__getitems__([0, 1])["chosen"].tolist()
    keep = [[i for i in range(1, N_ITEMS) if i != c][:2] for c in chosen]  # 2 items left
    exclude = [np.array([i for i in range(1, N_ITEMS) if i not in k]) for k in keep]
    got = reference_hard_negatives(reference, rows, exclude, 5)
    for row, left in enumerate(keep):
        assert sorted(got[row, :2].tolist()) == left and got[row, 2:].tolist() == [0, 0, 0]


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 1000),
    lo=st.integers(1, 6),
    extra=st.integers(0, 8),
    num=st.integers(1, 5),
    model=st.sampled_from(["sasrec", "two_tower"]),
)
def test_band_negatives_come_from_the_band_of_the_brute_force_ranking(seed, lo, extra, num, model):
    """Every drawn negative's 1-based rank among the unexcluded items is in [lo, hi]; never the
    chosen item nor an excluded positive; distinct; in rank order; seeded and reproducible."""
    hi = lo + max(extra, num - 1)
    torch.manual_seed(seed)
    config = {"n_items": N_ITEMS, "n_users": 5, "dim": 8, "max_len": 6}
    reference = build_model(model, **config).eval()
    rows, exclude = random_rows(seed, 25)
    got = reference_hard_negatives(reference, rows, exclude, num, band=(lo, hi), seed=seed,
                                   batch_size=7)  # fmt: skip
    again = reference_hard_negatives(reference, rows, exclude, num, band=(lo, hi), seed=seed,
                                     batch_size=25)  # fmt: skip
    assert torch.equal(got, again)  # same seed, other batch size: same draw
    for row, (ranking, banned) in enumerate(brute_force_rankings(reference, rows, exclude)):
        rank = {item: r + 1 for r, item in enumerate(ranking)}
        in_band = [i for i in ranking if lo <= rank[i] <= hi]
        drawn = [i for i in got[row].tolist() if i != 0]
        assert len(drawn) == min(num, len(in_band))  # padding only when the band runs out
        assert got[row].tolist() == drawn + [0] * (num - len(drawn))
        assert all(lo <= rank[i] <= hi for i in drawn) and not banned & set(drawn)
        assert [rank[i] for i in drawn] == sorted({rank[i] for i in drawn})


def test_band_draws_vary_with_the_seed_and_skip_is_the_full_band():
    torch.manual_seed(0)
    reference = build_model("sasrec", n_items=N_ITEMS, n_users=5, dim=8, max_len=6).eval()
    rows, exclude = random_rows(3, 25)
    draws = {seed: reference_hard_negatives(reference, rows, exclude, 3, band=(3, 12), seed=seed)
             for seed in (0, 1)}  # fmt: skip
    assert not torch.equal(draws[0], draws[1])
    full = reference_hard_negatives(reference, rows, exclude, 4, band=(3, 6), seed=5)
    assert torch.equal(full, reference_hard_negatives(reference, rows, exclude, 4, skip=2))
    with pytest.raises(ValueError, match="needs 1 <= lo <= hi, room for 5 negatives"):
        reference_hard_negatives(reference, rows, exclude, 5, band=(3, 6))
    with pytest.raises(ValueError, match="skip = 0"):
        reference_hard_negatives(reference, rows, exclude, 2, skip=1, band=(3, 6))
