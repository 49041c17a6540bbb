"""Stage 3 of the pipeline: fine-tune a reference under a DPO-family objective.

    recsys-dpo train-preference reference.ckpt=<path>  # DPO, beta 0.1
    recsys-dpo train-preference reference.ckpt=<path> objective=sdpo objective.beta=0.1
    recsys-dpo train-preference reference.ckpt=<path> reference.precompute=true
    recsys-dpo train-preference reference.source=models:/<name>@production   # or a bundle dir

`reference.source` (the registry, a bundle or a checkpoint; recsys_dpo/reference_source.py)
is resolved to `reference.ckpt` first, and its lineage tags the stage's MLflow run.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from recsys_dpo.commands import CONF
from recsys_dpo.reference_source import apply, from_config
from recsys_dpo.settings import TrainPreference
from recsys_dpo.stage import exits_cleanly_on_bad_input, preflight
from recsys_dpo.training.run import train_preference

CONFIG = "config"


def run(cfg: DictConfig) -> Path:
    """Fine-tune `reference.ckpt`; the run directory (checkpoints, result.json)."""
    preflight(cfg, TrainPreference)
    return train_preference(apply(cfg, from_config(cfg)))


@hydra.main(config_path=CONF, config_name=CONFIG, version_base="1.3")
def main(cfg: DictConfig) -> None:
    exits_cleanly_on_bad_input(run)(cfg)

