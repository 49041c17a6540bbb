"""Preference pairs: hypothesis invariants against pure-Python brute force, exact hand cases."""

from collections import Counter

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_dpo.data.pairs import (
    build_pairs,
    check_impression_pairs,
    feedback_pairs,
    impression_pairs,
    item_popularity,
    next_item_pairs,
)
from recsys_dpo.data.schema import PAIRS_SCHEMA
from recsys_dpo.data.splits import SPLITS, leave_one_out
from recsys_dpo.data.vocab import build_vocab, encode
from recsys_dpo.errors import DataError
from tests.conftest import bad_input_message
from tests.test_prepare import prepare_cli

SETTINGS = settings(max_examples=100, deadline=None)


@st.composite
def logs(draw: st.DrawFn) -> pl.DataFrame:
    """Encoded, leave-one-out split logs: 3 users, 7 items, 4 timestamps (many ties), `seq` a
    random permutation; a request is a user's events at one timestamp."""
    n = draw(st.integers(1, 45))
    row = st.tuples(
        st.sampled_from(["u1", "u2", "u3"]),
        st.sampled_from(list("abcdefg")),
        st.integers(0, 3),
        st.booleans(),
        st.integers(0, 3),
        st.sampled_from([1.0, 2.0, 3.0, 4.0, 5.0]),
        st.sampled_from([0.5, 1.0, 2.0]),
    )
    rows = draw(st.lists(row, min_size=n, max_size=n))
    names = ["user_id", "item_id", "timestamp", "clicked", "position", "rating", "weight"]
    df = pl.DataFrame(rows, schema=names, orient="row").with_columns(
        pl.Series("seq", draw(st.permutations(list(range(n)))), dtype=pl.Int64),
        pl.col("position").cast(pl.Int32),
        pl.format("{}-{}", "user_id", "timestamp").alias("request_id"),
    )
    return leave_one_out(encode(df, build_vocab(df)))


def brute_context(rows: list[dict], event: dict, max_context: int) -> tuple[int, ...]:
    """The user's positives strictly before `event` in (timestamp, seq) order, last ones kept."""
    key = (event["timestamp"], event["seq"])
    history = [
        r["item_idx"]
        for r in sorted(rows, key=lambda r: (r["timestamp"], r["seq"]))
        if r["user_idx"] == event["user_idx"] and r["clicked"] and (r["timestamp"], r["seq"]) < key
    ]
    return tuple(history[max(len(history) - max_context, 0) :]) if max_context else ()


def positives(rows: list[dict], user: int, splits=SPLITS) -> set[int]:
    return {
        r["item_idx"]
        for r in rows
        if r["user_idx"] == user and r["clicked"] and r["split"] in splits
    }


def up_to(split: str) -> tuple[str, ...]:
    return SPLITS[: SPLITS.index(split) + 1]


def keyed(pairs: pl.DataFrame, with_rejected: bool = False) -> list[tuple]:
    """Pairs as sortable tuples (user, chosen, timestamp, context, weight[, rejected])."""
    out = []
    for p in pairs.iter_rows(named=True):
        rejected = (tuple(p["rejected"]),) if with_rejected else ()
        context = tuple(p["context"])
        out.append((p["user_idx"], p["chosen"], p["timestamp"], context, p["weight"], *rejected))
    return sorted(out)


def check_common(pairs: pl.DataFrame, max_context: int) -> None:
    assert pairs.schema == pl.Schema(PAIRS_SCHEMA)
    for p in pairs.iter_rows(named=True):
        assert len(p["rejected"]) >= 1
        assert p["chosen"] not in p["rejected"]
        assert len(set(p["rejected"])) == len(p["rejected"])
        assert len(p["context"]) <= max_context


