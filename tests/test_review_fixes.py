"""Regression tests of the review's findings (issue 11, point 6): each failed before its fix.

- max_pairs_per_user keeps each user's latest N events (all their pair rows), ties by row order;
- leave-one-out keeps an impression request whole;
- one tie policy (pessimistic) in training-time validation and in the evaluator, and a
  vocabulary ordered from the train split only;
- the preference losses detach the reference themselves;
- one seen-item policy (eval.seen) in evaluation, hard-negative mining and serving;
- the evaluator's pair margin is the unscaled log-ratio margin, named so.
"""

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_evaluator import TableModel, prepare
from test_training import write_prepared

from recsys_dpo.data.datamodule import PairDataModule
from recsys_dpo.data.splits import leave_one_out
from recsys_dpo.data.vocab import build_vocab, encode
from recsys_dpo.errors import DataError
from recsys_dpo.evaluation.evaluator import compare
from recsys_dpo.objectives import preference

# --------------------------------------------------------------------------- d. detach


def _ref_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    batch, k = 4, 3
    return {
        "policy_chosen": torch.randn(batch, generator=gen).requires_grad_(),
        "policy_rejected": torch.randn(batch, k, generator=gen).requires_grad_(),
        "ref_chosen": torch.randn(batch, generator=gen).requires_grad_(),
        "ref_rejected": torch.randn(batch, k, generator=gen).requires_grad_(),
    }


LOSS_PARAMS = {
    "dpo": {"beta": 0.5},
    "cdpo": {"beta": 0.5, "label_smoothing": 0.1},
    "robust": {"beta": 0.5, "label_smoothing": 0.1},
    "ipo": {"beta": 0.5},
    "hinge": {"beta": 0.5},
    "sdpo": {"beta": 0.5},
    "simpo": {"beta": 0.5, "gamma": 0.3},
    "kto": {"beta": 0.5, "kl_ref": torch.tensor(0.2)},
    "sft": {"beta": 0.5},
}


@pytest.mark.parametrize("name", sorted(preference.LOSSES))
def test_losses_never_send_gradient_into_the_reference(name):
    inputs = _ref_inputs()
    out = preference.LOSSES[name](**inputs, **LOSS_PARAMS[name])
    # The policy term keeps the graph alive even for losses that are 0 (sft).
    (out.loss + inputs["policy_chosen"].sum()).backward()
    assert inputs["ref_chosen"].grad is None and inputs["ref_rejected"].grad is None
    assert inputs["policy_chosen"].grad is not None


def test_unpaired_kto_never_sends_gradient_into_the_reference():
    policy = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    ref = torch.tensor([-1.2, -1.5, -0.7], requires_grad=True)
    out = preference.kto(policy, ref, torch.tensor([True, False, True]), torch.tensor(0.1), 0.5)
    out.loss.backward()
    assert ref.grad is None and policy.grad is not None and np.isfinite(policy.grad).all()


# --------------------------------------------------------------------------- f. margin


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A hand-made click log prepared by the real prepare stage (test_evaluator's)."""
    return prepare(tmp_path_factory.mktemp("small") / "prepared", n_items=40)


def test_compare_reports_the_unscaled_log_ratio_margin(small):
    gen = torch.Generator().manual_seed(0)
    users, items = torch.randn(small.n_users, 4, generator=gen), torch.randn(small.n_items, 4)
    shift = torch.randn(small.n_items, 4, generator=gen)
    reference, policy = TableModel(users, items), TableModel(users, items + shift)
    result = compare(policy, reference, small, "test", k=[5], n_resamples=50)
    pairs = small.pairs("test")
    u = users[pairs["user_idx"].to_numpy()].numpy()
    ratio = u @ shift.numpy().T  # s_pol - s_ref of every item, per pair row
    rows = np.arange(pairs.height)
    chosen = ratio[rows, pairs["chosen"].to_numpy()]
    margins = [
        np.mean(chosen[r] - ratio[r, rejected])
        for r, rejected in enumerate(pairs["rejected"].to_list())
    ]
    assert result.aggregates["log_ratio_margin"] == pytest.approx(np.mean(margins), rel=1e-5)
    assert "reward_margin" not in result.aggregates


# --------------------------------------------------------------------------- a. latest events

# (user, timestamp, pair rows) per event; few users and timestamps, so ties are common.
EVENTS = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(1, 3)), min_size=1, max_size=25
)


@pytest.fixture(scope="module")
def pair_root(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("pairs") / "prepared", n_users=4)


