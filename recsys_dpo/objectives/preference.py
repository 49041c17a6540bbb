"""Stage-2 losses: the DPO family on (chosen, rejected) items of the same context.

The policy over the catalog is pi(i|u) = softmax_i s(u, i). For two items of the same
context the log-partition cancels exactly, so the implicit reward can be taken from logits:

    r(i) = s_theta(u, i) - s_ref(u, i),   m = r(chosen) - r(rejected)   (DESIGN.md)

Inputs of the paired losses, one row per context:
    policy_chosen [B], policy_rejected [B, K] (K >= 1), ref_chosen [B], ref_rejected [B, K],
    rejected_mask [B, K] bool (True = a real negative, False = padding; None = all real),
    weight [B] (>= 0; None = all 1), or [B, K]: one weight per (chosen, rejected) pair.
The reference inputs are detached inside every loss (no gradient ever reaches them).
The loss is the weighted mean sum_b w_b l_b / sum_b w_b. For a pairwise loss with K > 1
negatives, l_b is the mean of the pairwise loss over the row's real negatives; S-DPO is
listwise instead. With pair weights w_bk (pairwise losses only) it is the weighted mean over
pairs, each row's pairs counted 1/K_b as above:

    sum_b sum_k w_bk l_bk / K_b  /  sum_b sum_k w_bk / K_b

self-normalised, so that down-weighting pairs changes their mix, not the step size (all
w_bk = 1 is the unweighted loss exactly). Every loss returns `PreferenceLoss` with the rewards TRL logs,
beta * r, detached.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from recsys_dpo.objectives.catalog import at_least_fp32
from recsys_dpo.objectives.reference import full_softmax_ce


class PreferenceLoss(NamedTuple):
    """A paired loss and the rewards TRL reports (rewards/chosen, rewards/rejected)."""

    loss: Tensor  # scalar, differentiable
    chosen_rewards: Tensor  # [B], beta * r(chosen), detached
    rejected_rewards: Tensor  # [B, K], beta * r(rejected), detached; 0 at padded negatives


class KTOLoss(NamedTuple):
    """The KTO loss and beta * r of every (unpaired) row, detached."""

    loss: Tensor
    rewards: Tensor  # [B]


def _require(name: str, ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


def _check_beta(name: str, beta: float) -> None:
    _require(name, beta > 0, f"beta must be > 0, got {beta}")


def _check_label_smoothing(name: str, label_smoothing: float) -> None:
    _require(
        name,
        0.0 <= label_smoothing < 0.5,
        f"label_smoothing must be in [0, 0.5), got {label_smoothing}",
    )


def _check_shape(name: str, label: str, tensor: Tensor | None, shape: tuple[int, ...]) -> None:
    _require(
        name,
        tensor is None or tuple(tensor.shape) == shape,
        f"{label} must have shape {list(shape)}, got "
        f"{None if tensor is None else list(tensor.shape)}",
    )


def _check_pairs(
    name: str,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    rejected_mask: Tensor | None,
    weight: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Validate shapes; return the mask and weight with their defaults filled in."""
    _require(
        name,
        policy_chosen.dim() == 1,
        f"policy_chosen must be [B], got shape {list(policy_chosen.shape)}",
    )
    batch = policy_chosen.shape[0]
    _require(
        name,
        policy_rejected.dim() == 2 and policy_rejected.shape[0] == batch,
        f"policy_rejected must be [B={batch}, K], got shape {list(policy_rejected.shape)}",
    )
    num_neg = policy_rejected.shape[1]
    _require(name, num_neg >= 1, "need at least one rejected item per row (K >= 1), got K=0")
    _check_shape(name, "ref_chosen", ref_chosen, (batch,))
    _check_shape(name, "ref_rejected", ref_rejected, (batch, num_neg))
    _check_shape(name, "rejected_mask", rejected_mask, (batch, num_neg))
    _require(
        name,
        weight is None or tuple(weight.shape) in ((batch,), (batch, num_neg)),
        f"weight must have shape [{batch}] or [{batch}, {num_neg}], got "
        f"{None if weight is None else list(weight.shape)}",
    )
    if rejected_mask is None:
        rejected_mask = torch.ones_like(policy_rejected, dtype=torch.bool)
    else:
        _require(
            name,
            rejected_mask.dtype == torch.bool,
            f"rejected_mask must be bool, got {rejected_mask.dtype}",
        )
        empty = (~rejected_mask.any(dim=1)).nonzero().flatten()
        _require(
            name,
            empty.numel() == 0,
            f"every row needs at least one real rejected item; rows {empty[:10].tolist()} "
            "have none",
        )
    if weight is None:
        weight = torch.ones(batch, dtype=torch.float32, device=policy_chosen.device)
    return rejected_mask, weight