@SETTINGS
@given(
    logs(),
    st.sampled_from(SPLITS),
    st.sampled_from(["uniform", "popularity"]),
    st.integers(1, 5),
    st.integers(0, 3),
)
def test_next_item_pairs_match_brute_force(df, split, sampler, k, max_context):
    n_items = int(df["item_idx"].max()) + 1
    pairs = next_item_pairs(
        df, split, n_items=n_items, num_negatives=k, sampler=sampler, max_context=max_context
    )
    check_common(pairs, max_context)
    rows = df.to_dicts()
    popular = {r["item_idx"] for r in rows if r["clicked"] and r["split"] in up_to(split)}
    candidates = set(range(1, n_items)) if sampler == "uniform" else popular
    expected = []
    for e in rows:
        if not (e["clicked"] and e["split"] == split and brute_context(rows, e, 10**6)):
            continue
        if candidates - positives(rows, e["user_idx"], up_to(split)):
            context = brute_context(rows, e, max_context)
            expected.append((e["user_idx"], e["item_idx"], e["timestamp"], context, e["weight"]))
    assert keyed(pairs) == sorted(expected)
    for p in pairs.iter_rows(named=True):
        allowed = candidates - positives(rows, p["user_idx"], up_to(split))
        assert set(p["rejected"]) <= allowed  # never a positive known by then, never 0
        assert len(p["rejected"]) == min(k, len(allowed))


@SETTINGS
@given(logs(), st.sampled_from(SPLITS[:-1]), st.sampled_from(["uniform", "popularity"]))
def test_next_item_pairs_do_not_depend_on_later_splits(df, split, sampler):
    """No leakage: the held-out events change nothing in earlier splits' pairs, not even which
    items may be sampled as negatives."""
    n_items = int(df["item_idx"].max()) + 1
    known = df.filter(pl.col("split").is_in(up_to(split)))
    full = next_item_pairs(df, split, n_items=n_items, num_negatives=3, sampler=sampler)
    cut = next_item_pairs(known, split, n_items=n_items, num_negatives=3, sampler=sampler)
    assert full.equals(cut)


@SETTINGS
@given(logs(), st.sampled_from(SPLITS), st.booleans(), st.integers(0, 3))
def test_impression_pairs_match_brute_force(df, split, skip_above, max_context):
    pairs = impression_pairs(df, split, skip_above=skip_above, max_context=max_context)
    check_common(pairs, max_context)
    rows = df.to_dicts()
    expected = []
    for e in rows:
        if not (e["clicked"] and e["split"] == split):
            continue
        shown = sorted(
            (r["position"], r["seq"], r["item_idx"])
            for r in rows
            if r["request_id"] == e["request_id"]
            and not r["clicked"]
            and r["item_idx"] != e["item_idx"]
            and (not skip_above or r["position"] < e["position"])
        )
        rejected = tuple(dict.fromkeys(item for _, _, item in shown))
        if rejected:
            context = brute_context(rows, e, max_context)
            expected.append(
                (e["user_idx"], e["item_idx"], e["timestamp"], context, e["weight"], rejected)
            )
    assert keyed(pairs, with_rejected=True) == sorted(expected)


@SETTINGS
@given(logs(), st.sampled_from(SPLITS), st.integers(1, 3), st.integers(0, 3))
def test_feedback_pairs_match_brute_force(df, split, max_negatives, max_context):
    pairs = feedback_pairs(df, split, max_negatives=max_negatives, max_context=max_context)
    check_common(pairs, max_context)
    rows = df.to_dicts()

    def lows(user: int) -> set[int]:
        return {
            r["item_idx"]
            for r in rows
            if r["user_idx"] == user and r["rating"] <= 2.0 and r["split"] in up_to(split)
        }

    expected = [
        (
            e["user_idx"],
            e["item_idx"],
            e["timestamp"],
            brute_context(rows, e, max_context),
            e["weight"],
        )
        for e in rows
        if e["split"] == split and e["rating"] >= 4.0 and lows(e["user_idx"]) - {e["item_idx"]}
    ]
    assert keyed(pairs) == sorted(expected)
    for p in pairs.iter_rows(named=True):
        allowed = lows(p["user_idx"]) - {p["chosen"]}
        assert set(p["rejected"]) <= allowed
        assert len(p["rejected"]) == min(max_negatives, len(allowed))


