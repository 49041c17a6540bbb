"""Stage 1 of the pipeline: click log -> prepared dataset with preference pairs.

    python pipelines/prepare.py                      # the synthetic default
    python pipelines/prepare.py data=ml1m_sas        # MovieLens-1M (SASRec format)
    python pipelines/prepare.py data=table data.reader.path=clicks.parquet \
        '+data.reader.columns={user_id: uid, item_id: sku, timestamp: ts}'
"""

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console

from recsys_dpo.data.prepare import prepare_dataset
from recsys_dpo.settings import Prepare
from recsys_dpo.stage import exits_cleanly_on_bad_input, plain, preflight


@exits_cleanly_on_bad_input
def run(cfg: DictConfig) -> None:
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
    )
    Console(quiet=not cfg.progress).print(summary.table())


@hydra.main(config_path="pkg://recsys_dpo.conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
