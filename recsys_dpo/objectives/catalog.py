"""Exact full-catalog quantities of the policy pi(i|u) = softmax_i s(u, i).

An LLM trainer can only estimate KL(pi_theta || pi_ref) from sampled tokens; a recommender's
"vocabulary" is the item catalog, small enough to sum over exactly (DESIGN.md, "The
objective"). Column `PAD_ITEM` (0) of every logit matrix is the padding item: it is not an
item, so it gets probability 0 everywhere here.
"""

import torch
from torch import Tensor

from recsys_dpo.data.schema import PAD_ITEM


def _real_items(logits: Tensor) -> Tensor:
    """The logit columns of real items ([..., N] -> [..., N-1]); padding is column 0."""
    if logits.shape[-1] < 2:
        raise ValueError(
            f"catalog logits need the padding column and at least one item, got shape "
            f"{tuple(logits.shape)}"
        )
    return logits[..., PAD_ITEM + 1 :]


def at_least_fp32(x: Tensor) -> Tensor:
    """Half-precision logits lose the small probabilities a KL sums over; work in >= fp32."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def log_softmax_catalog(logits: Tensor) -> Tensor:
    """log pi(i|u) = s(u,i) - log sum_{j>=1} exp s(u,j), with log pi(PAD|u) = -inf.

    logits: [..., N] scores with column 0 the padding item. Returns [..., N].
    """
    real = torch.log_softmax(_real_items(logits), dim=-1)
    pad = real.new_full((*real.shape[:-1], 1), float("-inf"))
    return torch.cat([pad, real], dim=-1)


def logps(logits: Tensor, items: Tensor) -> Tensor:
    """log pi(item|u) of the given items: TRL's logps/chosen ([B] items) and logps/rejected.

    logits: [B, N]; items: [B] or [B, K] item indices. Returns items' shape; a padding item
    (index 0) gives -inf, so callers averaging padded negatives must mask them.
    """
    logp = log_softmax_catalog(logits)
    if items.dim() == 1:
        return logp.gather(-1, items.unsqueeze(-1)).squeeze(-1)
    return logp.gather(-1, items)


def exact_kl(policy_logits: Tensor, ref_logits: Tensor) -> Tensor:
    """KL(pi_theta || pi_ref) = sum_{i>=1} p_i (log p_i - log q_i) per row, padding excluded.

    policy_logits, ref_logits: [B, N]. Returns [B]. Differentiable w.r.t. both inputs.
    Computed from log-softmaxes (not from probabilities) so tiny p_i cannot give log 0.
    """
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(
            f"exact_kl: policy and reference logits differ in shape: "
            f"{tuple(policy_logits.shape)} vs {tuple(ref_logits.shape)}"
        )
    log_p = torch.log_softmax(at_least_fp32(_real_items(policy_logits)), dim=-1)
    log_q = torch.log_softmax(at_least_fp32(_real_items(ref_logits)), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def entropy(logits: Tensor) -> Tensor:
    """H(pi) = -sum_{i>=1} p_i log p_i per row, padding excluded. logits [B, N] -> [B]."""
    log_p = torch.log_softmax(at_least_fp32(_real_items(logits)), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def _chunk_scores(user_emb: Tensor, item_emb: Tensor, start: int, stop: int) -> Tensor:
    return at_least_fp32(user_emb) @ at_least_fp32(item_emb[start:stop]).T


@torch.no_grad()
def chunked_kl_entropy(
    user_emb_policy: Tensor,
    item_emb_policy: Tensor,
    user_emb_ref: Tensor,
    item_emb_ref: Tensor,
    chunk: int = 65536,
) -> tuple[Tensor, Tensor]:
    """`exact_kl` and `entropy` of inner-product scores s(u,i) = <user_u, item_i>, streamed.

    user_emb_*: [B, d]; item_emb_*: [N, d] with row 0 the padding item (excluded). Never
    materialises [B, N]: pass 1 streams the two log-partitions log Z = logsumexp_i s(u,i)
    over item chunks; pass 2 sums p_i (log p_i - log q_i) and -p_i log p_i chunk by chunk
    with the exact log p_i = s_i - log Z. Peak memory is O(B * chunk), so a 1M-item catalog
    fits. A monitoring quantity: runs without autograd. Returns (kl [B], entropy [B]).
    """
    if chunk < 1:
        raise ValueError(f"chunked_kl_entropy: chunk must be >= 1, got {chunk}")
    if item_emb_policy.shape[0] != item_emb_ref.shape[0]:
        raise ValueError(
            f"chunked_kl_entropy: policy and reference catalogs differ in size: "
            f"{item_emb_policy.shape[0]} vs {item_emb_ref.shape[0]} items"
        )
    if item_emb_policy.shape[0] < 2:
        raise ValueError("chunked_kl_entropy: the catalog has no item besides padding")
    bounds = [
        (start, min(start + chunk, item_emb_policy.shape[0]))
        for start in range(PAD_ITEM + 1, item_emb_policy.shape[0], chunk)
    ]
    log_z_p = torch.stack(
        [torch.logsumexp(_chunk_scores(user_emb_policy, item_emb_policy, *b), -1) for b in bounds]
    ).logsumexp(0)
    log_z_q = torch.stack(
        [torch.logsumexp(_chunk_scores(user_emb_ref, item_emb_ref, *b), -1) for b in bounds]
    ).logsumexp(0)
    kl = torch.zeros_like(log_z_p)
    ent = torch.zeros_like(log_z_p)
    for b in bounds:
        log_p = _chunk_scores(user_emb_policy, item_emb_policy, *b) - log_z_p.unsqueeze(-1)
        log_q = _chunk_scores(user_emb_ref, item_emb_ref, *b) - log_z_q.unsqueeze(-1)
        p = log_p.exp()
        kl += (p * (log_p - log_q)).sum(-1)
        ent -= (p * log_p).sum(-1)
    return kl, ent
