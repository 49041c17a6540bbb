"""A study, one command: references, grid runs selected on valid, one test read-out, matched
controls, the popularity baseline, CIs across references (recsys_dpo/study/runner.py).

    recsys-dpo study study=ml1m_sasrec
    recsys-dpo study study=synthetic_tiny paths.artifacts=/tmp/s
    recsys-dpo study study=ml1m_sasrec study.publish=benchmarks/results/study_ml1m_sasrec.json
    recsys-dpo study study=ml1m_sasrec study.jobs=2 study.plan_only=true

Runs and evaluations are cached by config hash: a second run trains nothing. Bad settings
(e.g. study.selection.split=test) print one message and exit with status 2.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.console import Console

from recsys_dpo.commands import CONF
from recsys_dpo.stage import exits_cleanly_on_bad_input
from recsys_dpo.study.spec import study_spec

CONFIG = "run_study"


def run(cfg: DictConfig) -> Path | None:
    """Run (or, with study.plan_only, only plan) the study; its output directory (None for a
    plan)."""
    spec = study_spec(cfg.study, list(cfg.eval.k))
    # Imported once the study's settings passed: torch, lightning and mlflow take seconds to
    # import, and a bad setting should fail at once.
    from recsys_dpo.study.runner import plan_study, run_study, template_of

    console = Console(soft_wrap=True)  # table lines stay whole
    if spec.plan_only:
        console.print(plan_study(spec, template_of(cfg)), highlight=False, markup=False)
        return None
    out = run_study(spec, template_of(cfg))
    console.print((out / "table.md").read_text(), highlight=False, markup=False)
    console.print(f"study written to [bold]{out}[/]", highlight=False)
    return out


@hydra.main(config_path=CONF, config_name=CONFIG, version_base="1.3")
def main(cfg: DictConfig) -> None:
    exits_cleanly_on_bad_input(run)(cfg)

