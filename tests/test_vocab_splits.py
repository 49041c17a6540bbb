"""Vocab, splits and histories: hand cases with known answers and hypothesis invariants."""

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_dpo.data.schema import PAD_ITEM
from recsys_dpo.data.sequences import user_histories
from recsys_dpo.data.splits import SPLITS, leave_one_out, split_frame, temporal
from recsys_dpo.data.vocab import Vocab, build_vocab, decode_items, encode
from recsys_dpo.errors import DataError

SETTINGS = settings(max_examples=40, deadline=None)


def frame(rows: list[tuple], request: bool = False) -> pl.DataFrame:
    """rows of (user_id, item_id, timestamp, clicked[, request_id]); seq = row order."""
    names = ["user_id", "item_id", "timestamp", "clicked"] + (["request_id"] if request else [])
    df = pl.DataFrame(rows, schema=names, orient="row")
    return df.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("seq"))


@st.composite
def logs(draw: st.DrawFn, with_requests: bool = False) -> pl.DataFrame:
    """Small random logs: few users and items, few distinct timestamps (many ties), and `seq`
    a random permutation so the tie-break is not the physical row order."""
    n = draw(st.integers(1, 40))
    row = st.tuples(
        st.sampled_from(["u1", "u2", "u3", "u10"]),
        st.sampled_from(["a", "b", "c", "d", "e", "f"]),
        st.integers(0, 4),
        st.booleans(),
    )
    rows = draw(st.lists(row, min_size=n, max_size=n))
    seq = draw(st.permutations(list(range(n))))
    df = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp", "clicked"], orient="row")
    df = df.with_columns(pl.Series("seq", seq, dtype=pl.Int64))
    if with_requests:
        requests = draw(st.lists(st.sampled_from(["r1", "r2", "r3", None]), min_size=n, max_size=n))
        df = df.with_columns(pl.Series("request_id", requests, dtype=pl.Utf8))
    return df


def encoded(df: pl.DataFrame) -> pl.DataFrame:
    return encode(df, build_vocab(df))


# ---------------------------------------------------------------- vocab


def test_vocab_orders_items_by_positive_count_then_id():
    df = frame(
        [
            ("u2", "b", 1, True),
            ("u1", "c", 2, True),
            ("u1", "b", 3, True),
            ("u2", "a", 4, True),
            ("u1", "z", 5, False),  # shown only: indexed after every clicked item
            ("u3", "c", 6, False),
        ]
    )
    vocab = build_vocab(df)
    assert vocab.items.rows() == [("b", 1, 2), ("a", 2, 1), ("c", 3, 1), ("z", 4, 0)]
    assert vocab.users.rows() == [("u1", 0), ("u2", 1), ("u3", 2)]
    assert (vocab.n_items, vocab.n_users) == (5, 3)


@SETTINGS
@given(logs())
def test_vocab_round_trips_and_is_contiguous(df):
    vocab = build_vocab(df)
    out = encode(df, vocab)
    assert out.columns == [*df.columns, "user_idx", "item_idx"]
    assert out.select(df.columns).equals(df)  # rows and their order kept
    assert decode_items(out["item_idx"].to_numpy(), vocab).to_list() == df["item_id"].to_list()
    users = dict(vocab.users.select("user_idx", "user_id").rows())
    assert [users[u] for u in out["user_idx"]] == df["user_id"].to_list()
    idx = np.sort(vocab.items["item_idx"].to_numpy())
    assert PAD_ITEM not in idx
    assert idx.tolist() == list(range(1, vocab.n_items))
    assert sorted(vocab.users["user_idx"]) == list(range(vocab.n_users))
    counts = vocab.items.sort("item_idx")["count"].to_list()
    assert counts == sorted(counts, reverse=True)


def test_vocab_save_load_and_padding_decode(tmp_path):
    df = frame([("u1", "a", 1, True), ("u2", "b", 2, False)])
    vocab = build_vocab(df)
    vocab.save(tmp_path)
    loaded = Vocab.load(tmp_path)
    assert loaded.items.equals(vocab.items) and loaded.users.equals(vocab.users)
    assert decode_items(pl.Series([0, 2, 1]), loaded).to_list() == [None, "b", "a"]
    with pytest.raises(DataError, match="0..2"):
        decode_items(np.array([3]), loaded)
    with pytest.raises(DataError, match="vocab_items.parquet"):
        Vocab.load(tmp_path / "missing")


def test_encode_names_unknown_ids():
    vocab = build_vocab(frame([("u1", "a", 1, True)]))
    new = frame([("u1", "x", 1, True), ("u1", "y", 2, True), ("u1", "a", 3, True)])
    with pytest.raises(DataError, match=r"item_id: 2 id\(s\).*'x', 'y'"):
        encode(new, vocab)


# ---------------------------------------------------------------- splits


def order_key(df: pl.DataFrame) -> list[tuple[int, int]]:
    return list(zip(df["timestamp"], df["seq"], strict=True))


