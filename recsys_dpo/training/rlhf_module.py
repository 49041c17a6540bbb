"""Stage 2, the RLHF route: the policy optimised against a learned reward r_phi with a KL
penalty to the reference, on the contexts of the same train pairs DPO trains on.

Per batch of pair rows (each a user and its history at one event) the frozen reference and
the frozen reward model (a `recsys-dpo train-reward` checkpoint, whose `full_scores` are
r_phi(u, i)) score the whole catalog, and the policy's logits go into one of the pure losses
of `recsys_dpo.objectives.rlhf`:

    rlhf_exact  distill_loss(pi_theta, rlhf_optimum_logits(s_ref, r_phi, beta)):
                the closed-form optimum pi* ~ pi_ref exp(r_phi / beta) distilled by the
                full-catalog KL(pi* || pi_theta)
    rlhf_pg     rlhf_objective: gradient ascent on the exact E_pi[r_phi] - beta KL(pi || pi_ref)
    rloo        rloo_loss: k items sampled per row from pi_theta, REINFORCE with the
                leave-one-out baseline and the KL shaped into the reward

Logged with TRL's RL-trainer names (`rlhf_metrics`: objective/scores, objective/rlhf_reward,
objective/kl, objective/entropy; for rlhf_exact they are those of the exact objective at the
current policy) plus the DPO stage's exact `kl/policy_ref` and `entropy/policy`, and for
rlhf_exact `distill/kl_to_optimum`, the loss itself. Pair rows are unweighted here (the
row `weight` of the pair log is a DPO-loss weight).
"""

from typing import Any

import torch
from torch import Tensor

from recsys_dpo.models import Recommender
from recsys_dpo.models.base import Batch
from recsys_dpo.objectives.catalog import entropy, exact_kl
from recsys_dpo.objectives.preference import LOSSES
from recsys_dpo.objectives.rlhf import (
    RLHFLoss,
    distill_loss,
    rlhf_metrics,
    rlhf_objective,
    rlhf_optimum_logits,
    rloo_loss,
)
from recsys_dpo.training.preference_module import NEUTRAL, PolicyModule, frozen
from recsys_dpo.training.reference_module import load_model
from recsys_dpo.training.schedule import check_schedule

RLHF_OBJECTIVES = ("rlhf_exact", "rlhf_pg", "rloo")
# Every objective of the preference stage: the DPO family, then the RLHF route.
PREFERENCE_OBJECTIVES = (*LOSSES, *RLHF_OBJECTIVES)


def rlhf_params(objective: str, beta: float, k: int | None = None,
                **settings: float | str) -> dict[str, Any]:  # fmt: skip
    """The parameters of an RLHF objective, checked: beta > 0; k (samples per row) >= 2 for
    rloo and unset otherwise; any of `NEUTRAL` or sft_alpha, which the RLHF losses do not
    take, must stay at its neutral value (0 for sft_alpha), so a typo cannot pass silently."""
    if objective not in RLHF_OBJECTIVES:
        raise ValueError(f"unknown RLHF objective {objective!r}; expected one of {RLHF_OBJECTIVES}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if objective == "rloo" and (k is None or k < 2):
        raise ValueError(f"rloo needs k >= 2 samples per row (a leave-one-out baseline), got {k}")
    if objective != "rloo" and k is not None:
        raise ValueError(f"k={k} is rloo's number of samples; {objective} samples nothing")
    neutral = {**NEUTRAL, "sft_alpha": 0.0}
    ignored = {n: v for n, v in settings.items() if v != neutral.get(n, v)}
    if ignored:
        raise ValueError(f"objective {objective!r} does not use {ignored}; it takes beta" +
                         (", k" if objective == "rloo" else ""))  # fmt: skip
    return {"beta": beta} | ({"k": k} if objective == "rloo" else {})


class RLHFModule(PolicyModule):
    """Stage-2 LightningModule of the RLHF route (validation, optimizer and checkpoints are
    `PolicyModule`'s, as the DPO stage's).

    Args:
        reference_ckpt: the stage-1 checkpoint (policy initialisation and frozen reference).
        reward_ckpt: the reward model r_phi (`recsys-dpo train-reward`), frozen.
        n_items, n_users: the data's vocab sizes; a reference built for others is refused.
        objective: rlhf_exact, rlhf_pg or rloo; beta: the KL coefficient; rloo_k: rloo's
            samples per row (objective.k).
        seed: rloo's sampler is seeded from (seed, global step), so a resumed run draws what
            the uninterrupted one drew.
        lr, weight_decay, lr_schedule, warmup_steps: AdamW's and its schedule.
        disable_dropout: build policy and reference without dropout (as TRL does).
        k: cut-off of the validation HR@k / NDCG@k.
        dataset: `trained_on` of the prepared dataset: both checkpoints are checked against it.
    """

    def __init__(
        self,
        reference_ckpt: str,
        reward_ckpt: str,
        n_items: int,
        n_users: int,
        objective: str = "rlhf_exact",
        beta: float = 0.1,
        rloo_k: int | None = None,
        seed: int = 0,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        disable_dropout: bool = True,
        k: int = 10,
        dataset: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.loss_params = rlhf_params(objective, beta, rloo_k)
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got {lr}, {weight_decay}")
        check_schedule(lr_schedule, warmup_steps)
        self.save_hyperparameters()
        self.load_policy(reference_ckpt, n_items, n_users, dataset, True, disable_dropout)
        reward = load_model(reward_ckpt, dataset, f"reward.ckpt={reward_ckpt}", dropout=0.0)
        self.keep_out(_reward=frozen(reward))

    @property
    def reward(self) -> Recommender:
        """The frozen reward model r_phi, on the policy's device."""
        return self.on_device(self._reward)

    def preference_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, detached metrics) on the contexts of a pairs batch (its chosen and rejected
        items are not read: the reward model scores the whole catalog)."""
        policy_logits = self.policy.full_scores(batch)
        with torch.no_grad():
            ref_logits = self.reference.full_scores(batch)
            reward = self.reward.full_scores(batch)
        beta, objective = self.hparams.beta, self.hparams.objective
        metrics: dict[str, Tensor] = {}
        if objective == "rlhf_exact":
            loss = distill_loss(policy_logits, rlhf_optimum_logits(ref_logits, reward, beta)).mean()
            metrics["distill/kl_to_optimum"] = loss.detach()
            with torch.no_grad():
                out: RLHFLoss = rlhf_objective(policy_logits, ref_logits, reward, beta)
        elif objective == "rlhf_pg":
            out = rlhf_objective(policy_logits, ref_logits, reward, beta)
            loss = out.loss
        else:
            generator = torch.Generator(policy_logits.device)
            # Per step (a resumed run draws the same samples) and per rank (DDP ranks hold
            # different rows and must not share their uniforms).
            generator.manual_seed((self.hparams.seed * 1_000_003 + self.global_step) * 1_009
                                  + self.global_rank)  # fmt: skip
            out = rloo_loss(policy_logits, ref_logits, reward, beta, self.hparams.rloo_k,
                            generator)  # fmt: skip
            loss = out.loss
        detached = policy_logits.detach()
        return loss, {
            "loss": loss.detach(),
            **metrics,
            **rlhf_metrics(out),
            "kl/policy_ref": exact_kl(detached, ref_logits).mean(),
            "entropy/policy": entropy(detached).mean(),
        }
