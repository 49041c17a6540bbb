"""Lightning DataModules: a prepared dataset directory -> batches of padded tensors.

Both modules read the prepare stage's parquet files once with polars and keep every
variable-length column (histories, rejected lists, seen sets) as one flat tensor plus row
bounds (`Ragged`); a batch is cut and padded from them in a single vectorised gather. That keeps
memory at O(events) instead of O(examples x max_len), and needs no per-row Python.

Batch keys (models read `user_idx` and `context`, see `recsys_dpo/models/base.py`):

    user_idx [B] long; context [B, L] long, LEFT-padded with PAD_ITEM, most recent item last
    stage 1:     target [B] (the next item); targets_seq [B, L] (SASRec mode: the next item at
                 every context position, PAD_ITEM where the context is padding)
    pairs:       chosen [B]; rejected [B, K] (right-padded with PAD_ITEM); rejected_mask [B, K];
                 weight [B]; optionally ref_chosen [B], ref_rejected [B, K] (precomputed
                 reference log-probabilities)
    validation:  context = the user's train positives, target = the first valid positive,
                 seen [B, S] = the train positives the seen policy removes (`eval.seen`)

Shuffling uses `EpochShuffle`, a permutation seeded by (seed, epoch), so a run resumed from
a checkpoint sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from recsys_dpo.artifacts import read_manifest
from recsys_dpo.data.schema import ITEM_IDX, PAD_ITEM, USER_IDX
from recsys_dpo.data.sequences import EVENT_ORDER
from recsys_dpo.errors import DataError
from recsys_dpo.retrieval.seen import DEFAULT_SEEN, check_seen_policy, removed_items

Batch = dict[str, Tensor]
TrainMode = Literal["sequence", "pointwise"]


@dataclass(frozen=True)
class PreparedDataset:
    """A finished prepare-stage directory: its manifest, vocab sizes and frame readers."""

    path: Path
    manifest: dict[str, Any]
    n_items: int  # including the padding item 0
    n_users: int

    def _read(self, name: str) -> pl.DataFrame:
        file = self.path / name
        if not file.is_file():
            raise DataError(f"{self.path}: missing {name} (listed files: {sorted(self.files)})")
        return pl.read_parquet(file)

    @property
    def files(self) -> dict[str, Any]:
        return self.manifest.get("files", {})

    def events(self, split: str) -> pl.DataFrame:
        """The encoded events of one split (`train`, `valid` or `test`)."""
        return self._read(f"{split}.parquet")

    def pairs(self, split: str) -> pl.DataFrame:
        """The preference pairs of one split (PAIRS_SCHEMA)."""
        return self._read(f"pairs_{split}.parquet")

    def has_pairs(self, split: str) -> bool:
        return f"pairs_{split}.parquet" in self.files

    def features(self, side: str) -> np.ndarray | None:
        """The `side` ("user" / "item") attribute matrix [n_users or n_items, f] float32, rows
        by index (item row 0 the padding item), or None when the dataset has none."""
        name = f"{side}_features.parquet"
        if name not in self.files:
            return None
        frame = self._read(name)
        return frame.drop(frame.columns[0]).to_numpy().astype(np.float32)


def load_prepared(path: str | Path) -> PreparedDataset:
    """Open a prepared dataset; DataError if it has no manifest (incomplete) or no vocab sizes."""
    path = Path(path)
    manifest = read_manifest(path)
    missing = [key for key in ("n_items", "n_users") if key not in manifest]
    if missing:
        raise DataError(f"{path}/manifest.json: missing {missing}; re-run the prepare stage")
    return PreparedDataset(path, manifest, int(manifest["n_items"]), int(manifest["n_users"]))


@dataclass(frozen=True)
class Ragged:
    """Variable-length rows as slices [starts, ends) of one flat tensor, padded on demand.

    `left=True` keeps each row's LAST `width` values, right-aligned (histories: most recent
    last); otherwise the FIRST `width`, left-aligned (rejected lists). `width=None` pads to the
    longest row of the batch. `values` ends with one pad sentinel so gathers never go out of
    range, even for an all-empty column.
    """

    values: Tensor
    starts: Tensor
    ends: Tensor
    width: int | None
    left: bool

    @classmethod
    def from_lists(cls, lists: pl.Series, width: int | None, left: bool) -> Ragged:
        """One row per list of a polars List column."""
        lists = lists.list.drop_nulls()
        lengths = torch.from_numpy(lists.list.len().to_numpy().astype(np.int64))
        flat = lists.explode(empty_as_null=False, keep_nulls=False).to_numpy()
        ends = lengths.cumsum(0)
        return cls(_with_sentinel(torch.tensor(flat)), ends - lengths, ends, width, left)

    def take(self, rows: Tensor) -> Tensor:
        """Padded values [len(rows), width] of the given rows (padding is 0)."""
        starts, ends = self.starts[rows], self.ends[rows]
        width = self.width
        if width is None:
            width = max(int((ends - starts).max()) if len(rows) else 0, 1)
        offsets = torch.arange(width)
        if self.left:
            index = ends.unsqueeze(1) - width + offsets
            real = index >= starts.unsqueeze(1)
        else:
            index = starts.unsqueeze(1) + offsets
            real = index < ends.unsqueeze(1)
        gathered = self.values[index.clamp(0, len(self.values) - 1)]
        return torch.where(real, gathered, torch.zeros((), dtype=gathered.dtype))


def _with_sentinel(values: Tensor) -> Tensor:
    values = values.long() if not values.is_floating_point() else values.float()
    return torch.cat([values, values.new_zeros(1)])


class RowsDataset(Dataset):
    """Named columns (dense tensors or `Ragged`) fetched a whole batch at a time.

    `__getitems__` lets the DataLoader ask for all rows of a batch in one call, so a batch is a
    handful of tensor gathers; use it with `collate_fn=as_batch`.
    """

    def __init__(self, columns: dict[str, Tensor | Ragged]) -> None:
        sizes = {len(c) if isinstance(c, Tensor) else len(c.starts) for c in columns.values()}
        if len(sizes) != 1:
            raise ValueError(f"RowsDataset columns differ in length: {sizes}")
        self.columns = columns
        self.size = sizes.pop()

    def __len__(self) -> int:
        return self.size

    def __getitems__(self, indices: list[int]) -> Batch:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return {
            name: col[rows] if isinstance(col, Tensor) else col.take(rows)
            for name, col in self.columns.items()
        }

    def __getitem__(self, index: int) -> Batch:
        return {name: value[0] for name, value in self.__getitems__([index]).items()}


def as_batch(batch: Batch) -> Batch:
    """collate_fn for `RowsDataset`: the batch is already collated; pair rows get their mask."""
    if "rejected" in batch:
        batch["rejected_mask"] = batch["rejected"] != PAD_ITEM
    return batch


class EpochShuffle(Sampler[int]):
    """A random permutation that depends only on (seed, epoch); Lightning calls `set_epoch`.

    torch's RandomSampler draws its seed from the global RNG, which a resumed run does not
    restore, so a resumed epoch would see other batches than the uninterrupted run.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def user_sequences(events: pl.DataFrame) -> pl.DataFrame:
    """Each user's positives in time order (ties by original row order): user_idx, items."""
    return (
        events.filter(pl.col("clicked"))
        .sort(USER_IDX, "timestamp", "seq")
        .group_by(USER_IDX, maintain_order=True)
        .agg(pl.col(ITEM_IDX).alias("items"))
    )


