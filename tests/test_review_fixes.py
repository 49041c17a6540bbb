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
from test_evaluator import N_USERS, TableModel, click_log, prepare
from test_objectives import PARAMS
from test_training import write_prepared

from recsys_dpo.data.datamodule import (
    PairDataModule,
    SequenceDataModule,
    load_prepared,
    pair_examples,
)
from recsys_dpo.data.prepare import prepare_dataset
from recsys_dpo.data.splits import leave_one_out
from recsys_dpo.data.vocab import Vocab, build_vocab, encode
from recsys_dpo.errors import DataError
from recsys_dpo.evaluation.evaluator import build_queries, compare, evaluate, listed_targets
from recsys_dpo.evaluation.report import topk_frame
from recsys_dpo.export.bundle import load_bundle, write_bundle
from recsys_dpo.models import SASRec, TwoTower
from recsys_dpo.objectives import preference
from recsys_dpo.pipeline import user_histories
from recsys_dpo.retrieval.hard_negatives import reference_hard_negatives
from recsys_dpo.retrieval.seen import removed_items
from recsys_dpo.training.ranking_eval import ranking_metrics, target_rank, target_ranks

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


@pytest.mark.parametrize("name", sorted(preference.LOSSES))
def test_losses_never_send_gradient_into_the_reference(name):
    inputs = _ref_inputs()
    out = preference.LOSSES[name](**inputs, **PARAMS[name])
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


def prepare_frame(log: pl.DataFrame, out):
    """`log` through the real prepare stage, leave-one-out (test_evaluator's settings)."""
    prepare_dataset(
        log.lazy(), source="hand-made", out_dir=out,
        validation={"drop_duplicates": True, "min_events_per_user": 3}, split={"kind": "loo"},
        pairs={"next_item": {"num_negatives": 3, "max_context": 10}}, progress=False,
    )  # fmt: skip
    return load_prepared(out)


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
    _pairs_of([(0, 1, 1)], [0]).drop("seq").write_parquet(pair_root / "pairs_train.parquet")
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


# --------------------------------------------------------------------------- c. ties, vocab


def test_target_ranks_closed_form_with_tied_targets_and_a_removed_one():
    inf = float("-inf")
    scores = torch.tensor([[inf, 3.0, 3.0, 3.0, 1.0, 5.0]])
    # Targets 2 and 3 tie with item 1: pessimistic, item 5 and item 1 go first, then 2, 3.
    # Target 4 is removed as seen: rank N = 6, a miss.
    ranks = target_ranks(scores, torch.tensor([[2, 3, 4]]), seen=torch.tensor([[4, 0]]))
    assert ranks.tolist() == [[2, 3, 6]]
    assert target_rank(scores, torch.tensor([2])).tolist() == [3]  # items 1, 3, 5 first


def _tie_model(data) -> TableModel:
    """s(u, i) = i % 3 for every user: three score levels, so most items tie."""
    items = (torch.arange(data.n_items) % 3).float().unsqueeze(1)
    return TableModel(torch.ones(data.n_users, 1), items)


def _closed_form_ranks(data, split: str, seen: str) -> dict[int, int]:
    """user -> the target's pessimistic rank among the real items the seen policy leaves."""
    before = ["train"] if split == "valid" else ["train", "valid"]
    history = pl.concat([data.events(s) for s in before]).filter(pl.col("clicked"))
    held = data.events(split).filter(pl.col("clicked"))
    out = {}
    for user, target in held.select("user_idx", "item_idx").iter_rows():
        mine = set(history.filter(pl.col("user_idx") == user)["item_idx"])
        removed = mine if seen == "remove" else set()
        if target in removed:
            out[user] = data.n_items  # removed: a miss
            continue
        level = target % 3
        out[user] = sum(
            1 for i in range(1, data.n_items) if i != target and i not in removed and i % 3 >= level
        )
    return out


