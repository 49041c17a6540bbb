"""The reward-model stage: r_phi(u, i) fit to the chosen/rejected pairs by Bradley-Terry.

The reward model is the reference's architecture started from the reference's weights; its
logits s_phi(u, i) are the reward, so one `full_scores` call gives the whole catalog's rewards
(what the RLHF policies of `recsys_dpo.objectives.rlhf` optimise against). Its checkpoints
load with `load_model` like any stage's.

Logged with TRL RewardTrainer's names: `loss` per step, and on the valid pairs `val/loss`,
`val/accuracy` (ties count as wrong), `val/margin`, plus `val/ece`, the expected calibration
error of sigma(r_c - r_j) over the valid pairs taken in both orders
(`recsys_dpo.objectives.reward`); on the ranking rows the usual val/hr_at_k, val/ndcg_at_k of
the reward as a ranker. The best checkpoint is the one with the best val/accuracy.
"""

from typing import Any

from lightning.pytorch import LightningModule
from torch import Tensor

from recsys_dpo.models.base import Batch
from recsys_dpo.objectives.reward import (
    bradley_terry,
    calibration_bins,
    expected_calibration_error,
    mean_margin,
    pair_accuracy,
)
from recsys_dpo.training.guards import require_finite, stage_guard
from recsys_dpo.training.preference_module import pair_logps
from recsys_dpo.training.ranking_eval import ranking_metrics
from recsys_dpo.training.reference_module import load_model, model_spec
from recsys_dpo.training.schedule import check_schedule, configure_optimizer


def pair_metrics(r_chosen: Tensor, r_rejected: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """TRL RewardTrainer's `accuracy` and `margin` of a batch (means over its real pairs)."""
    return {"accuracy": pair_accuracy(r_chosen, r_rejected, mask).float(),
            "margin": mean_margin(r_chosen, r_rejected, mask).float()}  # fmt: skip


class RewardModule(LightningModule):
    """Reward-stage LightningModule.

    Args:
        reference_ckpt: the stage-1 checkpoint the reward model starts from (architecture and
            weights), built without dropout (as TRL's RewardConfig does by default).
        lr, weight_decay, lr_schedule, warmup_steps: AdamW's and its schedule
            (`recsys_dpo.training.schedule`).
        k: cut-off of the validation HR@k / NDCG@k.
        dataset: `trained_on` of the prepared dataset: the reference is checked against it and
            every checkpoint records it.
    """

    def __init__(
        self,
        reference_ckpt: str,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        k: int = 10,
        dataset: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got {lr}, {weight_decay}")
        check_schedule(lr_schedule, warmup_steps)
        self.save_hyperparameters()
        self.reward = load_model(reference_ckpt, dataset, f"reference {reference_ckpt}",
                                 dropout=0.0).train()  # fmt: skip
        self._bins: Tensor | None = None

    def pair_step(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, r_chosen, r_rejected) of a pairs batch."""
        # log softmax_i s_phi(u, i): the score less a per-user constant, so the same margins.
        r_chosen, r_rejected = pair_logps(
            self.reward.full_scores(batch), batch["chosen"], batch["rejected"]
        )
        loss = bradley_terry(r_chosen, r_rejected, batch["rejected_mask"], batch["weight"])
        return loss, r_chosen.detach(), r_rejected.detach()

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss, r_chosen, r_rejected = self.pair_step(batch)
        with stage_guard(self, "reward"):
            require_finite(loss, "the bradley_terry loss")
        self.log("loss", loss.detach(), batch_size=len(batch["chosen"]))
        self.log_dict(pair_metrics(r_chosen, r_rejected, batch["rejected_mask"]),
                      batch_size=int(batch["rejected_mask"].sum()))  # fmt: skip
        return loss

    def on_validation_epoch_start(self) -> None:
        self._bins = None

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        size = len(batch["user_idx"])
        with stage_guard(self, "reward"):
            if "chosen" in batch:
                loss, r_chosen, r_rejected = self.pair_step(batch)
                require_finite(loss, "the validation loss")
                mask = batch["rejected_mask"]
                bins = calibration_bins(r_chosen, r_rejected, mask)
                self._bins = bins if self._bins is None else self._bins + bins
                self.log("val/loss", loss, batch_size=size, add_dataloader_idx=False,
                         sync_dist=True)  # fmt: skip
                # Epoch means weighted by each batch's real pairs: the means over all pairs.
                size = int(mask.sum())
                metrics = {f"val/{n}": v for n, v in pair_metrics(r_chosen, r_rejected,
                                                                  mask).items()}  # fmt: skip
            else:
                ranking = ranking_metrics(self.reward, batch, self.hparams.k)
                metrics = {n: v.mean() for n, v in ranking.items()}
        self.log_dict(metrics, batch_size=size, add_dataloader_idx=False, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self._bins is None:
            return
        # Bin sums add up across ranks (same shape on every rank), unlike a per-rank ECE.
        bins = self.all_gather(self._bins)
        bins = bins.sum(0) if bins.dim() == 3 else bins
        self.log("val/ece", expected_calibration_error(bins).float(), rank_zero_only=True)

    def configure_optimizers(self) -> Any:
        return configure_optimizer(self, self.reward.parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["model"] = model_spec(self.reward, "reward.")
        if self.hparams.dataset is not None:
            checkpoint["dataset"] = dict(self.hparams.dataset)