def next_item_examples(sequences: pl.DataFrame, max_len: int, mode: TrainMode) -> RowsDataset:
    """Stage-1 training rows from the train sequences.

    pointwise: one row per position t >= 1 of each sequence: context = s[t-L:t], target = s[t].
    sequence (SASRec): the sequence cut from its end into windows of L targets, so every
    position t >= 1 is a target exactly once: context = s[a:b], targets_seq = s[a+1:b+1],
    target = s[b] (the window's last target).
    """
    items = Ragged.from_lists(sequences["items"], max_len, left=True)
    lengths, offsets = items.ends - items.starts, items.starts
    if mode == "sequence":
        windows = (lengths - 1).clamp(min=0).add(max_len - 1).div(max_len, rounding_mode="floor")
        owner = torch.repeat_interleave(torch.arange(len(lengths)), windows)
        k = torch.arange(len(owner)) - torch.repeat_interleave(windows.cumsum(0) - windows, windows)
        ends = offsets[owner] + lengths[owner] - 1 - k * max_len
    elif mode == "pointwise":
        owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        position = torch.arange(len(owner)) - offsets[owner]
        owner, ends = owner[position >= 1], torch.arange(len(owner))[position >= 1]
    else:
        raise ValueError(f"unknown training mode {mode!r}; expected 'sequence' or 'pointwise'")
    starts = torch.maximum(offsets[owner], ends - max_len)
    users = torch.from_numpy(sequences[USER_IDX].to_numpy().astype(np.int64))
    columns: dict[str, Tensor | Ragged] = {
        "user_idx": users[owner],
        "context": Ragged(items.values, starts, ends, max_len, left=True),
        "target": items.values[ends],
    }
    if mode == "sequence":
        columns["targets_seq"] = Ragged(items.values, starts + 1, ends + 1, max_len, left=True)
    return RowsDataset(columns)