def hand_frame(rows: list[tuple], names: list[str]) -> pl.DataFrame:
    """An already encoded and split frame; seq = row order."""
    df = pl.DataFrame(rows, schema=names, orient="row")
    return df.with_columns(
        pl.col("user_idx", "item_idx").cast(pl.Int32),
        pl.int_range(pl.len(), dtype=pl.Int64).alias("seq"),
    )


IMPRESSIONS = hand_frame(
    [
        # user 0, request r1 at t=10: items 1..4 shown at positions 0..3, 3 clicked
        (0, 1, 10, False, "r1", 0, "train"),
        (0, 2, 10, False, "r1", 1, "train"),
        (0, 3, 10, True, "r1", 2, "train"),
        (0, 4, 10, False, "r1", 3, "train"),
        # user 0, request r2 at t=20: 5 clicked at the top, 6 skipped below, 2 clicked below
        (0, 5, 20, True, "r2", 0, "train"),
        (0, 6, 20, False, "r2", 1, "train"),
        (0, 2, 20, True, "r2", 2, "train"),
    ],
    ["user_idx", "item_idx", "timestamp", "clicked", "request_id", "position", "split"],
).with_columns(pl.col("position").cast(pl.Int32))


def test_impression_pairs_hand_case():
    pairs = impression_pairs(IMPRESSIONS, "train")
    assert pairs.select("context", "chosen", "rejected", "timestamp").rows() == [
        ([], 3, [1, 2, 4], 10),
        ([3], 5, [6], 20),
        ([3, 5], 2, [6], 20),
    ]
    assert pairs["weight"].to_list() == [1.0] * 3 and set(pairs["source"]) == {"impressions"}
    above = impression_pairs(IMPRESSIONS, "train", skip_above=True, max_context=1)
    assert above.select("context", "chosen", "rejected").rows() == [
        ([], 3, [1, 2]),
        ([5], 2, [6]),
    ]
    assert impression_pairs(IMPRESSIONS, "valid").height == 0


def test_feedback_pairs_hand_case():
    df = hand_frame(
        [
            (0, 1, 1, True, 5.0, 2.0, "train"),
            (0, 2, 2, True, 1.0, 1.0, "train"),
            (0, 3, 3, True, 4.0, 3.0, "train"),
            (0, 1, 4, True, 2.0, 1.0, "train"),  # item 1 again, now rated low
            (0, 4, 5, True, 1.0, 1.0, "test"),  # low, but in a later split: not for train
            (1, 5, 1, True, 5.0, 1.0, "train"),  # user 1 has no low rating: no pair
        ],
        ["user_idx", "item_idx", "timestamp", "clicked", "rating", "weight", "split"],
    )
    pairs = feedback_pairs(df, "train")
    assert pairs.select("user_idx", "context", "chosen", "rejected", "weight").rows() == [
        (0, [], 1, [2], 2.0),
        (0, [1, 2], 3, [1, 2], 3.0),
    ]
    test = feedback_pairs(df, "train", max_negatives=1, seed=3)
    assert [len(r) for r in test["rejected"]] == [1, 1]
    with pytest.raises(DataError, match="rating"):
        feedback_pairs(df.drop("rating"), "train")


