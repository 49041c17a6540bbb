"""Stage 5 of the pipeline alone: the A/B candidate bundle of an evaluated policy checkpoint.

    recsys-dpo export "export.ckpt='<policy.ckpt>'" export.evaluation=<eval dir> \
        export.out=<bundle dir>

The evaluation directory is the one `recsys-dpo evaluate` wrote for this checkpoint against its
reference (metrics.json with CIs, topk.parquet); the dataset is `paths.prepared`. Export refuses
(exit 2) an evaluation without its manifest (killed or still running), with files that no longer
match their sha256, or of another checkpoint or dataset than the ones given. The bundle holds
the torch.export'ed user tower, the item embeddings and faiss index, vocab and user histories
as JSON, a standalone serve.py with its pinned requirements, the safetensors weights, the top-K
lists and a model card (see recsys_dpo/export/bundle.py). `recsys-dpo run` runs this stage and
also registers the bundle in MLflow (a self-contained pyfunc).
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.console import Console

from recsys_dpo.commands import CONF
from recsys_dpo.data.datamodule import load_prepared
from recsys_dpo.errors import DataError
from recsys_dpo.pipeline import export_bundle
from recsys_dpo.settings import ExportStage
from recsys_dpo.stage import exits_cleanly_on_bad_input, preflight

CONFIG = "run"


def run(cfg: DictConfig) -> Path:
    """The candidate bundle of `export.ckpt` and its evaluation; the bundle directory."""
    preflight(cfg, ExportStage)
    if cfg.export.ckpt is None or cfg.export.evaluation is None:
        raise DataError("pass export.ckpt=<policy checkpoint> and export.evaluation=<the "
                        "recsys-dpo evaluate output directory of that checkpoint>")  # fmt: skip
    # export_bundle refuses an unfinished or altered evaluation, or one of another checkpoint or
    # dataset (recsys_dpo.pipeline.check_evaluation).
    out = export_bundle(cfg, load_prepared(cfg.paths.prepared), str(cfg.export.ckpt),
                        Path(cfg.export.evaluation), Path(cfg.export.out),
                        f"export.ckpt={cfg.export.ckpt}")  # fmt: skip
    Console().print(f"bundle written to [bold]{out}[/]", highlight=False)
    return out


@hydra.main(config_path=CONF, config_name=CONFIG, version_base="1.3")
def main(cfg: DictConfig) -> None:
    exits_cleanly_on_bad_input(run)(cfg)

