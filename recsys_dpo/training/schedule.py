"""The optimizer and its learning-rate schedule, shared by both training stages.

`train.lr_schedule` and `train.warmup_steps` (conf/config.yaml), stepped once per optimizer
step, `total` being the run's optimizer steps (Lightning's `estimated_stepping_batches`):

    constant, warmup_steps=0   lr throughout (no scheduler at all: the default)
    warmup_steps=W > 0         steps s < W: lr * (s + 1) / W (torch's LinearLR)
    cosine                     then lr * (1 + cos(pi * (s - W) / (total - W))) / 2 down to 0 at
                               the end of training (CosineAnnealingLR); constant: lr

The scheduler is saved in Lightning's checkpoints, so a resumed run continues the schedule.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    SequentialLR,
)

from recsys_dpo.errors import DataError

LR_SCHEDULES = ("constant", "cosine")
# The name of the logged learning rate (LearningRateMonitor): the MLflow metric `lr`.
LR_METRIC = "lr"


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int,
                 total: int) -> LRScheduler | None:  # fmt: skip
    """The per-step scheduler of `schedule` after `warmup_steps` of linear warmup, over
    `total` optimizer steps; None when the lr is constant from the first step."""
    check_schedule(schedule, warmup_steps)
    if schedule == "constant" and warmup_steps == 0:
        return None
    if warmup_steps >= total:
        raise ValueError(f"warmup_steps={warmup_steps}: the run has only {total} optimizer "
                         "steps, the warmup must end before training does")  # fmt: skip
    after = (
        CosineAnnealingLR(optimizer, T_max=total - warmup_steps)
        if schedule == "cosine"
        else ConstantLR(optimizer, factor=1.0, total_iters=0)
    )
    if warmup_steps == 0:
        return after
    # LinearLR reaches end_factor after total_iters steps: (s + 1) / W at step s < W.
    warmup = LinearLR(optimizer, start_factor=1 / warmup_steps, end_factor=1.0,
                      total_iters=max(warmup_steps - 1, 1))  # fmt: skip
    return SequentialLR(optimizer, [warmup, after], milestones=[warmup_steps])


def check_schedule(schedule: str, warmup_steps: int) -> None:
    """ValueError for a schedule name or warmup that no run can use."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps}: must be >= 0")


def configure_optimizer(module: LightningModule, params: Iterable[torch.nn.Parameter]) -> Any:
    """AdamW over `params` at the module's lr and weight_decay, with its scheduler (the
    module's lr_schedule and warmup_steps, stepped per optimizer step) in Lightning's form."""
    hp = module.hparams
    optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    if hp.lr_schedule == "constant" and hp.warmup_steps == 0:
        return optimizer
    total = int(module.trainer.estimated_stepping_batches)
    try:
        scheduler = lr_scheduler(optimizer, hp.lr_schedule, hp.warmup_steps, total)
    except ValueError as err:
        raise DataError(f"train.{err}") from err
    return {"optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": LR_METRIC}}  # fmt: skip
