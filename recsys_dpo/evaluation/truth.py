"""Exact truth metrics of a top-K on the synthetic log, whose true utilities are known.

The synthetic log (`recsys_dpo.data.synthetic`) knows every user's true utility t(u, i) of every
item and the click model P(click | u, i, p) = examine(p) * sigmoid(c t(u, i) + c0). For a
user's served top-K list r_1..r_K (the evaluator's, after the seen policy) and the oracle list
o_1..o_K (the K rankable items of highest true utility, the same seen items left out):

    truth/utility_at_K(u)        = 1/K sum_k t(u, r_k)
    truth/ctr_at_K(u)            = 1/K sum_k P(click | u, r_k, position k-1)
                                   (expected clicks per slot were the list shown as a slate in
                                   rank order; positions are 0-based as in the log)
    truth/utility_regret_at_K(u) = 1/K sum_k t(u, o_k) - truth/utility_at_K(u)   (>= 0)

Exact: no sampling. Sorting by true utility also maximises the CTR (examine falls with the
position and sigmoid is increasing: the rearrangement inequality), so the oracle is ideal for
both. A slot the retrieval left empty (fewer than K rankable items) adds no utility and no
click; the oracle has the same number of empty slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from recsys_dpo.data.datamodule import PreparedDataset
from recsys_dpo.data.schema import ITEM_IDX, PAD_ITEM, USER_IDX
from recsys_dpo.data.synthetic import Truth, load_truth
from recsys_dpo.data.vocab import Vocab

SYNTHETIC_READER = "recsys_dpo.data.synthetic.read_synthetic"
TRUTH_METRICS = ("utility", "ctr", "utility_regret")
# Users per block of the [users, items] true-utility matrix (float64: 32 MiB at 4k items).
_BLOCK_CELLS = 1 << 22


def truth_metrics(
    ranked_utility: np.ndarray,
    ranked_click: np.ndarray,
    ideal_utility: np.ndarray,
    ks: Sequence[int],
) -> dict[str, np.ndarray]:
    """Per user, for each K in `ks`, `truth/<m>_at_K` of the module docstring, from arrays
    [U, max K] in rank order: the true utility and click probability of the served items, and
    the true utilities of the oracle's items (descending). Empty slots hold 0 in all three."""
    out = {}
    for k in ks:
        utility = ranked_utility[:, :k].sum(axis=1) / k
        out[f"truth/utility_at_{k}"] = utility
        out[f"truth/ctr_at_{k}"] = ranked_click[:, :k].sum(axis=1) / k
        out[f"truth/utility_regret_at_{k}"] = ideal_utility[:, :k].sum(axis=1) / k - utility
    return out


def synthetic_truth(data: PreparedDataset) -> Truth | None:
    """The ground truth of the synthetic log `data` was prepared from; None for another reader,
    and None when that raw log is no longer where it was generated (deleted, or a relative
    path read from another directory): truth/* is then left out rather than the evaluation
    refused, since every other metric needs only the prepared dataset."""
    reader = data.manifest.get("config", {}).get("data", {}).get("reader", {})
    if reader.get("_target_") != SYNTHETIC_READER:
        return None
    if not (Path(reader["path"]) / "manifest.json").is_file():
        return None
    return load_truth(reader["path"])


def truth_rows(data: PreparedDataset, truth: Truth) -> tuple[np.ndarray, np.ndarray]:
    """(user_row [n_users], item_row [n_items]): the truth's row of each user_idx / item_idx
    (item_row[PAD_ITEM] = 0, a placeholder: padding is never ranked)."""
    vocab = Vocab.load(data.path)
    items, users = vocab.items.sort(ITEM_IDX), vocab.users.sort(USER_IDX)
    item_row = np.zeros(data.n_items, dtype=np.int64)
    item_row[items[ITEM_IDX].to_numpy()] = [truth.item_index[i] for i in items["item_id"]]
    user_row = np.array([truth.user_index[u] for u in users["user_id"]], dtype=np.int64)
    return user_row, item_row


def topk_truth_metrics(
    data: PreparedDataset,
    truth: Truth,
    user_idx: np.ndarray,
    ranked: np.ndarray,
    seen: Sequence[np.ndarray],
    ks: Sequence[int],
) -> dict[str, np.ndarray]:
    """`truth_metrics` of the top-K lists `ranked` [U, max K] (item_idx, -1: empty slot) of the
    users `user_idx`, the oracle ranking every real item but each user's `seen` ones."""
    user_row, item_row = truth_rows(data, truth)
    n_users, width = ranked.shape
    filled = ranked > PAD_ITEM
    served_utility = np.zeros(ranked.shape)
    ideal = np.zeros(ranked.shape)
    rows = max(1, _BLOCK_CELLS // data.n_items)
    for start in range(0, n_users, rows):
        block = slice(start, start + rows)
        # t(u, i) for the block's users x the catalog; padding and seen items never ranked.
        utility = truth.utility(user_row[user_idx[block]][:, None], item_row[None, :])
        served_utility[block] = np.take_along_axis(utility, np.maximum(ranked[block], 0), axis=1)
        utility[:, PAD_ITEM] = -np.inf
        for r, items in enumerate(seen[block]):
            utility[r, items[items > PAD_ITEM]] = -np.inf
        ideal[block] = -np.sort(-utility, axis=1)[:, :width]
    ideal[~np.isfinite(ideal)] = 0.0
    served_utility[~filled] = 0.0
    click = truth.click_probability(
        user_row[user_idx][:, None], item_row[np.maximum(ranked, 0)], np.arange(width)[None, :]
    )
    click[~filled] = 0.0
    return truth_metrics(served_utility, click, ideal, ks)
