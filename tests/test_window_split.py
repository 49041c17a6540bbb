"""The rolling `window` split: brute force and hypothesis invariants, hand cases, bad settings,
and the real logs with time (ML-100k by month, the MIND subset by day)."""

from datetime import UTC, datetime

import polars as pl
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from recsys_dpo.artifacts import read_manifest
from recsys_dpo.data.splits import DAY_SECONDS, split_frame, window, window_bounds
from recsys_dpo.errors import DataError
from tests.conftest import report, run_pipeline, shared_file


def stamp(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def frame(rows: list[tuple]) -> pl.DataFrame:
    """rows of (user_id, item_id, timestamp, request_id); seq = row order."""
    df = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp", "request_id"],
                      orient="row")  # fmt: skip
    return df.with_columns(pl.lit(True).alias("clicked"),
                           pl.int_range(pl.len(), dtype=pl.Int64).alias("seq"))  # fmt: skip


@st.composite
def logs(draw: st.DrawFn, period: str) -> pl.DataFrame:
    """Small logs over a few days (months), times often on a period's first or last second."""
    n = draw(st.integers(1, 30))
    base = draw(st.integers(1_500_000_000, 1_700_000_000))
    days = st.integers(0, 6) if period == "day" else st.integers(0, 150)
    second = st.sampled_from([0, 1, 43_200, DAY_SECONDS - 1])
    row = st.tuples(
        st.sampled_from(["u1", "u2", "u3"]),
        st.sampled_from(["a", "b", "c"]),
        st.builds(lambda d, s: base // DAY_SECONDS * DAY_SECONDS + d * DAY_SECONDS + s, days,
                  second),
        st.sampled_from(["r1", "r2", "r3", "r4", None]),
    )
    return frame(draw(st.lists(row, min_size=n, max_size=n)))


def period_index(origin: int, t: int, period: str) -> int:
    a, b = (datetime.fromtimestamp(x, UTC) for x in (origin, t))
    if period == "day":
        return (b.date() - a.date()).days
    return (b.year - a.year) * 12 + b.month - a.month


def brute_force(df: pl.DataFrame, e: int, v: int, h: int, keep: int | None,
                period: str) -> dict[int, str]:
    """seq -> split of every row the window keeps, straight from the definition."""
    rows = df.rows(named=True)
    start = {}
    for r in rows:
        if r["request_id"] is not None:
            start[r["request_id"]] = min(start.get(r["request_id"], r["timestamp"]),
                                         r["timestamp"])  # fmt: skip
    origin = min(start.values()) if start else min(r["timestamp"] for r in rows)
    out = {}
    for r in rows:
        t = r["timestamp"] if r["request_id"] is None else start[r["request_id"]]
        k = period_index(origin, t, period)
        if k < e and (keep is None or max(0, e - keep) <= k):
            out[r["seq"]] = "train"
        elif e <= k < e + v:
            out[r["seq"]] = "valid"
        elif e + v <= k < e + v + h:
            out[r["seq"]] = "test"
    return out


@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from(["day", "month"]), st.integers(1, 4), st.integers(0, 2),
       st.integers(1, 2), st.one_of(st.none(), st.integers(1, 3)))
def test_window_matches_brute_force_and_never_leaks(data, period, e, v, h, keep):
    df = data.draw(logs(period))
    expected = brute_force(df, e, v, h, keep, period)
    found = set(expected.values())
    refused = not {"train", "test"} <= found or (v and "valid" not in found)
    event("refused: an empty window" if refused else "split")
    if refused:
        with pytest.raises(DataError, match=r"data\.split\.(train_end|valid_periods|train_per)"):
            window(df, train_end=e, valid_periods=v, test_periods=h, train_periods=keep,
                   period=period)
        return
    out = window(df, train_end=e, valid_periods=v, test_periods=h, train_periods=keep,
                 period=period)
    assert dict(zip(out["seq"], out["split"], strict=True)) == expected
    # No leak: every train time < every valid time < every test time (request starts), and a
    # request never straddles two splits.
    start = pl.when(pl.col("request_id").is_null()).then(pl.col("timestamp"))
    start = start.otherwise(pl.col("timestamp").min().over("request_id"))
    times = out.with_columns(start.alias("t")).group_by("split").agg(
        pl.col("t").min().alias("lo"), pl.col("t").max().alias("hi"))
    bounds = {s: (lo, hi) for s, lo, hi in times.rows()}
    present = [s for s in ("train", "valid", "test") if s in bounds]
    for before, after in zip(present, present[1:], strict=False):
        assert bounds[before][1] < bounds[after][0]
    requests = out.filter(pl.col("request_id").is_not_null()).group_by("request_id")
    assert requests.agg(pl.col("split").n_unique())["split"].max() in (None, 1)
    train_start, valid_start, test_start, test_end = window_bounds(
        df.lazy(), e, v, h, keep, period)
    assert bounds["train"][1] < valid_start <= test_start <= bounds["test"][0] < test_end