class _Pairs(NamedTuple):
    chosen: Tensor  # [B], r(chosen) (or s(chosen) when reference-free)
    rejected: Tensor  # [B, K]
    mask: Tensor  # [B, K] bool, True = real negative
    weight: Tensor  # [B], or [B, K] per pair


def _log_ratio(name: str, policy: Tensor, ref: Tensor | None, label: str) -> Tensor:
    """r = s_theta - s_ref, subtracted in >= fp32: near the reference r is a tiny difference.

    The reference is detached here, in the one helper every loss uses: it is frozen by
    definition, so a caller that passes live reference scores must not train it.
    """
    _require(name, ref is not None, f"{label} is required (the loss is not reference-free)")
    return at_least_fp32(policy) - at_least_fp32(ref.detach())


def _prepare(
    name: str,
    beta: float,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    rejected_mask: Tensor | None,
    weight: Tensor | None,
    reference_free: bool = False,
) -> _Pairs:
    """Validate a paired batch and turn it into rewards r (or scores, when reference-free)."""
    _check_beta(name, beta)
    mask, weight = _check_pairs(
        name, policy_chosen, policy_rejected, ref_chosen, ref_rejected, rejected_mask, weight
    )
    if reference_free:
        return _Pairs(at_least_fp32(policy_chosen), at_least_fp32(policy_rejected), mask, weight)
    chosen = _log_ratio(name, policy_chosen, ref_chosen, "ref_chosen")
    rejected = _log_ratio(name, policy_rejected, ref_rejected, "ref_rejected")
    return _Pairs(chosen, rejected, mask, weight)


def _weighted_mean(row_loss: Tensor, weight: Tensor) -> Tensor:
    """sum(w * l) / sum(w); an all-zero weight batch gives 0 rather than NaN (and NaN grads)."""
    weight = weight.to(row_loss.dtype)
    return (weight * row_loss).sum() / weight.sum().clamp_min(torch.finfo(row_loss.dtype).tiny)


def _row_weights(name: str, weight: Tensor) -> Tensor:
    """The [B] row weights of a listwise or unpaired loss, which has no pairs to weight."""
    _require(
        name,
        weight.dim() == 1,
        "weight must be [B]: a listwise or unpaired loss has no per-pair weights",
    )
    return weight


def _result(row_loss: Tensor, row_weight: Tensor, pairs: _Pairs, beta: float) -> PreferenceLoss:
    rejected_rewards = torch.where(pairs.mask, beta * pairs.rejected, 0.0)
    return PreferenceLoss(
        _weighted_mean(row_loss, row_weight),
        (beta * pairs.chosen).detach(),
        rejected_rewards.detach(),
    )


def _pairwise(
    per_pair: Callable[[Tensor], Tensor], pairs: _Pairs, beta: float, shift: Tensor | None = None
) -> PreferenceLoss:
    """Apply per_pair(m), m = chosen - rejected - shift, averaged over each row's real negatives.

    shift [B]: a per-row term taken off every margin of the row (DPOP's penalty); the logged
    rewards stay beta * r. Padded margins are replaced by 0 before the loss so that garbage
    (inf, NaN) in padded slots can reach neither the loss nor the gradient.
    """
    chosen = pairs.chosen if shift is None else pairs.chosen - shift
    margin = torch.where(pairs.mask, chosen.unsqueeze(1) - pairs.rejected, 0.0)
    pair_loss = torch.where(pairs.mask, per_pair(margin), 0.0)
    real = pairs.mask.sum(dim=1)
    if pairs.weight.dim() == 1:
        return _result(pair_loss.sum(dim=1) / real, pairs.weight, pairs, beta)
    # Per-pair weights: row b counts with its mean pair weight, its pairs by their weights.
    weight = torch.where(pairs.mask, pairs.weight.to(pair_loss.dtype), 0.0)
    total = weight.sum(dim=1)
    row_loss = (weight * pair_loss).sum(dim=1) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return _result(row_loss, total / real, pairs, beta)


def dpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    rejected_mask: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    beta: float,
) -> PreferenceLoss:
    """DPO (Rafailov et al., NeurIPS 2023): l = -log sigma(beta * m), m = r_c - r_r."""
    pairs = _prepare(
        "dpo", beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected, rejected_mask, weight
    )
    return _pairwise(lambda m: -F.logsigmoid(beta * m), pairs, beta)


def dpop(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    rejected_mask: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    beta: float,
    lambda_: float,
) -> PreferenceLoss:
    """DPO-Positive, DPOP (Pal et al., 2024, "Smaug: Fixing Failure Modes of Preference
    Optimisation with DPO-Positive", arXiv:2402.13228, Eq. 3):

        l = -log sigma( beta * ( m - lambda * max(0, log pi_ref(c) - log pi_theta(c)) ) )

    the penalty inside the sigmoid, scaled by beta with the margin. DPO's loss depends on the
    margin alone, so it may push log pi_theta(chosen) below the reference as long as the
    rejected item falls further; DPOP charges every nat of that drop, which matters when the
    rejected items are noisy (a false negative pulls the chosen item down with it).
    lambda = 0 is DPO. Inputs: NORMALISED log-probabilities (`catalog.logps`, as the
    preference module passes them), since the penalty -r(chosen) is not a difference of two
    items of one context and the log-partitions do not cancel in it.
    """
    _require("dpop", lambda_ >= 0, f"lambda_ must be >= 0, got {lambda_}")
    pairs = _prepare(
        "dpop",
        beta,
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        rejected_mask,
        weight,
    )
    penalty = torch.relu(-pairs.chosen)  # log pi_ref(c) - log pi_theta(c), clipped at 0
    return _pairwise(lambda m: -F.logsigmoid(beta * m), pairs, beta, shift=lambda_ * penalty)


def cdpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    rejected_mask: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    beta: float,
    label_smoothing: float,
) -> PreferenceLoss:
    """Conservative DPO (Mitchell, 2023, "A note on DPO with noisy preferences"):

        l = -(1 - eps) log sigma(beta * m) - eps log sigma(-beta * m)

    the DPO loss when each label is flipped with probability eps in [0, 0.5); eps = 0 is DPO.
    """
    _check_label_smoothing("cdpo", label_smoothing)
    pairs = _prepare(
        "cdpo",
        beta,
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        rejected_mask,
        weight,
    )
    eps = label_smoothing
    return _pairwise(
        lambda m: -(1 - eps) * F.logsigmoid(beta * m) - eps * F.logsigmoid(-beta * m), pairs, beta
    )


def robust(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    rejected_mask: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    beta: float,
    label_smoothing: float,
) -> PreferenceLoss:
    """Robust DPO, rDPO (Chowdhury, Kini & Natarajan, ICML 2024):

        l = [ -(1 - eps) log sigma(beta * m) + eps log sigma(-beta * m) ] / (1 - 2 eps)

    an unbiased estimate of the clean DPO loss under label-flip rate eps in [0, 0.5);
    eps = 0 is DPO.
    """
    _check_label_smoothing("robust", label_smoothing)
    pairs = _prepare(
        "robust",
        beta,
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        rejected_mask,
        weight,
    )
    eps = label_smoothing
    return _pairwise(
        lambda m: (
            (-(1 - eps) * F.logsigmoid(beta * m) + eps * F.logsigmoid(-beta * m)) / (1 - 2 * eps)
        ),
        pairs,
        beta,
    )


def ipo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    rejected_mask: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    beta: float,
) -> PreferenceLoss:
    """IPO (Azar et al., AISTATS 2024, "A general theoretical paradigm to understand learning
    from human preferences"): l = (m - 1 / (2 * beta))**2.

    A squared loss: it pulls the margin to 1/(2 beta) instead of pushing it to infinity.
    """
    pairs = _prepare(
        "ipo", beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected, rejected_mask, weight
    )
    return _pairwise(lambda m: (m - 1 / (2 * beta)) ** 2, pairs, beta)


def hinge(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    rejected_mask: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    beta: float,
) -> PreferenceLoss:
    """Hinge loss of SLiC (Zhao et al., 2023, "SLiC-HF"), on the log ratios as TRL applies it:
    l = relu(1 - beta * m)."""
    pairs = _prepare(
        "hinge",
        beta,
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        rejected_mask,
        weight,
    )
    return _pairwise(lambda m: torch.relu(1 - beta * m), pairs, beta)


def sdpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    rejected_mask: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    beta: float,
) -> PreferenceLoss:
    """S-DPO, softmax DPO over many negatives (Chen et al., NeurIPS 2024, "On Softmax Direct
    Preference Optimization for Recommendation"):

        l = -log sigma( -log sum_{j real} exp(beta * (r_j - r_c)) )

    Listwise (one term per row, not a mean over pairs); with one negative it is DPO.
    """
    pairs = _prepare(
        "sdpo",
        beta,
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        rejected_mask,
        weight,
    )
    gaps = beta * (pairs.rejected - pairs.chosen.unsqueeze(1))
    # -inf for padding: exp(-inf) = 0 drops it from the sum, and its softmax gradient is 0.
    log_sum = torch.where(pairs.mask, gaps, float("-inf")).logsumexp(dim=1)
    return _result(-F.logsigmoid(-log_sum), _row_weights("sdpo", pairs.weight), pairs, beta)


def simpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    rejected_mask: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    beta: float,
    gamma: float,
) -> PreferenceLoss:
    """SimPO-style reference-free loss (Meng, Xia & Chen, NeurIPS 2024):

        l = -log sigma(beta * (s_c - s_r) - gamma)

    s_c - s_r equals log pi(c) - log pi(r) on one context; an item is one "token", so there
    is no length normalisation. ref_chosen / ref_rejected are ignored (accepted so that all
    of `LOSSES` share one signature); the rewards reported are beta * s.
    """
    _require("simpo", gamma >= 0, f"gamma must be >= 0, got {gamma}")
    pairs = _prepare(
        "simpo",
        beta,
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        rejected_mask,
        weight,
        reference_free=True,
    )
    return _pairwise(lambda m: -F.logsigmoid(beta * m - gamma), pairs, beta)


def kto(
    policy_logps: Tensor,
    ref_logps: Tensor,
    label: Tensor,
    kl_ref: Tensor,
    beta: float,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
    weight: Tensor | None = None,
) -> KTOLoss:
    """KTO for unpaired click / no-click rows (Ethayarajh et al., ICML 2024):

        r = log pi_theta(i|u) - log pi_ref(i|u),  z0 = max(kl_ref, 0), detached
        v = lambda_d * sigma(beta * (r - z0))   if label (desirable)
            lambda_u * sigma(beta * (z0 - r))   otherwise
        l = lambda_label - v

    policy_logps, ref_logps [B]: NORMALISED log-probabilities (`catalog.logps`), not raw
    logits: rows are unpaired, so the log-partitions do not cancel. label [B] bool.
    kl_ref: the reference point, a scalar (the paper's batch estimate, e.g. the mean of
    `catalog.exact_kl` over the batch's users) or [B] (each user's exact KL).
    The paper advises lambda_d * n_d / (lambda_u * n_u) in [1, 4/3].
    """
    _check_beta("kto", beta)
    _require("kto", lambda_d > 0, f"lambda_d must be > 0, got {lambda_d}")
    _require("kto", lambda_u > 0, f"lambda_u must be > 0, got {lambda_u}")
    _require(
        "kto",
        policy_logps.dim() == 1,
        f"policy_logps must be [B], got shape {list(policy_logps.shape)}",
    )
    batch = policy_logps.shape[0]
    _check_shape("kto", "ref_logps", ref_logps, (batch,))
    _check_shape("kto", "label", label, (batch,))
    _check_shape("kto", "weight", weight, (batch,))
    _require("kto", label.dtype == torch.bool, f"label must be bool, got {label.dtype}")
    _require(
        "kto",
        kl_ref.numel() == 1 or tuple(kl_ref.shape) == (batch,),
        f"kl_ref must be a scalar or [B={batch}], got shape {list(kl_ref.shape)}",
    )
    reward = _log_ratio("kto", policy_logps, ref_logps, "ref_logps")
    z0 = at_least_fp32(kl_ref.detach()).clamp_min(0).reshape(-1)
    value = torch.where(
        label,
        lambda_d * torch.sigmoid(beta * (reward - z0)),
        lambda_u * torch.sigmoid(beta * (z0 - reward)),
    )
    lambdas = torch.where(label, lambda_d, lambda_u).to(value.dtype)
    if weight is None:
        weight = torch.ones_like(value)
    return KTOLoss(_weighted_mean(lambdas - value, weight), (beta * reward).detach())


