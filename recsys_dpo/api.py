"""The stages from Python, for notebooks and orchestrators: each function composes the config
`recsys-dpo <command> <overrides>` would (hydra's compose API over the packaged configs) and
runs that stage in this process.

    from recsys_dpo import api

    result = api.run(["experiment=quickstart", "paths.artifacts=/tmp/a"])
    result.candidate, result.bundle, result.metrics["deltas"]["ndcg_at_10"]
    prepared = api.prepare(["data=table", "data.name=mylog", "data.reader.path=clicks.parquet"])

Third-party noise is off as on the command line (RECSYS_DPO_VERBOSE=1 brings it back).
Bad input raises recsys_dpo.errors.DataError (where the command line prints it and exits 2).
`config_dir` is the command line's `--config-dir`: a directory of configs of your own
(`data/mylog.yaml`, ...) beside the packaged ones. Give them names of their own: a file named
as a packaged one is shadowed by it here (hydra's searchpath comes after the packaged configs),
while `--config-dir` puts yours first.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from recsys_dpo.commands import CONF
from recsys_dpo.errors import DataError
from recsys_dpo.pipeline import PipelineResult
from recsys_dpo.quiet import quiet_output

if TYPE_CHECKING:  # retrain imports mlflow and torch: on use only, as the stages do
    from recsys_dpo.retrain import WindowRow

Overrides = Sequence[str]
ConfigDir = str | PathLike[str] | None


def _command(stage: str) -> ModuleType:
    # Imported on use: the training stages pull in torch, lightning and mlflow.
    return importlib.import_module(f"recsys_dpo.commands.{stage}")


def config(stage: str, overrides: Overrides = (), config_dir: ConfigDir = None) -> DictConfig:
    """The config `recsys-dpo <stage> <overrides>` composes (`stage` as the module name of
    recsys_dpo.commands: run, prepare, train_reference, train_preference, train_reward,
    evaluate, export, study). Third-party noise goes off first, as on the command line (`recsys_dpo.quiet`)."""
    quiet_output()
    name = _command(stage).CONFIG
    overrides = list(overrides)
    if config_dir is not None:
        directory = Path(config_dir).resolve()
        if not directory.is_dir():
            raise DataError(f"config_dir={config_dir}: no such directory")
        overrides.append(f"hydra.searchpath=['file://{directory}']")
    with initialize_config_module(CONF.removeprefix("pkg://"), version_base="1.3",
                                  job_name=stage):  # fmt: skip
        return compose(name, overrides=overrides)


def run(overrides: Overrides = (), config_dir: ConfigDir = None) -> PipelineResult:
    """`recsys-dpo run`: every stage; what they produced (paths, metrics, the decision, MLflow
    run ids)."""
    return _command("run").run(config("run", overrides, config_dir), list(overrides))


def retrain(overrides: Overrides = (), config_dir: ConfigDir = None) -> list[WindowRow]:
    """`recsys-dpo run` with pipeline.retrain.windows set (e.g. experiment=retrain_synthetic):
    the retraining replay, one row per window (recsys_dpo/retrain.py)."""
    return _command("run").retrain(config("run", overrides, config_dir), list(overrides))


def prepare(overrides: Overrides = (), config_dir: ConfigDir = None) -> Path:
    """`recsys-dpo prepare`: the prepared dataset's directory."""
    return _command("prepare").run(config("prepare", overrides, config_dir))


def train_reference(overrides: Overrides = (), config_dir: ConfigDir = None) -> Path:
    """`recsys-dpo train-reference`: the run directory (checkpoints, result.json)."""
    return _command("train_reference").run(config("train_reference", overrides, config_dir))


def train_preference(overrides: Overrides = (), config_dir: ConfigDir = None) -> Path:
    """`recsys-dpo train-preference`: the run directory (checkpoints, result.json)."""
    return _command("train_preference").run(config("train_preference", overrides, config_dir))


def train_reward(overrides: Overrides = (), config_dir: ConfigDir = None) -> Path:
    """`recsys-dpo train-reward`: the reward model's run directory (checkpoints, result.json)."""
    return _command("train_reward").run(config("train_reward", overrides, config_dir))


def evaluate(overrides: Overrides = (), config_dir: ConfigDir = None) -> Path:
    """`recsys-dpo evaluate`: the evaluation directory (metrics.json, topk.parquet, ...)."""
    return _command("evaluate").run(config("evaluate", overrides, config_dir))


def export(overrides: Overrides = (), config_dir: ConfigDir = None) -> Path:
    """`recsys-dpo export`: the bundle directory."""
    return _command("export").run(config("export", overrides, config_dir))


def study(overrides: Overrides = (), config_dir: ConfigDir = None) -> Path | None:
    """`recsys-dpo study`: the study's directory (None with study.plan_only=true)."""
    return _command("study").run(config("study", overrides, config_dir))