def _pairs_of(events: list[tuple[int, int, int]], order: list[int]) -> pl.DataFrame:
    """One pair row per (event, source); `weight` names the row, seq is the event's log row."""
    rows = [(u, t, seq) for seq, (u, t, n) in enumerate(events) for _ in range(n)]
    rows = [rows[i] for i in order if i < len(rows)]  # order: a permutation of range(75)
    users, times, seqs = zip(*rows, strict=True)
    return pl.DataFrame(
        {"user_idx": users, "context": [[1]] * len(rows), "chosen": [2] * len(rows),
         "rejected": [[3]] * len(rows), "weight": [float(i + 1) for i in range(len(rows))],
         "source": ["next_item"] * len(rows), "timestamp": times, "seq": seqs},
        schema={"user_idx": pl.Int32, "context": pl.List(pl.Int32), "chosen": pl.Int32,
                "rejected": pl.List(pl.Int32), "weight": pl.Float32, "source": pl.Utf8,
                "timestamp": pl.Int64, "seq": pl.Int64},
    )  # fmt: skip


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(events=EVENTS, n=st.integers(1, 4), order=st.permutations(range(75)))
def test_max_pairs_per_user_keeps_all_rows_of_the_latest_events(pair_root, events, n, order):
    pairs = _pairs_of(events, order)
    pairs.write_parquet(pair_root / "pairs_train.parquet")
    data = PairDataModule(pair_root, max_len=4, batch_size=10_000, max_pairs_per_user=n)
    data.setup()
    got = sorted(next(iter(data.train_dataloader()))["weight"].tolist())
    # Brute force: per user, the events sorted by (timestamp, seq), the last n kept.
    want = []
    for user in set(pairs["user_idx"]):
        mine = pairs.filter(pl.col("user_idx") == user)
        latest = sorted(set(zip(mine["timestamp"], mine["seq"], strict=True)))[-n:]
        want += [w for t, q, w in mine.select("timestamp", "seq", "weight").iter_rows()
                 if (t, q) in latest]  # fmt: skip
    assert got == sorted(want)


def test_max_pairs_per_user_refuses_pairs_without_seq(pair_root):
    _pairs_of([(0, 1, 1)], []).drop("seq").write_parquet(pair_root / "pairs_train.parquet")
    with pytest.raises(DataError, match="pairs_train.parquet: the pairs have no seq column"):
        PairDataModule(pair_root, max_pairs_per_user=1).setup()


# --------------------------------------------------------------------------- b. loo requests


@st.composite
def request_logs(draw: st.DrawFn) -> pl.DataFrame:
    """Small impression logs: each user's rows in a few requests (or none), few timestamps
    (many ties), clicks and impressions mixed, seq a permutation (the tie-break)."""
    n = draw(st.integers(1, 40))
    row = st.tuples(
        st.sampled_from(["u1", "u2", "u3"]),
        st.sampled_from(["a", "b", "c", "d", "e"]),
        st.integers(0, 4),
        st.booleans(),
        st.sampled_from(["r1", "r2", "r3", "r4", None]),
    )
    rows = draw(st.lists(row, min_size=n, max_size=n))
    rows = [(u, i, t, c, None if r is None else f"{u}/{r}") for u, i, t, c, r in rows]
    df = pl.DataFrame(
        rows, schema=["user_id", "item_id", "timestamp", "clicked", "request_id"], orient="row"
    )
    seq = draw(st.permutations(list(range(n))))
    return df.with_columns(pl.Series("seq", seq, dtype=pl.Int64))


def _expected_loo(rows: list[dict]) -> list[str]:
    """Brute force for one user: units (a request, or a row outside requests) by their first
    row's (timestamp, seq); the last unit with a click is test, the one before valid."""
    key = [(r["timestamp"], r["seq"]) for r in rows]
    unit = [r["request_id"] or ("row", i) for i, r in enumerate(rows)]
    start = {u: min(k for k, v in zip(key, unit, strict=True) if v == u) for u in unit}
    clicked = sorted({start[u] for u, r in zip(unit, rows, strict=True) if r["clicked"]})
    if len(clicked) < 3:
        return ["train"] * len(rows)
    return [
        "test" if start[u] >= clicked[-1] else "valid" if start[u] >= clicked[-2] else "train"
        for u in unit
    ]


@settings(max_examples=80, deadline=None)
@given(request_logs())
def test_leave_one_out_keeps_each_request_whole(df):
    out = leave_one_out(encode(df, build_vocab(df)))
    assert out.select(df.columns).equals(df)
    requests = out.filter(pl.col("request_id").is_not_null()).group_by("request_id")
    assert requests.agg(pl.col("split").n_unique())["split"].max() in (None, 1)
    rank = {"train": 0, "valid": 1, "test": 2}
    for user in df["user_id"].unique():
        rows = out.filter(pl.col("user_id") == user)
        assert rows["split"].to_list() == _expected_loo(rows.to_dicts())
        # No future leakage: every click of a later split starts a later unit.
        start = rows.with_columns(
            pl.when(pl.col("request_id").is_null())
            .then(pl.struct("timestamp", "seq"))
            .otherwise(pl.struct("timestamp", "seq").sort().first().over("request_id"))
            .alias("start")
        ).filter(pl.col("clicked"))
        starts = [
            (s["timestamp"], s["seq"], rank[x]) for s, x in start.select("start", "split").rows()
        ]
        assert [x for *_, x in sorted(starts)] == sorted(x for *_, x in starts)
