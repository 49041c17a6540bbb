"""The prepare stage: click log -> validated, indexed, split dataset with preference pairs.

    log (LazyFrame) -> validate -> split -> vocab (train counts) + encode -> pairs -> directory

The output directory (DESIGN.md, "Data contracts") holds `vocab_items.parquet`,
`vocab_users.parquet`, `train.parquet`, `valid.parquet`, `test.parquet` (the encoded events of
each split), `pairs_{train,valid,test}.parquet`, optionally `user_features.parquet` /
`item_features.parquet` (side information aligned to the vocab: `features_frame`), and
`manifest.json`, written last. The whole
directory is built in a temporary sibling and renamed into place, so a failure leaves no
dataset behind and never clobbers a previous good one.

Bounded memory: with `n_buckets > 1` the log is first streamed to disk in user-hash buckets
(polars' streaming sink), then each bucket is validated, encoded, split and turned into pairs
on its own. Every step is per user except the vocabulary, the temporal cut times (window
bounds) and the popularity counts of the negative sampler, which are computed over all buckets
from disk. Peak memory is then about one bucket, whatever the size of the log.
"""

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from recsys_dpo.artifacts import atomic_dir, config_hash, write_manifest
from recsys_dpo.data.pairs import build_pairs, check_impression_pairs, item_popularity
from recsys_dpo.data.schema import ITEM_IDX, PAD_ITEM, SCHEMA_VERSION, USER_IDX
from recsys_dpo.data.splits import (
    SPLITS,
    check_settings,
    split_frame,
    temporal_cuts,
    window_bounds,
)
from recsys_dpo.data.validate import (
    ValidationReport,
    check_columns,
    check_rows_left,
    merge_reports,
    validate,
)
from recsys_dpo.data.vocab import Vocab, build_vocab, encode, load_base_vocab
from recsys_dpo.errors import DataError

BUCKET = "_bucket"


@dataclass
class PrepareSummary:
    """What the prepare stage did, for the summary table and the manifest."""

    out_dir: Path
    users: int
    items: int
    events: dict[str, int]
    pairs: dict[str, dict[str, int]]  # split -> source -> rows
    report: ValidationReport

    def table(self) -> Table:
        title = f"prepared dataset: {self.out_dir}"
        # A title wraps at the table's width: as wide as the title, the path stays whole.
        table = Table(title=title, show_header=True, min_width=len(title))
        table.add_column("what")
        table.add_column("count", justify="right")
        table.add_row("users", f"{self.users:,}")
        table.add_row("items (excl. padding)", f"{self.items:,}")
        for split, n in self.events.items():
            table.add_row(f"events / {split}", f"{n:,}")
        for split, by_source in self.pairs.items():
            for source, n in by_source.items():
                table.add_row(f"pairs / {split} / {source}", f"{n:,}")
        for what, n in self.report.as_rows():
            table.add_row(what, f"{n:,}")
        return table


def partition_by_user(
    log: pl.LazyFrame, source: str, directory: Path, n_buckets: int
) -> list[Path]:
    """Stream the log to `directory` in user-hash buckets; one parquet folder per bucket.

    Adds `seq`, the row's number in the whole log, first, so validation messages and the
    event-order tie-break refer to the original rows.
    """
    check_columns(log.collect_schema().names(), source)
    bucketed = log.with_row_index("seq").with_columns(
        (pl.col("user_id").hash(seed=0) % n_buckets).alias(BUCKET)
    )
    try:
        bucketed.sink_parquet(pl.PartitionBy(directory, key=BUCKET, include_key=False), mkdir=True)
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{source}: cannot read the log: {exc}") from exc
    return sorted(directory.glob(f"{BUCKET}=*"))


class _Appender:
    """Parquet files written one bucket at a time (row groups), schema fixed by the first."""

    def __init__(self) -> None:
        self.writers: dict[Path, pq.ParquetWriter] = {}

    def write(self, path: Path, frame: pl.DataFrame) -> None:
        table = frame.to_arrow()
        if path not in self.writers:
            self.writers[path] = pq.ParquetWriter(path, table.schema)
        self.writers[path].write_table(table.cast(self.writers[path].schema))

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def _split_kwargs(split: Mapping[str, Any], validated: pl.LazyFrame) -> dict[str, Any]:
    """The split's arguments, with temporal cut times and window bounds computed once over the
    whole log."""
    kwargs = {k: v for k, v in split.items() if k != "kind"}
    check_settings(split["kind"], kwargs)
    if split["kind"] == "window" and "bounds" not in kwargs:
        return {"bounds": window_bounds(validated, **kwargs)}
    if split["kind"] == "temporal" and None in (
        kwargs.get("valid_start"),
        kwargs.get("test_start"),
    ):
        valid_start, test_start = temporal_cuts(
            validated, kwargs.get("valid_frac", 0.1), kwargs.get("test_frac", 0.1)
        )
        kwargs.setdefault("valid_start", valid_start)
        kwargs.setdefault("test_start", test_start)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("valid_frac", "test_frac")}
    return kwargs