def rated_examples(
    events: pl.DataFrame,
    sequences: pl.DataFrame,
    max_len: int,
    threshold: float,
    where: Path | str = "train events",
) -> RowsDataset:
    """Stage-1 rows of a rating classifier: one per rated event (rating not null) of `events`:
    user_idx, target = the rated item, liked = rating >= threshold (float 0/1), context = the
    user's positives in `sequences` (the same history the validation rows condition on) less
    the target itself: a liked target is one of those positives, so keeping it would tell a
    history model the label (validation candidates are never in their context either).

    DataError naming `where` when the events have no rating column or no rated row.
    """
    if "rating" not in events.columns or events["rating"].null_count() == events.height:
        raise DataError(
            f"{where}: no rating column with a value, but objective=rating_bce trains a rating "
            "classifier on rated (user, item) events (use a dataset with explicit ratings, "
            "e.g. data=coat, or a next-item objective such as objective=ce)"
        )
    rated = (
        events.filter(pl.col("rating").is_not_null())
        .join(sequences, on=USER_IDX, how="left", maintain_order="left")
        .with_row_index("row")
    )
    context = (
        rated.select("row", ITEM_IDX, pl.col("items").fill_null([]))
        .explode("items")
        .filter(pl.col("items") != pl.col(ITEM_IDX))  # also drops an empty list's null
        .group_by("row", maintain_order=True)
        .agg("items")
    )
    rated = rated.drop("items").join(context, on="row", how="left", maintain_order="left")
    users = rated[USER_IDX].to_numpy().astype(np.int64)
    liked = (rated["rating"] >= threshold).to_numpy().astype(np.float32)
    return RowsDataset({
        "user_idx": torch.from_numpy(users),
        "context": Ragged.from_lists(rated["items"].fill_null([]), max_len, left=True),
        "target": torch.from_numpy(rated[ITEM_IDX].to_numpy().astype(np.int64)),
        "liked": torch.from_numpy(liked),
    })  # fmt: skip


def rated_ranking_examples(
    sequences: pl.DataFrame, valid_events: pl.DataFrame, max_len: int
) -> RowsDataset:
    """Validation rows of a rating classifier: one per user whose valid rated items hold a
    liked (clicked) and a disliked one: context = the train positives, candidates = the valid
    rated items, targets = the liked ones among them (both right-padded with PAD_ITEM).

    The model ranks only the user's own held-out rated items, the question a rating model
    answers and the one the Coat study selects on (`mcar/ndcg_at_k` of the valid slice);
    `training.ranking_eval.ranking_metrics` scores these rows.
    """
    rated = valid_events.filter(pl.col("rating").is_not_null()) if "rating" in \
        valid_events.columns else valid_events  # fmt: skip
    per_user = (
        rated.sort(USER_IDX, ITEM_IDX)
        .group_by(USER_IDX, maintain_order=True)
        .agg(
            pl.col(ITEM_IDX).alias("candidates"),
            pl.col(ITEM_IDX).filter(pl.col("clicked")).alias("targets"),
        )
        .filter(pl.col("targets").list.len().is_between(1, pl.col("candidates").list.len() - 1))
    )
    rows = sequences.join(per_user, on=USER_IDX, how="inner")
    return RowsDataset({
        "user_idx": torch.from_numpy(rows[USER_IDX].to_numpy().astype(np.int64)),
        "context": Ragged.from_lists(rows["items"], max_len, left=True),
        "candidates": Ragged.from_lists(rows["candidates"], None, left=False),
        "targets": Ragged.from_lists(rows["targets"], None, left=False),
    })  # fmt: skip


