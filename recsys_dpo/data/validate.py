"""Validation: a reader's canonical LazyFrame -> the checked, normalised click-log DataFrame.

Checks the contract of `recsys_dpo.data.schema` and fails with one `DataError` naming the
source, column and rows at fault; normalises dtypes (ids to strings, timestamps to unix
seconds, a boolean `clicked`); adds `seq`, the original row order; refuses NaN / inf in float
columns (or drops those rows, `non_finite="drop"`) and values outside the contract's bounds;
drops exact duplicates and users with too few positive events, and says how many in a
`ValidationReport`.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from recsys_dpo.data.schema import BOUNDS, CANONICAL_DTYPES, OPTIONAL, REQUIRED
from recsys_dpo.errors import DataError

SHOWN_ROWS = 5
POSITIVE_EVENTS = ("click", "purchase", "like", "rating", "history")
# What to do with NaN / inf in a float column: refuse the log, or drop those rows (counted).
NON_FINITE = ("error", "drop")
_CLICKED_TEXT = {"true": True, "false": False, "1": True, "0": False}
MAPPING_HINT = "set a column mapping in the data config, `data.reader.columns`"
_FORMAT_KEY = "data.validation.timestamp_format"


@dataclass
class ValidationReport:
    """What validation kept and dropped, for the prepare summary and the manifest."""

    source: str
    rows_in: int
    rows_out: int
    non_finite_dropped: int
    duplicates_dropped: int
    short_users_dropped: int
    short_user_rows_dropped: int

    def as_rows(self) -> list[tuple[str, int]]:
        """(label, count) pairs for a summary table."""
        return [
            ("rows in", self.rows_in),
            ("non-finite rows dropped", self.non_finite_dropped),
            ("duplicate rows dropped", self.duplicates_dropped),
            ("short users dropped", self.short_users_dropped),
            ("short-user rows dropped", self.short_user_rows_dropped),
            ("rows out", self.rows_out),
        ]


def _first_rows(df: pl.DataFrame, mask: pl.Series) -> list[int]:
    """The first few 0-based row numbers (`seq`, the row in the whole log) where `mask` is True."""
    return df["seq"].filter(mask).head(SHOWN_ROWS).to_list()


def check_columns(columns: list[str], source: str) -> None:
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise DataError(
            f"{source}: missing required column(s) {missing}; the data has columns {columns}; "
            f"{MAPPING_HINT}"
        )


def check_click_signal(columns: list[str], source: str) -> None:
    """DataError unless the log can tell shown-not-clicked items from clicks, which impression
    pairs are made of: a `request_id` column and a `clicked` or an `event` column. Without
    them every row would count as a click and no pair could come out."""
    faults = []
    if "request_id" not in columns:
        faults.append("no 'request_id' column (the items shown together)")
    if "clicked" not in columns and "event" not in columns:
        faults.append("no 'clicked' column and no 'event' column (which shown items were clicked)")
    if faults:
        raise DataError(
            f"{source}: impression pairs (data.pairs.impressions) need to know what was shown "
            f"and what was clicked, but the log has {' and '.join(faults)}; it has columns "
            f"{columns}; map yours, e.g. '+data.reader.columns={{clicked: <your 0/1 or "
            "true/false column>, request_id: <your impression id column>}' (or an `event` "
            "column of event types), or drop `impressions` from data.pairs"
        )


def _check_no_nulls(df: pl.DataFrame, names: Sequence[str], source: str) -> None:
    """DataError listing, per column with nulls, the count and the first row numbers."""
    faults = []
    for name in names:
        nulls = df[name].is_null()
        if nulls.any():
            faults.append(
                f"column {name!r} has {nulls.sum():,} null value(s), first at row(s) "
                f"{_first_rows(df, nulls)}"
            )
    if faults:
        raise DataError(f"{source}: " + "; ".join(faults) + " (rows are 0-based)")


def _converted(df: pl.DataFrame, name: str, expr: pl.Expr, source: str, expected: str) -> pl.Series:
    """`expr` evaluated on `df`; a value it turns into null is a DataError showing rows + values."""
    out = df.select(expr.alias(name)).to_series()
    bad = out.is_null() & df[name].is_not_null()
    _raise_faults([_shown_values(df, name, bad, f"that are not {expected}")], source)
    return out


def _timestamp_expr(dtype: pl.DataType, fmt: str | None, source: str) -> pl.Expr:
    """Expression turning the timestamp column into unix seconds (Int64)."""
    col = pl.col("timestamp")
    if dtype.is_integer():
        return col.cast(pl.Int64)
    if isinstance(dtype, pl.Datetime | pl.Date):
        return col.dt.epoch("s")
    if dtype == pl.Utf8:
        # naive times are read as UTC; time_zone="UTC" also converts strings with an offset
        if fmt is not None:
            return col.str.to_datetime(fmt, strict=False, time_zone="UTC").dt.epoch("s")
        # digits are unix seconds; polars infers a date format from the first other value
        as_int = col.str.to_integer(strict=False)
        as_date = pl.when(as_int.is_null()).then(col).str.to_datetime(strict=False, time_zone="UTC")
        return pl.coalesce(as_int, as_date.dt.epoch("s"))
    raise DataError(
        f"{source}: column 'timestamp' has dtype {dtype}; expected integer unix seconds, a "
        "datetime, a date, or date strings"
    )


def _timestamps(df: pl.DataFrame, fmt: str | None, source: str) -> pl.Series:
    expected = (
        f"dates in format {fmt!r} (the setting {_FORMAT_KEY})"
        if fmt
        else "unix seconds or dates in one format polars can infer (else set the "
        f"`timestamp_format`, e.g. \"{_FORMAT_KEY}='%d/%m/%Y %H:%M'\")"
    )
    try:
        return _converted(
            df, "timestamp", _timestamp_expr(df.schema["timestamp"], fmt, source), source, expected
        )
    except pl.exceptions.PolarsError as exc:  # e.g. polars rejects the format string itself
        reason = str(exc).splitlines()[0]
        raise DataError(
            f"{source}: column 'timestamp' cannot be read with {_FORMAT_KEY}={fmt!r}: {reason}"
        ) from exc


def _clicked(df: pl.DataFrame, positive_events: Sequence[str], source: str) -> pl.Series:
    """The `clicked` column as Boolean, else derived from `event`, else all True."""
    if "clicked" in df.columns:
        _check_no_nulls(df, ["clicked"], source)
        dtype = df.schema["clicked"]
        col = pl.col("clicked")
        if dtype == pl.Boolean:
            expr = col
        elif dtype.is_integer():
            expr = pl.when(col == 1).then(True).when(col == 0).then(False)
        else:
            text = col.cast(pl.Utf8).str.strip_chars().str.to_lowercase()
            expr = text.replace_strict(_CLICKED_TEXT, default=None, return_dtype=pl.Boolean)
        return _converted(df, "clicked", expr, source, "a boolean (true/false or 1/0)")
    if "event" in df.columns:
        positive = [e.lower() for e in positive_events]
        expr = pl.col("event").cast(pl.Utf8).str.to_lowercase().is_in(positive).fill_null(False)
        return df.select(expr.alias("clicked")).to_series()
    return pl.Series("clicked", [True] * df.height, dtype=pl.Boolean)


def _optional_columns(df: pl.DataFrame, source: str) -> list[pl.Series]:
    """The optional canonical columns present (except `clicked`), cast to their dtypes."""
    present = [c for c in OPTIONAL if c != "clicked" and c in df.columns]
    return [
        _converted(
            df,
            c,
            pl.col(c).cast(CANONICAL_DTYPES[c], strict=False),
            source,
            f"castable to {CANONICAL_DTYPES[c]}",
        )
        for c in present
    ]


def _non_finite(df: pl.DataFrame, policy: str, source: str) -> pl.DataFrame:
    """`df` without rows holding NaN / inf in a float column (`policy="drop"`), or a DataError
    naming column, count, rows and values (`"error"`). NaN compares true with >= in polars, so a
    NaN rating would otherwise become a liked item."""
    floats = [c for c in df.columns if df.schema[c].is_float()]
    bad = {c: df[c].is_not_null() & ~df[c].is_finite() for c in floats}
    if policy == "drop":
        return df.filter(~pl.any_horizontal(*bad.values())) if bad else df
    faults = [_shown_values(df, c, mask, "that are NaN or inf") for c, mask in bad.items()]
    _raise_faults(faults, source, "; fix them, or set data.validation.non_finite=drop to drop them")
    return df


def _out_of_range(df: pl.DataFrame, source: str) -> None:
    """DataError for values outside a column's contract bounds (`schema.BOUNDS`)."""
    faults = []
    for c, (low, high, low_inclusive) in BOUNDS.items():
        if c not in df.columns:
            continue
        below = df[c] < low if low_inclusive else df[c] <= low
        if high is None:
            what = f"that are below {low}" if low_inclusive else f"that are at most {low}"
            faults.append(_shown_values(df, c, below, what))
        else:
            bracket = "[" if low_inclusive else "("
            faults.append(_shown_values(df, c, below | (df[c] > high),
                                        f"outside {bracket}{low}, {high}]"))
    _raise_faults(faults, source)


