"""The embedded default dataset: a seeded synthetic impression log with known true utilities.

The model (all draws seeded by `SyntheticConfig.seed`):

    users       U_u ~ N(0, I/d)  in R^d                                  (d = `dim`)
    items       V_i ~ N(0, I/d)  in R^d
    popularity  pop_i = (r_i + 1)^(-a) / Z,  r = a random permutation of 0..n_items-1
                (a = `popularity_exponent`; Z normalises pop to sum 1)
    bias        b_i = `popularity_bias` * standardise(log pop_i)   (popular items are a bit better)
    utility     u(u, i) = s * <U_u, V_i> + b_i                         (s = `utility_scale`;
                s = sqrt(d) gives <.,.> term unit variance)

    requests    each user makes max(1, Poisson(`mean_requests`)) requests at times
                t_j = 2024-01-01T00:00Z + sum_{l<=j} (1 + floor(Exp(`mean_gap_seconds`)))
                (int64 unix seconds, strictly increasing per user)

    logging     the slate of `slate_size` distinct items is a Plackett-Luce draw, i.e. sampling
    policy      without replacement, from softmax_i(l_ui) with the partially informed score
                    l_ui = w_pop * log pop_i + w_util * (s * <U_u + e_u, V_i> + b_i),
                    e_u ~ N(0, (`logging_noise`^2 / d) I)       (the policy knows users imperfectly)
                Slate order is the draw order; position p = 0..slate_size-1. Each shown item's
                `propensity` is the exact probability that this policy puts it at its
                position, P(i at p | u) (`recsys_dpo.ranking_policy.plackett_luce_marginals`:
                a Gumbel integral, ~1e-8 relative error), for off-policy evaluation.
                Sampling: draws with replacement from softmax(l_u) keeping first occurrences
                (repeats rejected, which is exactly sequential sampling without replacement);
                a row that runs out of draws is completed by the Gumbel top-k trick over the
                items not yet taken: argtop_k(l_ui + G_i), G_i ~ Gumbel(0, 1). Both are exact.

    clicks      P(click | shown at p) = examine(p) * sigmoid(c * u(u, i) + c0),
                examine(p) = 1 / (1 + p)^eta                    (c = `click_scale`,
                c0 = `click_bias`, eta = `examine_eta`; the cascade-free position-based model)

Drift (off by default: `n_days` = 0 writes the log above, bit for bit). With `n_days` = D > 0
the log has a day axis, day d = floor((t - 2024-01-01T00:00Z) / 86,400 s), d = 0..D-1:

    arrival     round(`item_arrival` * n_items) items, drawn uniformly, arrive on a day a_i
                uniform on 1..D-1, the others have a_i = 0; a user arrives on a day a_u uniform
                on 1..D-1 with probability `user_arrival`, else a_u = 0
    requests    the user's max(1, Poisson(`mean_requests`)) requests fall uniformly in
                [day a_u, day D): t_j = day_start(a_u) + floor(F_j (S_u - n_u)) + j, F_(j)
                sorted uniforms on [0, 1), S_u = (D - a_u) * 86,400, n_u the request count
                (strictly increasing; `mean_gap_seconds` is not used)
    popularity  on day d >= a_i the logging policy sees
                    log pop_i(d) = log pop_i + sigma * (W_i(d) - W_i(a_i)),
                    W_i(0) = 0, W_i(d) = sum_{l=1..d} z_il, z_il ~ N(0, 1)
                (sigma = `popularity_drift`: a Gaussian random walk of log-popularity, from
                the item's base popularity on its arrival day); an item with a_i > d has
                logit -inf that day: it is never shown before it arrives
    logging     l_ui(d) = w_pop * log pop_i(d) + w_util * (s * <U_u + e_u, V_i> + b_i), the
                slate and its propensities drawn from the logits of the request's day

The true utility u(u, i) stays static: it, b_i and `popularity` (the truth's) are the base
ones; only what the logging policy shows drifts (exposure drift, no preference drift), so the
truth metrics read a drift log as any other. The truth's items and users frames then carry
`arrival_day` (Int32), so later code can tell new items and users apart; without a day axis
the column is left out (every arrival day is 0). Items arriving or popularity drifting cost
more: the logits (and propensities) have one row per (user, day) instead of per user, up to
min(D, mean_requests) times the work (~4x at D = 10, 8 requests per user).

With the defaults (2000 users, 500 items) the log has ~160k impressions, a click-through of
~16% falling from ~57% at position 0 to ~5% at position 9, and ~99% of users with >= 3 clicks;
it takes a few seconds, most of it the propensities: O(users x items x slate_size x ~130
quadrature nodes); the rest is O(users x items) for the logging softmax plus O(events).

Ids are strings: user_id "u<k>", item_id "i<k>", request_id "u<k>-<j>" (the user's j-th
request), so every stage is exercised with string ids.

Randomness is drawn per fixed block of users (`_block_users`, a function of n_items only), each
block from its own `np.random.default_rng([seed, stream, block])`, so the log does not depend on
`chunk_users`: chunks only decide how the users are cut into parquet files. Memory is bounded
by one chunk plus one block (the block's user x item logits, a few MiB).

On disk (`generate`):

    out_dir/events/chunk=00000/part-0.parquet ...   request_id, user_id, item_id, timestamp,
                                                     position, clicked, propensity,
                                                     event ("impression")
    out_dir/truth/users.parquet                     user_id, vector (Array[Float32, d]),
                                                     logging_vector (U + e, what the logging
                                                     policy knows; Array[Float64, d])
    out_dir/truth/items.parquet                     item_id, vector, bias, popularity
                                                     (+ arrival_day with n_days > 0; also
                                                     in users.parquet)
    out_dir/manifest.json                           written last: config, counts, file list

built in a temporary directory beside `out_dir` and renamed into place, so a directory with a
manifest is always complete.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from rich.progress import Progress

from recsys_dpo.data.splits import DAY_SECONDS  # the window split's days are the log's
from recsys_dpo.errors import DataError
from recsys_dpo.ranking_policy import plackett_luce_marginals

GENERATOR = "recsys_dpo.data.synthetic"
# 2: the `propensity` column.
GENERATOR_VERSION = 2
START_TIMESTAMP = 1_704_067_200  # 2024-01-01T00:00:00Z
EVENT_COLUMNS = ("request_id", "user_id", "item_id", "timestamp", "position", "clicked",
                 "propensity", "event")
# Independent random streams: one for the items, then per user block one for each stage, so a
# data-dependent number of draws in one stage cannot shift the draws of another. The drift's
# own streams leave the users, items and request counts of a drift log those of the same seed
# without drift.
_ITEMS, _USERS, _SLATES, _CLICKS, _ITEM_ARRIVAL, _POPULARITY_WALK, _USER_ARRIVAL = range(7)
_BLOCK_CELLS = 1 << 20  # users x items logits held per block (float64: 8 MiB)
_MAX_BLOCK_USERS = 1024
# Allowed leftovers in a directory that `generate` may replace (an earlier, maybe partial, log).
_OWN_ENTRIES = frozenset({"events", "truth", "manifest.json"})


@dataclass
class SyntheticConfig:
    """Parameters of the synthetic log (see the module docstring for the model)."""

    n_users: int = 2000
    n_items: int = 500
    mean_requests: float = 8.0
    slate_size: int = 10
    dim: int = 16
    seed: int = 0
    popularity_exponent: float = 1.0
    popularity_bias: float = 0.3
    utility_scale: float = 4.0
    logging_pop_weight: float = 1.0
    logging_util_weight: float = 0.5
    logging_noise: float = 1.0
    click_scale: float = 1.0
    click_bias: float = -1.0
    examine_eta: float = 1.0
    mean_gap_seconds: float = 86_400.0
    chunk_users: int = 50_000
    n_days: int = 0
    item_arrival: float = 0.0
    user_arrival: float = 0.0
    popularity_drift: float = 0.0

    def __post_init__(self) -> None:
        positive = ("n_users", "n_items", "slate_size", "dim", "chunk_users", "mean_requests")
        bad = [name for name in positive if not getattr(self, name) > 0]
        if bad:
            raise DataError(f"synthetic config: {bad} must be positive; got {asdict(self)}")
        if self.slate_size > self.n_items:
            raise DataError(
                f"synthetic config: slate_size={self.slate_size} exceeds n_items={self.n_items}; "
                "a slate shows distinct items"
            )
        if self.mean_gap_seconds < 0 or self.logging_noise < 0:
            raise DataError("synthetic config: mean_gap_seconds and logging_noise must be >= 0")
        self._check_drift()

    def _check_drift(self) -> None:
        if self.n_days < 0 or self.popularity_drift < 0:
            raise DataError(f"synthetic config: n_days={self.n_days} and popularity_drift="
                            f"{self.popularity_drift} must be >= 0")
        shares = {"item_arrival": self.item_arrival, "user_arrival": self.user_arrival}
        if any(not 0 <= share <= 1 for share in shares.values()):
            raise DataError(f"synthetic config: {shares} must lie in [0, 1]")
        drifting = [n for n in DRIFT_FIELDS[1:] if getattr(self, n)]
        if drifting and self.n_days < 2:
            raise DataError(f"synthetic config: {drifting} need n_days >= 2 (a day after the "
                            f"first to arrive or drift on); got n_days={self.n_days}")
        first_day = self.n_items - _n_new_items(self)
        if first_day < self.slate_size:
            raise DataError(
                f"synthetic config: item_arrival={self.item_arrival} leaves {first_day} of "
                f"{self.n_items} items on day 0, fewer than slate_size={self.slate_size}"
            )


# The drift settings; at their off value (0) a config records and hashes as one without them.
DRIFT_FIELDS = ("n_days", "item_arrival", "user_arrival", "popularity_drift")


def _n_new_items(cfg: SyntheticConfig) -> int:
    """The items that arrive after day 0."""
    return round(cfg.item_arrival * cfg.n_items)


def _logit_days(cfg: SyntheticConfig) -> int:
    """The days the logging logits tell apart: n_days when items arrive or popularity drifts,
    else 1 (the logits are a user's whatever the day: one row per user, not per user-day)."""
    return cfg.n_days if cfg.item_arrival or cfg.popularity_drift else 1


@dataclass(frozen=True)
class Truth:
    """Ground truth of a synthetic log: latent vectors, item bias and popularity, id maps."""

    user_vectors: np.ndarray  # [n_users, d] float32
    item_vectors: np.ndarray  # [n_items, d] float32
    item_bias: np.ndarray  # [n_items] float64
    item_popularity: np.ndarray  # [n_items] float64, sums to 1
    utility_scale: float
    user_index: dict[str, int]
    item_index: dict[str, int]
    logging_vectors: np.ndarray  # [n_users, d] float64: U_u + e_u
    config: SyntheticConfig
    item_arrival_day: np.ndarray  # [n_items] int32: the first day the item can be shown
    user_arrival_day: np.ndarray  # [n_users] int32: the day of the user's first request
    popularity_walk: np.ndarray  # [max(1, n_days), n_items]: log pop_i(d) - log pop_i

    def utility(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """u(user row, item row) = scale * <U, V> + b, elementwise over broadcast arrays
        (float64)."""
        return _utility(self.user_vectors[users], self.item_vectors[items],
                        self.item_bias[items], self.utility_scale)

    def click_probability(self, users: np.ndarray, items: np.ndarray,
                          positions: np.ndarray) -> np.ndarray:
        """P(click | user row, item row shown at position) of the click model, elementwise
        over broadcast arrays (float64)."""
        return _click_probability(self.config, self.utility(users, items), positions)

    def logging_logits(self, users: np.ndarray, day: int = 0) -> np.ndarray:
        """[len(users), n_items]: the logging policy's Plackett-Luce logits l_ui on `day`
        (-inf for an item not yet arrived; the day matters only with drift)."""
        logits = _logging_logits(self.config, self.logging_vectors[users], self.item_vectors,
                                 self.item_bias, self.item_popularity)
        return _on_days(self.config, logits, self.popularity_walk, self.item_arrival_day,
                        np.full(len(logits), day))


@dataclass(frozen=True)
class _Items:
    """The catalog: what every user block needs."""

    vectors: np.ndarray
    bias: np.ndarray
    popularity: np.ndarray
    arrival_day: np.ndarray  # [n_items] int32
    walk: np.ndarray  # [max(1, n_days), n_items] float64: `_popularity_walk`


@dataclass(frozen=True)
class _Requests:
    """Request-level arrays for a contiguous range of users (sorted by user)."""

    user: np.ndarray  # [R] global user index
    number: np.ndarray  # [R] the request's rank among its user's requests
    timestamp: np.ndarray  # [R]
    slate: np.ndarray  # [R, k] item index, in display order
    clicked: np.ndarray  # [R, k] bool
    propensity: np.ndarray  # [R, k] P(the slate's item at its position | the user)

    def users_between(self, start: int, end: int) -> "_Requests":
        """The requests of users start <= u < end."""
        lo, hi = np.searchsorted(self.user, [start, end])
        return _Requests(*(getattr(self, f.name)[lo:hi] for f in fields(self)))


# --- the model ---------------------------------------------------------------------------------


def _utility(user_vectors: np.ndarray, item_vectors: np.ndarray, bias: np.ndarray,
             scale: float) -> np.ndarray:
    """u = scale * <U, V> + b, row by row over broadcast leading axes (float64 from the stored
    float32 vectors)."""
    dot = np.einsum("...d,...d->...", user_vectors.astype(np.float64),
                    item_vectors.astype(np.float64))
    return scale * dot + bias


def _click_probability(cfg: SyntheticConfig, utility: np.ndarray,
                       positions: np.ndarray) -> np.ndarray:
    """P(click | shown at p) = examine(p) * sigmoid(c * u + c0), examine(p) = 1 / (1 + p)^eta."""
    examine = 1.0 / (1.0 + np.asarray(positions, dtype=np.float64)) ** cfg.examine_eta
    return examine * _sigmoid(cfg.click_scale * utility + cfg.click_bias)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free form of 1 / (1 + e^-x)


def _latent(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """n vectors ~ N(0, I/d) as float32."""
    return (rng.standard_normal((n, dim)) / np.sqrt(dim)).astype(np.float32)


def _make_items(cfg: SyntheticConfig) -> _Items:
    """Item vectors, Zipf-like popularity over a random rank order, and the popularity bias."""
    rng = np.random.default_rng([cfg.seed, _ITEMS])
    vectors = _latent(rng, cfg.n_items, cfg.dim)
    rank = rng.permutation(cfg.n_items)
    weight = (rank + 1.0) ** -cfg.popularity_exponent
    popularity = weight / weight.sum()
    log_pop = np.log(popularity)
    spread = log_pop.std()
    standardised = (log_pop - log_pop.mean()) / spread if spread > 0 else np.zeros_like(log_pop)
    arrival = _item_arrival(cfg)
    return _Items(vectors, cfg.popularity_bias * standardised, popularity, arrival,
                  _popularity_walk(cfg, arrival))


def _item_arrival(cfg: SyntheticConfig) -> np.ndarray:
    """a_i: 0, or for `_n_new_items` items drawn uniformly a day uniform on 1..n_days-1."""
    day = np.zeros(cfg.n_items, dtype=np.int32)
    n_new = _n_new_items(cfg)
    if n_new:
        rng = np.random.default_rng([cfg.seed, _ITEM_ARRIVAL])
        day[rng.permutation(cfg.n_items)[:n_new]] = rng.integers(1, cfg.n_days, n_new)
    return day


def _popularity_walk(cfg: SyntheticConfig, arrival: np.ndarray) -> np.ndarray:
    """[max(1, n_days), n_items]: sigma * (W_i(d) - W_i(a_i)), the drift of log pop_i on day d
    (rows before an item's arrival are never used: it is not shown then)."""
    days = max(1, cfg.n_days)
    walk = np.zeros((days, cfg.n_items))
    if cfg.popularity_drift:
        steps = np.random.default_rng([cfg.seed, _POPULARITY_WALK]).standard_normal(
            (days - 1, cfg.n_items))
        np.cumsum(steps, axis=0, out=walk[1:])
        walk -= walk[arrival, np.arange(cfg.n_items)]
        walk *= cfg.popularity_drift
    return walk


def _on_days(cfg: SyntheticConfig, logits: np.ndarray, walk: np.ndarray, arrival: np.ndarray,
             day: np.ndarray) -> np.ndarray:
    """The logits [rows, items] of rows on days `day` [rows], in place: + w_pop times the
    popularity drift, -inf for the items that have not arrived yet."""
    if _logit_days(cfg) > 1:
        logits += cfg.logging_pop_weight * walk[day]
        logits[arrival[None, :] > day[:, None]] = -np.inf
    return logits


def _block_users(cfg: SyntheticConfig) -> int:
    """Users per random-number block: a function of the config only, not of `chunk_users`
    (chunk-invariance). The logits of a block have a row per (user, day) with items arriving
    or popularity drifting: about min(n_days, mean_requests) per user; else one."""
    rows_per_user = min(_logit_days(cfg), int(np.ceil(cfg.mean_requests)))
    return max(1, min(_MAX_BLOCK_USERS, _BLOCK_CELLS // (cfg.n_items * rows_per_user)))


def _request_times(rng: np.random.Generator, counts: np.ndarray, mean_gap: float) -> np.ndarray:
    """Per user: start + cumulative gaps of 1 + floor(Exp(mean_gap)) seconds (no day axis)."""
    gaps = 1 + np.floor(rng.exponential(mean_gap, counts.sum())).astype(np.int64)
    total = np.cumsum(gaps)
    first = np.cumsum(counts) - counts
    before_user = total[first] - gaps[first]
    return START_TIMESTAMP + total - np.repeat(before_user, counts)


def _daily_times(rng: np.random.Generator, counts: np.ndarray, arrival: np.ndarray,
                 n_days: int) -> np.ndarray:
    """Per user: `counts` strictly increasing times uniform in [day a_u, day n_days)."""
    row = np.repeat(np.arange(len(counts)), counts)
    fraction = np.sort(row + rng.random(len(row))) - row  # sorted within each user
    rank = np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts)
    start = START_TIMESTAMP + DAY_SECONDS * arrival[row].astype(np.int64)
    span = DAY_SECONDS * (n_days - arrival[row].astype(np.int64)) - counts[row]
    return start + np.floor(fraction * span).astype(np.int64) + rank


def _first_occurrences(draws: np.ndarray) -> np.ndarray:
    """Mask of each row's first occurrence of every value (stable sort keeps the earliest)."""
    order = np.argsort(draws, axis=1, kind="stable")
    ordered = np.take_along_axis(draws, order, axis=1)
    first_ordered = np.ones_like(ordered, dtype=bool)
    first_ordered[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first = np.empty_like(first_ordered)
    np.put_along_axis(first, order, first_ordered, axis=1)
    return first


def _gumbel_complete(logits: np.ndarray, taken: np.ndarray, n_taken: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """Fill slots n_taken.. of `taken` [r, k] by Gumbel top-k over the items not yet taken."""
    k = taken.shape[1]
    scores = logits + rng.gumbel(size=logits.shape)
    rows = np.arange(len(taken))[:, None]
    slot = np.arange(k)[None, :]
    already = slot < n_taken[:, None]
    scores[np.broadcast_to(rows, taken.shape)[already], taken[already]] = -np.inf
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), 1), 1)
    fill = np.take_along_axis(top, np.maximum(slot - n_taken[:, None], 0), axis=1)
    return np.where(already, taken, fill)


def _sample_slates(logits: np.ndarray, rows: np.ndarray, k: int, rng: np.random.Generator,
                   n_draws: int) -> np.ndarray:
    """Plackett-Luce slates [len(rows), k]: k items without replacement from softmax(logits[row]).

    `n_draws` draws with replacement per request by inverse CDF, keep first occurrences in
    order; requests with fewer than k distinct draws are completed by `_gumbel_complete`.
    """
    n_users, n_items = logits.shape
    # A row's last item that can show: a draw past the row's end (float rounding) is that one,
    # never an item of logit -inf (one that has not arrived yet, with drift).
    last = n_items - 1 - np.argmax(np.isfinite(logits[:, ::-1]), axis=1)
    # In place: fresh block-sized arrays cost more in page faults than the arithmetic.
    cdf = np.subtract(logits, logits.max(axis=1, keepdims=True))
    np.exp(cdf, out=cdf)
    np.cumsum(cdf, axis=1, out=cdf)
    cdf /= cdf[:, -1:]
    # One sorted array for all users: row u's CDF shifted into (u, u + 1].
    cdf += np.arange(n_users)[:, None]
    flat = cdf.ravel()
    queries = rng.random((len(rows), n_draws)) + rows[:, None]
    found = np.searchsorted(flat, queries, side="right") - rows[:, None] * n_items
    draws = np.minimum(np.maximum(found, 0), last[rows][:, None])
    first = _first_occurrences(draws)
    rank = np.cumsum(first, axis=1)
    keep = first & (rank <= k)
    n_taken = np.minimum(rank[:, -1], k)
    slates = np.zeros((len(rows), k), dtype=np.int64)
    slates[np.nonzero(keep)[0], rank[keep] - 1] = draws[keep]
    short = np.flatnonzero(n_taken < k)
    for start in range(0, len(short), n_users):  # bounds the [rows, items] Gumbel matrix
        part = short[start:start + n_users]
        slates[part] = _gumbel_complete(logits[rows[part]], slates[part], n_taken[part], rng)
    return slates


def _slot_propensities(logits: np.ndarray, row: np.ndarray, slate: np.ndarray) -> np.ndarray:
    """[R, k]: P(slate[r, p] at position p) under Plackett-Luce from softmax(logits[row[r]]),
    computed once per (user, shown item)."""
    n_users, n_items = logits.shape
    k = slate.shape[1]
    shown, where = np.unique((row[:, None] * n_items + slate).ravel(), return_inverse=True)
    user, item = np.divmod(shown, n_items)
    counts = np.bincount(user, minlength=n_users)
    column = np.arange(len(shown)) - np.repeat(np.cumsum(counts) - counts, counts)
    asked = np.zeros((n_users, max(1, int(counts.max()))), dtype=np.int64)  # padding: item 0
    asked[user, column] = item
    marginals = plackett_luce_marginals(logits, k, asked)
    slot = np.tile(np.arange(k), len(row))
    return marginals[user[where], column[where], slot].reshape(slate.shape)


def _logging_logits(cfg: SyntheticConfig, logging_vectors: np.ndarray, item_vectors: np.ndarray,
                    bias: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """l_ui = w_pop log pop_i + w_util (s <U_u + e_u, V_i> + b_i), float64 [users, items]."""
    logits = logging_vectors.astype(np.float64) @ item_vectors.T.astype(np.float64)
    logits *= cfg.logging_util_weight * cfg.utility_scale
    logits += cfg.logging_pop_weight * np.log(popularity) + cfg.logging_util_weight * bias
    return logits


# A block's user vectors, logging vectors and arrival days.
_Vectors = tuple[np.ndarray, np.ndarray, np.ndarray]


def _simulate_block(cfg: SyntheticConfig, items: _Items, block: int) -> tuple[_Vectors, _Requests]:
    """User and logging vectors and the requests of user block `block`, from the block's own
    random streams."""
    size = _block_users(cfg)
    first_user = block * size
    n = min(size, cfg.n_users - first_user)
    users_rng, slates_rng, clicks_rng = (
        np.random.default_rng([cfg.seed, stream, block]) for stream in (_USERS, _SLATES, _CLICKS)
    )
    user_vectors = _latent(users_rng, n, cfg.dim)
    noise = users_rng.standard_normal((n, cfg.dim)) * (cfg.logging_noise / np.sqrt(cfg.dim))
    counts = np.maximum(1, users_rng.poisson(cfg.mean_requests, n))
    arrival = np.zeros(n, dtype=np.int32)
    if cfg.n_days:
        arrival_rng = np.random.default_rng([cfg.seed, _USER_ARRIVAL, block])
        late = arrival_rng.random(n) < cfg.user_arrival
        arrival[late] = arrival_rng.integers(1, cfg.n_days, int(late.sum()))
        timestamp = _daily_times(arrival_rng, counts, arrival, cfg.n_days)
    else:
        timestamp = _request_times(users_rng, counts, cfg.mean_gap_seconds)

    logging_vectors = user_vectors + noise  # float64: the logits are made from exactly these
    row = np.repeat(np.arange(n), counts)
    # One logits row per (user, day) the user has requests on, where the day changes them.
    days = _logit_days(cfg)
    day = (timestamp - START_TIMESTAMP) // DAY_SECONDS if days > 1 else np.zeros_like(row)
    groups, logit_row = np.unique(row * days + day, return_inverse=True)
    group_user, group_day = np.divmod(groups, days)
    logits = _logging_logits(cfg, logging_vectors[group_user], items.vectors, items.bias,
                             items.popularity)
    logits = _on_days(cfg, logits, items.walk, items.arrival_day, group_day)
    k = cfg.slate_size
    slate = _sample_slates(logits, logit_row, k, slates_rng, n_draws=2 * k + 8)

    utility = _utility(user_vectors[np.repeat(row, k)], items.vectors[slate.ravel()],
                       items.bias[slate.ravel()], cfg.utility_scale).reshape(slate.shape)
    p_click = _click_probability(cfg, utility, np.arange(k))
    clicked = clicks_rng.random(slate.shape) < p_click

    number = np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts)
    propensity = _slot_propensities(logits, logit_row, slate)
    return (user_vectors, logging_vectors, arrival), _Requests(row + first_user, number,
                                                                timestamp, slate, clicked,
                                                                propensity)


def _simulate_chunks(cfg: SyntheticConfig, items: _Items) -> Iterator[tuple[_Vectors, _Requests]]:
    """((user vectors, logging vectors), requests) per chunk of `chunk_users` users, cut out of
    the user blocks."""
    size = _block_users(cfg)
    cached: tuple[int, tuple[_Vectors, _Requests]] | None = None
    for start in range(0, cfg.n_users, cfg.chunk_users):
        end = min(start + cfg.chunk_users, cfg.n_users)
        vectors, requests = [], []
        for block in range(start // size, (end - 1) // size + 1):
            if cached is None or cached[0] != block:  # consecutive chunks may share a block
                cached = (block, _simulate_block(cfg, items, block))
            block_vectors, block_requests = cached[1]
            lo, hi = max(start, block * size), min(end, (block + 1) * size)
            vectors.append([v[lo - block * size:hi - block * size] for v in block_vectors])
            requests.append(block_requests.users_between(lo, hi))
        yield tuple(np.concatenate(v) for v in zip(*vectors, strict=True)), _Requests(
            *(np.concatenate([getattr(r, f.name) for r in requests]) for f in fields(_Requests))
        )


# --- frames and files --------------------------------------------------------------------------


def _ids(prefix: str, index: pl.Expr) -> pl.Expr:
    return pl.concat_str(pl.lit(prefix), index.cast(pl.Utf8))


def _events_frame(requests: _Requests) -> pl.DataFrame:
    """One row per shown item, canonical columns (`EVENT_COLUMNS`)."""
    k = requests.slate.shape[1]
    frame = pl.DataFrame({
        "_user": np.repeat(requests.user, k),
        "_number": np.repeat(requests.number, k),
        "timestamp": np.repeat(requests.timestamp, k).astype(np.int64),
        "position": np.tile(np.arange(k, dtype=np.int32), len(requests.user)),
        "_item": requests.slate.ravel(),
        "clicked": requests.clicked.ravel(),
        "propensity": requests.propensity.ravel(),
    })
    return frame.select(
        pl.concat_str(_ids("u", pl.col("_user")), pl.lit("-"), pl.col("_number").cast(pl.Utf8))
        .alias("request_id"),
        _ids("u", pl.col("_user")).alias("user_id"),
        _ids("i", pl.col("_item")).alias("item_id"),
        "timestamp",
        "position",
        "clicked",
        "propensity",
        pl.lit("impression").alias("event"),
    )


def _arrival_column(cfg: SyntheticConfig, arrival: np.ndarray) -> list[pl.Series]:
    """The `arrival_day` column of a log with a day axis; none without (the files stay those
    of a log generated before drift existed)."""
    return [pl.Series("arrival_day", arrival, dtype=pl.Int32)] if cfg.n_days else []


def _users_frame(cfg: SyntheticConfig, first_user: int, vectors: _Vectors) -> pl.DataFrame:
    index = pl.Series(np.arange(first_user, first_user + len(vectors[0])))
    return pl.DataFrame({"user_id": index}).select(
        _ids("u", pl.col("user_id")).alias("user_id"), pl.Series("vector", vectors[0]),
        pl.Series("logging_vector", vectors[1]), *_arrival_column(cfg, vectors[2]),
    )


def _items_frame(cfg: SyntheticConfig, items: _Items) -> pl.DataFrame:
    frame = pl.DataFrame({"_item": np.arange(len(items.bias))})
    return frame.select(
        _ids("i", pl.col("_item")).alias("item_id"),
        pl.Series("vector", items.vectors),
        pl.Series("bias", items.bias),
        pl.Series("popularity", items.popularity),
        *_arrival_column(cfg, items.arrival_day),
    )


def _recorded_config(cfg: SyntheticConfig) -> dict:
    """The config as the manifest records it: the drift settings left out while off, so a log
    without drift has the manifest (and the regeneration check) it had before they existed."""
    return {k: v for k, v in asdict(cfg).items() if not (k in DRIFT_FIELDS and not v)}


def _content_config(config: dict) -> dict:
    """The config fields that decide the log's content: `chunk_users` only cuts it into files."""
    return {k: v for k, v in config.items() if k != "chunk_users"}


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to overwrite a directory that is not (a possibly partial) synthetic log."""
    if out_dir.exists() and not (out_dir.is_dir()
                                 and {p.name for p in out_dir.iterdir()} <= _OWN_ENTRIES):
        raise DataError(
            f"{out_dir}: exists and is not a synthetic log directory (expected only "
            f"{sorted(_OWN_ENTRIES)}); choose another path for the synthetic data"
        )


def _write_log(tmp: Path, cfg: SyntheticConfig, progress: bool) -> dict:
    """Write events and truth under `tmp`; return the manifest (not yet written)."""
    items = _make_items(cfg)
    (tmp / "truth").mkdir()
    _items_frame(cfg, items).write_parquet(tmp / "truth" / "items.parquet")
    n_chunks = -(-cfg.n_users // cfg.chunk_users)
    width = max(5, len(str(n_chunks - 1)))
    files, n_requests, n_events, n_clicks = [], 0, 0, 0
    users_writer = None
    with Progress(disable=not progress) as bar:
        task = bar.add_task("synthetic log", total=n_chunks)
        for chunk, (vectors, requests) in enumerate(_simulate_chunks(cfg, items)):
            part = Path("events") / f"chunk={chunk:0{width}d}" / "part-0.parquet"
            (tmp / part).parent.mkdir(parents=True)
            _events_frame(requests).write_parquet(tmp / part)
            files.append(part.as_posix())
            users = _users_frame(cfg, chunk * cfg.chunk_users, vectors).to_arrow()
            if users_writer is None:
                users_writer = pq.ParquetWriter(tmp / "truth" / "users.parquet", users.schema)
            users_writer.write_table(users)
            n_requests += len(requests.user)
            n_events += requests.slate.size
            n_clicks += int(requests.clicked.sum())
            bar.advance(task)
    users_writer.close()
    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "config": _recorded_config(cfg),
        "seed": cfg.seed,
        "n_users": cfg.n_users,
        "n_items": cfg.n_items,
        "n_requests": n_requests,
        "n_events": n_events,
        "n_clicks": n_clicks,
        "click_through": n_clicks / n_events,
        "files": ["truth/items.parquet", "truth/users.parquet", *files],
    }


def generate(out_dir: str | Path, cfg: SyntheticConfig, progress: bool = False) -> Path:
    """Write the synthetic log of `cfg` to `out_dir` atomically; `manifest.json` comes last.

    The files are built in a temporary directory beside `out_dir` and renamed into place; an
    existing `out_dir` is replaced only if it holds nothing but a (possibly partial) log.
    """
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        manifest = _write_log(tmp, cfg, progress)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            old = tmp.with_name(tmp.name + "-old")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_manifest(path: str | Path) -> dict | None:
    """The manifest of a synthetic log directory, or None when it has none (incomplete)."""
    manifest = Path(path) / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.is_file() else None


def read_synthetic(path: str | Path, **cfg_overrides: int | float) -> pl.LazyFrame:
    """The synthetic log at `path` as a lazy canonical frame, generating it when needed.

    `cfg_overrides` are `SyntheticConfig` fields (plain numbers, as hydra passes them). The log
    is (re)generated when `path` has no manifest or was generated by another generator version
    or from another config (`chunk_users` aside, which does not change the events).
    """
    known = {f.name for f in fields(SyntheticConfig)}
    unknown = sorted(set(cfg_overrides) - known)
    if unknown:
        raise DataError(f"synthetic reader: unknown option(s) {unknown}; known: {sorted(known)}")
    cfg = SyntheticConfig(**cfg_overrides)
    manifest = read_manifest(path)
    if (manifest is None or manifest.get("version") != GENERATOR_VERSION
            or _content_config(manifest["config"]) != _content_config(_recorded_config(cfg))):
        generate(path, cfg)
    return pl.scan_parquet(
        str(Path(path) / "events" / "**" / "*.parquet"), hive_partitioning=False
    ).select(EVENT_COLUMNS)


# --- ground truth ------------------------------------------------------------------------------


def load_truth(path: str | Path) -> Truth:
    """The ground truth saved with the synthetic log at `path`."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        raise DataError(f"{path}: no manifest.json; not a complete synthetic log")
    users = pl.read_parquet(path / "truth" / "users.parquet")
    items = pl.read_parquet(path / "truth" / "items.parquet")
    return _truth(SyntheticConfig(**manifest["config"]), users, items)


def _truth(cfg: SyntheticConfig, users: pl.DataFrame, items: pl.DataFrame) -> Truth:
    item_arrival = _arrival_days(items)
    return Truth(
        user_vectors=users["vector"].to_numpy(),
        item_vectors=items["vector"].to_numpy(),
        item_bias=items["bias"].to_numpy(),
        item_popularity=items["popularity"].to_numpy(),
        utility_scale=float(cfg.utility_scale),
        user_index={u: k for k, u in enumerate(users["user_id"].to_list())},
        item_index={i: k for k, i in enumerate(items["item_id"].to_list())},
        logging_vectors=users["logging_vector"].to_numpy(),
        config=cfg,
        item_arrival_day=item_arrival,
        user_arrival_day=_arrival_days(users),
        popularity_walk=_popularity_walk(cfg, item_arrival),
    )


def _arrival_days(frame: pl.DataFrame) -> np.ndarray:
    """A truth frame's `arrival_day`; all 0 where the log has no day axis (no such column)."""
    if "arrival_day" in frame.columns:
        return frame["arrival_day"].to_numpy()
    return np.zeros(frame.height, dtype=np.int32)


def simulate(cfg: SyntheticConfig) -> tuple[Truth, pl.DataFrame]:
    """The log of `cfg` in memory, (truth, events): the same log as `generate` writes, for
    studies that draw many (benchmarks/ope_validation.py)."""
    items = _make_items(cfg)
    chunks = list(_simulate_chunks(cfg, items))
    users = pl.concat([_users_frame(cfg, k * cfg.chunk_users, v)
                       for k, (v, _) in enumerate(chunks)])
    events = pl.concat([_events_frame(r) for _, r in chunks])
    return _truth(cfg, users, _items_frame(cfg, items)), events


def _rows(index: dict[str, int], ids: Sequence[str], what: str) -> np.ndarray:
    """Row numbers of `ids`; DataError naming the first unknown ones."""
    rows = [index.get(str(i), -1) for i in ids]
    missing = [str(i) for i, r in zip(ids, rows, strict=True) if r < 0]
    if missing:
        raise DataError(f"synthetic truth: {len(missing)} unknown {what} id(s), e.g. {missing[:5]}")
    return np.asarray(rows, dtype=np.int64)


def true_utility(truth: "Truth | str | Path", user_ids: Sequence[str],
                 item_ids: Sequence[str]) -> np.ndarray:
    """u(user_ids[n], item_ids[n]) = scale * <U, V> + b for each n (float64 [n])."""
    if not isinstance(truth, Truth):
        truth = load_truth(truth)
    if len(user_ids) != len(item_ids):
        raise DataError(f"true_utility: {len(user_ids)} user ids but {len(item_ids)} item ids")
    users = _rows(truth.user_index, user_ids, "user")
    items = _rows(truth.item_index, item_ids, "item")
    return _utility(truth.user_vectors[users], truth.item_vectors[items], truth.item_bias[items],
                    truth.utility_scale)


def true_preference_accuracy(truth: "Truth | str | Path", user_ids: Sequence[str],
                             chosen_item_ids: Sequence[str],
                             rejected_item_ids: Sequence[str]) -> float:
    """Fraction of (user, chosen, rejected) triples with u(user, chosen) > u(user, rejected)."""
    if not isinstance(truth, Truth):
        truth = load_truth(truth)
    if len(user_ids) == 0:
        raise DataError("true_preference_accuracy: no (user, chosen, rejected) triples given")
    chosen = true_utility(truth, user_ids, chosen_item_ids)
    rejected = true_utility(truth, user_ids, rejected_item_ids)
    return float(np.mean(chosen > rejected))
