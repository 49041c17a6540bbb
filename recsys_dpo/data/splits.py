"""Train / valid / test splits of an encoded click log (DESIGN.md, "Evaluation").

Every function adds a Utf8 `split` column ("train" | "valid" | "test") and keeps every row, so
each row lies in exactly one split; but `window`, which drops the rows outside its window.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

import numpy as np
import polars as pl

from recsys_dpo.data.schema import USER_IDX
from recsys_dpo.data.sequences import event_rank
from recsys_dpo.errors import DataError

SPLITS = ("train", "valid", "test")
MIN_LOO_POSITIVES = 3
DAY_SECONDS = 86_400
WINDOW_PERIODS = ("day", "month")


def _assign(key: pl.Expr, valid_start: pl.Expr | int, test_start: pl.Expr | int) -> pl.Expr:
    """key >= test_start -> test, >= valid_start -> valid, else (or null bounds) train."""
    return (
        pl.when(key >= test_start)
        .then(pl.lit("test"))
        .when(key >= valid_start)
        .then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
        .alias("split")
    )


def leave_one_out(df: pl.DataFrame) -> pl.DataFrame:
    """Per user: the last unit with a positive -> test, the one before -> valid, earlier -> train.

    A unit is an impression request (the rows sharing a request_id) or, for a row outside any
    request, that row alone; units are ordered by their first row in (timestamp, seq) event
    order. A request is never cut: every row of it shares its split, so the items shown
    together with a held-out click (its impressions, or a second click) are held out with it.
    Users with fewer than 3 units with a positive keep all their rows in train: holding out
    one of one or two would leave nothing to learn them from. A row outside any request
    follows the window it falls in for its user: at or after the test unit's start -> test,
    at or after the valid unit's start -> valid, else train.
    """
    ranked = df.with_columns(event_rank().alias("_ord"))
    unit = _unit_start(ranked.columns, pl.col("_ord"), by=[USER_IDX, "request_id"])
    ranked = ranked.with_columns(unit.alias("_unit"))
    cuts = (
        ranked.filter(pl.col("clicked"))
        .group_by(USER_IDX)
        .agg(pl.col("_unit").unique().sort().alias("_units"))
        .filter(pl.col("_units").list.len() >= MIN_LOO_POSITIVES)
        .select(
            USER_IDX,
            pl.col("_units").list.get(-2).alias("_valid"),
            pl.col("_units").list.last().alias("_test"),
        )
    )
    return (
        ranked.join(cuts, on=USER_IDX, how="left", maintain_order="left")
        .with_columns(_assign(pl.col("_unit"), pl.col("_valid"), pl.col("_test")))
        .drop("_ord", "_unit", "_valid", "_test")
    )


def _unit_start(columns: Sequence[str], key: pl.Expr, by: Sequence[str]) -> pl.Expr:
    """`key` of a row's unit: the smallest `key` of its request (the rows sharing the `by`
    columns), or its own for a row outside any request."""
    if "request_id" not in columns:
        return key
    return pl.when(pl.col("request_id").is_null()).then(key).otherwise(key.min().over(by))


def _request_time(columns: Sequence[str]) -> pl.Expr:
    """A row's split time: its request's first timestamp, so a request never straddles a cut."""
    return _unit_start(columns, pl.col("timestamp"), by=["request_id"])


def _cut(sorted_times: np.ndarray, frac_after: float) -> int:
    """The smallest time such that about `frac_after` of the rows are at or after it."""
    n = len(sorted_times)
    first_after = n - round(frac_after * n)
    return int(sorted_times[first_after]) if first_after < n else int(sorted_times[-1]) + 1


def _request_times(lf: pl.LazyFrame) -> np.ndarray:
    """Every row's split time (`_request_time`), sorted; one Int64 column of the log in memory."""
    times = lf.select(_request_time(lf.collect_schema().names()).alias("_t")).collect()["_t"]
    return np.sort(times.to_numpy())


def temporal_cuts(
    lf: pl.LazyFrame, valid_frac: float = 0.1, test_frac: float = 0.1
) -> tuple[int, int]:
    """(valid_start, test_start): the times after which about valid_frac + test_frac and
    test_frac of the rows fall, rows timed by their request's start.

    Takes a LazyFrame so the prepare stage can compute the global cuts over all user buckets
    on disk, holding only one Int64 column.
    """
    if not (valid_frac >= 0 and test_frac >= 0 and valid_frac + test_frac < 1):
        raise DataError(
            f"temporal split: need valid_frac, test_frac >= 0 with sum < 1, "
            f"got {valid_frac}, {test_frac}"
        )
    times = _request_times(lf)
    if not len(times):
        return 0, 0
    test_start = _cut(times, test_frac)
    return min(_cut(times, valid_frac + test_frac), test_start), test_start


