"""Training callbacks."""

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class StepSeed(Callback):
    """Reseed torch's RNG before every training batch from (seed, global step).

    Dropout masks and sampled negatives then depend only on the step, not on the RNG's history,
    so a run resumed from a checkpoint draws exactly what the uninterrupted run drew (Lightning
    does not save RNG states in checkpoints). With `EpochShuffle` batches and
    `Trainer(deterministic=True)`, resuming is bit-exact.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: object, batch_idx: int
    ) -> None:
        torch.manual_seed(self.seed * 1_000_003 + trainer.global_step)
