"""Stage 1 of the pipeline: click log -> prepared dataset with preference pairs.

    recsys-dpo prepare                    # the synthetic default
    recsys-dpo prepare data=ml1m_sas      # MovieLens-1M (SASRec format)
    recsys-dpo prepare data=table data.name=clicks data.reader.path=clicks.parquet \
        '+data.reader.columns={user_id: uid, item_id: sku, timestamp: ts}'

The dataset goes to `paths.prepared` (default `${paths.artifacts}/prepared/${data.name}`).
`+data.base_vocab=<a prepared dataset>` extends that dataset's vocabulary (a growing catalog:
its items and users keep their indices, the new ones are appended).
"""

from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console

from recsys_dpo.commands import CONF
from recsys_dpo.data.prepare import prepare_dataset
from recsys_dpo.settings import Prepare
from recsys_dpo.stage import data_features, exits_cleanly_on_bad_input, plain, preflight

CONFIG = "config"


def run(cfg: DictConfig) -> Path:
    """Prepare the log of `cfg.data`; the prepared dataset's directory."""
    preflight(cfg, Prepare)
    # _partial_ so the reader's own DataError reaches us unwrapped by hydra.
    reader = instantiate(cfg.data.reader, _partial_=True)
    summary = prepare_dataset(
        reader(),
        source=str(cfg.data.reader.path),
        out_dir=cfg.paths.prepared,
        validation=plain(cfg.data.validation),
        split=plain(cfg.data.split),
        pairs=plain(cfg.data.pairs),
        pair_splits=list(cfg.data.pair_splits),
        n_buckets=cfg.data.n_buckets,
        config=plain(cfg),
        progress=cfg.progress,
        features=data_features(cfg),
        base_vocab=cfg.data.get("base_vocab"),
    )
    Console(quiet=not cfg.progress).print(summary.table())
    return Path(cfg.paths.prepared)


@hydra.main(config_path=CONF, config_name=CONFIG, version_base="1.3")
def main(cfg: DictConfig) -> None:
    exits_cleanly_on_bad_input(run)(cfg)

