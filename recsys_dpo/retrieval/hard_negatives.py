"""The `reference_hard` pair strategy: the frozen reference's own top-ranked items the user did
not choose (DESIGN.md, "Pair strategies").

Random negatives are mostly items the reference already ranks far below the chosen one, so their
DPO margins start large and teach little. Hard negatives are where the reference is wrong: for
each pair row, the reference's full-catalog top-N by exact faiss inner-product search over
`item_embeddings()`, with the chosen item and the user's known positives that the seen policy
removes (`eval.seen`, `recsys_dpo/retrieval/seen.py`, the evaluator's and the bundle's rule)
left out. Needs a trained reference, so it runs at the start of the preference stage
(`reference.hard_negatives=N`), not in `prepare`.

Rank band (`reference.hard_negatives_band=[lo, hi]`): N negatives drawn uniformly without
replacement from the reference's ranks lo..hi (1-based, among the same candidates), seeded. The
top ranks hold most false negatives (benchmarks/hard_negative_hits.py), so a band below them
trades a little hardness for cleaner labels; skip s with N negatives is the band [s+1, s+N]
with every rank taken.
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
    band: tuple[int, int] | None = None,
    seed: int = 0,
) -> Tensor:
    """Rejected items [len(rows), num_negatives]: per pair row (user_idx, context, chosen), the
    reference's items ranked skip+1 .. skip+num_negatives by score among those that are neither
    the chosen item nor removed by the `seen` policy from `exclude[row]` (the user's known
    positives: all of them under `remove`, none under `keep`); ordered by score descending.
    Slots with no candidate left hold the padding item 0.

    skip: the very top of the reference's ranking holds the items the user is about to choose
    (for the latest train events, their held-out items), so pushing it down teaches the policy
    to bury true positives; skipping a few ranks keeps the negatives hard but mostly true.

    band (lo, hi): instead, num_negatives of the ranks lo..hi drawn uniformly without
    replacement (seeded by `seed`, one draw for all rows at once, so the result does not depend
    on batch_size), ordered by rank; skip must then be 0. A row with fewer than num_negatives
    candidates in the band gets them all, then padding.
    """
    if num_negatives < 1 or skip < 0:
        raise ValueError(
            f"reference_hard: need num_negatives >= 1 and skip >= 0, got {num_negatives}, {skip}"
        )
    if band is not None:
        lo, hi = band
        if skip or not 1 <= lo <= hi or num_negatives > hi - lo + 1:
            raise ValueError(
                f"reference_hard: the band [{lo}, {hi}] needs 1 <= lo <= hi, room for "
                f"{num_negatives} negatives and skip = 0 (got {skip})"
            )
        skip, width = lo - 1, hi - lo + 1
        # One uniform key per (row, band slot): the lowest num_negatives keys are the draw.
        keys = torch.rand(len(rows), width, generator=torch.Generator().manual_seed(seed))
    else:
        width = num_negatives
    if len(exclude) != len(rows):
        raise ValueError(f"reference_hard: exclude has {len(exclude)} rows for {len(rows)} pairs")
    reference.eval()
    items = reference.item_embeddings().float().cpu().numpy()
    n_real = len(items) - 1
    if skip + width > n_real - 1:
        raise ValueError(
            f"reference_hard: the deepest rank asked, {skip + width}, leaves no room for the "
            f"chosen item in a catalog of {n_real} items"
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
        _, found = search(index, users, skip + width, removed)
        found = found[:, skip:]
        found = torch.from_numpy(np.where(found == EMPTY_ITEM, PAD_ITEM, found))
        if band is not None:
            found = _draw(found, keys[start : start + len(idx)], num_negatives)
        out[start : start + len(idx)] = found
    return out


def _draw(found: Tensor, keys: Tensor, num: int) -> Tensor:
    """Per row, the `num` real items of `found` [R, W] with the lowest keys [R, W], in rank
    order; padding (no candidate, only ever at a row's tail) is drawn only when no real
    candidate is left, so it stays at the tail."""
    keys = torch.where(found == PAD_ITEM, 2.0, keys)  # keys are in [0, 1): padding goes last
    return found.gather(1, keys.argsort(dim=1)[:, :num].sort(dim=1).values)
