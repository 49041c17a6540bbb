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

from recsys_dpo.models import Recommender, build_model
from recsys_dpo.models.base import Batch
from recsys_dpo.objectives.catalog import entropy, exact_kl, log_softmax_catalog
from recsys_dpo.objectives.preference import LOSSES, reward_metrics, sft_term
from recsys_dpo.training.ranking_eval import ranking_metrics
from recsys_dpo.training.reference_module import model_spec, model_weights, read_checkpoint


def objective_params(
    objective: str, beta: float, label_smoothing: float, gamma: float
) -> dict[str, float]:
    """The keyword parameters `LOSSES[objective]` takes, checked now by a dry run of the loss.

    A setting the objective ignores but that is not at its neutral value (e.g. gamma with DPO)
    is refused, so a config typo cannot silently train something else.
    """
    if objective not in LOSSES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {sorted(LOSSES)}")
    loss = LOSSES[objective]
    accepted = {
        name for name, p in inspect.signature(loss).parameters.items() if p.kind == p.KEYWORD_ONLY
    }
    given = {"beta": beta, "label_smoothing": label_smoothing, "gamma": gamma}
    ignored = {name: v for name, v in given.items() if name not in accepted and v != 0}
    if ignored:
        raise ValueError(f"objective {objective!r} does not use {ignored}; it takes {accepted}")
    params = {name: v for name, v in given.items() if name in accepted}
    zero, zeros = torch.zeros(1), torch.zeros(1, 1)
    loss(zero, zeros, zero, zeros, **params)  # its own checks raise ValueError (beta <= 0, ...)
    return params


def gather_logps(logp: Tensor, items: Tensor) -> Tensor:
    """log pi(item|u) from catalog log-probabilities logp [B, N] for items [B] or [B, K]."""
    if items.dim() == 1:
        return logp.gather(1, items.unsqueeze(1)).squeeze(1)
    return logp.gather(1, items)


class PreferenceModule(LightningModule):
    """Stage-2 LightningModule.

    Args:
        reference_ckpt: the stage-1 checkpoint (policy initialisation and frozen reference).
        n_items, n_users: the data's vocab sizes; a reference built for others is refused.
        objective: a key of `recsys_dpo.objectives.preference.LOSSES` (dpo, cdpo, robust, ipo,
            hinge, sdpo, simpo); beta, label_smoothing, gamma: its parameters.
        sft_alpha: weight of the RPO term, full-catalog cross-entropy on the chosen item.
        precompute: take reference log-probabilities from the batch, keep no reference model
            (then kl/policy_ref cannot be logged).
        disable_dropout: build policy and reference without dropout (as TRL does), so at step 0
            the policy equals the reference exactly and rewards start at 0.
        k: cut-off of the validation HR@k / NDCG@k.
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
        sft_alpha: float = 0.0,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        precompute: bool = False,
        disable_dropout: bool = True,
        k: int = 10,
    ) -> None:
        super().__init__()
        self.loss_params = objective_params(objective, beta, label_smoothing, gamma)
        if sft_alpha < 0:
            raise ValueError(f"sft_alpha must be >= 0, got {sft_alpha}")
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got {lr}, {weight_decay}")
        self.save_hyperparameters()
        spec, state = model_weights(read_checkpoint(reference_ckpt))
        for name, expected in (("n_items", n_items), ("n_users", n_users)):
            if spec["config"].get(name) != expected:
                raise ValueError(
                    f"reference {reference_ckpt} was trained with {name}="
                    f"{spec['config'].get(name)}, but the data has {name}={expected}: "
                    "train the reference on this prepared dataset"
                )
        config = dict(spec["config"])
        if disable_dropout and "dropout" in config:
            config["dropout"] = 0.0
        self.policy = self._build(spec["name"], config, state)
        # object.__setattr__ bypasses nn.Module registration: not a child module, so not in
        # parameters(), state_dict() or .to(); `reference` moves it to the policy's device.
        frozen = None if precompute else self._build(spec["name"], config, state)
        if frozen is not None:
            frozen.eval().requires_grad_(False)
        object.__setattr__(self, "_reference", frozen)

    @staticmethod
    def _build(name: str, config: dict[str, Any], state: dict[str, Tensor]) -> Recommender:
        model = build_model(name, **config)
        model.load_state_dict(state)
        return model

    @property
    def reference(self) -> Recommender | None:
        """The frozen reference, on the policy's device (None with precompute)."""
        ref = self._reference
        if ref is not None and next(ref.parameters()).device != self.device:
            ref.to(self.device)
        return ref

    def preference_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, detached metrics) of a pairs batch; see the module docstring for the names."""
        chosen, mask = batch["chosen"], batch["rejected_mask"]
        # Padded slots gather the chosen item instead of the padding column's -inf.
        rejected = torch.where(mask, batch["rejected"], chosen.unsqueeze(1))
        policy_logits = self.policy.full_scores(batch)
        policy_logp = log_softmax_catalog(policy_logits)
        policy_chosen = gather_logps(policy_logp, chosen)
        policy_rejected = gather_logps(policy_logp, rejected)
        ref_logits = None
        if self.hparams.precompute:
            if "ref_chosen" not in batch:
                raise ValueError("precompute=True but the pairs have no ref_chosen/ref_rejected")
            ref_chosen, ref_rejected = batch["ref_chosen"], batch["ref_rejected"]
        else:
            with torch.no_grad():
                ref_logits = self.reference.full_scores(batch)
                ref_logp = log_softmax_catalog(ref_logits)
                ref_chosen = gather_logps(ref_logp, chosen)
                ref_rejected = gather_logps(ref_logp, rejected)
        out = LOSSES[self.hparams.objective](
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            mask,
            batch["weight"],
            **self.loss_params,
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
        if ref_logits is not None:
            metrics["kl/policy_ref"] = exact_kl(detached, ref_logits).mean()
        return loss, metrics

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss, metrics = self.preference_step(batch)
        if not torch.isfinite(loss):
            raise RuntimeError(
                f"non-finite preference loss ({loss.item()}) at step {self.global_step} with "
                f"objective {self.hparams.objective!r} {self.loss_params}: lower lr or beta"
            )
        self.log_dict(metrics, batch_size=len(batch["chosen"]))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        size = len(batch["user_idx"])
        if "chosen" in batch:
            _, metrics = self.preference_step(batch)
            metrics = {f"val/{name}": v for name, v in metrics.items()}
        else:
            metrics = {
                n: v.mean() for n, v in ranking_metrics(self.policy, batch, self.hparams.k).items()
            }
        self.log_dict(metrics, batch_size=size, add_dataloader_idx=False)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norms = grad_norm(self.policy, norm_type=2)
        if norms:
            self.log("grad_norm", norms["grad_2.0_norm_total"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.policy.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["model"] = model_spec(self.policy, "policy.")