@pytest.mark.parametrize("seen", ["remove", "keep"])
def test_training_validation_and_evaluator_agree_on_ties_in_closed_form(small, seen):
    model, ks = _tie_model(small), [5, 20]
    rank = _closed_form_ranks(small, "valid", seen)
    users = sorted(rank)
    want = {k: np.array([rank[u] < k for u in users], dtype=float) for k in ks}
    result = evaluate(model, small, "valid", k=ks, seen=seen).per_user.sort("user_idx")
    assert result["user_idx"].to_list() == users
    datamodule = SequenceDataModule(small.path, max_len=10, batch_size=10_000, seen=seen)
    datamodule.setup()
    batch = next(iter(datamodule.val_dataloader()))
    order = batch["user_idx"].argsort()
    assert batch["user_idx"][order].tolist() == users
    for k in ks:
        ndcg = want[k] / np.log2(np.array([rank[u] for u in users]) + 2.0)
        trained = ranking_metrics(model, batch, k)
        np.testing.assert_array_equal(result[f"hr_at_{k}"].to_numpy(), want[k])
        np.testing.assert_allclose(result[f"ndcg_at_{k}"].to_numpy(), ndcg, rtol=1e-6)
        np.testing.assert_array_equal(trained[f"val/hr_at_{k}"][order].numpy(), want[k])
        np.testing.assert_allclose(trained[f"val/ndcg_at_{k}"][order].numpy(), ndcg, rtol=1e-6)
    assert 0 < want[20].mean() < 1  # ties decide some hits: the case is not trivial


def test_vocabulary_order_ignores_the_held_out_events(tmp_path):
    """Items are indexed by train popularity only: making one item the test target of every
    user (held out by leave-one-out) must not move any id."""
    log = click_log(N_USERS, 40, seed=0).collect()
    last = log.group_by("user_id").agg(pl.col("timestamp").max().alias("last"))
    hot = (
        log.join(last, on="user_id")
        .with_columns(
            pl.when(pl.col("timestamp") == pl.col("last"))
            .then(pl.lit("i39"))
            .otherwise(pl.col("item_id"))
            .alias("item_id")
        )
        .drop("last")
    )
    # i39 may already be one of a user's items: keep the log free of repeats for the split.
    hot = hot.unique(["user_id", "item_id"], keep="last", maintain_order=True)
    plain = log.join(hot.select("user_id", "timestamp"), on=["user_id", "timestamp"])
    a = prepare_frame(plain, tmp_path / "a")
    b = prepare_frame(hot, tmp_path / "b")
    assert a.events("train").equals(b.events("train"))
    assert not a.events("test").equals(b.events("test"))
    va = pl.read_parquet(a.path / "vocab_items.parquet")
    vb = pl.read_parquet(b.path / "vocab_items.parquet")
    assert va.equals(vb)


# --------------------------------------------------------------------------- e. seen policy


def test_removed_items_is_the_whole_history_or_nothing():
    history = np.array([5, 2, 5, 9])
    assert removed_items(history, "remove").tolist() == [2, 5, 9]
    assert removed_items(history, "keep").tolist() == []
    with pytest.raises(DataError, match="eval.seen='drop': expected one of remove, keep"):
        removed_items(history, "drop")


@pytest.fixture(scope="module")
def repeats(tmp_path_factory):
    """A repeat-consumption log: 8 clicks per user drawn with replacement from 12 items, so
    many test targets are items the user consumed before."""
    rng = np.random.default_rng(3)
    n_users, clicks = 150, 8
    log = pl.DataFrame({
        "user_id": np.repeat([f"u{u}" for u in range(n_users)], clicks),
        "item_id": [f"i{i}" for i in rng.integers(0, 12, n_users * clicks)],
        "timestamp": np.tile(np.arange(clicks), n_users) + 1_000,
    })  # fmt: skip
    return prepare_frame(log, tmp_path_factory.mktemp("repeats") / "prepared")


def _model(data, name: str = "sasrec") -> SASRec | TwoTower:
    torch.manual_seed(0)
    if name == "two_tower":
        return TwoTower(n_items=data.n_items, n_users=data.n_users, dim=8, max_len=10).eval()
    return SASRec(n_items=data.n_items, n_users=data.n_users, dim=8, n_layers=1, n_heads=1,
                  max_len=10).eval()  # fmt: skip