def kto_pairs(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    rejected_mask: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    beta: float,
    kl_ref: Tensor,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> PreferenceLoss:
    """`kto` on pair rows taken apart: the chosen item is a desirable (click) row, each real
    rejected item an undesirable (no-click) row, as TRL unpairs preference data for KTO.

    Inputs as the paired losses, but NORMALISED log-probabilities (`catalog.logps`). A row's
    undesirable items share its weight (w_b / K_b each), so clicks and no-clicks weigh the
    same in total and lambda_d = lambda_u = 1 sits in the paper's advised range. kl_ref: the
    reference point, e.g. the batch mean of `catalog.exact_kl`. Returns the rewards beta * r
    as the paired losses do, so `reward_metrics` reads them the same way.
    """
    _check_beta("kto", beta)
    mask, weight = _check_pairs(
        "kto", policy_chosen, policy_rejected, ref_chosen, ref_rejected, rejected_mask, weight
    )
    _row_weights("kto", weight)
    real = mask.sum(dim=1, keepdim=True)
    out = kto(
        torch.cat([policy_chosen, policy_rejected[mask]]),
        torch.cat([ref_chosen, ref_rejected[mask]]),
        torch.cat([torch.ones_like(mask[:, 0]), torch.zeros_like(mask[mask])]),
        kl_ref,
        beta,
        lambda_d,
        lambda_u,
        torch.cat([weight, (weight.unsqueeze(1) / real).expand_as(mask)[mask]]),
    )
    batch = policy_chosen.shape[0]
    rejected_rewards = torch.zeros_like(policy_rejected, dtype=out.rewards.dtype)
    rejected_rewards[mask] = out.rewards[batch:]
    return PreferenceLoss(out.loss, out.rewards[:batch], rejected_rewards)


def sft(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    rejected_mask: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    beta: float,
) -> PreferenceLoss:
    """No preference term: l = 0, rewards beta * log ratio as for DPO (logged only).

    With `sft_alpha > 0` the preference stage then trains the SFT term alone on the chosen
    items: the SFT baseline of Rafailov et al. (NeurIPS 2023), which tells a gain of the
    preference term from a gain of fine-tuning on the same (recent) events.
    """
    pairs = _prepare(
        "sft", beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected, rejected_mask, weight
    )
    return _pairwise(lambda m: 0.0 * m, pairs, beta)  # zero, yet in the graph (gradient 0)


def sft_term(logits: Tensor, chosen: Tensor) -> Tensor:
    """RPO's NLL term (Pang et al., NeurIPS 2024, "Iterative Reasoning Preference
    Optimization"): full-catalog cross-entropy -log pi_theta(chosen|u), padding excluded.

    logits [B, N], chosen [B]. The preference module adds alpha * sft_term to its loss.
    """
    return full_softmax_ce(logits, chosen)


def reward_metrics(
    result: PreferenceLoss, rejected_mask: Tensor | None = None
) -> dict[str, Tensor]:
    """TRL's per-step reward logs, over real (chosen, rejected) pairs only:
    rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies."""
    rejected = result.rejected_rewards
    mask = torch.ones_like(rejected, dtype=torch.bool) if rejected_mask is None else rejected_mask
    margins = result.chosen_rewards.unsqueeze(1) - rejected
    pairs = mask.sum().clamp_min(1)
    return {
        "rewards/chosen": result.chosen_rewards.mean(),
        "rewards/rejected": rejected[mask].sum() / pairs,
        "rewards/margins": margins[mask].sum() / pairs,
        "rewards/accuracies": (margins[mask] > 0).float().sum() / pairs,
    }


PairwiseLoss = Callable[..., PreferenceLoss]

# Uniform signature: (policy_chosen, policy_rejected, ref_chosen, ref_rejected, rejected_mask,
# weight, **params). `kto` is the exception: it also takes kl_ref (the reference point, a batch
# statistic, not a setting) and wants normalised log-probabilities.
LOSSES: dict[str, PairwiseLoss] = {
    "dpo": dpo,
    "dpop": dpop,
    "cdpo": cdpo,
    "robust": robust,
    "ipo": ipo,
    "hinge": hinge,
    "sdpo": sdpo,
    "simpo": simpo,
    "kto": kto_pairs,
    "sft": sft,
}