def ranking_examples(
    sequences: pl.DataFrame, valid_events: pl.DataFrame, max_len: int, seen: str = DEFAULT_SEEN
) -> RowsDataset:
    """One validation row per user with a valid positive and at least one train positive.

    target = the user's first valid positive; context = the train positives; seen = the train
    positives the seen policy removes (`recsys_dpo/retrieval/seen.py`, as the evaluator).
    A user with no train history is cold-start: there is nothing to condition on, and the
    evaluation stage reports those users separately.
    """
    first_valid = (
        valid_events.filter(pl.col("clicked"))
        .sort(USER_IDX, "timestamp", "seq")
        .group_by(USER_IDX, maintain_order=True)
        .agg(pl.col(ITEM_IDX).first().alias("target"))
    )
    rows = sequences.join(first_valid, on=USER_IDX, how="inner")
    removed = pl.Series([removed_items(h, seen) for h in rows["items"].to_list()])
    return RowsDataset(
        {
            "user_idx": torch.from_numpy(rows[USER_IDX].to_numpy().astype(np.int64)),
            "context": Ragged.from_lists(rows["items"], max_len, left=True),
            "target": torch.from_numpy(rows["target"].to_numpy().astype(np.int64)),
            "seen": Ragged.from_lists(removed.cast(pl.List(pl.Int64)), None, left=False),
        }
    )


def pair_examples(pairs: pl.DataFrame, max_len: int, max_negatives: int | None) -> RowsDataset:
    """Pairs parquet rows -> padded pair columns (plus ref_* when the file has them)."""
    if pairs.height == 0:
        raise DataError("pairs file has no rows: nothing to train or validate on")
    widest = int(pairs["rejected"].list.len().max())
    width = widest if max_negatives is None else min(widest, max_negatives)
    columns: dict[str, Tensor | Ragged] = {
        "user_idx": torch.from_numpy(pairs[USER_IDX].to_numpy().astype(np.int64)),
        "context": Ragged.from_lists(pairs["context"], max_len, left=True),
        "chosen": torch.from_numpy(pairs["chosen"].to_numpy().astype(np.int64)),
        "rejected": Ragged.from_lists(pairs["rejected"], width, left=False),
        "weight": torch.from_numpy(pairs["weight"].fill_null(1.0).to_numpy().astype(np.float32)),
    }
    if {"ref_chosen", "ref_rejected"} <= set(pairs.columns):
        columns["ref_chosen"] = torch.from_numpy(pairs["ref_chosen"].to_numpy().astype(np.float32))
        columns["ref_rejected"] = Ragged.from_lists(pairs["ref_rejected"], width, left=False)
    return RowsDataset(columns)


def latest_events(pairs: pl.DataFrame, n: int, where: Path | str = "pairs") -> pl.DataFrame:
    """The pair rows of each user's latest `n` chosen EVENTS, in their file order.

    An event is (user_idx, timestamp, seq): every strategy's rows of one event count once, and
    equal timestamps are ordered by seq (the log's row order), the later row being the more
    recent, as everywhere else (`sequences.EVENT_ORDER`). A bounded fine-tuning set that
    keeps every user.
    """
    if "seq" not in pairs.columns:
        raise DataError(
            f"{where}: the pairs have no seq column (written before schema version 3), so "
            "their events cannot be told apart; re-run the prepare stage"
        )
    events = [USER_IDX, *EVENT_ORDER]
    latest = (
        pairs.select(events)
        .unique()
        .sort(events, descending=True)
        .filter(pl.int_range(pl.len()).over(USER_IDX) < n)
    )
    return pairs.join(latest, on=events, how="semi", maintain_order="left")


class _PreparedDataModule(LightningDataModule):
    """Shared plumbing: the dataset handle, the validation ranking rows, dataloaders."""

    def __init__(
        self,
        path: str | Path,
        max_len: int,
        batch_size: int,
        seed: int,
        num_workers: int,
        seen: str = DEFAULT_SEEN,
    ) -> None:
        super().__init__()
        if max_len < 1 or batch_size < 1:
            raise ValueError(f"max_len and batch_size must be >= 1, got {max_len}, {batch_size}")
        self.dataset = load_prepared(path)
        self.max_len, self.batch_size = max_len, batch_size
        self.seed, self.num_workers = seed, num_workers
        self.seen = check_seen_policy(seen)
        self.train_set: RowsDataset | None = None
        self.ranking_set: RowsDataset | None = None
        self.train_sequences: pl.DataFrame | None = None

    @property
    def n_items(self) -> int:
        return self.dataset.n_items

    @property
    def n_users(self) -> int:
        return self.dataset.n_users

    def _build_ranking(self) -> None:
        self.train_sequences = user_sequences(self.dataset.events("train"))
        self.ranking_set = ranking_examples(
            self.train_sequences, self.dataset.events("valid"), self.max_len, self.seen
        )

    def _loader(self, data: RowsDataset, shuffle: bool) -> DataLoader:
        sampler = EpochShuffle(len(data), self.seed) if shuffle else None
        return DataLoader(
            data,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=as_batch,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)