def test_days_hand_case():
    day = stamp("2024-03-01T00:00:00")
    rows = [("u1", "a", day + k * DAY_SECONDS + 3600, f"r{k}") for k in range(5)]
    df = frame(rows)
    out = window(df, train_end=2, valid_periods=1, test_periods=1)
    assert out["split"].to_list() == ["train", "train", "valid", "test"]  # day 4: past h
    out = window(df, train_end=2, test_periods=2, train_periods=1)
    assert out["seq"].to_list() == [1, 2, 3] and out["split"].to_list() == [
        "train", "test", "test"]  # fmt: skip


def test_calendar_months_and_a_request_across_midnight():
    rows = [
        ("u1", "a", stamp("1997-09-20T03:05:10"), None),
        ("u1", "b", stamp("1997-10-31T23:59:59"), "r1"),  # r1 starts in October...
        ("u1", "c", stamp("1997-11-01T00:00:01"), "r1"),  # ... so this row is October's
        ("u2", "a", stamp("1997-11-01T00:00:00"), None),
        ("u2", "b", stamp("1997-12-31T23:59:59"), None),
        ("u2", "c", stamp("1998-01-01T00:00:00"), None),
    ]
    # Period 0 is the month of the first request (r1, October): September, before it, is
    # train; test = November and December; January is past the horizon.
    out = window(frame(rows), train_end=1, test_periods=2, period="month")
    assert out["split"].to_list() == ["train", "train", "train", "test", "test"]
    out = window(frame(rows), train_end=1, test_periods=1, train_periods=1, period="month")
    assert out["seq"].to_list() == [1, 2, 3] and out["split"].to_list() == [
        "train", "train", "test"]  # fmt: skip


def test_rows_before_the_first_request_are_train_not_the_log_start():
    """MIND's history clicks are stamped seconds before their impression (here across
    midnight): day 0 is the first request's, the history row is train, not a day of its own."""
    first = stamp("2019-11-09T00:00:05")
    rows = [("u1", "h", first - 10, None), ("u1", "a", first, "r1"),
            ("u1", "b", first + DAY_SECONDS, "r2")]  # fmt: skip
    assert window(frame(rows), train_end=1)["split"].to_list() == ["train", "train", "test"]
    assert window(frame(rows), train_end=1, train_periods=1)["seq"].to_list() == [1, 2]


BAD = [
    ({"train_end": 9}, r"data\.split\.train_end=9: the test window, days 9\.\.9 \(2024-03-10 "
     r"to before 2024-03-11\), holds no rows; the log spans days 0\.\.3 \(2024-03-01 to "
     r"2024-03-04\)"),
    ({"train_end": 3, "valid_periods": 1}, r"data\.split\.train_end=3: the test window"),
    ({"train_end": 2, "valid_periods": 1},
     r"data\.split\.valid_periods=1: the valid window, days 2\.\.2"),
    ({"train_end": 3, "train_periods": 1}, r"data\.split\.train_periods=1: the train window"),
    ({}, r"data\.split\.train_end: missing"),
    ({"train_end": 0}, r"data\.split\.train_end=0: must be an integer >= 1"),
    ({"train_end": 2, "test_periods": 0}, r"data\.split\.test_periods=0: must be"),
    ({"train_end": 2, "train_periods": 0}, r"data\.split\.train_periods=0: must be"),
    ({"train_end": 2, "period": "week"}, r"data\.split\.period='week': must be one of day, m"),
]  # fmt: skip