@pytest.mark.parametrize("name", ["sasrec", "two_tower"])
@pytest.mark.parametrize("seen", ["remove", "keep"])
def test_served_top_k_is_the_evaluated_top_k_for_every_test_user(repeats, tmp_path, seen, name):
    model, k = _model(repeats, name), 10
    result = evaluate(model, repeats, "test", k=[k], seen=seen)
    vocab = Vocab.load(repeats.path)
    topk = topk_frame(result, vocab)
    topk.write_parquet(tmp_path / "topk.parquet")
    bundle = load_bundle(write_bundle(tmp_path / "bundle", model, vocab, user_histories(repeats),
                                      tmp_path / "topk.parquet", "card", {"seen": seen}))  # fmt: skip
    queries = build_queries(repeats, "test", seen)
    removed = sum(np.isin(t, s).sum() for t, s in zip(queries.targets, queries.seen, strict=True))
    if seen == "remove":
        assert removed > 20  # the case the policies disagree on is common here
        assert result.counts["targets_removed_as_seen"] == removed
        hit = result.per_user["hr_at_10"].to_numpy()
        for row, (t, s) in enumerate(zip(queries.targets, queries.seen, strict=True)):
            if np.isin(t, s).all():
                assert hit[row] == 0.0  # a removed target is a guaranteed miss
    else:
        assert result.counts["targets_removed_as_seen"] == 0
    served = {user: [i for i, _ in bundle.recommend(user, k)] for user in bundle.histories}
    evaluated = {u: g.sort("rank")["item_id"].to_list()
                 for (u,), g in topk.group_by("user_id")}  # fmt: skip
    assert len(served) == len(evaluated) == len(queries)
    assert served == evaluated
    if name == "two_tower":  # its tower embeds the user id: a bare history has none
        with pytest.raises(DataError, match="embeds user ids"):
            bundle.recommend(["i1"], k)


@pytest.mark.parametrize("seen", ["remove", "keep"])
def test_reference_hard_negatives_follow_the_seen_policy(seen):
    torch.manual_seed(0)
    reference = SASRec(n_items=20, n_users=3, dim=8, n_layers=1, n_heads=1, max_len=4).eval()
    frame = pl.DataFrame(
        {"user_idx": [0, 1], "context": [[1, 2], [3]], "chosen": [4, 5], "rejected": [[6], [7]],
         "weight": [1.0, 1.0]},
        schema={"user_idx": pl.Int32, "context": pl.List(pl.Int32), "chosen": pl.Int32,
                "rejected": pl.List(pl.Int32), "weight": pl.Float32},
    )  # fmt: skip
    rows = pair_examples(frame, max_len=4, max_negatives=None)
    history = [np.array([1, 2, 8, 9]), np.array([3, 10])]
    got = reference_hard_negatives(reference, rows, history, 18 - 4 - 1, seen=seen)
    batch = rows.__getitems__([0, 1])
    with torch.no_grad():
        scores = reference.full_scores(batch)
    for row in range(2):
        banned = set(removed_items(history[row], seen).tolist()) | {int(batch["chosen"][row])}
        allowed = [i for i in range(1, 20) if i not in banned]
        want = sorted(allowed, key=lambda i: (-scores[row, i].item(), i))[: got.shape[1]]
        assert [i for i in got[row].tolist() if i] == want


def test_listed_targets_place_each_target_at_its_rank_and_drop_unretrieved_ones():
    ranks, targets = [np.array([0, 12]), np.array([3]), np.array([1])], [
        np.array([7, 9]), np.array([4]), np.array([5])]  # fmt: skip
    assert listed_targets(ranks, targets, 4).tolist() == [
        [7, -1, -1, -1], [-1, -1, -1, 4], [-1, 5, -1, -1]]  # fmt: skip
    retrieved = np.array([[7, 1, 2, 3], [4, 8, -1, -1], [9, 3, 2, 1]])
    # user 2's target 5 was not retrieved (an approximate index): a miss
    assert listed_targets(ranks, targets, 4, retrieved).tolist() == [
        [7, -1, -1, -1], [-1, -1, -1, 4], [-1, -1, -1, -1]]  # fmt: skip
