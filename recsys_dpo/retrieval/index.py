"""Full-catalog top-k retrieval by inner product with faiss, seen items removed.

DESIGN.md "Evaluation": every real item is a candidate (never a sampled set), and the items
a user has already seen are removed before the top-k is taken.

Id convention: row 0 of an item-embedding matrix is padding and is never indexed. The index
holds rows 1..N-1 in order, so faiss position p is item idx p + 1; `search` maps positions
back to item ids. Keeping faiss' own sequential ids (instead of an IDMap wrapper) is what lets
every index kind be cloned and sharded onto GPUs unchanged.

Tie rule: results are ordered by score descending, then item id ascending. For the exact
("flat") index the result is exactly the top-k of the unseen items under that rule: when
equal scores straddle the edge of what faiss returned, the search is widened until they no
longer do. Approximate indexes (IVF, HNSW) return their own candidates, ordered by the same
rule; a row that still has fewer than k unseen candidates is padded with item -1, score -inf.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
import torch
from torch import Tensor

from recsys_dpo.data.schema import PAD_ITEM

KINDS = ("flat", "ivf_flat", "ivf_pq", "hnsw")
# faiss GPU k-selection supports k <= 2048; larger searches run on a CPU copy of the index.
GPU_MAX_K = 2048
# faiss warns below ~39 training points per centroid; keep IVF/PQ training at that density.
MIN_POINTS_PER_CENTROID = 39
EMPTY_ITEM = -1


def build_index(
    item_emb: np.ndarray,
    kind: str = "flat",
    nlist: int | None = None,
    m: int | None = None,
    nprobe: int = 16,
    hnsw_m: int = 32,
    ef_search: int = 128,
    use_gpu: bool | None = None,
) -> faiss.Index:
    """Inner-product index over the real items (rows 1..N-1) of `item_emb` [N, d].

    kind: "flat" (exact), "ivf_flat", "ivf_pq" (IVF with product quantisation, m sub-quantizers
    of nbits <= 8, m defaulting to ~d/4) or "hnsw". IVF kinds are trained on the n real items;
    nlist defaults to 4*sqrt(n), capped at n/39 so every centroid has ~39 training points.
    nprobe (IVF) and ef_search (HNSW) are stored in the index and survive save/load.
    use_gpu: None = on GPU when faiss sees one (HNSW has no faiss GPU version and stays on
    CPU); True demands a GPU. Several GPUs shard the index (each holds a slice of the items).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    items = np.ascontiguousarray(item_emb[PAD_ITEM + 1 :], dtype=np.float32)
    n, d = items.shape
    if n < 1:
        raise ValueError("item_emb has no real items (only the padding row 0)")
    index = faiss.index_factory(
        d, _factory_string(kind, n, d, nlist, m, hnsw_m), faiss.METRIC_INNER_PRODUCT
    )
    if not index.is_trained:
        index.train(items)
    index.add(items)
    if kind.startswith("ivf"):
        index.nprobe = nprobe
    elif kind == "hnsw":
        index.hnsw.efSearch = ef_search
    if use_gpu is None:
        use_gpu = faiss.get_num_gpus() > 0 and kind != "hnsw"
    if use_gpu:
        if kind == "hnsw":
            raise ValueError("faiss has no GPU HNSW index; use kind='flat' or an IVF kind on GPU")
        index = to_gpu(index)
    return index


