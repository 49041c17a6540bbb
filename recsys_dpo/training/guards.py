"""Non-finite numbers stop the run: a NaN or infinite loss or score is never trained on,
cached as a result, or ranked.

NaN compares false with everything, so `(scores >= nan).sum() - 1` ranks a NaN target at -1
(NDCG = 1 / log2(1) = inf) and faiss orders NaN scores arbitrarily: every metric computed from
them is silently wrong. `require_finite` raises `NonFinite` (a `DataError`, so the entry points
print it and exit 2); inside a training step `stage_guard` adds the stage, where it happened and
the setting to change. Raised inside `Trainer.fit`, the error reaches the caller unwrapped
(Lightning re-raises it after its `on_exception` hooks), before any checkpoint of that step or
validation is written and before `result.json`.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from recsys_dpo.errors import DataError


class NonFinite(DataError):
    """A NaN or an infinity where every number must be finite."""


def require_finite(values: Tensor | np.ndarray, what: str) -> None:
    """NonFinite naming `what` and the kinds found (nan, inf, -inf) unless all values are finite."""
    values = torch.as_tensor(values).detach()
    bad = ~torch.isfinite(values)
    if not bad.any():
        return
    wrong = values[bad]
    kinds = [name for name, hit in (("nan", torch.isnan(wrong)), ("inf", wrong == float("inf")),
                                    ("-inf", wrong == float("-inf"))) if hit.any()]  # fmt: skip
    if values.numel() == 1:
        raise NonFinite(f"{what} is {kinds[0]}")
    raise NonFinite(
        f"{what} have {int(bad.sum())} of {values.numel()} values not finite ({', '.join(kinds)})"
    )


@contextmanager
def stage_guard(module: LightningModule, stage: str) -> Iterator[None]:
    """Re-raise a NonFinite of the block as "<stage> stage: <what> at epoch E step S; lower
    train.lr (<lr>)": a diverged run is told apart from bad data, and the user gets the knob."""
    try:
        yield
    except NonFinite as err:
        raise DataError(
            f"{stage} stage: {err} at epoch {module.current_epoch} step {module.global_step}, "
            f"so the run diverged: lower train.lr ({module.hparams.lr:g})"
        ) from err