def prepare_dataset(
    log: pl.LazyFrame,
    source: str,
    out_dir: str | Path,
    *,
    validation: Mapping[str, Any],
    split: Mapping[str, Any],
    pairs: Mapping[str, Mapping[str, Any]],
    pair_splits: Sequence[str] = SPLITS,
    n_buckets: int = 1,
    config: Mapping[str, Any] | None = None,
    progress: bool = True,
    features: Mapping[str, pl.DataFrame] | None = None,
    base_vocab: str | Path | None = None,
) -> PrepareSummary:
    """Run the prepare stage and write the dataset directory atomically (manifest last).

    `validation` is passed to `validate`, `split` to `split_frame` (its `kind` picks the
    protocol), `pairs` maps strategy name -> its keyword arguments (None: that strategy is
    off, so a config extending a preset can drop one: `data.pairs.next_item: null`).
    `n_buckets > 1` bounds memory (module docstring). `config` (the composed hydra config, as
    plain data) is stored in the manifest together with its hash. `features` ("user" / "item"
    -> a frame of the raw id and numeric attribute columns) are written aligned to the vocab
    (`features_frame`). `base_vocab` (a prepared dataset's directory, `data.base_vocab`): the
    vocabulary extends that dataset's, its items and users keeping their indices and the new
    ones appended (`build_vocab`), so a model trained on it can be used here (grown, see
    `recsys_dpo.training.reference_module.load_model`); the manifest records the base.
    """
    if n_buckets < 1:
        raise DataError(f"n_buckets must be >= 1, got {n_buckets}")
    pairs = {name: kwargs for name, kwargs in pairs.items() if kwargs is not None}
    unknown = sorted(set(pair_splits) - set(SPLITS))
    if unknown:
        raise DataError(f"pair_splits: unknown split(s) {unknown}; expected some of {SPLITS}")
    out_dir = Path(out_dir)
    base = None if base_vocab is None else load_base_vocab(base_vocab)
    console = Console(stderr=True, quiet=not progress)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with (
        Progress(*columns, console=console) as bar,
        atomic_dir(out_dir) as tmp,
    ):
        work = tmp / "_work"
        work.mkdir()
        if n_buckets == 1:
            parts: list[pl.LazyFrame] = [log]
        else:
            bar.console.log(f"streaming the log into {n_buckets} user buckets")
            folders = partition_by_user(log, source, work / "raw", n_buckets)
            parts = [pl.scan_parquet(folder / "*.parquet") for folder in folders]
        n = len(parts)
        steps = bar.add_task("validating", total=4 * n)

        reports = []
        impressions = "impressions" in pairs  # which need clicks told from shown items
        for b, part in enumerate(parts):
            df, report = validate(
                part, source, partial=n_buckets > 1, require_click_signal=impressions, **validation
            )
            df.write_parquet(work / f"validated_{b}.parquet")
            reports.append(report)
            bar.advance(steps)
        report = merge_reports(source, reports)
        check_rows_left(report, validation.get("min_events_per_user", 1))
        validated = pl.scan_parquet(work / "validated_*.parquet")
        split_kwargs = _split_kwargs(split, validated)

        # The split runs before the vocabulary, whose item order counts train positives only
        # (so held-out events never shape the ids); it is per user and ignores item ids, so
        # user_id stands in for user_idx.
        bar.update(steps, description=f"splitting ({split['kind']})")
        for b in range(n):
            df = pl.read_parquet(work / f"validated_{b}.parquet")
            df = split_frame(df.with_columns(pl.col("user_id").alias(USER_IDX)), split["kind"],
                             **split_kwargs).drop(USER_IDX)  # fmt: skip
            df.write_parquet(work / f"split_{b}.parquet")
            bar.advance(steps)
        vocab = build_vocab(pl.scan_parquet(work / "split_*.parquet"), base)
        vocab.save(tmp)
        for side, frame in (features or {}).items():
            features_frame(frame, vocab, side).write_parquet(tmp / FEATURES_FILE.format(side))

        bar.update(steps, description="encoding")
        popularity = {s: np.zeros(vocab.n_items, dtype=np.int64) for s in pair_splits}
        events = dict.fromkeys(SPLITS, 0)
        files = _Appender()
        try:
            for b in range(n):
                df = encode(pl.read_parquet(work / f"split_{b}.parquet"), vocab)
                df = df.select(pl.exclude("split"), "split")
                df.write_parquet(work / f"split_{b}.parquet")
                for s in SPLITS:
                    part = df.filter(pl.col("split") == s)
                    events[s] += part.height
                    files.write(tmp / f"{s}.parquet", part)
                for s in pair_splits:
                    popularity[s] += item_popularity(df, s, vocab.n_items)
                bar.advance(steps)

            bar.update(steps, description="building pairs")
            for b in range(n):
                df = pl.read_parquet(work / f"split_{b}.parquet")
                salt = (b, n_buckets) if n_buckets > 1 else ()
                for s in pair_splits:
                    built = build_pairs(
                        df,
                        s,
                        pairs,
                        n_items=vocab.n_items,
                        popularity=popularity[s],
                        seed_salt=salt,
                    )
                    files.write(tmp / f"pairs_{s}.parquet", built)
                bar.advance(steps)
        finally:
            files.close()
        if not events["train"]:
            raise DataError(f"split {split['kind']!r}: the train split is empty")
        pair_counts = _count_pairs(tmp, pair_splits)
        if impressions:
            check_impression_pairs(validated, pair_counts, source)
        shutil.rmtree(work)

        summary = PrepareSummary(
            out_dir=out_dir,
            users=vocab.n_users,
            items=vocab.n_items - 1,
            events=events,
            pairs=pair_counts,
            report=report,
        )
        write_manifest(
            tmp,
            {
                "stage": "prepare",
                "schema_version": SCHEMA_VERSION,
                "source": source,
                "n_users": vocab.n_users,
                "n_items": vocab.n_items,
                # what a checkpoint trained on this dataset records and its consumers check
                "vocab_hash": vocab.content_hash(),
                "events": events,
                # as run: the cut times / window bounds computed over the whole log
                "split": {"kind": split["kind"], **split_kwargs},
                "pairs": pair_counts,
                "validation": dict(report.as_rows()),
                "n_buckets": n_buckets,
                "config": dict(config or {}),
                "config_hash": dataset_hash(dict(config or {})),
                # only with a base, so the manifests (and dataset hashes) without one are as before
                **({} if base is None else {"base_vocab": {
                    "path": str(base_vocab), "vocab_hash": base.content_hash(),
                    "n_items": base.n_items, "n_users": base.n_users}}),
            },
        )
        bar.update(steps, description="done")
    return summary