def _factory_string(
    kind: str, n: int, d: int, nlist: int | None, m: int | None, hnsw_m: int
) -> str:
    """The faiss index_factory description of `kind` for n items of dimension d."""
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{hnsw_m},Flat"
    if nlist is None:
        nlist = min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_CENTROID)
    nlist = max(1, min(nlist, n))
    if kind == "ivf_flat":
        return f"IVF{nlist},Flat"
    if m is None:
        # ~4 dimensions per sub-quantizer: the usual accuracy / memory trade-off of IVF-PQ.
        m = max(div for div in range(1, max(1, d // 4) + 1) if d % div == 0)
    if d % m:
        raise ValueError(f"ivf_pq needs m dividing the dimension {d}, got m={m}")
    # Codebooks of 2**nbits entries get the same training density as the IVF centroids;
    # 8 bits (the only width faiss GPU IVF-PQ takes) from ~10k items on.
    nbits = max(1, min(8, int(math.log2(max(2, n // MIN_POINTS_PER_CENTROID)))))
    return f"IVF{nlist},PQ{m}x{nbits}"


def to_gpu(index: faiss.Index) -> faiss.Index:
    """A copy of a CPU index on all GPUs faiss sees, sharded across them when there are several."""
    n_gpus = faiss.get_num_gpus()
    if n_gpus == 0:
        raise ValueError("use_gpu=True but faiss sees no GPU (is faiss-gpu installed?)")
    options = faiss.GpuMultipleClonerOptions()
    options.shard = n_gpus > 1
    return faiss.index_cpu_to_all_gpus(index, co=options, ngpu=n_gpus)


def is_gpu_index(index: faiss.Index) -> bool:
    """True for an index living on GPU (a Gpu* index, or the shards/replicas of several)."""
    if faiss.get_num_gpus() == 0:
        return False
    name = type(faiss.downcast_index(index)).__name__
    return name.startswith("Gpu") or name in ("IndexShards", "IndexReplicas")


def search(
    index: faiss.Index,
    user_emb: np.ndarray,
    k: int,
    seen: Sequence[np.ndarray] | None = None,
    batch_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k items by inner product for each user, the user's `seen` items removed.

    Returns scores [B, k] float32 and item ids [B, k] int64 (see the module docstring for the
    tie rule and the -1 / -inf padding). Each batch of `batch_size` users asks faiss for
    k + (most seen items of a user in the batch) + 1, so removing the seen items still leaves
    k candidates. On GPU, a search for more than GPU_MAX_K (2048) runs on a CPU copy.
    """
    n_real = index.ntotal
    if not 1 <= k <= n_real:
        raise ValueError(f"k must be in [1, {n_real}] (the number of real items), got {k}")
    user_emb = np.ascontiguousarray(user_emb, dtype=np.float32)
    if seen is not None and len(seen) != len(user_emb):
        raise ValueError(f"seen has {len(seen)} rows for {len(user_emb)} users")
    searcher = _Searcher(index)
    scores = np.full((len(user_emb), k), -np.inf, dtype=np.float32)
    items = np.full((len(user_emb), k), EMPTY_ITEM, dtype=np.int64)
    for start in range(0, len(user_emb), batch_size):
        rows = slice(start, start + batch_size)
        batch_seen = None if seen is None else [_real_ids(s) for s in seen[rows]]
        scores[rows], items[rows] = _search_batch(searcher, user_emb[rows], k, batch_seen)
    return scores, items


def _real_ids(items: np.ndarray) -> np.ndarray:
    """Sorted distinct item ids >= 1 of `items` (padding 0 and -1 fillers dropped)."""
    items = np.unique(np.asarray(items, dtype=np.int64).reshape(-1))
    return items[items > PAD_ITEM]


class _Searcher:
    """Runs faiss searches on the given index, or on a CPU copy (made once, on demand) when a
    GPU index is asked for more than GPU_MAX_K results."""

    def __init__(self, index: faiss.Index) -> None:
        self.index = index
        self.on_gpu = is_gpu_index(index)
        self.cpu_copy: faiss.Index | None = None

    def __call__(self, queries: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        index = self.index
        if self.on_gpu and kk > GPU_MAX_K:
            if self.cpu_copy is None:
                self.cpu_copy = faiss.index_gpu_to_cpu(self.index)
            index = self.cpu_copy
        return index.search(queries, kk)


def _search_batch(
    searcher: _Searcher, queries: np.ndarray, k: int, seen: list[np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """One batch of `search`: retrieve, drop seen, order, and widen rows whose tie group at the
    k-th place may continue past the retrieved candidates.

    faiss is asked for one candidate more than k + seen needs: if that spare one scores below
    the k-th kept item, nothing unretrieved can tie with it and the row is exact.
    """
    n_real = searcher.index.ntotal
    extra = max((len(s) for s in seen), default=0) if seen is not None else 0
    kk = min(k + extra + 1, n_real)
    scores = np.empty((len(queries), k), dtype=np.float32)
    items = np.empty((len(queries), k), dtype=np.int64)
    pending = np.arange(len(queries))
    while len(pending):
        raw_scores, positions = searcher(queries[pending], kk)
        pending_seen = None if seen is None else [seen[i] for i in pending]
        top_scores, top_items = _drop_seen_and_order(raw_scores, positions, k, pending_seen)
        scores[pending], items[pending] = top_scores, top_items
        # The spare candidate ties with the k-th kept item: the run of equal scores may go on
        # past the cut, and its unseen items beyond it might outrank (by id) the ones kept.
        cut_in_tie = (raw_scores[:, -1] == top_scores[:, -1]) & (positions[:, -1] >= 0)
        if kk == n_real or not cut_in_tie.any():
            break
        pending = pending[cut_in_tie]
        kk = min(2 * kk, n_real)
    return scores, items


def _drop_seen_and_order(
    raw_scores: np.ndarray, positions: np.ndarray, k: int, seen: list[np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """First k unseen candidates per row by (score desc, item asc); -1 / -inf where none left."""
    items = positions.astype(np.int64) + 1
    removed = positions < 0
    if seen is not None and len(seen):
        # One key per (row, item) pair, so a single isin tests every row against its own set.
        width = int(max(items.max(initial=0), max(s.max(initial=0) for s in seen))) + 1
        row_of_seen = np.repeat(np.arange(len(seen)), [len(s) for s in seen])
        seen_keys = row_of_seen * width + np.concatenate(seen)
        item_keys = np.arange(len(items))[:, None] * width + items
        removed |= np.isin(item_keys, seen_keys)
    order = np.lexsort((items, -raw_scores, removed), axis=-1)[:, :k]
    removed = np.take_along_axis(removed, order, axis=1)
    scores = np.where(removed, -np.inf, np.take_along_axis(raw_scores, order, axis=1))
    items = np.where(removed, EMPTY_ITEM, np.take_along_axis(items, order, axis=1))
    if scores.shape[1] < k:  # fewer candidates than k: only when the catalog minus seen is small
        pad = k - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        items = np.pad(items, ((0, 0), (0, pad)), constant_values=EMPTY_ITEM)
    return scores.astype(np.float32), items


def save_index(index: faiss.Index, path: str | Path) -> None:
    """Write `index` (a GPU index is copied to CPU first) atomically: a temp file, then rename,
    so a reader never sees a half-written index."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_gpu_index(index):
        index = faiss.index_gpu_to_cpu(index)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_index(path: str | Path) -> faiss.Index:
    """Read an index written by `save_index` (on CPU; `to_gpu` moves it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: faiss index not found")
    return faiss.read_index(str(path))


@torch.no_grad()
def exact_topk_torch(
    user_emb: Tensor | np.ndarray,
    item_emb: Tensor | np.ndarray,
    k: int,
    seen: Sequence[np.ndarray | Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference top-k: full score matrix user_emb @ item_emb.T [B, N], padding column 0 and
    each user's seen items set to -inf, then a stable descending sort (so ties are broken by
    item id ascending, the rule of `search`). Returns scores [B, k] and item ids [B, k];
    positions left with -inf (catalog exhausted by seen items) get item -1."""
    user_emb, item_emb = torch.as_tensor(user_emb), torch.as_tensor(item_emb)
    n_real = item_emb.shape[0] - 1
    if not 1 <= k <= n_real:
        raise ValueError(f"k must be in [1, {n_real}] (the number of real items), got {k}")
    scores = user_emb @ item_emb.T
    scores[:, PAD_ITEM] = float("-inf")
    if seen is not None and len(seen):
        rows = torch.cat([torch.full((len(s),), i, dtype=torch.long) for i, s in enumerate(seen)])
        cols = torch.cat([torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seen])
        scores[rows.to(scores.device), cols.to(scores.device)] = float("-inf")
    top_scores, top_items = torch.sort(scores, dim=1, descending=True, stable=True)
    top_scores, top_items = top_scores[:, :k], top_items[:, :k]
    return top_scores, torch.where(top_scores == float("-inf"), EMPTY_ITEM, top_items)
