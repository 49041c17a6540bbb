"""Stage 2 of the pipeline: train the reference ranker on a prepared dataset.

    recsys-dpo train-reference                                      # SASRec, full softmax
    recsys-dpo train-reference model=two_tower objective=bpr
    recsys-dpo train-reference mode=continue reference.ckpt=<path>  # the control
    recsys-dpo train-reference ckpt_path=<run dir>/last.ckpt        # resume
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from recsys_dpo.commands import CONF
from recsys_dpo.reference_source import apply, from_config
from recsys_dpo.settings import TrainReference
from recsys_dpo.stage import exits_cleanly_on_bad_input, preflight
from recsys_dpo.training.run import train_reference

CONFIG = "train_reference"


def run(cfg: DictConfig) -> Path:
    """Train the reference; its run directory (checkpoints, result.json)."""
    preflight(cfg, TrainReference)
    return train_reference(apply(cfg, from_config(cfg)))


@hydra.main(config_path=CONF, config_name=CONFIG, version_base="1.3")
def main(cfg: DictConfig) -> None:
    exits_cleanly_on_bad_input(run)(cfg)

