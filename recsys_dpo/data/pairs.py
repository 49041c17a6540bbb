"""Preference pairs from an encoded, split click log (DESIGN.md, "Pair strategies").

One row per chosen event, schema `PAIRS_SCHEMA`: the user's context (their positive items
strictly before the chosen event in (timestamp, seq) order, most recent last, the last
`max_context` kept), the chosen item, >= 1 rejected items (never the chosen one), the event's
weight (its `weight` column, else 1.0), the strategy name as `source`, and its timestamp and
seq (the event's row: every strategy's rows of one event share them).

The chosen events come from one split; a context may use positives of every split because
they precede the event (a test pair's context holds the train history, as at serving time).
Anything else a strategy reads from other rows (popularity, low ratings) comes from the
requested split and the splits before it (`SPLITS` order), never from later ones.

Strategies live in `STRATEGIES`. `reference_hard` (items the frozen reference ranks top-K that
the user did not choose) needs a trained reference model, so it is not built here: the
preference stage applies it to these pairs (`reference.hard_negatives=N`,
`recsys_dpo/retrieval/hard_negatives.py`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import polars as pl

from recsys_dpo.data.schema import ITEM_IDX, PAD_ITEM, PAIRS_SCHEMA, USER_IDX
from recsys_dpo.data.sequences import (
    EVENT_ORDER,
    N_BEFORE,
    history_windows,
    ragged_list,
    user_histories,
    with_positives_before,
)
from recsys_dpo.data.splits import SPLITS
from recsys_dpo.errors import DataError

SAMPLERS = ("uniform", "popularity")
# Rounds of vectorised rejection sampling before the rows still short fall back to an exact
# per-row draw; only users whose positives cover most of the sampling mass get that far.
_REJECTION_ROUNDS = 6


def _require(df: pl.DataFrame, columns: tuple[str, ...], who: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{who} pairs: the log has no column(s) {missing}")


def _events(df: pl.DataFrame, split: str, who: str) -> pl.DataFrame:
    """Check the frame and `split`; add `n_before` (the chosen event's history length)."""
    _require(df, (USER_IDX, ITEM_IDX, *EVENT_ORDER, "clicked", "split"), who)
    _splits_up_to(split)
    return with_positives_before(df)


def _splits_up_to(split: str) -> list[str]:
    if split not in SPLITS:
        raise DataError(f"split {split!r} unknown; expected one of {SPLITS}")
    return list(SPLITS[: SPLITS.index(split) + 1])


def _finish(
    chosen: pl.DataFrame, events: pl.DataFrame, source: str, max_context: int
) -> pl.DataFrame:
    """Attach contexts, weight and source to chosen rows (with a `rejected` list column)."""
    if max_context < 0:
        raise DataError(f"{source} pairs: max_context must be >= 0, got {max_context}")
    chosen = chosen.sort([USER_IDX, *EVENT_ORDER])
    context = history_windows(
        user_histories(events, splits=SPLITS),
        chosen[USER_IDX].to_numpy(),
        chosen[N_BEFORE].to_numpy(),
        max_context,
    )
    weight = pl.col("weight").fill_null(1.0) if "weight" in chosen.columns else pl.lit(1.0)
    return chosen.select(
        USER_IDX,
        context.alias("context"),
        pl.col(ITEM_IDX).alias("chosen"),
        "rejected",
        weight.alias("weight"),
        pl.lit(source).alias("source"),
        "timestamp",
        "seq",
    ).cast(PAIRS_SCHEMA)


def impression_pairs(
    df: pl.DataFrame, split: str, *, max_context: int = 50, skip_above: bool = False
) -> pl.DataFrame:
    """Clicked item vs the items shown but not clicked in the same request.

    Rejected = the request's not-clicked items (whatever split their rows fell in: they were
    shown together with the click), in display order, without the chosen item. With
    `skip_above` only those shown above the click (smaller position) count, the ones the user
    surely saw and skipped (Joachims et al., 2005); clicks with none are dropped.
    """
    _require(df, ("request_id", *(("position",) if skip_above else ())), "impressions")
    events = _events(df, split, "impressions")
    keys = [USER_IDX, "request_id"]
    has_position = "position" in events.columns
    display = ["position", "seq"] if has_position else ["seq"]
    in_request = pl.col("request_id").is_not_null()
    clicks = events.filter(pl.col("clicked") & in_request & (pl.col("split") == split))
    clicks = clicks.with_row_index("_row")
    shown = events.filter(~pl.col("clicked") & in_request).select(
        *keys, pl.col(ITEM_IDX).alias("_rej"), *(pl.col(c).alias(f"_r{c}") for c in display)
    )
    candidates = (
        clicks.select("_row", *keys, ITEM_IDX, *(["position"] if has_position else []))
        .join(shown, on=keys, how="inner")
        .filter(pl.col("_rej") != pl.col(ITEM_IDX))
    )
    if skip_above:
        candidates = candidates.filter(pl.col("_rposition") < pl.col("position"))
    rejected = (
        candidates.sort(["_row", *(f"_r{c}" for c in display)])
        .group_by("_row", maintain_order=True)
        .agg(pl.col("_rej").unique(maintain_order=True).alias("rejected"))
    )
    chosen = clicks.join(rejected, on="_row", how="inner")
    return _finish(chosen, events, "impressions", max_context)


def check_impression_pairs(
    log: pl.LazyFrame, counts: Mapping[str, Mapping[str, int]], source: str
) -> None:
    """DataError when impression pairs were asked for and none came out, saying why.

    `log` is the validated log (its `request_id` and `clicked`), `counts` the pairs built,
    split -> source -> rows. No pair at all means no request holds both a click and a
    shown-but-not-clicked item: all shown items clicked (a click column that is not one, or
    none mapped), none clicked, or one item per request; an empty pairs file would only make
    the preference stage fail later, or train on nothing.
    """
    if sum(by_source.get("impressions", 0) for by_source in counts.values()):
        return
    shown = log.filter(pl.col("request_id").is_not_null())
    n, clicked = shown.select(pl.len(), pl.col("clicked").sum()).collect().row(0)
    if not n:
        why = "no row has a request_id; check the request_id column (or its mapping)"
    elif clicked == n:
        why = f"all {n:,} shown item(s) are clicked; check the clicked column (or its mapping)"
    elif not clicked:
        why = f"none of the {n:,} shown item(s) is clicked; check the clicked/event column"
    else:
        why = (
            "no request has both a clicked and a not-clicked item (or, with skip_above, a "
            "not-clicked one shown above a click); check the request_id column"
        )
    raise DataError(f"{source}: impression pairs: none built: {why}")


def item_popularity(df: pl.DataFrame, split: str, n_items: int) -> np.ndarray:
    """Positive counts per item_idx (length n_items) over `split` and the splits before it."""
    items = df.filter(pl.col("clicked") & pl.col("split").is_in(_splits_up_to(split)))[ITEM_IDX]
    return np.bincount(items.to_numpy(), minlength=n_items)[:n_items]


def _sampling_weights(sampler: str, alpha: float, popularity: np.ndarray) -> np.ndarray:
    """Unnormalised draw weights per item: 1, or popularity^alpha (word2vec's 3/4 by default)."""
    if sampler not in SAMPLERS:
        raise DataError(f"next_item pairs: sampler {sampler!r} unknown; expected one of {SAMPLERS}")
    weights = (
        np.ones(len(popularity)) if sampler == "uniform" else popularity.astype(float) ** alpha
    )
    weights[PAD_ITEM] = 0.0
    return weights


def _member(sorted_keys: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x in sorted_keys, elementwise."""
    if not len(sorted_keys):
        return np.zeros(x.shape, dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, x), len(sorted_keys) - 1)
    return sorted_keys[at] == x


def sample_negatives(
    users: np.ndarray,
    weights: np.ndarray,
    k: int,
    excluded: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, up to k distinct items drawn without replacement with probability ∝ weights.

    `excluded` holds sorted keys user * n_items + item that must never be drawn for that
    user (their positives). A row gets min(k, items with weight > 0 not excluded) items.
    Rows draw candidates in bulk, drop duplicates and excluded ones in draw order and keep the
    first ones needed (exactly sequential sampling without replacement); only rows still short
    draw again, with twice the oversampling. Returns (items flattened row by row, count per row).
    """
    n_items = len(weights)
    support = weights > 0
    cdf = np.cumsum(weights)
    in_support = excluded[support[excluded % n_items]]
    blocked = np.searchsorted(in_support, (users + 1) * n_items) - np.searchsorted(
        in_support, users * n_items
    )
    target = np.minimum(k, int(support.sum()) - blocked)
    out = np.full((len(users), k), -1, dtype=np.int64)
    filled = np.zeros(len(users), dtype=np.int64)
    for round_ in range(_REJECTION_ROUNDS):
        active = np.flatnonzero(filled < target)
        if not active.size:
            break
        draws = rng.random((active.size, 2 * k << round_)) * cdf[-1]
        cand = np.minimum(np.searchsorted(cdf, draws, side="right"), n_items - 1)
        # A key per (row, item) over what the row holds already followed by the new draws:
        # np.unique's first index marks first occurrences in draw order.
        seen = np.concatenate([out[active], cand], axis=1) + 1
        keys = (np.arange(active.size)[:, None] * (n_items + 1) + seen).ravel()
        first = np.zeros(keys.size, dtype=bool)
        first[np.unique(keys, return_index=True)[1]] = True
        valid = (
            first.reshape(seen.shape)[:, k:]
            & support[cand]
            & ~_member(excluded, users[active, None] * n_items + cand)
        )
        rank = np.cumsum(valid, axis=1)
        take = valid & (rank <= (target - filled)[active, None])
        row, col = np.nonzero(take)
        out[active[row], filled[active[row]] + rank[row, col] - 1] = cand[row, col]
        filled[active] += take.sum(axis=1)
    for i in np.flatnonzero(filled < target):
        lo, hi = np.searchsorted(excluded, [users[i] * n_items, (users[i] + 1) * n_items])
        allowed = support.copy()
        allowed[excluded[lo:hi] % n_items] = False
        allowed[out[i, : filled[i]]] = False
        pool = np.flatnonzero(allowed)
        out[i, filled[i] : target[i]] = rng.choice(
            pool, size=target[i] - filled[i], replace=False, p=weights[pool] / weights[pool].sum()
        )
    return out[out >= 0], target


def next_item_pairs(
    df: pl.DataFrame,
    split: str,
    *,
    n_items: int,
    num_negatives: int = 4,
    sampler: str = "uniform",
    alpha: float = 0.75,
    max_context: int = 50,
    min_context: int = 1,
    seed: int = 0,
    popularity: np.ndarray | None = None,
) -> pl.DataFrame:
    """Each positive of `split` vs `num_negatives` sampled items the user never chose.

    Negatives come from 1..n_items-1, uniformly or ∝ popularity^alpha (Mikolov et al., 2013),
    where popularity counts positives in `split` and the splits before it (or is given, e.g.
    computed once over the whole log by `write_pairs`); never padding, never one of the
    user's positives in `split` or the splits before it. Later splits are not looked at: a
    train pair that avoided the user's held-out items as negatives would leak them. Events
    with fewer than `min_context` earlier positives are skipped.
    """
    events = _events(df, split, "next_item")
    if num_negatives < 1:
        raise DataError(f"next_item pairs: num_negatives must be >= 1, got {num_negatives}")
    if events.height and events[ITEM_IDX].max() >= n_items:
        raise DataError(f"next_item pairs: column {ITEM_IDX} exceeds n_items - 1 = {n_items - 1}")
    if popularity is None:
        popularity = item_popularity(events, split, n_items)
    weights = _sampling_weights(sampler, alpha, popularity)
    positives = events.filter(pl.col("clicked") & pl.col("split").is_in(_splits_up_to(split)))
    excluded = np.unique(
        positives[USER_IDX].to_numpy().astype(np.int64) * n_items + positives[ITEM_IDX].to_numpy()
    )
    chosen = positives.filter((pl.col("split") == split) & (pl.col(N_BEFORE) >= min_context))
    chosen = chosen.sort([USER_IDX, *EVENT_ORDER])
    values, lengths = sample_negatives(
        chosen[USER_IDX].to_numpy().astype(np.int64),
        weights,
        num_negatives,
        excluded,
        np.random.default_rng(seed),
    )
    chosen = chosen.with_columns(ragged_list(values, lengths, pl.Int32()).alias("rejected"))
    return _finish(
        chosen.filter(pl.col("rejected").list.len() > 0), events, "next_item", max_context
    )


def feedback_pairs(
    df: pl.DataFrame,
    split: str,
    *,
    high: float = 4.0,
    low: float = 2.0,
    max_negatives: int = 4,
    max_context: int = 50,
    seed: int = 0,
) -> pl.DataFrame:
    """An event rated >= high vs up to `max_negatives` of the same user's items rated <= low.

    The low-rated items come from `split` and the splits before it; when a user has more than
    `max_negatives` (other than the chosen item) a seeded uniform subset is kept, in item order.
    Users with no low-rated item give no pairs.
    """
    _require(df, ("rating",), "feedback")
    if not low < high:
        raise DataError(f"feedback pairs: need low < high, got low={low}, high={high}")
    events = _events(df, split, "feedback")
    chosen = events.filter((pl.col("split") == split) & (pl.col("rating") >= high))
    chosen = chosen.sort([USER_IDX, *EVENT_ORDER]).with_row_index("_row")
    lows = (
        events.filter(pl.col("split").is_in(_splits_up_to(split)) & (pl.col("rating") <= low))
        .select(USER_IDX, pl.col(ITEM_IDX).alias("_rej"))
        .unique()
    )
    candidates = (
        chosen.select("_row", USER_IDX, ITEM_IDX)
        .join(lows, on=USER_IDX, how="inner")
        .filter(pl.col("_rej") != pl.col(ITEM_IDX))
        .sort("_row", "_rej")
    )
    draw = pl.Series(np.random.default_rng(seed).random(candidates.height))
    rejected = (
        candidates.with_columns(draw.alias("_draw"))
        .filter(pl.col("_draw").rank("ordinal").over("_row") <= max_negatives)
        .group_by("_row", maintain_order=True)
        .agg(pl.col("_rej").alias("rejected"))
    )
    chosen = chosen.join(rejected, on="_row", how="inner")
    return _finish(chosen, events, "feedback", max_context)


STRATEGIES: dict[str, Callable[..., pl.DataFrame]] = {
    "impressions": impression_pairs,
    "next_item": next_item_pairs,
    "feedback": feedback_pairs,
}


def _run_strategy(
    df: pl.DataFrame,
    split: str,
    name: str,
    kwargs: Mapping[str, Any],
    shared: Mapping[str, Any],
    seed_salt: tuple[int, ...],
) -> pl.DataFrame:
    """Call a registered strategy with its kwargs plus the `shared` values it accepts.

    With a `seed_salt` the strategy's seed becomes SeedSequence((seed, *salt)), so each
    bucket of `write_pairs` draws its own stream, reproducibly.
    """
    if name not in STRATEGIES:
        raise DataError(f"pair strategy {name!r} unknown; expected one of {sorted(STRATEGIES)}")
    params = dict(inspect.signature(STRATEGIES[name]).parameters)
    del params["df"], params["split"]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise DataError(
            f"pair strategy {name!r}: unknown option(s) {unknown}; has {sorted(params)}"
        )
    call = {**kwargs, **{k: v for k, v in shared.items() if k in params}}
    if seed_salt and "seed" in params:
        base = call.get("seed", params["seed"].default)
        call["seed"] = int(np.random.SeedSequence([base, *seed_salt]).generate_state(1)[0])
    return STRATEGIES[name](df, split, **call)


def build_pairs(
    df: pl.DataFrame,
    split: str,
    strategies: Mapping[str, Mapping[str, Any]],
    *,
    n_items: int,
    popularity: np.ndarray | None = None,
    seed_salt: tuple[int, ...] = (),
) -> pl.DataFrame:
    """Run each named strategy (`STRATEGIES`) with its kwargs; their pairs, concatenated.

    Every strategy is per user, so `df` may hold one bucket of the users (the prepare stage's
    bounded-memory path). Then pass the whole log's `popularity` (`item_popularity`), so the
    sampler sees the same counts in every bucket, and `seed_salt=(bucket, n_buckets)`, so each
    bucket draws its own reproducible stream.
    """
    if popularity is None:
        popularity = item_popularity(df, split, n_items)
    shared = {"n_items": n_items, "popularity": popularity}
    frames = [
        _run_strategy(df, split, name, kwargs, shared, seed_salt)
        for name, kwargs in strategies.items()
    ]
    return pl.concat([pl.DataFrame(schema=PAIRS_SCHEMA), *frames])
