"""Stage 4 of the pipeline: evaluate a checkpoint, or compare a policy with its reference.

    recsys-dpo evaluate eval.ckpt=<policy.ckpt> reference.ckpt=<ref.ckpt>
    recsys-dpo evaluate eval.ckpt=<model.ckpt> eval.split=valid 'eval.k=[5,10]'
    recsys-dpo evaluate +model.ckpt=<policy.ckpt> reference.ckpt=<ref.ckpt>

The model to evaluate is `eval.ckpt` (`model` is the hydra group of the architecture, so
`model.ckpt=` is not a key; `+model.ckpt=` is accepted as an alias). Either stage's checkpoint
works: the architecture is read from the checkpoint itself. With `reference.ckpt` set the model
is the policy and is compared with that reference (paired bootstrap CIs, exact KL);
`reference.source=models:/<name>@<alias>` (or a bundle, or a checkpoint) names it instead
(recsys_dpo/reference_source.py). The dataset is `paths.prepared`; the output goes to
`eval.out_dir/<eval.name>` (default `${paths.artifacts}/eval/<run dir of the
checkpoint>-<checkpoint>-<split>`). Bad input (k larger than the catalog, a checkpoint of
another dataset, users the model does not know, an empty split) prints one message and exits
with status 2. When the log records propensities and the
split is temporal, the candidate's online click-through rate is also estimated off-policy
(`eval.ope`, recsys_dpo/evaluation/counterfactual.py).
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.console import Console

from recsys_dpo.artifacts import stage_lock
from recsys_dpo.commands import CONF
from recsys_dpo.data.datamodule import PreparedDataset, load_prepared
from recsys_dpo.data.vocab import Vocab
from recsys_dpo.errors import DataError
from recsys_dpo.evaluation.counterfactual import OpeConfig, add_ope
from recsys_dpo.evaluation.evaluator import RetrievalConfig, compare, evaluate, train_popularity
from recsys_dpo.evaluation.report import summary_table, write_outputs
from recsys_dpo.models import Recommender
from recsys_dpo.reference_source import apply, from_config
from recsys_dpo.settings import Evaluate
from recsys_dpo.stage import exits_cleanly_on_bad_input, plain, preflight
from recsys_dpo.training.reference_module import load_model, trained_on

CONFIG = "config"


def checkpoint(cfg: DictConfig) -> str:
    """The checkpoint to evaluate: eval.ckpt, else the +model.ckpt alias."""
    path = cfg.eval.ckpt or cfg.model.get("ckpt")
    if path is None:
        raise DataError("eval.ckpt is not set: pass eval.ckpt=<a checkpoint of either stage>")
    return str(path)


def load(path: str, what: str, data: PreparedDataset) -> Recommender:
    """The recommender of a checkpoint trained on `data`'s vocabulary; a missing or foreign
    file, or one of another vocabulary, is bad input."""
    try:
        return load_model(path, trained_on(data), f"{what}={path}")
    except DataError:
        raise
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
        raise DataError(f"{what}={path}: cannot load a recsys_dpo model from it ({err})") from err


def output_dir(cfg: DictConfig, ckpt: str) -> Path:
    name = cfg.eval.name or f"{Path(ckpt).parent.name}-{Path(ckpt).stem}-{cfg.eval.split}"
    return Path(cfg.eval.out_dir) / name


def run(cfg: DictConfig) -> Path:
    """Evaluate `eval.ckpt` (against `reference.ckpt` if set); the output directory."""
    preflight(cfg, Evaluate)
    cfg = apply(cfg, from_config(cfg))
    ckpt = checkpoint(cfg)
    # Before any work: the output directory is writable and this run its only writer.
    with stage_lock(output_dir(cfg, ckpt)):
        return _evaluate(cfg, ckpt)


def _evaluate(cfg: DictConfig, ckpt: str) -> Path:
    data = load_prepared(cfg.paths.prepared)
    model = load(ckpt, "eval.ckpt", data)
    settings = dict(
        data=data,
        split=cfg.eval.split,
        k=list(cfg.eval.k),
        retrieval=RetrievalConfig(cfg.eval.index, cfg.eval.nlist, cfg.eval.nprobe,
                                  cfg.eval.use_gpu),  # fmt: skip
        head_fraction=cfg.eval.head_fraction,
        batch_size=cfg.eval.batch_size,
        kl_chunk=cfg.eval.kl_chunk,
        progress=cfg.progress,
        seen=cfg.eval.seen,
    )
    if cfg.reference.ckpt is None:
        outcome = evaluate(model, what=f"eval.ckpt={ckpt}", **settings)
        models = {"model": model}
    else:
        reference = load(str(cfg.reference.ckpt), "reference.ckpt", data)
        outcome = compare(model, reference, n_resamples=cfg.eval.n_resamples, seed=cfg.seed,
                          ci=cfg.eval.ci, names=(f"eval.ckpt={ckpt}",
                          f"reference.ckpt={cfg.reference.ckpt}"), **settings)  # fmt: skip
        models = {"policy": model, "reference": reference}
    add_ope(outcome, models, data, cfg.eval.ope.enabled, OpeConfig.from_eval(cfg.eval, cfg.seed),
            cfg.eval.seen, cfg.eval.batch_size)
    out = write_outputs(
        output_dir(cfg, ckpt),
        outcome,
        Vocab.load(data.path),
        train_popularity(data),
        {**plain(cfg.eval), "ckpt": ckpt, "reference_ckpt": cfg.reference.ckpt,
         "prepared": str(data.path), "seed": cfg.seed},  # fmt: skip
    )
    console = Console(quiet=not cfg.progress)
    console.print(summary_table(outcome))
    console.print(f"evaluation written to [bold]{out}[/]", highlight=False)
    return out


@hydra.main(config_path=CONF, config_name=CONFIG, version_base="1.3")
def main(cfg: DictConfig) -> None:
    exits_cleanly_on_bad_input(run)(cfg)

