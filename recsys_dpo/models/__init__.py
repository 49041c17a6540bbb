"""Recommender models (DESIGN.md, "Models"): the `Recommender` interface and its models.

`build_model(name, **config)` rebuilds any model from its registry name and constructor kwargs,
so a checkpoint that stores `model.name` and `model.config` can be loaded without knowing the
class.
"""

from typing import Any

from recsys_dpo.models.base import Batch, Recommender
from recsys_dpo.models.mf import MF
from recsys_dpo.models.sasrec import SASRec
from recsys_dpo.models.two_tower import TwoTower

MODELS: dict[str, type[Recommender]] = {cls.name: cls for cls in (TwoTower, SASRec, MF)}


def build_model(name: str, **config: Any) -> Recommender:
    """Instantiate the model registered as `name` (a key of `MODELS`) with `config`."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name](**config)


__all__ = ["MF", "MODELS", "Batch", "Recommender", "SASRec", "TwoTower", "build_model"]