def popularity_log(n_probes: int) -> tuple[pl.DataFrame, np.ndarray]:
    """Filler users click items 1..8 with skewed counts; each probe user clicks 9 then 10, so
    the event on 10 is chosen and its negatives come from 1..8 only."""
    counts = np.array([64, 32, 16, 8, 4, 2, 1, 1])
    items = np.repeat(np.arange(1, 9), counts)
    rows = [(i, int(item), 0, True, "train") for i, item in enumerate(items)]
    for p in range(n_probes):
        user = len(items) + p
        rows += [(user, 9, 0, True, "train"), (user, 10, 1, True, "train")]
    names = ["user_idx", "item_idx", "timestamp", "clicked", "split"]
    return hand_frame(rows, names), counts


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_popularity_sampler_follows_popularity_power(alpha):
    df, counts = popularity_log(2000)
    pairs = next_item_pairs(
        df, "train", n_items=11, num_negatives=1, sampler="popularity", alpha=alpha, seed=1
    )
    assert pairs.height == 2000 and set(pairs["chosen"]) == {10}
    drawn = Counter(r[0] for r in pairs["rejected"].to_list())
    freq = np.array([drawn[i] for i in range(1, 9)]) / pairs.height
    expected = counts**alpha / (counts**alpha).sum()
    assert np.abs(freq - expected).max() < 0.04  # about 4 standard errors at n = 2000
    assert freq[0] > 2 * freq[3] > 0  # the head clearly beats the tail


def test_uniform_sampler_is_flat_and_seeded():
    df, _ = popularity_log(2000)
    pairs = next_item_pairs(df, "train", n_items=11, num_negatives=1, seed=1)
    freq = np.bincount(pairs["rejected"].list.first().to_numpy(), minlength=9)[1:] / pairs.height
    assert np.abs(freq - 1 / 8).max() < 0.04
    again = next_item_pairs(df, "train", n_items=11, num_negatives=1, seed=1)
    assert again.equals(pairs)


def test_next_item_when_the_user_clicked_almost_everything():
    # user 0 clicked 1..7 of 9 items: only 8 and 9 can be negatives, whatever k is
    df = hand_frame(
        [(0, i, i, True, "train") for i in range(1, 8)] + [(1, 8, 0, True, "train")],
        ["user_idx", "item_idx", "timestamp", "clicked", "split"],
    )
    pairs = next_item_pairs(df, "train", n_items=10, num_negatives=4, max_context=2)
    assert pairs["chosen"].to_list() == [2, 3, 4, 5, 6, 7]
    assert pairs["context"].to_list()[:2] == [[1], [1, 2]]
    assert all(sorted(r) == [8, 9] for r in pairs["rejected"].to_list())
    # popularity: 9 was never clicked, so 8 is the one negative left
    popular = next_item_pairs(df, "train", n_items=10, sampler="popularity")
    assert popular["rejected"].to_list() == [[8]] * 6


def random_log(seed: int = 0, n: int = 3000) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 60, n)
    times = rng.integers(0, 50, n)
    df = pl.DataFrame(
        {
            "user_id": [f"u{u}" for u in users],
            "item_id": [f"i{i}" for i in rng.zipf(1.5, n) % 200],
            "timestamp": times,
            "clicked": rng.random(n) < 0.5,
            "seq": rng.permutation(n),
            "request_id": [f"{u}-{t}" for u, t in zip(users, times, strict=True)],
            "position": rng.integers(0, 8, n).astype(np.int32),
            "rating": rng.integers(1, 6, n).astype(float),
        }
    )
    return leave_one_out(encode(df, build_vocab(df)))


STRATEGIES = {
    "impressions": {"skip_above": True},
    "next_item": {"sampler": "popularity", "num_negatives": 3, "seed": 5},
    "feedback": {"max_negatives": 2},
}


@pytest.mark.parametrize("split", ["train", "test"])
def test_pairs_same_rows_for_any_user_bucketing(split):
    """Built bucket by bucket with the whole log's popularity, the rows are the same."""
    df = random_log()
    n_items = int(df["item_idx"].max()) + 1
    popularity = item_popularity(df, split, n_items)
    built = {}
    for n_buckets in (1, 4):
        parts = [
            build_pairs(
                df.filter(pl.col("user_idx") % n_buckets == b), split, STRATEGIES,
                n_items=n_items, popularity=popularity, seed_salt=(b, n_buckets),
            )
            for b in range(n_buckets)
        ]
        built[n_buckets] = pl.concat(parts)
        assert built[n_buckets].height > 0
        assert built[n_buckets].schema == pl.Schema(PAIRS_SCHEMA)
    one, four = built[1], built[4]
    key = ["user_idx", "chosen", "context", "source", "timestamp", "weight"]
    assert one.select(key).sort(key).equals(four.select(key).sort(key))
    impressions = pl.col("source") == "impressions"  # nothing sampled: equal rejected too
    assert one.filter(impressions).sort(key).equals(four.filter(impressions).sort(key))
    assert set(one["source"]) == set(STRATEGIES)