def temporal(
    df: pl.DataFrame,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    valid_start: int | None = None,
    test_start: int | None = None,
) -> pl.DataFrame:
    """Global time cuts: t < valid_start -> train, t < test_start -> valid, else test.

    t is the row's request start (the min timestamp of its request_id) when the log has
    requests, else its timestamp; so every train t < every valid t < every test t, and the rows
    of one request share a split. A cut not given comes from `temporal_cuts`.
    """
    if valid_start is None or test_start is None:
        valid_cut, test_cut = temporal_cuts(df.lazy(), valid_frac, test_frac)
        test_start = test_cut if test_start is None else test_start
        valid_start = min(valid_cut, test_start) if valid_start is None else valid_start
    if valid_start > test_start:
        raise DataError(f"temporal split: valid_start {valid_start} > test_start {test_start}")
    out = df.with_columns(_request_time(df.columns).alias("_t"))
    return out.with_columns(_assign(pl.col("_t"), valid_start, test_start)).drop("_t")


def _period_start(origin: int, k: int, period: str) -> int:
    """The unix time period k starts at: period 0 is the UTC day (or calendar month) holding
    `origin`, k counts days (months) from it."""
    if period == "day":
        return origin // DAY_SECONDS * DAY_SECONDS + k * DAY_SECONDS
    first = datetime.fromtimestamp(origin, UTC)
    year, month = divmod(first.year * 12 + first.month - 1 + k, 12)
    return int(datetime(year, month + 1, 1, tzinfo=UTC).timestamp())


def _period_of(origin: int, t: int, period: str) -> int:
    """The period index (as `_period_start` counts) of time t; < 0 before the origin's."""
    if period == "day":
        return (t - _period_start(origin, 0, period)) // DAY_SECONDS
    a, b = (datetime.fromtimestamp(x, UTC) for x in (origin, t))
    return (b.year - a.year) * 12 + b.month - a.month


