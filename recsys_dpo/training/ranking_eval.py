"""Exact full-catalog HR@K / NDCG@K during training: the validation step of both modules.

Every item is scored (`full_scores`, never a sampled candidate set; DESIGN.md "Evaluation"),
the user's already-seen items are removed, and the held-out item's rank is counted exactly.
The evaluation stage does the same with faiss; this in-training copy only steers checkpoints.
"""

import torch
from torch import Tensor

from recsys_dpo.models.base import Batch, Recommender


def mask_seen(scores: Tensor, seen: Tensor) -> Tensor:
    """scores [B, N] with the items of seen [B, S] (padded with item 0) set to -inf.

    Column 0 is padding and already -inf, so masking the padding slots of `seen` is harmless.
    """
    return scores.scatter(1, seen, float("-inf"))


def target_rank(scores: Tensor, target: Tensor) -> Tensor:
    """0-based rank [B] of each row's target among its scores [B, N], ties counted against it.

    rank = #{i != t : s_i >= s_t}. Pessimistic on ties, so a model that scores everything
    equally ranks its target last instead of first.
    """
    target_score = scores.gather(1, target.unsqueeze(1))
    return (scores >= target_score).sum(dim=1) - 1


def hit_and_ndcg(rank: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """HR@k = [rank < k]; NDCG@k = [rank < k] / log2(rank + 2) for one relevant item
    (Jarvelin & Kekalainen, TOIS 2002; the leave-one-out form of Kang & McAuley, ICDM 2018)."""
    hit = (rank < k).float()
    return hit, hit / torch.log2(rank.float() + 2)


@torch.no_grad()
def ranking_metrics(model: Recommender, batch: Batch, k: int = 10) -> dict[str, Tensor]:
    """Per-user val/hr@k and val/ndcg@k [B] for a validation ranking batch (context, target,
    seen; see `recsys_dpo/data/datamodule.py`)."""
    scores = mask_seen(model.full_scores(batch), batch["seen"])
    hit, ndcg = hit_and_ndcg(target_rank(scores, batch["target"]), k)
    return {f"val/hr@{k}": hit, f"val/ndcg@{k}": ndcg}
