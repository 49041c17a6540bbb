"""Contiguous integer ids for users and items (DESIGN.md, "Prepared dataset").

Item index 0 is padding (`PAD_ITEM`); real items get 1..N ordered by how often they were a
positive IN THE TRAIN SPLIT (most clicked first, ties by item_id), so the order is
deterministic, popular items sit in low rows, and held-out events never shape the ids (a score
tie broken by id would otherwise favour items popular in test). Items with no train positive
(only shown, or only clicked in valid / test) still get an index, after all the others, by
item_id.
Users get 0..U-1 by user_id.

`Vocab.content_hash` identifies the mapping itself (which id each index means); the prepare
stage writes it into the dataset's manifest and every checkpoint carries the hash of the vocab
it was trained on, so a model is never used with data whose indices mean other items or users
(`check_same_vocab`), even when the sizes agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recsys_dpo.artifacts import config_hash
from recsys_dpo.data.schema import ITEM_IDX, PAD_ITEM, USER_IDX
from recsys_dpo.errors import DataError

ITEMS_FILE = "vocab_items.parquet"
USERS_FILE = "vocab_users.parquet"

ITEMS_SCHEMA = {"item_id": pl.Utf8(), ITEM_IDX: pl.Int32(), "count": pl.Int64()}
USERS_SCHEMA = {"user_id": pl.Utf8(), USER_IDX: pl.Int32()}


@dataclass(frozen=True)
class Vocab:
    """items: (item_id, item_idx 1..N, count of positives); users: (user_id, user_idx 0..U-1)."""

    items: pl.DataFrame
    users: pl.DataFrame

    @property
    def n_items(self) -> int:
        """Rows of an item embedding table: the real items plus the padding row 0."""
        return self.items.height + 1

    @property
    def n_users(self) -> int:
        return self.users.height

    def content_hash(self) -> str:
        """A short hash of the (item_id, item_idx) and (user_id, user_idx) tables, in index
        order: equal exactly when every index means the same id, so shared ids in another
        order differ. Stable across runs and machines (sha256 of JSON, `config_hash`)."""
        return config_hash({
            "items": self.items.sort(ITEM_IDX).select("item_id", ITEM_IDX).rows(),
            "users": self.users.sort(USER_IDX).select("user_id", USER_IDX).rows(),
        })  # fmt: skip

    def save(self, directory: str | Path) -> None:
        """Write `vocab_items.parquet` and `vocab_users.parquet` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.items.write_parquet(directory / ITEMS_FILE)
        self.users.write_parquet(directory / USERS_FILE)

    @classmethod
    def load(cls, directory: str | Path) -> Vocab:
        """Read a vocab written by `save`; DataError if a file is missing or ids are not contiguous."""
        directory = Path(directory)
        frames = []
        for name, schema in ((ITEMS_FILE, ITEMS_SCHEMA), (USERS_FILE, USERS_SCHEMA)):
            path = directory / name
            if not path.is_file():
                raise DataError(f"{path}: vocabulary file not found")
            frame = pl.read_parquet(path)
            missing = set(schema) - set(frame.columns)
            if missing:
                raise DataError(f"{path}: missing column(s) {sorted(missing)}")
            frames.append(frame.select(list(schema)).cast(schema))
        items, users = frames
        _check_contiguous(items[ITEM_IDX], first=PAD_ITEM + 1, where=str(directory / ITEMS_FILE))
        _check_contiguous(users[USER_IDX], first=0, where=str(directory / USERS_FILE))
        return cls(items=items, users=users)


def check_same_vocab(ckpt_vocab_hash: str, data_vocab_hash: str, what: str) -> None:
    """Refuse `what` (a checkpoint, named with its setting) trained on another vocabulary than
    the data's: its item and user indices would silently mean other items and users."""
    if ckpt_vocab_hash != data_vocab_hash:
        raise DataError(
            f"{what}: its vocabulary hash is {ckpt_vocab_hash}, but the data's vocabulary hash "
            f"is {data_vocab_hash}, so its item and user indices mean other ids here (equal "
            "sizes are not enough; the same ids in another order differ). Use it with the "
            "prepared dataset it was trained on, or re-train it on this one"
        )


def _check_contiguous(idx: pl.Series, first: int, where: str) -> None:
    expected = np.arange(first, first + idx.len())
    if not np.array_equal(np.sort(idx.to_numpy()), expected):
        raise DataError(f"{where}: column {idx.name} must hold {first}..{first + idx.len() - 1}")


def build_vocab(df: pl.DataFrame | pl.LazyFrame) -> Vocab:
    """Index the items by (train positive count desc, item_id asc) from 1, the users by
    user_id from 0.

    With a `split` column (the prepare stage's case) only rows of the train split count;
    without one, every row does (nothing is held out). A LazyFrame (e.g. a scan of the split
    buckets) is aggregated without loading the log.
    """
    lf = df.lazy()
    counted = pl.col("clicked")
    if "split" in lf.collect_schema().names():
        counted = counted & (pl.col("split") == "train")
    items = (
        lf.group_by("item_id")
        .agg(counted.sum().cast(pl.Int64).alias("count"))
        .sort(["count", "item_id"], descending=[True, False])
        .with_columns(pl.int_range(PAD_ITEM + 1, pl.len() + 1, dtype=pl.Int32).alias(ITEM_IDX))
        .select(list(ITEMS_SCHEMA))
        .collect()
    )
    users = (
        lf.select(pl.col("user_id").unique().sort())
        .with_columns(pl.int_range(pl.len(), dtype=pl.Int32).alias(USER_IDX))
        .select(list(USERS_SCHEMA))
        .collect()
    )
    return Vocab(items=items, users=users)


def encode(df: pl.DataFrame, vocab: Vocab) -> pl.DataFrame:
    """Add user_idx and item_idx (Int32) to `df`, keeping its rows, their order and columns.

    Raises DataError naming how many ids (and a few examples) are not in the vocabulary.
    """
    out = df
    for id_col, table in (("user_id", vocab.users), ("item_id", vocab.items)):
        idx_col = USER_IDX if id_col == "user_id" else ITEM_IDX
        out = out.join(table.select(id_col, idx_col), on=id_col, how="left", maintain_order="left")
        unknown = out.filter(pl.col(idx_col).is_null())[id_col].unique().sort()
        if unknown.len():
            examples = ", ".join(repr(v) for v in unknown.head(5).to_list())
            raise DataError(
                f"column {id_col}: {unknown.len()} id(s) not in the vocabulary (e.g. {examples}); "
                "build the vocab from a frame that contains them"
            )
    return out


def decode_items(item_idx: np.ndarray | pl.Series, vocab: Vocab) -> pl.Series:
    """Map item indices back to item_id; the padding index 0 decodes to null."""
    idx = pl.Series(ITEM_IDX, item_idx).cast(pl.Int64)
    if idx.len() and (idx.min() < PAD_ITEM or idx.max() >= vocab.n_items):
        raise DataError(f"{ITEM_IDX}: indices must lie in 0..{vocab.n_items - 1}")
    lookup = pl.Series("item_id", [None], dtype=pl.Utf8).append(
        vocab.items.sort(ITEM_IDX)["item_id"]
    )
    return lookup.gather(idx)
