"""Contiguous integer ids for users and items (DESIGN.md, "Prepared dataset").

Item index 0 is padding (`PAD_ITEM`); real items get 1..N ordered by how often they were a
positive IN THE TRAIN SPLIT (most clicked first, ties by item_id), so the order is
deterministic, popular items sit in low rows, and held-out events never shape the ids (a score
tie broken by id would otherwise favour items popular in test). Items with no train positive
(only shown, or only clicked in valid / test) still get an index, after all the others, by
item_id.
Users get 0..U-1 by user_id.

A growing catalog (`build_vocab(..., base=...)`, the prepare stage's `data.base_vocab`): the
base vocabulary's items and users keep their indices, every one of them, whether or not the
new log still has it; the items the base lacks follow, from index N0 (the base's n_items) on, by
the same rule (train positives in the new log desc, then item_id), and the unseen users from
U0 on, by user_id. Without a base the order is the one above, so are the hashes.

`Vocab.content_hash` identifies the mapping itself (which id each index means); the prepare
stage writes it into the dataset's manifest and every checkpoint carries the hash of the vocab
it was trained on, so a model is never used with data whose indices mean other items or users
(`check_extends`), even when the sizes agree. The hash of a prefix (the first n items and m
users, `content_hash(n, m)`) is what lets a model trained on a vocabulary be used with an
extension of it, and only with one: the extension's prefix of the model's sizes hashes to the
model's hash exactly when every index the model knows still means the same id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recsys_dpo.artifacts import config_hash, read_manifest
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

    def content_hash(self, n_items: int | None = None, n_users: int | None = None) -> str:
        """A short hash of the (item_id, item_idx) and (user_id, user_idx) tables, in index
        order: equal exactly when every index means the same id, so shared ids in another
        order differ. Stable across runs and machines (sha256 of JSON, `config_hash`).

        n_items, n_users: hash only the prefix a vocabulary of those sizes would have (item
        indices below n_items, padding counted as in `n_items`; user indices below n_users),
        so the prefix of an extension hashes like the vocabulary it extends. None: the whole
        table (the hash of every manifest and checkpoint)."""
        n_items = self.n_items if n_items is None else n_items
        n_users = self.n_users if n_users is None else n_users
        if not (PAD_ITEM + 1 <= n_items <= self.n_items and 0 <= n_users <= self.n_users):
            raise ValueError(
                f"a prefix of {n_items} items and {n_users} users does not fit a vocabulary of "
                f"{self.n_items} and {self.n_users}"
            )
        return config_hash({
            "items": self.items.sort(ITEM_IDX).select("item_id", ITEM_IDX).head(n_items - 1).rows(),
            "users": self.users.sort(USER_IDX).select("user_id", USER_IDX).head(n_users).rows(),
        })  # fmt: skip

    def extends(self, vocab_hash: str, n_items: int, n_users: int) -> bool:
        """Whether this vocabulary is (or extends) the one of `vocab_hash`, of n_items /
        n_users: at least that large, and its prefix of those sizes has that hash."""
        fits = n_items <= self.n_items and n_users <= self.n_users
        return fits and self.content_hash(n_items, n_users) == vocab_hash

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


def check_extends(
    ckpt_vocab_hash: str,
    ckpt_sizes: tuple[int, int],
    vocab: Vocab,
    what: str,
    trained: Vocab | None = None,
) -> None:
    """Refuse `what` (a checkpoint, named with its setting) trained on a vocabulary (hash
    ckpt_vocab_hash, sizes (n_items, n_users)) that `vocab`, the data's, neither is nor
    extends: its item and user indices would silently mean other items and users. One
    DataError names both hashes and says what differs: the data's prefix hash and sizes, and,
    with the checkpoint's own vocabulary at hand (`trained`), the first index that changed and
    the ids that are gone."""
    n_items, n_users = ckpt_sizes
    if vocab.content_hash() == ckpt_vocab_hash or vocab.extends(ckpt_vocab_hash, n_items, n_users):
        return
    if n_items > vocab.n_items or n_users > vocab.n_users:
        details = [f"it has {vocab.n_items - 1} items and {vocab.n_users} users, the "
                   f"checkpoint's {n_items - 1} and {n_users}"]  # fmt: skip
    elif (n_items, n_users) == (vocab.n_items, vocab.n_users):
        details = [f"both have {n_items - 1} items and {n_users} users"]
    else:
        details = [f"its first {n_items - 1} items and {n_users} users hash to "
                   f"{vocab.content_hash(n_items, n_users)}"]  # fmt: skip
    if trained is not None:
        details += vocab_changes(trained, vocab)
    detail = "; ".join(details)
    raise DataError(
        f"{what}: its vocabulary hash is {ckpt_vocab_hash}, but the data's vocabulary hash is "
        f"{vocab.content_hash()}, and the data's vocabulary does not extend the checkpoint's "
        f"({detail}), so its item and user indices mean other ids here (equal sizes are not "
        "enough; the same ids in another order differ; an extension keeps every id at its "
        "index and appends the new ones, data.base_vocab). Use it with the prepared dataset it "
        "was trained on, or re-train it on this one"
    )


def vocab_changes(old: Vocab, new: Vocab) -> list[str]:
    """What `new` changed of `old`'s indices, phrases per side (items, users): how many of
    old's ids sit at another index (the first one named) and how many new lacks altogether."""
    changes = []
    for side, table, idx_col in (("item", "items", ITEM_IDX), ("user", "users", USER_IDX)):
        id_col = f"{side}_id"
        before = getattr(old, table).select(id_col, idx_col)
        after = getattr(new, table).select(id_col, pl.col(idx_col).alias("new"))
        joined = before.join(after, on=id_col, how="left").sort(idx_col)
        moved = joined.filter(pl.col("new") != pl.col(idx_col))
        gone = joined.filter(pl.col("new").is_null())
        if moved.height:
            ident, idx, now = moved.row(0)
            changes.append(f"{moved.height} {side} id(s) moved, first {id_col} {ident!r} from "
                           f"{idx_col} {idx} to {now}")  # fmt: skip
        if gone.height:
            changes.append(f"{gone.height} {side} id(s) removed, e.g. {id_col} "
                           f"{gone[id_col][0]!r}")  # fmt: skip
    return changes


