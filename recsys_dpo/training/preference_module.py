"""Stage 2: fine-tune the stage-1 model under a DPO-family objective against a frozen reference.

The policy pi(i|u) = softmax_i s(u, i) over the whole catalog (DESIGN.md, "The objective"). The
stage-1 checkpoint is loaded twice: the trainable policy, and a frozen reference (eval mode, no
grad) kept OUT of the module's registered children, so it is neither optimised nor moved by
Lightning nor saved in checkpoints (the reference checkpoint path is a hyperparameter). With
`precompute=True` no reference model is kept; its log-probabilities come with each batch
(`ref_chosen`, `ref_rejected`).

Logged per step with TRL's names (loss, rewards/*, logps/*) plus what only a recommender can
compute exactly: `kl/policy_ref` = KL(pi_theta || pi_ref) and `entropy/policy` over the
catalog for the batch's users, and `grad_norm`.
"""

import inspect
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import grad_norm
from torch import Tensor

from recsys_dpo.data.schema import PAD_ITEM
from recsys_dpo.models import Recommender, build_model
from recsys_dpo.models.base import Batch
from recsys_dpo.objectives.catalog import entropy, exact_kl, logps
from recsys_dpo.objectives.preference import LOSSES, reward_metrics, sft_term
from recsys_dpo.training.guards import require_finite, stage_guard
from recsys_dpo.training.ranking_eval import ranking_metrics
from recsys_dpo.training.reference_module import (
    check_sizes,
    model_spec,
    read_checkpoint,
    weights_for,
)
from recsys_dpo.training.schedule import check_schedule, configure_optimizer

# A flip rate in [0, 0.5) standing in for label_smoothing=auto in the dry run of the loss.
AUTO_STAND_IN = 0.25
# Settings an objective may not use; each must then stay at this neutral value.
NEUTRAL = {"label_smoothing": 0.0, "gamma": 0.0, "lambda_d": 1.0, "lambda_u": 1.0, "lambda_": 0.0}


def objective_params(objective: str, beta: float, **settings: float | str) -> dict[str, Any]:
    """The keyword parameters `LOSSES[objective]` takes, checked now by a dry run of the loss.

    settings: any of `NEUTRAL`. One the objective ignores but that is not at its neutral value
    (e.g. gamma with DPO) is refused, so a config typo cannot silently train something else.
    label_smoothing may be "auto" (measured on the pairs before training, `run.py`): the dry
    run then checks the rest with a stand-in rate.
    """
    if objective not in LOSSES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {sorted(LOSSES)}")
    loss = LOSSES[objective]
    accepted = {
        name
        for name, p in inspect.signature(loss).parameters.items()
        if p.kind == p.KEYWORD_ONLY and name != "kl_ref"
    }
    given = {"beta": beta, **settings}
    ignored = {n: v for n, v in given.items() if n not in accepted and v != NEUTRAL.get(n)}
    if ignored:
        raise ValueError(f"objective {objective!r} does not use {ignored}; it takes {accepted}")
    params = {name: v for name, v in given.items() if name in accepted}
    zero, zeros = torch.zeros(1), torch.zeros(1, 1)
    batch_stats = {"kl_ref": zero} if objective == "kto" else {}
    stand_in = {n: AUTO_STAND_IN for n, v in params.items() if v == "auto"}
    # Its own checks raise ValueError (beta <= 0, ...).
    loss(zero, zeros, zero, zeros, **{**params, **stand_in}, **batch_stats)
    return params