def _shown_values(df: pl.DataFrame, name: str, mask: pl.Series, what: str) -> str | None:
    """'column 'x' has n value(s) <what> (row r: v, ...)' for the rows of `mask`, or None."""
    mask = mask.fill_null(False)
    if not mask.any():
        return None
    rows = _first_rows(df, mask)
    values = df[name].filter(mask).head(SHOWN_ROWS).to_list()
    shown = ", ".join(f"row {r}: {v!r}" for r, v in zip(rows, values, strict=True))
    return f"column {name!r} has {mask.sum():,} value(s) {what} ({shown})"


def _raise_faults(faults: Sequence[str | None], source: str, hint: str = "") -> None:
    """One DataError for the faults found (None = that check passed), if any."""
    found = [f for f in faults if f]
    if found:
        raise DataError(f"{source}: " + "; ".join(found) + f" (rows are 0-based){hint}")


def validate(
    lf: pl.LazyFrame,
    source: str,
    *,
    drop_duplicates: bool = True,
    min_events_per_user: int = 1,
    positive_events: Sequence[str] = POSITIVE_EVENTS,
    timestamp_format: str | None = None,
    non_finite: str = "error",
    require_click_signal: bool = False,
    partial: bool = False,
) -> tuple[pl.DataFrame, ValidationReport]:
    """Check and normalise a canonical click log; rows stay in their original order.

    Output columns: user_id, item_id, timestamp, clicked, seq, then the optional canonical
    columns present, with `schema.CANONICAL_DTYPES`. NaN / inf in a float column (rating,
    weight) is refused, or with `non_finite="drop"` its row is dropped; a value below
    `schema.BOUNDS` is refused. Duplicates are rows equal on user_id,
    item_id, timestamp and, when present, request_id and event (the first is kept). Users with
    fewer than `min_events_per_user` positive (clicked) events are dropped with all their rows.
    `require_click_signal` (the caller builds impression pairs) refuses a log without
    request ids or clicks (`check_click_signal`) instead of taking every row as a click.

    `partial=True` validates one user bucket of a larger log (the prepare stage's bounded-memory
    path): the input carries `seq`, its rows' numbers in the whole log, which error messages
    quote, and an empty result is returned, not refused; the caller checks the merged report
    with `check_rows_left`.
    """
    if non_finite not in NON_FINITE:
        raise DataError(
            f"data.validation.non_finite must be one of {list(NON_FINITE)}, got {non_finite!r}"
        )
    try:
        check_columns(lf.collect_schema().names(), source)
        raw = lf.collect()
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{source}: cannot read the log: {exc}") from exc
    if "seq" not in raw.columns or not partial:
        raw = raw.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("seq"))
    if raw.height == 0 and not partial:
        raise DataError(f"{source}: no rows")
    _check_no_nulls(raw, REQUIRED, source)
    if require_click_signal:
        check_click_signal([c for c in raw.columns if c != "seq"], source)

    df = pl.DataFrame(
        [
            raw["user_id"].cast(pl.Utf8),
            raw["item_id"].cast(pl.Utf8),
            _timestamps(raw, timestamp_format, source),
            _clicked(raw, positive_events, source),
            raw["seq"].cast(pl.Int64),
            *_optional_columns(raw, source),
        ]
    )
    rows_in = df.height
    df = _non_finite(df, non_finite, source)
    non_finite_dropped = rows_in - df.height
    _out_of_range(df, source)
    deduplicating = df.height

    if drop_duplicates:
        key = [
            "user_id",
            "item_id",
            "timestamp",
            *(c for c in ("request_id", "event") if c in df.columns),
        ]
        df = df.unique(subset=key, keep="first", maintain_order=True)
    duplicates = deduplicating - df.height

    positives = df.group_by("user_id").agg(pl.col("clicked").sum().alias("n"))
    short = positives.filter(pl.col("n") < min_events_per_user)["user_id"]
    before = df.height
    df = df.filter(~pl.col("user_id").is_in(short.implode()))
    report = ValidationReport(
        source=source,
        rows_in=rows_in,
        rows_out=df.height,
        non_finite_dropped=non_finite_dropped,
        duplicates_dropped=duplicates,
        short_users_dropped=short.len(),
        short_user_rows_dropped=before - df.height,
    )
    if not partial:
        check_rows_left(report, min_events_per_user)
    return df, report


def merge_reports(source: str, reports: Sequence[ValidationReport]) -> ValidationReport:
    """One report for a log validated in buckets: the counts summed."""
    return ValidationReport(
        source=source,
        rows_in=sum(r.rows_in for r in reports),
        rows_out=sum(r.rows_out for r in reports),
        non_finite_dropped=sum(r.non_finite_dropped for r in reports),
        duplicates_dropped=sum(r.duplicates_dropped for r in reports),
        short_users_dropped=sum(r.short_users_dropped for r in reports),
        short_user_rows_dropped=sum(r.short_user_rows_dropped for r in reports),
    )


def check_rows_left(report: ValidationReport, min_events_per_user: int) -> None:
    """DataError if the log was empty, or if dropping left no rows, saying why."""
    if report.rows_in == 0:
        raise DataError(f"{report.source}: no rows")
    if report.rows_out == 0:
        raise DataError(
            f"{report.source}: no rows left: all {report.short_users_dropped:,} user(s) have "
            f"fewer than min_events_per_user={min_events_per_user} positive events "
            f"(after dropping {report.duplicates_dropped:,} duplicate rows); lower "
            "min_events_per_user or check the clicked/event column"
        )