def _check_contiguous(idx: pl.Series, first: int, where: str) -> None:
    expected = np.arange(first, first + idx.len())
    if not np.array_equal(np.sort(idx.to_numpy()), expected):
        raise DataError(f"{where}: column {idx.name} must hold {first}..{first + idx.len() - 1}")


def build_vocab(df: pl.DataFrame | pl.LazyFrame, base: Vocab | None = None) -> Vocab:
    """Index the items by (train positive count desc, item_id asc) from 1, the users by
    user_id from 0; with a `base` vocabulary, its items and users keep their indices and only
    the ids it lacks are indexed so, after its own (module docstring). `count` is the train
    positives in `df`, 0 for a base item it does not have.

    With a `split` column (the prepare stage's case) only rows of the train split count;
    without one, every row does (nothing is held out). A LazyFrame (e.g. a scan of the split
    buckets) is aggregated without loading the log.
    """
    lf = df.lazy()
    counted = pl.col("clicked")
    if "split" in lf.collect_schema().names():
        counted = counted & (pl.col("split") == "train")
    base = base or Vocab(pl.DataFrame(schema=ITEMS_SCHEMA), pl.DataFrame(schema=USERS_SCHEMA))
    counts = lf.group_by("item_id").agg(counted.sum().cast(pl.Int64).alias("count"))
    kept = (
        base.items.lazy()
        .select("item_id", ITEM_IDX)
        .join(counts, on="item_id", how="left")
        .with_columns(pl.col("count").fill_null(0))
    )
    new_items = (
        counts.join(base.items.lazy(), on="item_id", how="anti")
        .sort(["count", "item_id"], descending=[True, False])
        .with_columns(pl.int_range(pl.len(), dtype=pl.Int32).add(base.n_items).alias(ITEM_IDX))
    )
    items = pl.concat([kept.select(list(ITEMS_SCHEMA)), new_items.select(list(ITEMS_SCHEMA))])
    new_users = (
        lf.select(pl.col("user_id").unique())
        .join(base.users.lazy(), on="user_id", how="anti")
        .sort("user_id")
        .with_columns(pl.int_range(pl.len(), dtype=pl.Int32).add(base.n_users).alias(USER_IDX))
    )
    users = pl.concat([base.users.lazy(), new_users.select(list(USERS_SCHEMA))])
    items, users = pl.collect_all([items.sort(ITEM_IDX), users.sort(USER_IDX)])
    return Vocab(items=items, users=users)


def load_base_vocab(path: str | Path, setting: str = "data.base_vocab") -> Vocab:
    """The vocabulary of the prepared dataset at `path`, the base a new one extends: a
    finished directory (its manifest) whose vocab files hash to the manifest's vocab_hash.
    DataError naming `setting` otherwise."""
    try:
        manifest = read_manifest(path)
        vocab = Vocab.load(path)
    except DataError as err:
        raise DataError(f"{setting}={path}: not a prepared dataset ({err})") from err
    if vocab.content_hash() != manifest.get("vocab_hash"):
        raise DataError(
            f"{setting}={path}: its vocabulary files hash to {vocab.content_hash()}, but its "
            f"manifest.json records vocab_hash {manifest.get('vocab_hash')} (changed after "
            "the prepare stage wrote them): re-prepare it"
        )
    return vocab


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
