"""Per-user event order, positive histories and history windows.

Event order within a user is (timestamp, seq): `seq` is the original row order, so events with
the same timestamp keep the order they were logged in. A user's history is the item_idx of
their positives (clicked == True) in that order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from recsys_dpo.data.schema import ITEM_IDX, USER_IDX
from recsys_dpo.errors import DataError

EVENT_ORDER = ("timestamp", "seq")
N_BEFORE = "n_before"


def event_rank() -> pl.Expr:
    """Each row's rank 0..n-1 in the global (timestamp, seq) order: one integer order key."""
    return pl.arg_sort_by(*EVENT_ORDER).arg_sort()


def with_positives_before(df: pl.DataFrame) -> pl.DataFrame:
    """Add `n_before`: how many of the row's user's positives come strictly before it.

    For a positive it is its rank among the user's positives, i.e. the length of its history.
    """
    clicked = pl.col("clicked").cast(pl.Int64)
    return df.with_columns(
        (clicked.cum_sum().over(USER_IDX, order_by=list(EVENT_ORDER)) - clicked).alias(N_BEFORE)
    )


def user_histories(
    df: pl.DataFrame, max_len: int | None = None, splits: Sequence[str] = ("train",)
) -> pl.DataFrame:
    """(user_idx, items, timestamps): each user's positives in event order, within `splits`.

    Only users with at least one such positive appear; with `max_len` the most recent
    `max_len` are kept. Sorted by user_idx.
    """
    if "split" not in df.columns:
        raise DataError("column split: missing; split the frame (splits.split_frame) first")
    histories = (
        df.filter(pl.col("clicked") & pl.col("split").is_in(list(splits)))
        .sort([USER_IDX, *EVENT_ORDER])
        .group_by(USER_IDX, maintain_order=True)
        .agg(pl.col(ITEM_IDX).alias("items"), pl.col("timestamp").alias("timestamps"))
    )
    if max_len is not None:
        histories = histories.with_columns(pl.col("items", "timestamps").list.tail(max_len))
    return histories


def ragged_list(values: np.ndarray, lengths: np.ndarray, dtype: pl.DataType) -> pl.Series:
    """A List column whose row r holds the next `lengths[r]` entries of `values`."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    array = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
    return pl.Series(array).cast(pl.List(dtype))


def history_windows(
    histories: pl.DataFrame, user_idx: np.ndarray, end: np.ndarray, max_len: int
) -> pl.Series:
    """For each (user, end): the user's history items [end - max_len, end), most recent last.

    `histories` comes from `user_histories` (sorted by user); `end` counts the positives before
    the event (`n_before`). Gathering from one flat array costs only the output size, unlike
    joining the full history list onto every event.
    """
    users = histories[USER_IDX].to_numpy()
    lengths = histories["items"].list.len().to_numpy()
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    flat = histories["items"].explode(empty_as_null=False).to_numpy()

    end = np.asarray(end, dtype=np.int64)
    window = np.minimum(end, max_len)
    row = np.minimum(np.searchsorted(users, user_idx), max(len(users) - 1, 0))
    first = starts[row] + end - window if len(users) else np.zeros_like(end)
    offsets = np.zeros(len(window) + 1, dtype=np.int64)
    np.cumsum(window, out=offsets[1:])
    gather = np.repeat(first - offsets[:-1], window) + np.arange(offsets[-1])
    return ragged_list(flat[gather], window, pl.Int32())
