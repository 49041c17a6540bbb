"""Exact full-catalog HR@K / NDCG@K during training: the validation step of both modules.

Every item is scored (`full_scores`, never a sampled candidate set; DESIGN.md "Evaluation"),
the items the seen policy removes are removed (`eval.seen`, `recsys_dpo/retrieval/seen.py`),
and the held-out item's rank is counted exactly by `target_ranks`, which the evaluation stage
uses too: one tie policy for both.

Tie policy: PESSIMISTIC. A target ranks below every other candidate with the same score,
rank = #{candidates i that are not targets: s_i >= s_t} (+ the live targets above it). It is
the conservative choice: a tie never earns a hit, a model that scores everything equally ranks
its target last rather than first, and the figure does not depend on how item ids happen to
be ordered. A target the seen policy removed is not rankable: rank N, a miss at every cut-off.

A rating model (objective=rating_bce) is validated instead on each user's own held-out rated
items (`candidate_ndcg`): the whole set, not a sample, and the question such a model answers.
"""

import torch
from torch import Tensor

from recsys_dpo.models.base import Batch, Recommender
from recsys_dpo.training.guards import require_finite


def mask_seen(scores: Tensor, seen: Tensor) -> Tensor:
    """scores [B, N] with the items of seen [B, S] (padded with item 0) set to -inf.

    Column 0 is padding and already -inf, so masking the padding slots of `seen` is harmless.
    """
    return scores.scatter(1, seen, float("-inf"))


def target_ranks(scores: Tensor, targets: Tensor, seen: Tensor | None = None,
                 valid: Tensor | None = None) -> Tensor:  # fmt: skip
    """0-based pessimistic ranks [B, T] of each row's targets [B, T] among its scores [B, N],
    once the items of `seen` [B, S] (padded with item 0) are removed.

    A target's rank counts the remaining non-target items scored >= it, plus the live targets
    scored above it (targets tied with each other take consecutive ranks, in column order), so
    every tie goes against the target. A target in `seen` (removed) or marked False in
    `valid` [B, T] gets rank N. Column 0 must be the padding item at -inf (`full_scores`).
    """
    raw = scores.gather(1, targets)
    if seen is not None:
        scores = mask_seen(scores, seen)
    live = scores.gather(1, targets) == raw  # a removed target now reads -inf
    if valid is not None:
        live = live & valid
    n = scores.shape[1]
    ascending = scores.sort(dim=1).values
    at_or_above = n - torch.searchsorted(ascending, raw.contiguous(), side="left")
    later = torch.ones(targets.shape[1], targets.shape[1], dtype=torch.bool,
                       device=scores.device).triu()  # fmt: skip
    tied_from_here = ((raw.unsqueeze(2) == raw.unsqueeze(1)) & live.unsqueeze(1) & later).sum(2)
    return torch.where(live, at_or_above - tied_from_here, n)


def target_rank(
    scores: Tensor, target: Tensor, what: str = "scores", seen: Tensor | None = None
) -> Tensor:
    """0-based rank [B] of each row's target among its scores [B, N], ties counted against it.

    rank = #{i != t : s_i >= s_t} (`target_ranks` with one target). Pessimistic on ties, so a
    model that scores everything equally ranks its target last instead of first. With `seen`
    [B, S] those items are removed first; a removed target ranks N (a miss).
    NonFinite (naming `what`) for a NaN or +inf score, or a non-finite target score: NaN
    compares false with everything, so a NaN target would rank -1 (NDCG inf). -inf elsewhere
    is a masked item (`mask_seen`).
    """
    target_score = scores.gather(1, target.unsqueeze(1))
    require_finite(target_score, f"{what} of the targets")
    require_finite(scores.masked_fill(scores == float("-inf"), 0.0), what)
    return target_ranks(scores, target.unsqueeze(1), seen)[:, 0]


def hit_and_ndcg(rank: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """HR@k = [rank < k]; NDCG@k = [rank < k] / log2(rank + 2) for one relevant item
    (Jarvelin & Kekalainen, TOIS 2002; the leave-one-out form of Kang & McAuley, ICDM 2018)."""
    hit = (rank < k).float()
    return hit, hit / torch.log2(rank.float() + 2)


def candidate_ndcg(scores: Tensor, candidates: Tensor, targets: Tensor,
                   k: int) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(HR@k, NDCG@k) [B] of each row's relevant `targets` [B, T] ranked among its own
    `candidates` [B, C] (both padded with item 0) by scores [B, N]; every other item removed:

        NDCG@k = sum_{targets t, rank_t < k} 1 / log2(rank_t + 2) / sum_{r < min(k, T)} 1 / log2(r + 2)

    ranks pessimistic (`target_ranks`), as `evaluation.metrics.mcar_metrics`' ndcg_at_k;
    HR@k = [some target in the top k]. Rows need at least one target."""
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter(1, candidates, True)
    real = targets != 0
    ranks = target_ranks(scores.masked_fill(~keep, float("-inf")), targets, valid=real)
    dcg = torch.where(ranks < k, 1.0 / torch.log2(ranks.float() + 2), 0.0).sum(1)
    discounts = 1.0 / torch.log2(torch.arange(k, device=scores.device).float() + 2)
    idcg = torch.cat([discounts.new_zeros(1), discounts.cumsum(0)])[real.sum(1).clamp(max=k)]
    return (ranks < k).any(1).float(), dcg / idcg


@torch.no_grad()
def ranking_metrics(model: Recommender, batch: Batch, k: int = 10) -> dict[str, Tensor]:
    """Per-user val/hr_at_k and val/ndcg_at_k [B] for a validation ranking batch (context, target,
    seen; see `recsys_dpo/data/datamodule.py`), or, for a batch with `candidates` and `targets`
    (a rating model's, `rated_ranking_examples`), of its targets among its candidates."""
    scores = model.full_scores(batch)
    if "candidates" in batch:
        require_finite(scores.gather(1, batch["candidates"].clamp(min=1)), "validation scores")
        hit, ndcg = candidate_ndcg(scores, batch["candidates"], batch["targets"], k)
        return {f"val/hr_at_{k}": hit, f"val/ndcg_at_{k}": ndcg}
    rank = target_rank(scores, batch["target"], "validation scores", seen=batch["seen"])
    hit, ndcg = hit_and_ndcg(rank, k)
    return {f"val/hr_at_{k}": hit, f"val/ndcg_at_{k}": ndcg}