@pytest.mark.parametrize(("setting", "message"), BAD)
def test_a_bad_window_is_refused_naming_the_setting(setting, message):
    day = stamp("2024-03-01T00:00:00")
    # days 0, 1 and 3: day 2 is empty
    df = frame([("u1", "a", day + k * DAY_SECONDS, f"r{k}") for k in (0, 1, 3)])
    with pytest.raises(DataError, match=message):
        split_frame(df.with_columns(pl.col("user_id").alias("user_idx")), "window", **setting)


def test_a_setting_of_another_kind_is_refused():
    df = frame([("u1", "a", k, None) for k in range(5)])
    with pytest.raises(DataError, match=r"data\.split\.kind=window: unknown setting\(s\) "
                                        r"data\.split\.test_frac; it takes train_end"):
        split_frame(df, "window", train_end=1, test_frac=0.1)
    with pytest.raises(DataError, match=r"kind=loo: unknown setting\(s\) data\.split\.valid_frac; "
                                        r"it takes none"):
        split_frame(df, "loo", valid_frac=0.1)


# --- real logs with time ------------------------------------------------------------------


def prepared_events(out) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(out / f"{s}.parquet").with_columns(pl.lit(s).alias("s"))
                      for s in ("train", "valid", "test")])  # fmt: skip


def test_movielens_100k_by_month(tmp_path, pytestconfig):
    """Train on the first three calendar months (Sep-Nov 1997), test on the fourth (Dec)."""
    shared_file("ml-100k", "u.data")
    result = run_pipeline(
        "prepare.py", "data=ml100k", "data.split.kind=window", "+data.split.train_end=3",
        "+data.split.period=month", f"paths.artifacts={tmp_path}", "progress=false",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "prepared" / "ml100k"
    manifest = read_manifest(out)
    december, january = stamp("1997-12-01T00:00:00"), stamp("1998-01-01T00:00:00")
    assert manifest["split"]["bounds"][1:] == [december, december, january]
    df = prepared_events(out)
    train, test = df.filter(pl.col("s") == "train"), df.filter(pl.col("s") == "test")
    assert train["timestamp"].max() < december
    assert test["timestamp"].min() >= december and test["timestamp"].max() < january
    months = pl.from_epoch(df["timestamp"]).dt.strftime("%Y-%m")
    report(pytestconfig, "ml-100k events per month kept: "
           + str(months.value_counts().sort(months.name).rows()))  # fmt: skip
    # the raw log's months: 6,704 (Sep), 10,304 (Oct), 23,980 (Nov), 11,911 (Dec)
    assert manifest["events"] == {"train": 6_704 + 10_304 + 23_980, "valid": 0, "test": 11_911}
    assert manifest["pairs"]["test"]["next_item"] > 0


def test_mind_subset_by_day(tmp_path, pytestconfig):
    """Six days (9-14 Nov 2019): train on days 0..3, valid on day 4, test on day 5, in user
    buckets; every test impression is on 14 Nov and none straddles a split."""
    shared_file("mind-small-subset", "behaviors.tsv")
    result = run_pipeline(
        "prepare.py", "data=mind", "data.split.kind=window", "~data.split.valid_frac",
        "~data.split.test_frac", "+data.split.train_end=4", "+data.split.valid_periods=1",
        "data.n_buckets=3", f"paths.artifacts={tmp_path}", "progress=false", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "prepared" / "mind"
    df = prepared_events(out)
    shown = df.filter(pl.col("request_id").is_not_null())
    days = shown.group_by("s").agg(pl.from_epoch("timestamp").dt.strftime("%m-%d").unique()
                                   .sort().alias("days"))  # fmt: skip
    assert dict(days.rows()) == {"train": ["11-09", "11-10", "11-11", "11-12"],
                                 "valid": ["11-13"], "test": ["11-14"]}  # fmt: skip
    assert shown.group_by("request_id").agg(pl.col("s").n_unique())["s"].max() == 1
    assert shown.height == 189_359  # every impression is in the six days: none dropped
    per_day = shown.group_by(pl.from_epoch("timestamp").dt.strftime("%m-%d").alias("d")).len()
    report(pytestconfig, f"mind impressions per day: {sorted(per_day.rows())}")
    # the raw log's impressions on 13 and 14 Nov (tests/test_prepare.py reads the same file)
    assert shown.filter(pl.col("s") == "valid").height == 40_455
    assert shown.filter(pl.col("s") == "test").height == 39_375
    assert read_manifest(out)["pairs"]["test"]["impressions"] > 0
