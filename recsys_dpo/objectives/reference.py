"""Stage-1 losses: train the reference ranker that the preference stage starts from.

All take model logits s(u, i) (inner products). Positives are `[...]`, negatives `[..., K]`
(the leading shape is the batch, or batch x sequence for SASRec); every loss is averaged over
the leading positions.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from recsys_dpo.data.schema import PAD_ITEM
from recsys_dpo.objectives.catalog import log_softmax_catalog


def _check_negatives(name: str, pos_logits: Tensor, neg_logits: Tensor) -> None:
    if neg_logits.dim() != pos_logits.dim() + 1 or neg_logits.shape[:-1] != pos_logits.shape:
        raise ValueError(
            f"{name}: negatives must have shape [*positives.shape, K], got positives "
            f"{tuple(pos_logits.shape)} and negatives {tuple(neg_logits.shape)}"
        )
    if neg_logits.shape[-1] == 0:
        raise ValueError(f"{name}: need at least one negative per positive (K >= 1), got K=0")


def full_softmax_ce(logits: Tensor, target: Tensor, ignore_index: int = PAD_ITEM) -> Tensor:
    """Full-catalog cross-entropy -log softmax_{i>=1}(s)[target], the padding column excluded.

    loss = mean over rows with target != ignore_index of -(s_t - log sum_{j>=1} exp s_j)
    (the softmax loss of Covington et al., RecSys 2016; SASRec with CE, Klenitskiy &
    Vasilev, RecSys 2023). logits: [..., N] with column 0 the padding item; target: [...].
    Rows whose target is the padding item (padded sequence positions) are ignored; a batch
    with none left gives 0.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"full_softmax_ce: target shape {tuple(target.shape)} does not match logits "
            f"{tuple(logits.shape)} without the item axis"
        )
    keep = target != ignore_index
    # Gather at a safe index for ignored rows: column 0 holds -inf, and 0 * inf is NaN.
    safe_target = torch.where(keep, target, PAD_ITEM + 1)
    nll = -log_softmax_catalog(logits).gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    nll = torch.where(keep, nll, torch.zeros_like(nll))
    return nll.sum() / keep.sum().clamp_min(1)


# Rows of logits per chunk of `catalog_softmax_ce`: about 4M floats (16 MB), so a chunk's
# logits stay in the last-level cache between the GEMM that writes them and the ones that read.
_CHUNK_LOGITS = 1 << 22


