"""The RLHF route beside DPO: KL-regularised policy optimisation against a reward r(u, i).

The objective, per context u, over the policy pi(i|u) = softmax_i s(u, i):

    J(pi) = E_{i~pi}[r(u, i)] - beta * KL(pi || pi_ref)

An LLM trainer can only sample it; over an item catalog every term is an exact sum
(`catalog.exact_kl`), so its maximiser is known in closed form (`rlhf_optimum_logits`) and
the sampled, LLM-style estimator (`rloo_loss`) can be checked against the exact gradient.

Inputs, one row per context: logit matrices [B, N] and a reward matrix [B, N] with column
`PAD_ITEM` (0) the padding item, which is not an item: it gets probability 0 and its reward
is ignored. The reference and the reward are frozen (a reference network and a trained
reward model): they are detached inside every function here. Logged quantities carry TRL's
RL-trainer names (`rlhf_metrics`).
"""

from typing import NamedTuple

import torch
from torch import Tensor

from recsys_dpo.data.schema import PAD_ITEM
from recsys_dpo.objectives.catalog import at_least_fp32, entropy, exact_kl, log_softmax_catalog


class RLHFLoss(NamedTuple):
    """A policy-optimisation loss and what TRL's RL trainers log, per row, detached."""

    loss: Tensor  # scalar, differentiable w.r.t. the policy logits
    score: Tensor  # [B], E_{i~pi}[r]: TRL's objective/scores (the reward model's own view)
    rlhf_reward: Tensor  # [B], E_pi[r] - beta * KL(pi || pi_ref): objective/rlhf_reward
    kl: Tensor  # [B], exact KL(pi || pi_ref) over the catalog: objective/kl
    entropy: Tensor  # [B], exact H(pi) over the catalog: objective/entropy