def test_build_pairs_errors():
    df = random_log(n=200)
    with pytest.raises(DataError, match="reference_hard"):
        build_pairs(df, "train", {"reference_hard": {}}, n_items=500)
    with pytest.raises(DataError, match="negatives"):
        build_pairs(df, "train", {"next_item": {"negatives": 3}}, n_items=500)
    with pytest.raises(DataError, match="sampler"):
        build_pairs(df, "train", {"next_item": {"sampler": "zipf"}}, n_items=500)
    with pytest.raises(DataError, match="request_id"):
        impression_pairs(df.drop("request_id"), "train")
    with pytest.raises(DataError, match="position"):
        impression_pairs(df.drop("position"), "train", skip_above=True)
    with pytest.raises(DataError, match="split"):
        impression_pairs(df, "holdout")
    assert build_pairs(df, "train", {}, n_items=500).schema == pl.Schema(PAIRS_SCHEMA)


# --- impression pairs need a click signal (issue 15, item 6) ---------------------------------

IMPRESSION_LOG = [
    "uid,sku,ts,request_id,position",
    *(f"a,x{k},{k // 3},r{k // 3},{k % 3}" for k in range(9)),
    *(f"b,x{k},{k // 3},s{k // 3},{k % 3}" for k in range(9)),
]
IMPRESSIONS_ON = "+data.pairs.impressions={max_context: 50}"


def test_cli_impressions_without_click_column_are_refused(tmp_path):
    log = tmp_path / "shown.csv"
    log.write_text("\n".join(IMPRESSION_LOG) + "\n")
    msg = bad_input_message(prepare_cli(tmp_path, log, IMPRESSIONS_ON))
    assert "shown.csv: impression pairs" in msg
    assert "no 'clicked' column and no 'event' column" in msg
    assert "'+data.reader.columns={clicked: " in msg
    assert not (tmp_path / "artifacts" / "prepared" / "table").exists()


def test_cli_impressions_all_clicked_give_no_pairs_and_are_refused(tmp_path):
    log = tmp_path / "clicked.csv"
    rows = [IMPRESSION_LOG[0] + ",clicked", *(f"{row},1" for row in IMPRESSION_LOG[1:])]
    log.write_text("\n".join(rows) + "\n")
    msg = bad_input_message(prepare_cli(tmp_path, log, IMPRESSIONS_ON))
    assert "clicked.csv: impression pairs: none built" in msg
    assert "all 18 shown item(s) are clicked" in msg
    assert not (tmp_path / "artifacts" / "prepared" / "table").exists()


def test_impression_pairs_refused_when_none_come_out():
    clicks = IMPRESSIONS.with_columns(clicked=pl.lit(True))
    counts = {"train": {"next_item": 3}, "valid": {}}
    with pytest.raises(DataError, match=r"src: impression pairs: none built.*all 7 shown"):
        check_impression_pairs(clicks.lazy(), counts, "src")
    with pytest.raises(DataError, match=r"none of the 7 shown item\(s\) is clicked"):
        check_impression_pairs(clicks.with_columns(clicked=False).lazy(), counts, "src")
    mixed = IMPRESSIONS.with_columns(request_id=pl.format("{}", pl.col("item_idx")))
    with pytest.raises(DataError, match="no request has both a clicked and a not-clicked item"):
        check_impression_pairs(mixed.lazy(), counts, "src")
    check_impression_pairs(IMPRESSIONS.lazy(), {"train": {"impressions": 1}}, "src")