class _CatalogSoftmaxCE(torch.autograd.Function):
    """sum_m [logsumexp_j <q_m, v_j> - <q_m, v_{t_m}>] and its gradients, chunk by chunk.

    The gradient of the summed loss w.r.t. the chunk's logits is softmax - onehot(t), known as
    soon as the chunk's log-partition is: it is formed in place of the logits and multiplied
    into both gradients right away, so no [M, N] tensor is ever stored (the fused linear
    cross-entropy of Liger-Kernel / Cut Cross-Entropy, Wijmans et al. 2024, on the CPU).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, query: Tensor, items: Tensor, target: Tensor) -> Tensor:
        want_query, want_items = ctx.needs_input_grad[:2]
        rows = max(1, _CHUNK_LOGITS // items.shape[0])
        grad_query = torch.empty_like(query) if want_query else None
        grad_items = torch.zeros_like(items) if want_items else None
        precision = torch.promote_types(query.dtype, torch.float32)  # fp32 softmax under bf16
        total = query.new_zeros((), dtype=precision)
        for start in range(0, query.shape[0], rows):
            q, t = query[start : start + rows], target[start : start + rows]
            log_p = torch.log_softmax((q @ items.T).to(precision), dim=-1)
            arange = torch.arange(len(t), device=t.device)
            total -= log_p[arange, t].sum()
            if want_query or want_items:
                probs = log_p.exp_()
                probs[arange, t] -= 1.0
                probs = probs.to(query.dtype)
                if want_query:
                    grad_query[start : start + rows] = probs @ items
                if want_items:
                    grad_items.addmm_(probs.T, q)
        ctx.save_for_backward(grad_query, grad_items)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        grad_query, grad_items = ctx.saved_tensors
        scale = grad_total.to(grad_query.dtype if grad_query is not None else grad_items.dtype)
        return (
            None if grad_query is None else grad_query * scale,
            None if grad_items is None else grad_items * scale,
            None,
        )


def catalog_softmax_ce(
    query: Tensor, item_table: Tensor, target: Tensor, ignore_index: int = PAD_ITEM
) -> Tensor:
    """`full_softmax_ce(query @ item_table.T, target)` without the [M, N] logit matrix.

    query: [M, d]; item_table: [N, d], row 0 the padding item (left out of the softmax);
    target: [M]. Rows whose target is ignore_index are dropped; none left gives 0 (with zero
    gradients). Same loss and gradients as the materialised form up to float rounding, in the
    time of its three matrix products: the softmax passes run on cache-sized chunks.
    Differentiable once (no double backward).
    """
    if query.dim() != 2 or item_table.dim() != 2 or target.shape != query.shape[:1]:
        raise ValueError(
            f"catalog_softmax_ce: need query [M, d], item_table [N, d], target [M]; got "
            f"{tuple(query.shape)}, {tuple(item_table.shape)}, {tuple(target.shape)}"
        )
    keep = target != ignore_index
    query, target = query[keep], target[keep]
    total = _CatalogSoftmaxCE.apply(query, item_table[PAD_ITEM + 1 :], target - (PAD_ITEM + 1))
    return total / max(len(target), 1)


def sampled_softmax_logq(
    pos_logits: Tensor,
    neg_logits: Tensor,
    pos_logq: Tensor,
    neg_logq: Tensor,
    accidental_hits_mask: Tensor | None = None,
) -> Tensor:
    """Sampled softmax with logQ correction (Bengio & Senecal, 2008; Yi et al., RecSys 2019).

    With o_i = s_i - log q_i, where q_i is the probability the sampler draws item i:
        loss = mean of -log( exp o_+ / (exp o_+ + sum_{j real} exp o_j) )
    Subtracting log q makes the sampled partition an estimate of the full one, so popular
    (often-sampled) items are not over-penalised. pos_logits, pos_logq: [...];
    neg_logits, neg_logq: [..., K]. accidental_hits_mask [..., K]: True where a sampled
    negative is in fact the positive item; such columns are left out of the partition.
    """
    _check_negatives("sampled_softmax_logq", pos_logits, neg_logits)
    if pos_logq.shape != pos_logits.shape or neg_logq.shape != neg_logits.shape:
        raise ValueError(
            "sampled_softmax_logq: log q tensors must match their logits' shapes, got "
            f"{tuple(pos_logq.shape)} / {tuple(neg_logq.shape)} for "
            f"{tuple(pos_logits.shape)} / {tuple(neg_logits.shape)}"
        )
    neg = neg_logits - neg_logq
    if accidental_hits_mask is not None:
        if accidental_hits_mask.shape != neg_logits.shape:
            raise ValueError(
                f"sampled_softmax_logq: accidental_hits_mask shape "
                f"{tuple(accidental_hits_mask.shape)} != negatives {tuple(neg_logits.shape)}"
            )
        neg = neg.masked_fill(accidental_hits_mask, float("-inf"))
    corrected = torch.cat([(pos_logits - pos_logq).unsqueeze(-1), neg], dim=-1)
    return -torch.log_softmax(corrected, dim=-1)[..., 0].mean()


def _powered_bce(pos_logits: Tensor, neg_logits: Tensor, beta: float) -> Tensor:
    """1/(K+1) * [beta * softplus(-s+) + sum_j softplus(s_j)], averaged over positives.

    softplus(-s) = -log sigma(s) and softplus(s) = -log(1 - sigma(s)), without log 0.
    """
    per_row = beta * F.softplus(-pos_logits) + F.softplus(neg_logits).sum(-1)
    return (per_row / (neg_logits.shape[-1] + 1)).mean()


def gbce_beta(num_negatives: int, num_items: int, t: float) -> float:
    """gSASRec's calibration power: beta = alpha * (t * (1 - 1/alpha) + 1/alpha),
    alpha = K / (|I| - 1), the negative sampling rate (Petrov & Macdonald, RecSys 2023).

    t = 0 gives beta = 1 (plain BCE); t = 1 gives beta = alpha, the setting the paper
    proves removes the overconfidence that negative sampling induces.
    """
    if num_negatives < 1:
        raise ValueError(f"gbce: need at least one negative (K >= 1), got K={num_negatives}")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"gbce: t must be in [0, 1], got {t}")
    if num_items - 1 < num_negatives:
        raise ValueError(
            f"gbce: K={num_negatives} negatives need num_items >= K + 1, got {num_items}"
        )
    alpha = num_negatives / (num_items - 1)
    return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


def gbce(pos_logits: Tensor, neg_logits: Tensor, num_items: int, t: float) -> Tensor:
    """Generalised BCE of gSASRec (Petrov & Macdonald, RecSys 2023, L_gBCE^beta):

        loss = -1/(K+1) * [ log sigma(s+)^beta + sum_{j=1..K} log(1 - sigma(s_j)) ]
             = 1/(K+1) * [ beta * softplus(-s+) + sum_j softplus(s_j) ]

    averaged over positives; beta = `gbce_beta(K, num_items, t)`. num_items is the number
    of real items |I| (padding not counted), K the number of uniformly sampled negatives.
    The 1/(K+1) matches the paper and its reference code (BCE mean over the K+1 logits).
    """
    _check_negatives("gbce", pos_logits, neg_logits)
    return _powered_bce(pos_logits, neg_logits, gbce_beta(neg_logits.shape[-1], num_items, t))


def bce(pos_logits: Tensor, neg_logits: Tensor) -> Tensor:
    """Binary cross-entropy with sampled negatives (SASRec, Kang & McAuley, ICDM 2018):

        loss = -1/(K+1) * [ log sigma(s+) + sum_j log(1 - sigma(s_j)) ]

    i.e. gBCE with beta = 1; same 1/(K+1) normalisation so the two are comparable.
    """
    _check_negatives("bce", pos_logits, neg_logits)
    return _powered_bce(pos_logits, neg_logits, beta=1.0)


def rating_bce(logits: Tensor, liked: Tensor) -> Tensor:
    """Pointwise BCE of a rating classifier on the observed (rated) pairs:

        loss = mean over rated (u, i) of -[y log sigma(s) + (1 - y) log(1 - sigma(s))]
             = mean of y * softplus(-s) + (1 - y) * softplus(s),   y = rating >= threshold

    The "naive" estimator of the Coat debiasing tables: the average loss over the ratings users
    chose to give, no propensity weights (Schnabel et al., ICML 2016, the naive estimator of
    section 3; binarised ratings with the cross-entropy loss as in Wang et al., ICML 2019,
    DR-JL, and the MF baseline of Ha et al., NeurIPS 2024, Table 2). logits, liked: [M]
    (liked 0/1, any float or bool dtype).
    """
    if logits.shape != liked.shape:
        raise ValueError(
            f"rating_bce: labels shape {tuple(liked.shape)} != logits {tuple(logits.shape)}"
        )
    y = liked.to(logits.dtype)
    return (y * F.softplus(-logits) + (1 - y) * F.softplus(logits)).mean()


def bpr(pos_logits: Tensor, neg_logits: Tensor) -> Tensor:
    """Bayesian personalised ranking (Rendle et al., UAI 2009):

    loss = mean over positives and their K negatives of -log sigma(s+ - s_j)
    """
    _check_negatives("bpr", pos_logits, neg_logits)
    return F.softplus(-(pos_logits.unsqueeze(-1) - neg_logits)).mean()