def _require(name: str, ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


def _check_beta(name: str, beta: float) -> None:
    _require(name, beta > 0, f"beta must be > 0, got {beta}")


def _check_shapes(name: str, **matrices: Tensor) -> None:
    """Every matrix [B, N] with N >= 2 (padding + an item), all of one shape."""
    shapes = {label: tuple(m.shape) for label, m in matrices.items()}
    first_label, first = next(iter(shapes.items()))
    _require(
        name,
        len(first) == 2 and first[1] >= 2,
        f"{first_label} must be [B, N] with column 0 the padding item and N >= 2, got shape "
        f"{list(first)}",
    )
    for label, shape in shapes.items():
        _require(
            name,
            shape == first,
            f"{label} must have the shape of {first_label} {list(first)}, got {list(shape)}",
        )


def _real(x: Tensor) -> Tensor:
    return at_least_fp32(x[:, PAD_ITEM + 1 :])


def rlhf_optimum_logits(ref_logits: Tensor, reward: Tensor, beta: float) -> Tensor:
    """Scores of the KL-regularised RLHF optimum: log pi*(i|u) up to a per-row constant.

        pi*(i|u) = pi_ref(i|u) exp(r(u, i) / beta) / Z(u)
        =>  s*(u, i) = s_ref(u, i) + r(u, i) / beta

    the maximiser of E_pi[r] - beta KL(pi || pi_ref) (Peters & Schaal 2007; Rafailov et al.,
    NeurIPS 2023, "Direct Preference Optimization", Eq. 4). The log-partitions of pi_ref and
    Z(u) are per-row constants, so these are servable scores; softmax over the real items
    (`catalog.log_softmax_catalog`) gives pi*. ref_logits, reward: [B, N]. Returns [B, N] in
    >= fp32 with the padding column -inf.
    """
    _check_beta("rlhf_optimum_logits", beta)
    _check_shapes("rlhf_optimum_logits", ref_logits=ref_logits, reward=reward)
    real = _real(ref_logits.detach()) + _real(reward.detach()) / beta
    pad = real.new_full((real.shape[0], 1), float("-inf"))
    return torch.cat([pad, real], dim=-1)


def distill_loss(policy_logits: Tensor, target_logits: Tensor) -> Tensor:
    """Forward KL(pi_target || pi_theta) = sum_{i>=1} p*_i (log p*_i - log p_theta_i) per row.

    Distils a target policy given by its scores (e.g. `rlhf_optimum_logits`) into one network:
    the full-catalog cross-entropy H(pi*, pi_theta) minus the constant H(pi*), so it is 0
    exactly when pi_theta = pi* (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
    Neural Network", at temperature 1). The forward direction weights items by pi*, the
    target's mass, as supervised distillation does. policy_logits, target_logits: [B, N];
    the target is detached. Returns [B].
    """
    _check_shapes("distill_loss", policy_logits=policy_logits, target_logits=target_logits)
    return exact_kl(target_logits.detach(), policy_logits)


def rlhf_objective(
    policy_logits: Tensor, ref_logits: Tensor, reward: Tensor, beta: float
) -> RLHFLoss:
    """The exact RLHF objective over the catalog, no sampling:

        J(u) = sum_{i>=1} pi(i|u) r(u, i) - beta * KL(pi(.|u) || pi_ref(.|u)),
        loss = -mean_u J(u)

    (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences";
    Ouyang et al. 2022 without the pretraining term), its gradient the exact policy gradient.
    Its maximiser is `rlhf_optimum_logits`, with maximum beta * log E_{pi_ref}[exp(r / beta)].
    policy_logits, ref_logits, reward: [B, N].
    """
    _check_beta("rlhf_objective", beta)
    _check_shapes(
        "rlhf_objective", policy_logits=policy_logits, ref_logits=ref_logits, reward=reward
    )
    log_p = log_softmax_catalog(at_least_fp32(policy_logits))[:, PAD_ITEM + 1 :]
    score = (log_p.exp() * _real(reward.detach())).sum(dim=-1)
    kl = exact_kl(policy_logits, ref_logits.detach())
    objective = score - beta * kl
    return RLHFLoss(
        -objective.mean(),
        score.detach(),
        objective.detach(),
        kl.detach(),
        entropy(policy_logits.detach()),
    )


def rloo_loss(
    policy_logits: Tensor,
    ref_logits: Tensor,
    reward: Tensor,
    beta: float,
    k: int,
    generator: torch.Generator | None = None,
) -> RLHFLoss:
    """RLOO, REINFORCE with the leave-one-out baseline (Ahmadian et al., ACL 2024, "Back to
    Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in
    LLMs", arXiv:2402.14740), the LLM-style estimator of the `rlhf_objective` gradient:

        i_1..i_k ~ pi_theta(.|u)  (with replacement)
        R_s = r(u, i_s) - beta * (log pi_theta(i_s|u) - log pi_ref(i_s|u))    (detached)
        b_s = (sum_{s'} R_s' - R_s) / (k - 1),   A_s = R_s - b_s
        loss = -mean_u mean_s A_s * log pi_theta(i_s|u)

    The KL is shaped into the reward as TRL's RLOOTrainer does it: the sampled (k1) estimate
    log pi_theta - log pi_ref, scaled by -kl_coef (= beta), added to the score to give
    `rlhf_reward`, all without gradient; the loss is mean(-advantages * logprobs). (An item is
    one action, so TRL's sequence- and token-level KL coincide.) This is unbiased for the exact
    gradient of J: the REINFORCE gradient of E_pi[sg(R)] differs from grad J only by
    beta * sum_i pi_i grad log pi_i = beta * grad sum_i pi_i = 0. b_s is independent of i_s,
    so the baseline adds no bias. Since the catalog is enumerable, the logged kl and entropy
    are exact (TRL estimates them from the samples); rlhf_reward and score are the sample
    means TRL logs. policy_logits, ref_logits, reward: [B, N]; k >= 2 samples per row;
    generator: the sampler's random stream (None: torch's global one).
    """
    _check_beta("rloo_loss", beta)
    _check_shapes("rloo_loss", policy_logits=policy_logits, ref_logits=ref_logits, reward=reward)
    _require("rloo_loss", k >= 2, f"k must be >= 2 (a leave-one-out baseline), got {k}")
    log_p = log_softmax_catalog(at_least_fp32(policy_logits))[:, PAD_ITEM + 1 :]
    log_q = log_softmax_catalog(at_least_fp32(ref_logits.detach()))[:, PAD_ITEM + 1 :]
    samples = torch.multinomial(log_p.detach().exp(), k, replacement=True, generator=generator)
    logp_s = log_p.gather(-1, samples)
    with torch.no_grad():
        score_s = _real(reward).gather(-1, samples)
        shaped = score_s - beta * (logp_s - log_q.gather(-1, samples))
        advantage = shaped - (shaped.sum(dim=-1, keepdim=True) - shaped) / (k - 1)
    return RLHFLoss(
        -(advantage * logp_s).mean(),
        score_s.mean(dim=-1),
        shaped.mean(dim=-1),
        exact_kl(policy_logits.detach(), ref_logits.detach()),
        entropy(policy_logits.detach()),
    )


def rlhf_metrics(result: RLHFLoss) -> dict[str, Tensor]:
    """TRL's RL-trainer logs, batch means: objective/scores, objective/rlhf_reward,
    objective/kl, objective/entropy."""
    return {
        "objective/scores": result.score.mean(),
        "objective/rlhf_reward": result.rlhf_reward.mean(),
        "objective/kl": result.kl.mean(),
        "objective/entropy": result.entropy.mean(),
    }