def _date(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d")


def window_bounds(
    lf: pl.LazyFrame,
    train_end: int | None = None,
    valid_periods: int = 0,
    test_periods: int = 1,
    train_periods: int | None = None,
    period: str = "day",
) -> tuple[int, int, int, int]:
    """(train_start, valid_start, test_start, test_end), unix seconds, of the window split.

    Periods are UTC days (86,400 s) or calendar months, counted from 0, the one holding the
    log's first request (its first row when it has no request_id: rows outside requests
    stamped before it, like MIND's history clicks, are not the log's start); rows are timed
    by their request's start. With e = train_end, v = valid_periods, h = test_periods:
    train = periods [max(0, e - train_periods), e) (with train_periods None, every row before
    period e), valid = [e, e + v), test = [e + v, e + v + h). Takes a LazyFrame so the prepare
    stage computes the bounds once over all user buckets. DataError naming the setting at
    fault when a bound is out of range or a window (train, test, valid when v > 0) holds no
    row.
    """
    if train_end is None:
        raise DataError("data.split.train_end: missing (the window split's first period after "
                        "the train window)")
    if period not in WINDOW_PERIODS:
        raise DataError(f"data.split.period={period!r}: must be one of {', '.join(WINDOW_PERIODS)}")
    at_least = (("train_end", train_end, 1), ("valid_periods", valid_periods, 0),
                ("test_periods", test_periods, 1), ("train_periods", train_periods or 1, 1))
    for name, value, low in at_least:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise DataError(f"data.split.{name}={value}: must be an integer >= {low}")
    if train_periods == 0:
        raise DataError("data.split.train_periods=0: must be an integer >= 1 (null: all)")
    times = _request_times(lf)
    if not len(times):
        raise DataError("window split: the log has no rows")
    origin = int(times[0])
    if "request_id" in lf.collect_schema().names():
        requests = lf.filter(pl.col("request_id").is_not_null())
        first_request = requests.select(pl.col("timestamp").min()).collect().item()
        origin = origin if first_request is None else int(first_request)
    first = max(0, train_end - train_periods) if train_periods else 0
    test_start = train_end + valid_periods
    periods = (first, train_end, test_start, test_start + test_periods)
    bounds = tuple(_period_start(origin, k, period) for k in periods)
    if train_periods is None:
        bounds = (min(bounds[0], int(times[0])), *bounds[1:])
    rows = np.diff(np.searchsorted(times, bounds))
    span = (f"the log spans {period}s {_period_of(origin, int(times[0]), period)}.."
            f"{_period_of(origin, int(times[-1]), period)} ({_date(int(times[0]))} to "
            f"{_date(int(times[-1]))})")
    train = ("train_end", train_end) if train_periods is None else ("train_periods", train_periods)
    windows = (("train", *train), ("valid", "valid_periods", valid_periods),
               ("test", "train_end", train_end))
    for (split, setting, value), n, lo, hi in zip(windows, rows, periods[:-1], periods[1:],
                                                  strict=True):
        if not n and hi > lo:
            raise DataError(
                f"data.split.{setting}={value}: the {split} window, {period}s {lo}..{hi - 1} "
                f"({_date(_period_start(origin, lo, period))} to before "
                f"{_date(_period_start(origin, hi, period))}), holds no rows; {span}"
            )
    return bounds


def window(
    df: pl.DataFrame,
    train_end: int | None = None,
    valid_periods: int = 0,
    test_periods: int = 1,
    train_periods: int | None = None,
    period: str = "day",
    bounds: Sequence[int] | None = None,
) -> pl.DataFrame:
    """A rolling window: train on the periods before `train_end`, valid and test on the next
    ones (`window_bounds`); the rows before the train window or past the test one are dropped.

    A row is timed by its request's start, as in `temporal`: every train time < every valid
    time < every test time, and the rows of one request share a split. `bounds` (train_start,
    valid_start, test_start, test_end) replaces the settings when given: the prepare stage
    computes them once over the whole log; else they come from `df`.
    """
    if bounds is None:
        bounds = window_bounds(df.lazy(), train_end, valid_periods, test_periods, train_periods,
                               period)
    train_start, valid_start, test_start, test_end = bounds
    out = df.with_columns(_request_time(df.columns).alias("_t"))
    out = out.filter((pl.col("_t") >= train_start) & (pl.col("_t") < test_end))
    return out.with_columns(_assign(pl.col("_t"), valid_start, test_start)).drop("_t")


def mcar(
    df: pl.DataFrame,
    valid_frac: float = 0.2,
    relevant: float = 4.0,
    test_event: str = "mcar",
    seed: int = 0,
) -> pl.DataFrame:
    """A test set the log brings (Coat's random exposures), a valid slice held out of the rest.

    Rows whose `event` is `test_event` -> test, as they are (`readers.read_coat`). Of each
    user's other rows, round(valid_frac * n) drawn uniformly without replacement (at most
    n - 1, so every user keeps a train row) -> valid; the rest -> train. The draw is seeded by
    (seed, crc32 of the user id) over the user's rows in `seq` order: the same rows whatever
    the bucket or the other users. The valid rows are relabelled as the test ones are, so the
    selection split is measured like the test one, on biased (MNAR) items only, never the test
    items: clicked = rating >= `relevant`, one request per user ("valid-<user>"), timestamp 1
    (after the train rows' 0, before the test rows' 2, so no train context holds one).
    """
    missing = [c for c in ("event", "rating") if c not in df.columns]
    if missing:
        raise DataError(f"mcar split: the log has no column(s) {missing} (data.reader=coat has)")
    if not 0 <= valid_frac < 1:
        raise DataError(f"mcar split: valid_frac must lie in [0, 1), got {valid_frac}")
    test = pl.col("event") == test_event
    rest = df.with_row_index("_row").filter(~test).sort(USER_IDX, "seq")
    held = []
    for (user,), rows in rest.group_by(USER_IDX, maintain_order=True):
        n = rows.height
        k = min(round(valid_frac * n), n - 1)
        rng = np.random.default_rng([seed, zlib.crc32(str(user).encode())])
        held.append(rows["_row"].to_numpy()[rng.permutation(n)[:k]])
    valid = pl.int_range(pl.len()).is_in(np.concatenate([np.empty(0, np.uint32), *held]))
    relabelled = pl.when(valid)
    return df.with_columns(
        split=pl.when(test).then(pl.lit("test")).when(valid).then(pl.lit("valid"))
        .otherwise(pl.lit("train")),
        clicked=relabelled.then(pl.col("rating") >= relevant).otherwise(pl.col("clicked")),
        request_id=relabelled.then(pl.lit("valid-") + pl.col(USER_IDX).cast(pl.Utf8))
        .otherwise(pl.col("request_id") if "request_id" in df.columns else pl.lit(None, pl.Utf8)),
        timestamp=relabelled.then(pl.lit(1, pl.Int64)).otherwise(pl.col("timestamp")),
    )  # fmt: skip


SPLITTERS: dict[str, Callable[..., pl.DataFrame]] = {
    "loo": leave_one_out,
    "temporal": temporal,
    "window": window,
    "mcar": mcar,
}


def check_settings(kind: str, settings: Mapping[str, object]) -> None:
    """DataError for an unknown split kind, or a setting its method does not take (one left
    over from another kind's preset)."""
    if kind not in SPLITTERS:
        raise DataError(f"split kind {kind!r} unknown; expected one of {sorted(SPLITTERS)}")
    takes = list(inspect.signature(SPLITTERS[kind]).parameters)[1:]
    unknown = sorted(set(settings) - set(takes))
    if unknown:
        raise DataError(f"data.split.kind={kind}: unknown setting(s) "
                        f"{', '.join(f'data.split.{k}' for k in unknown)}; it takes "
                        f"{', '.join(takes) or 'none'}")


def split_frame(df: pl.DataFrame, kind: str, **kwargs: object) -> pl.DataFrame:
    """Split with the named method (`SPLITTERS`); DataError if no row lands in train, or from
    `check_settings`."""
    check_settings(kind, kwargs)
    out = SPLITTERS[kind](df, **kwargs)
    if not out.filter(pl.col("split") == "train").height:
        raise DataError(f"split {kind!r}: the train split is empty ({df.height} rows in total)")
    return out
