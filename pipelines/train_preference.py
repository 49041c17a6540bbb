"""Stage 3 of the pipeline: fine-tune a reference under a DPO-family objective.

    python pipelines/train_preference.py reference.ckpt=<path>          # DPO, beta 0.1
    python pipelines/train_preference.py reference.ckpt=<path> objective=sdpo objective.beta=0.1
    python pipelines/train_preference.py reference.ckpt=<path> reference.precompute=true
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from recsys_dpo.settings import TrainPreference
from recsys_dpo.stage import exits_cleanly_on_bad_input, preflight
from recsys_dpo.training.run import train_preference


@exits_cleanly_on_bad_input
def run(cfg: DictConfig) -> Path:
    preflight(cfg, TrainPreference)
    return train_preference(cfg)


@hydra.main(config_path="pkg://recsys_dpo.conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
