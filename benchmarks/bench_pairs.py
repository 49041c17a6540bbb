"""Benchmark: click log -> preference pairs, recsys-dpo (polars) vs a straightforward pandas port.

Both implementations do the same work on the same synthetic impression log: validate (row
order, duplicates), item vocab, leave-one-out split, then `impressions` pairs (clicked vs
shown-not-clicked in the request) and `next_item` pairs (next positive vs 4 uniform negatives
outside the user's positives), context = the user's last 50 positives before the chosen event,
for the train split, written to parquet. Each (implementation, size) runs in a fresh child
process so its peak RSS is its own; timings come from the same run, so the ratio is fair.

    python benchmarks/bench_pairs.py                    # 1M and 10M events
    python benchmarks/bench_pairs.py --sizes 1e6 1e7 5e7 --pandas-max 1e7

Writes benchmarks/results/bench_pairs.json and prints a table.
"""

import argparse
import json
import multiprocessing as mp
import platform
import resource
import shutil
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
EVENTS_PER_USER = 80  # mean_requests 8 x slate 10
MAX_CONTEXT = 50
NUM_NEGATIVES = 4
# The prepare stage's bounded-memory knob: about this many events per user bucket.
EVENTS_PER_BUCKET = 500_000


def synthetic_log(n_events: int) -> Path:
    from recsys_dpo.data.synthetic import SyntheticConfig, generate

    n_users = max(1, int(n_events // EVENTS_PER_USER))
    path = WORK / f"log_{n_events:.0e}"
    if not (path / "manifest.json").exists():
        cfg = SyntheticConfig(n_users=n_users, n_items=20_000, seed=0)
        generate(path, cfg, progress=True)
    return path


def events_glob(log: Path) -> str:
    return str(log / "events" / "**" / "*.parquet")


def run_polars(log: Path, out: Path) -> int:
    import polars as pl

    from recsys_dpo.data.prepare import prepare_dataset

    events = pl.scan_parquet(events_glob(log), hive_partitioning=False)
    n_events_hint = events.select(pl.len()).collect().item()
    summary = prepare_dataset(
        events,
        source=str(log),
        out_dir=out,
        validation={"drop_duplicates": True, "min_events_per_user": 1},
        split={"kind": "loo"},
        pairs={
            "impressions": {"max_context": MAX_CONTEXT},
            "next_item": {
                "num_negatives": NUM_NEGATIVES, "sampler": "uniform", "max_context": MAX_CONTEXT,
            },
        },
        pair_splits=["train"],
        n_buckets=max(1, n_events_hint // EVENTS_PER_BUCKET),
        progress=False,
    )
    return sum(summary.pairs["train"].values())


def run_pandas(log: Path, out: Path) -> int:
    """The same logic written the way most pandas code would: groupby + per-row Python."""
    import pandas as pd

    df = pd.read_parquet(sorted(log.glob("events/*/*.parquet")))
    df["seq"] = np.arange(len(df))
    df = df.drop_duplicates(["user_id", "item_id", "timestamp", "request_id"])
    pos_counts = df[df["clicked"]].groupby("item_id").size().sort_values(ascending=False)
    items = list(pos_counts.index) + sorted(set(df["item_id"]) - set(pos_counts.index))
    item_idx = {item: i + 1 for i, item in enumerate(items)}
    df["item_idx"] = df["item_id"].map(item_idx)
    df["user_idx"] = df["user_id"].astype("category").cat.codes
    df = df.sort_values(["user_idx", "timestamp", "seq"])

    # leave-one-out on positives, impressions follow the user's cut times
    pos = df[df["clicked"]].copy()
    pos["rank"] = pos.groupby("user_idx").cumcount()
    pos["n"] = pos.groupby("user_idx")["item_idx"].transform("size")
    pos["split"] = np.where(pos["rank"] == pos["n"] - 1, "test",
                            np.where(pos["rank"] == pos["n"] - 2, "valid", "train"))
    pos.loc[pos["n"] < 3, "split"] = "train"
    histories = pos.groupby("user_idx")["item_idx"].apply(list).to_dict()
    positives = {u: set(h) for u, h in histories.items()}

    def context(user: int, rank: int) -> list[int]:
        return histories[user][max(0, rank - MAX_CONTEXT):rank]

    rows = []
    rank_of = dict(zip(pos["seq"], pos["rank"], strict=True))
    train_pos = pos[pos["split"] == "train"]
    train_seqs = set(train_pos["seq"])
    for _, request in df.groupby("request_id"):
        clicked = request[request["clicked"]]
        shown = request.loc[~request["clicked"], "item_idx"].tolist()
        if not shown:
            continue
        for row in clicked.itertuples():
            if row.seq in train_seqs:
                rows.append((row.user_idx, context(row.user_idx, rank_of[row.seq]), row.item_idx,
                             shown, 1.0, "impressions", row.timestamp))
    rng = np.random.default_rng(0)
    n_items = len(items) + 1
    for row in train_pos.itertuples():
        if row.rank == 0:
            continue
        negatives: list[int] = []
        while len(negatives) < NUM_NEGATIVES:
            candidate = int(rng.integers(1, n_items))
            if candidate not in positives[row.user_idx] and candidate not in negatives:
                negatives.append(candidate)
        rows.append((row.user_idx, context(row.user_idx, row.rank), row.item_idx, negatives, 1.0,
                     "next_item", row.timestamp))
    pairs = pd.DataFrame(rows, columns=["user_idx", "context", "chosen", "rejected", "weight",
                                        "source", "timestamp"])
    out.mkdir(parents=True, exist_ok=True)
    pairs.to_parquet(out / "pairs_train.parquet")
    return len(pairs)


def _child(impl: str, log: str, out: str, queue: mp.Queue) -> None:
    fn = {"polars": run_polars, "pandas": run_pandas}[impl]
    start = time.perf_counter()
    n_pairs = fn(Path(log), Path(out))
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"seconds": seconds, "pairs": n_pairs, "peak_rss_mb": peak_kib / 1024})


def measure(impl: str, log: Path) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    out = WORK / f"out_{impl}"
    shutil.rmtree(out, ignore_errors=True)
    proc = ctx.Process(target=_child, args=(impl, str(log), str(out), queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{impl} run failed with exit code {proc.exitcode}")
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7])
    parser.add_argument("--pandas-max", type=float, default=1e7,
                        help="largest log the pandas port runs on")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_pairs.json")
    args = parser.parse_args()

    results = []
    for size in args.sizes:
        log = synthetic_log(int(size))
        import polars as pl

        n_events = pl.scan_parquet(events_glob(log)).select(pl.len()).collect().item()
        row = {"events": n_events}
        for impl in ("polars", "pandas"):
            if impl == "pandas" and size > args.pandas_max:
                continue
            m = measure(impl, log)
            row[impl] = {**m, "events_per_s": n_events / m["seconds"]}
            print(f"{n_events:>12,} events  {impl:<7} {m['seconds']:8.1f} s  "
                  f"{n_events / m['seconds']:>12,.0f} events/s  peak RSS {m['peak_rss_mb']:8.0f} MB  "
                  f"{m['pairs']:>11,} pairs", flush=True)
        if "pandas" in row:
            row["speedup"] = row["pandas"]["seconds"] / row["polars"]["seconds"]
            print(f"{'':>12}  speed-up polars / pandas: {row['speedup']:.1f}x", flush=True)
        results.append(row)
        # Saved after every size: a 50M run takes long enough to be worth keeping partial.
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": {"cpus": mp.cpu_count(), "platform": platform.platform()},
                   "results": results}
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"saved {args.out}", flush=True)


if __name__ == "__main__":
    main()
