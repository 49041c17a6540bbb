"""All stages, one command: prepare -> reference -> preference -> evaluate -> export.

    recsys-dpo run                                    # experiment=quickstart
    recsys-dpo run experiment=ml100k_two_tower_dpo
    recsys-dpo run -m objective=dpo,sdpo objective.beta=0.05,0.1   # summary.md
    recsys-dpo run force=true                         # re-run every stage
    recsys-dpo run tracking.uri=http://127.0.0.1:5000 # a tracking server
    recsys-dpo run hparams_search=optuna               # tune on valid (Optuna)
    recsys-dpo run experiment=retrain_synthetic        # the retraining loop, 5 windows

With `pipeline.retrain.windows` set the command replays the retraining loop over rolling windows
instead (recsys_dpo/retrain.py): one pipeline run per window, production a registry alias
moved only when the candidate's CI lies above 0; its table is printed and written as
retrain.md / retrain.json into the job directory.

Each stage is skipped when its output exists for the same config hash. When the log records
propensities (the synthetic log does) and the split is temporal, the last lines show each
model's off-policy click-through rate estimate beside the simulator's exact value. MLflow holds
one parent run per pipeline with a child per stage; the candidate is registered as
<experiment>-<model>. Bad input, or an unreachable tracking server, prints one message and exits
with status 2.
"""

from collections.abc import Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from rich.console import Console

from recsys_dpo.commands import CONF
from recsys_dpo.errors import DataError
from recsys_dpo.evaluation.report import ope_summary
from recsys_dpo.pipeline import (
    PipelineResult,
    job_dir,
    run_pipeline,
    save_result,
    summary,
    write_summary,
)
from recsys_dpo.retrain import WindowRow, replay, table_markdown, write_table
from recsys_dpo.settings import Run
from recsys_dpo.stage import exits_cleanly_on_bad_input, preflight

CONFIG = "run"


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> PipelineResult:
    """The pipeline on `cfg` (its MLflow parent run records `overrides`), then its summary."""
    if cfg.pipeline.retrain.windows is not None:
        raise DataError(f"pipeline.retrain.windows={cfg.pipeline.retrain.windows}: a retraining "
                        "replay, not one pipeline run (recsys-dpo run runs it; from Python "
                        "recsys_dpo.api.retrain)")  # fmt: skip
    result = run_pipeline(cfg, overrides)
    Console().print(summary([result], f"{result.name}: candidate vs reference"))
    online = ope_summary(result.metrics)
    if online is not None:
        Console().print(online, highlight=False)
    Console().print(f"bundle: [bold]{result.bundle}[/]", highlight=False)
    if result.valid_value is not None:
        Console().print(f"objective (valid {result.optimized_metric}): {result.valid_value:.4f}",
                        highlight=False)  # fmt: skip
    return result


def retrain(cfg: DictConfig, overrides: Sequence[str] = ()) -> list[WindowRow]:
    """The retraining replay on `cfg` (pipeline.retrain.windows set), then its table."""
    settings = preflight(cfg, Run).pipeline.retrain
    rows = replay(cfg, settings, overrides)
    Console().print(table_markdown(rows, cfg.pipeline.primary_metric), highlight=False)
    return rows


@hydra.main(config_path=CONF, config_name=CONFIG, version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """The pipeline; returns its policy's valid pipeline.optimized_metric (None when unset),
    which a sweeper such as hparams_search=optuna optimises. With pipeline.retrain set, the
    retraining replay (returns None)."""
    hydra_cfg = HydraConfig.get()
    if cfg.pipeline.retrain.windows is not None:
        rows = exits_cleanly_on_bad_input(retrain)(cfg, list(hydra_cfg.overrides.task))
        write_table(job_dir(), rows, cfg.pipeline.primary_metric)
        return None
    result = exits_cleanly_on_bad_input(run)(cfg, list(hydra_cfg.overrides.task))
    out = job_dir()
    save_result(result, out)
    if hydra_cfg.mode.name == "RUN":  # a sweep writes one summary at its end
        write_summary(out, [result])
    return result.valid_value