@SETTINGS
@given(logs())
def test_leave_one_out_matches_brute_force(df):
    out = leave_one_out(encoded(df))
    assert out.height == df.height
    assert out.select(df.columns).equals(df)
    for user in df["user_id"].unique():
        rows = out.filter(pl.col("user_id") == user)
        keys = order_key(rows)
        positives = sorted(k for k, c in zip(keys, rows["clicked"], strict=True) if c)
        for key, split in zip(keys, rows["split"], strict=True):
            if len(positives) < 3:
                expected = "train"
            elif key >= positives[-1]:
                expected = "test"
            elif key >= positives[-2]:
                expected = "valid"
            else:
                expected = "train"
            assert split == expected
        if len(positives) >= 3:  # exactly one test and one valid positive: the last two
            held = rows.filter(pl.col("clicked") & (pl.col("split") != "train"))
            assert sorted(zip(order_key(held), held["split"], strict=True)) == [
                (positives[-2], "valid"),
                (positives[-1], "test"),
            ]


def test_leave_one_out_hand_case():
    df = frame(
        [
            ("u1", "a", 1, True),
            ("u1", "b", 5, True),
            ("u1", "x", 5, False),  # same time as b but logged after it: valid window
            ("u1", "c", 5, True),  # tie on time, later seq: the last positive
            ("u1", "y", 9, False),
            ("u2", "a", 1, True),
            ("u2", "b", 2, True),
        ]
    )
    assert leave_one_out(encoded(df))["split"].to_list() == [
        "train",
        "valid",
        "valid",
        "test",
        "test",
        "train",
        "train",
    ]


@SETTINGS
@given(logs(with_requests=True), st.floats(0, 0.45), st.floats(0, 0.45))
def test_temporal_orders_splits_in_time_and_keeps_requests_whole(df, valid_frac, test_frac):
    out = temporal(encoded(df), valid_frac=valid_frac, test_frac=test_frac)
    assert out.height == df.height and set(out["split"]) <= set(SPLITS)
    start = pl.when(pl.col("request_id").is_null()).then(pl.col("timestamp"))
    start = start.otherwise(pl.col("timestamp").min().over("request_id"))
    times = (
        out.with_columns(start.alias("t"))
        .group_by("split")
        .agg(pl.col("t").min().alias("lo"), pl.col("t").max().alias("hi"))
    )
    bounds = {s: (lo, hi) for s, lo, hi in times.rows()}
    present = [s for s in SPLITS if s in bounds]
    for before, after in zip(present, present[1:], strict=False):
        assert bounds[before][1] < bounds[after][0]
    per_request = out.filter(pl.col("request_id").is_not_null()).group_by("request_id")
    assert per_request.agg(pl.col("split").n_unique())["split"].max() in (None, 1)


def test_temporal_given_cuts_and_fractions():
    df = frame([("u1", str(t), t, True) for t in range(10)])
    out = temporal(encoded(df), valid_start=6, test_start=8)
    assert out["split"].to_list() == ["train"] * 6 + ["valid"] * 2 + ["test"] * 2
    out = temporal(encoded(df), valid_frac=0.3, test_frac=0.2)
    assert out["split"].to_list() == ["train"] * 5 + ["valid"] * 3 + ["test"] * 2
    assert set(temporal(encoded(df), valid_frac=0, test_frac=0)["split"]) == {"train"}


def test_temporal_uses_request_start():
    df = frame(
        [("u1", "a", 1, True, "r1"), ("u1", "b", 5, False, "r2"), ("u1", "c", 9, True, "r2")],
        request=True,
    )
    assert temporal(encoded(df), valid_start=3, test_start=7)["split"].to_list() == [
        "train",
        "valid",
        "valid",
    ]


def test_split_frame_dispatch_and_errors():
    df = encoded(frame([("u1", "a", t, True) for t in range(5)]))
    assert split_frame(df, "loo")["split"].to_list() == ["train"] * 3 + ["valid", "test"]
    assert split_frame(df, "temporal", valid_start=2, test_start=4)["split"][0] == "train"
    with pytest.raises(DataError, match="unknown"):
        split_frame(df, "random")
    with pytest.raises(DataError, match="train split is empty"):
        split_frame(df, "temporal", valid_start=0, test_start=3)
    with pytest.raises(DataError, match="valid_frac"):
        temporal(df, valid_frac=0.6, test_frac=0.5)


# ---------------------------------------------------------------- histories


def test_user_histories_in_event_order_per_split_and_truncated():
    df = frame(
        [
            ("u1", "a", 3, True),
            ("u1", "b", 1, True),
            ("u1", "c", 3, True),  # ties with a at t=3, logged later
            ("u1", "d", 2, False),
            ("u1", "e", 7, True),
            ("u2", "a", 4, True),
        ]
    )
    vocab = build_vocab(df)
    out = leave_one_out(encode(df, vocab))  # u1: b, a train; c valid; e test
    hist = user_histories(out)
    assert hist["user_idx"].to_list() == [0, 1]
    assert decode_items(hist["items"][0], vocab).to_list() == ["b", "a"]
    assert hist["timestamps"].to_list() == [[1, 3], [4]]
    full = user_histories(out, max_len=3, splits=SPLITS)
    assert decode_items(full["items"][0], vocab).to_list() == ["a", "c", "e"]
    assert full["timestamps"][0].to_list() == [3, 3, 7]
