"""The `reference_hard` pair strategy: the frozen reference's own top-ranked items the user did
not choose (DESIGN.md, "Pair strategies").

Random negatives are mostly items the reference already ranks far below the chosen one, so their
DPO margins start large and teach little. Hard negatives are where the reference is wrong: for
each pair row, the reference's full-catalog top-N by exact faiss inner-product search over
`item_embeddings()`, with the chosen item and the user's known positives that the seen policy
removes (`eval.seen`, `recsys_dpo/retrieval/seen.py`, the evaluator's and the bundle's rule)
left out. Needs a trained reference, so it runs at the start of the preference stage
(`reference.hard_negatives=N`), not in `prepare`.
"""

from collections.abc import Sequence

import numpy as np
import torch
from rich.progress import track
from torch import Tensor

from recsys_dpo.data.datamodule import RowsDataset
from recsys_dpo.data.schema import PAD_ITEM
from recsys_dpo.models import Recommender
from recsys_dpo.retrieval.index import EMPTY_ITEM, build_index, search
from recsys_dpo.retrieval.seen import DEFAULT_SEEN, removed_items


@torch.no_grad()
def reference_hard_negatives(
    reference: Recommender,
    rows: RowsDataset,
    exclude: Sequence[np.ndarray],
    num_negatives: int,
    skip: int = 0,
    batch_size: int = 1024,
    progress: bool = False,
    seen: str = DEFAULT_SEEN,
) -> Tensor:
    """Rejected items [len(rows), num_negatives]: per pair row (user_idx, context, chosen), the
    reference's items ranked skip+1 .. skip+num_negatives by score among those that are neither
    the chosen item nor removed by the `seen` policy from `exclude[row]` (the user's known
    positives: all of them under `remove`, none under `keep`); ordered by score descending.
    Slots with no candidate left hold the padding item 0.

    skip: the very top of the reference's ranking holds the items the user is about to choose
    (for the latest train events, their held-out items), so pushing it down teaches the policy
    to bury true positives; skipping a few ranks keeps the negatives hard but mostly true.
    """
    if num_negatives < 1 or skip < 0:
        raise ValueError(
            f"reference_hard: need num_negatives >= 1 and skip >= 0, got {num_negatives}, {skip}"
        )
    if len(exclude) != len(rows):
        raise ValueError(f"reference_hard: exclude has {len(exclude)} rows for {len(rows)} pairs")
    reference.eval()
    items = reference.item_embeddings().float().cpu().numpy()
    n_real = len(items) - 1
    if skip + num_negatives > n_real - 1:
        raise ValueError(
            f"reference_hard: skip + num_negatives = {skip + num_negatives} leaves no room for "
            f"the chosen item in a catalog of {n_real} items"
        )
    index = build_index(items, kind="flat")
    out = torch.full((len(rows), num_negatives), PAD_ITEM, dtype=torch.long)
    starts = range(0, len(rows), batch_size)
    for start in track(starts, description="reference_hard negatives", disable=not progress):
        idx = list(range(start, min(start + batch_size, len(rows))))
        batch = rows.__getitems__(idx)
        users = reference.user_embeddings(batch).float().cpu().numpy()
        removed = [
            np.append(removed_items(exclude[i], seen), int(chosen))
            for i, chosen in zip(idx, batch["chosen"], strict=True)
        ]
        _, found = search(index, users, skip + num_negatives, removed)
        found = found[:, skip:]
        out[start : start + len(idx)] = torch.from_numpy(
            np.where(found == EMPTY_ITEM, PAD_ITEM, found)
        )
    return out