class SequenceDataModule(_PreparedDataModule):
    """Stage-1 (reference) training on the train positives; validation ranking rows.

    mode="sequence" (SASRec) yields windows with `targets_seq`; "pointwise" (two-tower) one
    (user, history, next item) row per position. `TRAIN_MODE[model_name]` picks it. With
    `rating_threshold` set, the train rows are instead the rated train events with their
    `liked` label (`rated_examples`, for objective=rating_bce), and the validation rows rank
    each user's valid rated items (`rated_ranking_examples`).
    """

    def __init__(
        self,
        path: str | Path,
        max_len: int = 50,
        batch_size: int = 256,
        seed: int = 0,
        mode: TrainMode = "sequence",
        num_workers: int = 0,
        seen: str = DEFAULT_SEEN,
        rating_threshold: float | None = None,
    ) -> None:
        super().__init__(path, max_len, batch_size, seed, num_workers, seen)
        self.mode, self.rating_threshold = mode, rating_threshold

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self._build_ranking()
        if self.rating_threshold is None:
            self.train_set = next_item_examples(self.train_sequences, self.max_len, self.mode)
        else:
            self.ranking_set = rated_ranking_examples(
                self.train_sequences, self.dataset.events("valid"), self.max_len
            )
            self.train_set = rated_examples(
                self.dataset.events("train"), self.train_sequences, self.max_len,
                self.rating_threshold, self.dataset.path / "train.parquet",
            )  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.ranking_set, shuffle=False)


TRAIN_MODE: dict[str, TrainMode] = {"sasrec": "sequence", "two_tower": "pointwise",
                                    "mf": "pointwise"}


class PairDataModule(_PreparedDataModule):
    """Preference-stage batches from pairs_train; validation: ranking rows and pairs_valid.

    `val_dataloader` returns [ranking] or [ranking, pairs_valid] when the dataset has valid
    pairs; a validation step tells them apart by the `chosen` key.
    """

    def __init__(
        self,
        path: str | Path,
        max_len: int = 50,
        max_negatives: int | None = None,
        batch_size: int = 256,
        seed: int = 0,
        num_workers: int = 0,
        max_pairs_per_user: int | None = None,
        seen: str = DEFAULT_SEEN,
        pairs_since: int | None = None,
    ) -> None:
        super().__init__(path, max_len, batch_size, seed, num_workers, seen)
        for name, value in (("max_negatives", max_negatives),
                            ("max_pairs_per_user", max_pairs_per_user)):  # fmt: skip
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        self.max_negatives = max_negatives
        self.max_pairs_per_user = max_pairs_per_user
        self.pairs_since = pairs_since
        self.valid_pairs: RowsDataset | None = None

    def train_pairs(self) -> pl.DataFrame:
        """The pairs_train rows the stage trains on, in file order: those whose chosen event is
        at or after `pairs_since` (unix seconds; None: all), then of those each user's latest
        `max_pairs_per_user` events (None: all). DataError when `pairs_since` leaves none."""
        where = self.dataset.path / "pairs_train.parquet"
        train = self.dataset.pairs("train")
        if self.pairs_since is not None:
            train = train.filter(pl.col("timestamp") >= self.pairs_since)
            if train.is_empty():
                when = datetime.fromtimestamp(self.pairs_since, UTC).strftime("%Y-%m-%d %H:%M")
                raise DataError(
                    f"{where}: no train pair's chosen event is at or after train.pairs_since="
                    f"{self.pairs_since} ({when} UTC): nothing to fine-tune on"
                )
        if self.max_pairs_per_user is not None:
            train = latest_events(train, self.max_pairs_per_user, where)
        return train

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self._build_ranking()
        self.train_set = pair_examples(self.train_pairs(), self.max_len, self.max_negatives)
        valid = self.dataset.pairs("valid") if self.dataset.has_pairs("valid") else None
        if valid is not None and valid.height > 0:
            self.valid_pairs = pair_examples(valid, self.max_len, self.max_negatives)

    def val_dataloader(self) -> list[DataLoader]:
        loaders = [self._loader(self.ranking_set, shuffle=False)]
        if self.valid_pairs is not None:
            loaders.append(self._loader(self.valid_pairs, shuffle=False))
        return loaders
