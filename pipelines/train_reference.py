"""Stage 2 of the pipeline: train the reference ranker on a prepared dataset.

    python pipelines/train_reference.py                             # SASRec, full softmax
    python pipelines/train_reference.py model=two_tower objective=bpr
    python pipelines/train_reference.py mode=continue reference.ckpt=<path>   # the control
    python pipelines/train_reference.py ckpt_path=<run dir>/last.ckpt         # resume
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from recsys_dpo.settings import TrainReference
from recsys_dpo.stage import exits_cleanly_on_bad_input, preflight
from recsys_dpo.training.run import train_reference


@exits_cleanly_on_bad_input
def run(cfg: DictConfig) -> Path:
    preflight(cfg, TrainReference)
    return train_reference(cfg)


@hydra.main(config_path="pkg://recsys_dpo.conf", config_name="train_reference", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