def pair_logps(logits: Tensor, chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
    """log pi(chosen|u) [B] and log pi(rejected|u) [B, K] from catalog logits [B, N].

    Padded rejected slots (item 0) get the chosen item's value instead of the padding column's
    -inf, so they stay finite; the losses mask them out.
    """
    rejected = torch.where(rejected != PAD_ITEM, rejected, chosen.unsqueeze(1))
    logp = logps(logits, torch.cat([chosen.unsqueeze(1), rejected], dim=1))
    return logp[:, 0], logp[:, 1:]


def frozen(model: Recommender) -> Recommender:
    """`model` in eval mode without gradients: a reference or a reward model, never trained."""
    return model.eval().requires_grad_(False)


class PolicyModule(LightningModule):
    """What every policy-training LightningModule of stage 2 shares: the policy started from
    the reference checkpoint, the frozen reference beside it (not a registered child), the
    logged training step, validation (the `preference_step` of the valid pairs and the ranking
    metrics), AdamW and the checkpoint's model spec. A subclass saves its hyperparameters
    (`objective`, `k`, `dataset` among them), calls `load_policy`, sets `loss_params` (named in
    a non-finite loss's error) and defines `preference_step`."""

    loss_params: dict[str, Any]

    def load_policy(
        self,
        reference_ckpt: str,
        n_items: int,
        n_users: int,
        dataset: dict[str, str] | None,
        keep_reference: bool,
        disable_dropout: bool,
    ) -> None:
        """The policy from `reference_ckpt` (checked against `dataset` and the vocab sizes),
        and (keep_reference) its frozen copy as `reference`; both grown alike when the
        dataset's vocabulary extends the reference's (`weights_for`), so pi_ref is defined on
        the new items too."""
        what = f"reference {reference_ckpt}"
        spec, state = weights_for(read_checkpoint(reference_ckpt), dataset, what)
        check_sizes(spec, what, n_items=n_items, n_users=n_users)
        config = dict(spec["config"])
        if disable_dropout and "dropout" in config:
            config["dropout"] = 0.0
        self.policy = self._build(spec["name"], config, state)
        ref = frozen(self._build(spec["name"], config, state)) if keep_reference else None
        self.keep_out(_reference=ref)

    def keep_out(self, **models: Recommender | None) -> None:
        """Attributes that are NOT registered children: object.__setattr__ bypasses nn.Module
        registration, so they are not in parameters(), state_dict() or .to(); `on_device`
        moves them to the policy's device."""
        for name, model in models.items():
            object.__setattr__(self, name, model)

    def on_device(self, model: Recommender | None) -> Recommender | None:
        if model is not None and next(model.parameters()).device != self.device:
            model.to(self.device)
        return model

    @staticmethod
    def _build(name: str, config: dict[str, Any], state: dict[str, Tensor]) -> Recommender:
        model = build_model(name, **config)
        model.load_state_dict(state)
        return model

    @property
    def reference(self) -> Recommender | None:
        """The frozen reference, on the policy's device (None with precompute)."""
        return self.on_device(self._reference)

    def preference_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, detached metrics) of a pairs batch."""
        raise NotImplementedError

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss, metrics = self.preference_step(batch)
        with stage_guard(self, "preference"):
            require_finite(loss, f"the {self.hparams.objective} loss {self.loss_params}")
        self.log_dict(metrics, batch_size=len(batch["chosen"]))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        size = len(batch["user_idx"])
        with stage_guard(self, "preference"):
            if "chosen" in batch:
                loss, metrics = self.preference_step(batch)
                require_finite(loss, "the validation loss")
                metrics = {f"val/{name}": v for name, v in metrics.items()}
            else:
                ranking = ranking_metrics(self.policy, batch, self.hparams.k)
                metrics = {n: v.mean() for n, v in ranking.items()}
        # Under DDP each rank validates a shard: the best checkpoint needs the global mean.
        self.log_dict(metrics, batch_size=size, add_dataloader_idx=False, sync_dist=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norms = grad_norm(self.policy, norm_type=2)
        if norms:
            self.log("grad_norm", norms["grad_2.0_norm_total"])

    def configure_optimizers(self) -> Any:
        return configure_optimizer(self, self.policy.parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["model"] = model_spec(self.policy, "policy.")
        if self.hparams.dataset is not None:
            checkpoint["dataset"] = dict(self.hparams.dataset)


class PreferenceModule(PolicyModule):
    """Stage-2 LightningModule.

    Args:
        reference_ckpt: the stage-1 checkpoint (policy initialisation and frozen reference).
        n_items, n_users: the data's vocab sizes; a reference built for others is refused.
        objective: a key of `recsys_dpo.objectives.preference.LOSSES` (dpo, dpop, cdpo, robust,
            ipo, hinge, sdpo, simpo, kto, sft); beta, label_smoothing, gamma, lambda_d,
            lambda_u, lambda_ (DPOP's): its parameters. kto takes the pairs apart into click / no-click rows; its reference
            point is the exact KL(pi_theta || pi_ref) of the batch's users, so it needs the
            live reference (not precompute). sft has no preference term: the SFT-only
            baseline, which needs sft_alpha > 0.
        sft_alpha: weight of the RPO term, full-catalog cross-entropy on the chosen item.
        lr, weight_decay: AdamW's; lr_schedule, warmup_steps: its learning rate per step
            (`recsys_dpo.training.schedule`; "constant", 0: lr throughout).
        precompute: take reference log-probabilities from the batch, keep no reference model
            (then kl/policy_ref cannot be logged).
        disable_dropout: build policy and reference without dropout (as TRL does), so at step 0
            the policy equals the reference exactly and rewards start at 0.
        k: cut-off of the validation HR@k / NDCG@k.
        dataset: `trained_on` of the prepared dataset it trains on: the reference checkpoint
            is checked against it, and every checkpoint of this module records it.
    """

    def __init__(
        self,
        reference_ckpt: str,
        n_items: int,
        n_users: int,
        objective: str = "dpo",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        gamma: float = 0.0,
        lambda_d: float = 1.0,
        lambda_u: float = 1.0,
        lambda_: float = 0.0,
        sft_alpha: float = 0.0,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        precompute: bool = False,
        disable_dropout: bool = True,
        k: int = 10,
        dataset: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.loss_params = objective_params(
            objective,
            beta,
            label_smoothing=label_smoothing,
            gamma=gamma,
            lambda_d=lambda_d,
            lambda_u=lambda_u,
            lambda_=lambda_,
        )
        if objective == "kto" and precompute:
            raise ValueError(
                "kto takes its reference point from the exact KL to the live reference model: "
                "set reference.precompute=false"
            )
        if sft_alpha < 0:
            raise ValueError(f"sft_alpha must be >= 0, got {sft_alpha}")
        if objective == "sft" and sft_alpha <= 0:
            raise ValueError("objective=sft trains the SFT term alone: set sft_alpha > 0")
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got {lr}, {weight_decay}")
        check_schedule(lr_schedule, warmup_steps)
        self.save_hyperparameters()
        self.load_policy(reference_ckpt, n_items, n_users, dataset, not precompute,
                         disable_dropout)  # fmt: skip

    def preference_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, detached metrics) of a pairs batch; see the module docstring for the names."""
        chosen, rejected, mask = batch["chosen"], batch["rejected"], batch["rejected_mask"]
        policy_logits = self.policy.full_scores(batch)
        policy_chosen, policy_rejected = pair_logps(policy_logits, chosen, rejected)
        ref_logits = None
        if self.hparams.precompute:
            if "ref_chosen" not in batch:
                raise ValueError("precompute=True but the pairs have no ref_chosen/ref_rejected")
            ref_chosen, ref_rejected = batch["ref_chosen"], batch["ref_rejected"]
        else:
            with torch.no_grad():
                ref_logits = self.reference.full_scores(batch)
                ref_chosen, ref_rejected = pair_logps(ref_logits, chosen, rejected)
        kl = None if ref_logits is None else exact_kl(policy_logits.detach(), ref_logits)
        batch_stats = {"kl_ref": kl.mean()} if self.hparams.objective == "kto" else {}
        weight = batch["weight"]
        if "rejected_weight" in batch:  # objective.rejected_weight_horizon: per-pair weights
            weight = weight.unsqueeze(1) * batch["rejected_weight"]
        out = LOSSES[self.hparams.objective](
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            mask,
            weight,
            **self.loss_params,
            **batch_stats,
        )
        loss = out.loss
        if self.hparams.sft_alpha > 0:
            loss = loss + self.hparams.sft_alpha * sft_term(policy_logits, chosen)
        detached = policy_logits.detach()
        metrics = {
            "loss": loss.detach(),
            **reward_metrics(out, mask),
            "logps/chosen": policy_chosen.detach().mean(),
            "logps/rejected": policy_rejected.detach()[mask].mean(),
            "preference/accuracy": (policy_chosen.unsqueeze(1) > policy_rejected)[mask]
            .float()
            .mean(),
            "entropy/policy": entropy(detached).mean(),
        }
        if kl is not None:
            metrics["kl/policy_ref"] = kl.mean()
        return loss, metrics
