"""The prepare stage: click log -> validated, indexed, split dataset with preference pairs.

    log (LazyFrame) -> validate -> vocab + encode -> split -> pairs per split -> directory

The output directory (DESIGN.md, "Data contracts") holds `vocab_items.parquet`,
`vocab_users.parquet`, `train.parquet`, `valid.parquet`, `test.parquet` (the encoded events of
each split), `pairs_{train,valid,test}.parquet`, and `manifest.json`, written last. The whole
directory is built in a temporary sibling and renamed into place, so a failure leaves no
dataset behind and never clobbers a previous good one.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from recsys_dpo.artifacts import atomic_dir, config_hash, write_manifest
from recsys_dpo.data.pairs import write_pairs
from recsys_dpo.data.schema import SCHEMA_VERSION
from recsys_dpo.data.splits import split_frame
from recsys_dpo.data.validate import ValidationReport, validate
from recsys_dpo.data.vocab import build_vocab, encode

SPLITS = ("train", "valid", "test")


@dataclass
class PrepareSummary:
    """What the prepare stage did, for the summary table and the manifest."""

    out_dir: Path
    users: int
    items: int
    events: dict[str, int]
    pairs: dict[str, dict[str, int]]  # split -> source -> rows
    report: ValidationReport
    extra: dict[str, Any] = field(default_factory=dict)

    def table(self) -> Table:
        table = Table(title=f"prepared dataset: {self.out_dir}", show_header=True)
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
) -> PrepareSummary:
    """Run the prepare stage and write the dataset directory atomically (manifest last).

    `validation` is passed to `validate`, `split` to `split_frame` (its `kind` picks the
    protocol), `pairs` maps strategy name -> its keyword arguments. `config` (the composed
    hydra config, as plain data) is stored in the manifest together with its hash.
    """
    out_dir = Path(out_dir)
    console = Console(stderr=True, quiet=not progress)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("validating log", total=4 + len(pair_splits))
        df, report = validate(log, source, **validation)
        bar.update(task, advance=1, description="building vocab")
        vocab = build_vocab(df)
        encoded = encode(df, vocab)
        del df
        bar.update(task, advance=1, description=f"splitting ({split['kind']})")
        split_kwargs = {k: v for k, v in split.items() if k != "kind"}
        encoded = split_frame(encoded, split["kind"], **split_kwargs)
        events = {s: encoded.filter(pl.col("split") == s).height for s in SPLITS}
        bar.update(task, advance=1, description="writing events")
        pair_counts: dict[str, dict[str, int]] = {}
        with atomic_dir(out_dir) as tmp:
            vocab.save(tmp)
            for s in SPLITS:
                encoded.filter(pl.col("split") == s).write_parquet(tmp / f"{s}.parquet")
            bar.update(task, advance=1)
            for s in pair_splits:
                bar.update(task, description=f"building pairs ({s})")
                path = tmp / f"pairs_{s}.parquet"
                write_pairs(encoded, path, s, pairs, n_items=vocab.n_items, n_buckets=n_buckets)
                counts = pl.scan_parquet(path).group_by("source").len().collect()
                pair_counts[s] = dict(zip(counts["source"], counts["len"], strict=True))
                bar.update(task, advance=1)
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
                    "events": events,
                    "pairs": pair_counts,
                    "validation": dict(report.as_rows()),
                    "config": dict(config or {}),
                    "config_hash": config_hash(dict(config or {})),
                },
            )
        bar.update(task, description="done")
    return summary
