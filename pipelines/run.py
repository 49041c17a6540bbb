"""All stages, one command: prepare -> reference -> preference -> evaluate -> export.

    python pipelines/run.py                                    # experiment=quickstart
    python pipelines/run.py experiment=ml100k_two_tower_dpo
    python pipelines/run.py -m objective=dpo,sdpo objective.beta=0.05,0.1   # summary.md
    python pipelines/run.py force=true                         # re-run every stage
    python pipelines/run.py tracking.uri=http://127.0.0.1:5000 # a tracking server

Each stage is skipped when its output exists for the same config hash. When the log records
propensities (the synthetic log does) and the split is temporal, the last lines show each
model's off-policy click-through rate estimate beside the simulator's exact value. MLflow holds one parent
run per pipeline with a child per stage; the candidate is registered as <experiment>-<model>.
Bad input, or an unreachable tracking server, prints one message and exits with status 2.
"""

import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from rich.console import Console

from recsys_dpo.evaluation.report import ope_summary
from recsys_dpo.pipeline import job_dir, run_pipeline, save_result, summary, write_summary
from recsys_dpo.stage import exits_cleanly_on_bad_input


@exits_cleanly_on_bad_input
def run(cfg: DictConfig) -> None:
    result = run_pipeline(cfg, list(HydraConfig.get().overrides.task))
    out = job_dir()
    save_result(result, out)
    if HydraConfig.get().mode.name == "RUN":  # a sweep writes one summary at its end
        write_summary(out, [result])
    Console().print(summary([result], f"{result.name}: candidate vs reference"))
    online = ope_summary(json.loads((Path(result.evaluation) / "metrics.json").read_text()))
    if online is not None:
        Console().print(online, highlight=False)
    Console().print(f"bundle: [bold]{result.bundle}[/]", highlight=False)


@hydra.main(config_path="pkg://recsys_dpo.conf", config_name="run", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
