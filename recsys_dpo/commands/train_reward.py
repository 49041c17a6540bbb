"""The RLHF route's reward-model stage: r_phi(u, i) fit to the preference pairs by
Bradley-Terry, started from the reference (recsys_dpo/training/reward_module.py).

    recsys-dpo train-reward reference.ckpt=<path>
    recsys-dpo train-reward reference.ckpt=<path> reference.hard_negatives=20
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from recsys_dpo.commands import CONF
from recsys_dpo.reference_source import apply, from_config
from recsys_dpo.settings import TrainReward
from recsys_dpo.stage import exits_cleanly_on_bad_input, preflight
from recsys_dpo.training.run import train_reward

CONFIG = "train_reward"


def run(cfg: DictConfig) -> Path:
    """Train the reward model on `reference.ckpt`'s dataset; the run directory."""
    preflight(cfg, TrainReward)
    return train_reward(apply(cfg, from_config(cfg)))


@hydra.main(config_path=CONF, config_name=CONFIG, version_base="1.3")
def main(cfg: DictConfig) -> None:
    exits_cleanly_on_bad_input(run)(cfg)
