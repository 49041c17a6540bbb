"""Full-catalog evaluation retrieval: faiss exact vs torch matmul + topk vs a naive per-user loop,
and IVF recall_at_10 against exact at its speed.

    python benchmarks/bench_eval.py                       # 100k users x 100k items, d = 64
    python benchmarks/bench_eval.py --users 20000         # quicker; users/s does not change

About 4 minutes on 2 CPU cores.

Clustered random embeddings (items and users drawn around shared centres, so IVF has structure
to exploit), SEEN random seen items per user removed from every ranking, top-100 per user
(enough for K in {10, 20, 50, 100}). The naive loop (one numpy dot + argpartition per user) is
timed on a subset and extrapolated to all users; the output says so. Saves
benchmarks/results/bench_eval.json and prints a markdown table for benchmarks/RESULTS.md.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from recsys_dpo.retrieval.index import build_index, search

K, SEEN = 100, 20
OUT = Path(__file__).parent / "results" / "bench_eval.json"


def clustered(rng: np.random.Generator, n: int, d: int, centres: np.ndarray) -> np.ndarray:
    x = centres[rng.integers(len(centres), size=n)] + 0.5 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def naive(users: np.ndarray, items: np.ndarray, seen: list[np.ndarray]) -> np.ndarray:
    """One user at a time: score the catalog, mask padding and seen, argpartition, sort."""
    out = np.empty((len(users), K), dtype=np.int64)
    for u, vec in enumerate(users):
        scores = items @ vec
        scores[0] = -np.inf
        scores[seen[u]] = -np.inf
        top = np.argpartition(-scores, K)[:K]
        out[u] = top[np.argsort(-scores[top], kind="stable")]
    return out


@torch.no_grad()
def torch_topk(users: np.ndarray, items: np.ndarray, seen, batch: int, device: str) -> np.ndarray:
    """Batched users @ items.T, padding and seen set to -inf, torch.topk (ties unordered)."""
    item_t = torch.from_numpy(items).to(device)
    parts = []
    for s in range(0, len(users), batch):
        scores = torch.from_numpy(users[s : s + batch]).to(device) @ item_t.T
        scores[:, 0] = -torch.inf
        rows = torch.arange(len(scores)).repeat_interleave(SEEN)
        scores[rows, torch.from_numpy(np.concatenate(seen[s : s + batch]))] = -torch.inf
        parts.append(scores.topk(K, dim=1).indices.cpu().numpy())
    return np.concatenate(parts)


def recall_at(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    hits = [len(np.intersect1d(a[:k], e[:k])) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits) / k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--naive-users", type=int, default=500)
    parser.add_argument("--batch", type=int, default=4096)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((256, args.dim))
    items = clustered(rng, args.items + 1, args.dim, centres)
    items[0] = 0  # padding row
    users = clustered(rng, args.users, args.dim, centres)
    seen = [rng.choice(np.arange(1, args.items + 1), SEEN, replace=False) for _ in users]
    gpu = faiss.get_num_gpus() > 0
    rows: dict[str, dict] = {}

    build_s, flat = timed(lambda: build_index(items, "flat"))
    flat_s, (_, exact) = timed(lambda: search(flat, users, K, seen, args.batch))
    rows["faiss flat (exact)" + (" GPU" if gpu else "")] = {"seconds": flat_s, "build_s": build_s}

    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        sec, top = timed(lambda d=device: torch_topk(users, items, seen, 1024, d))
        rows[f"torch matmul + topk ({device})"] = {
            "seconds": sec, "agrees_with_faiss_at_10": recall_at(top, exact, 10),
        }  # fmt: skip

    subset = args.naive_users
    sec, top = timed(lambda: naive(users[:subset], items, seen[:subset]))
    rows["naive per-user numpy loop"] = {
        "seconds": sec * args.users / subset, "extrapolated_from_users": subset,
        "agrees_with_faiss_at_10": recall_at(top, exact[:subset], 10),
    }  # fmt: skip

    for nprobe in (8, 32):
        build_s, ivf = timed(lambda n=nprobe: build_index(items, "ivf_flat", nprobe=n))
        sec, (_, approx) = timed(lambda i=ivf: search(i, users, K, seen, args.batch))
        rows[f"faiss ivf_flat nprobe={nprobe}"] = {
            "seconds": sec, "build_s": build_s, "recall_at_10_vs_exact": recall_at(approx, exact, 10),
        }  # fmt: skip

    for row in rows.values():
        row["users_per_s"] = args.users / row["seconds"]
    result = {
        "users": args.users, "items": args.items, "dim": args.dim, "k": K, "seen_per_user": SEEN,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "faiss_gpus": faiss.get_num_gpus(),
        "machine": platform.processor() or platform.machine(), "rows": rows,
    }  # fmt: skip
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(f"{args.users:,} users x {args.items:,} items, d={args.dim}, top-{K}, {SEEN} seen "
          f"removed per user, {os.cpu_count()} CPUs, faiss GPUs: {faiss.get_num_gpus()}\n")
    print("| method | seconds | users/s | note |\n|---|---:|---:|---|")
    for name, row in rows.items():
        note = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in row.items() if k not in ("seconds", "users_per_s"))
        print(f"| {name} | {row['seconds']:.1f} | {row['users_per_s']:,.0f} | {note} |")


if __name__ == "__main__":
    main()