FEATURES_FILE = "{}_features.parquet"


def features_frame(frame: pl.DataFrame, vocab: Vocab, side: str) -> pl.DataFrame:
    """`side` ("user" or "item") attributes indexed like the vocab: one row per index in
    order (user_idx 0..U-1; item_idx 0..N-1, row 0 the padding item, all zeros), the raw id
    dropped, attributes as float32. Ids the vocab lacks (never rated) are dropped; a vocab id
    without attributes is a DataError naming it."""
    if side not in ("user", "item"):
        raise DataError(f"data.features: unknown side {side!r}; expected 'user' or 'item'")
    raw, index = f"{side}_id", USER_IDX if side == "user" else ITEM_IDX
    table = vocab.users if side == "user" else vocab.items
    names = [c for c in frame.columns if c != raw]
    if raw not in frame.columns or not names:
        raise DataError(f"data.features ({side}): expected a column {raw} and attribute "
                        f"column(s), got {frame.columns}")  # fmt: skip
    joined = table.select(raw, index).join(frame.with_columns(pl.col(raw).cast(pl.Utf8)),
                                           on=raw, how="left")  # fmt: skip
    missing = joined.filter(pl.col(names[0]).is_null())[raw].to_list()
    if missing:
        raise DataError(f"data.features ({side}): no attributes for {len(missing)} {side}(s) of "
                        f"the vocab, e.g. {raw} {missing[:3]}")  # fmt: skip
    rows = joined.sort(index).select(index, *(pl.col(c).cast(pl.Float32) for c in names))
    if side == "item":  # the padding row 0
        pad = pl.DataFrame({index: [PAD_ITEM], **{c: [0.0] for c in names}}, schema=rows.schema)
        rows = pl.concat([pad, rows])
    return rows


def dataset_hash(config: dict[str, Any]) -> str:
    """The manifest's config hash: the config and the schema version, so a dataset written by
    an older version of this stage is never mistaken for an up-to-date one."""
    return config_hash({**config, "schema_version": SCHEMA_VERSION})


def _count_pairs(directory: Path, pair_splits: Sequence[str]) -> dict[str, dict[str, int]]:
    counts = {}
    for s in pair_splits:
        by_source = pl.scan_parquet(directory / f"pairs_{s}.parquet").group_by("source").len()
        frame = by_source.sort("source").collect()
        counts[s] = dict(zip(frame["source"], frame["len"], strict=True))
    return counts
