"""Typed study settings: `recsys_dpo/conf/study/<name>.yaml` (the `study` block) -> `StudySpec`,
checked.

A study (DESIGN.md, "Study protocol") is the dataset and model of the root config plus:

- `reference`: the stage-1 recipe (objective, lr, max_epochs, early-stopping patience, extra
  overrides) and `reference_seeds`, one independently trained reference per seed (the seed
  changes the initialisation and the data order);
- `fine_tune`: overrides shared by every fine-tuning run, `seeds` its seeds;
- `reward`: the reward-model recipe (objective, lr, max_epochs), read only when a row is one of
  the RLHF route's objectives (rlhf_exact, rlhf_pg, rloo): one reward model per reference,
  trained from it, and every RLHF run from that reference optimises against it;
- `rows`: name -> a preference objective, its fixed `overrides` and the `grid` selected over
  (nested like the config, lists at the leaves: `{objective: {beta: [0.1, 1]}}`);
- `selection`: the metric selected on; the split is always `valid` (anything else is refused);
- `controls`, `baselines`, `report`: which matched controls and baselines every table has, the
  metrics shown, the CI settings and `report.versus`, rows every other row is compared with
  directly (e.g. each RLHF row against `dpo`);
- `recipe_from`: a finished study's JSON whose selected points replace the grids of the rows of
  the same name (a recipe carried over untouched to another dataset);
- `jobs`: how many training runs at a time, each in a single-threaded worker process;
  `plan_only`: print the plan and what of it is cached, train nothing.

`objectives` holds the objective group configs the rows name (composed by hydra from
recsys_dpo/conf/objective/ in the study file's defaults list), so a row says `objective: dpo`.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from recsys_dpo.errors import DataError
from recsys_dpo.evaluation.evaluator import MCAR_K
from recsys_dpo.evaluation.truth import TRUTH_METRICS
from recsys_dpo.stage import flatten
from recsys_dpo.training.rlhf_module import RLHF_OBJECTIVES

# Hyperparameters are selected on valid and read out on test once: not a free setting.
SELECTION_SPLIT = "valid"
SFT = "sft"
METRIC = re.compile(r"^(?:hr|recall|ndcg|mrr)_at_(\d+)$")
# A dataset split by the `mcar` kind (Coat): each user's ranking of their own random items.
MCAR_METRICS = ("mcar/auc", f"mcar/ndcg_at_{MCAR_K}", f"mcar/recall_at_{MCAR_K}")
# The same split under the published Coat tables' protocol (evaluator module docstring); its
# AUC pools every (user, item) row, so it has no per-user value (GLOBAL_METRICS).
PAPER_METRICS = ("coat_paper/auc", f"coat_paper/ndcg_at_{MCAR_K}", f"coat_paper/recall_at_{MCAR_K}")
GLOBAL_METRICS = ("coat_paper/auc",)
# The synthetic log's exact figures of the top-K (`recsys_dpo.evaluation.truth`).
TRUTH_METRIC = re.compile(rf"^truth/(?:{'|'.join(TRUTH_METRICS)})_at_(\d+)$")


@dataclass(frozen=True)
class ReferenceRecipe:
    """Stage 1: how each reference is trained."""

    objective: str
    lr: float
    max_epochs: int
    early_stopping_patience: int | None
    overrides: dict[str, Any]

    def updates(self) -> dict[str, Any]:
        """Dotted config updates of a reference run (besides objective, mode and seed)."""
        return {
            "train.lr": self.lr,
            "trainer.max_epochs": self.max_epochs,
            "train.early_stopping_patience": self.early_stopping_patience,
            **self.overrides,
        }


@dataclass(frozen=True)
class RewardRecipe:
    """The RLHF rows' reward model: trained once per reference, from it (`train-reward`)."""

    objective: str
    lr: float
    max_epochs: int

    def updates(self) -> dict[str, Any]:
        return {"train.lr": self.lr, "trainer.max_epochs": self.max_epochs}


@dataclass(frozen=True)
class Row:
    """One preference objective with fixed overrides and the grid selected over."""

    name: str
    objective: str
    overrides: dict[str, Any]
    grid: dict[str, list[Any]]

    def points(self) -> list[dict[str, Any]]:
        """Every grid point as dotted updates, in the grid's order (the first wins ties)."""
        keys = list(self.grid)
        return [dict(zip(keys, values, strict=True)) for values in
                itertools.product(*(self.grid[k] for k in keys))]  # fmt: skip


@dataclass(frozen=True)
class StudySpec:
    name: str
    reference: ReferenceRecipe
    reference_seeds: tuple[int, ...]
    seeds: tuple[int, ...]
    fine_tune: dict[str, Any]
    rows: tuple[Row, ...]
    objectives: dict[str, dict[str, Any]]
    selection_metric: str
    sft_control: bool
    continue_control: bool
    popularity: bool
    metrics: tuple[str, ...]
    n_resamples: int
    ci: float
    out_dir: Path
    eval_cache: Path
    publish: Path | None
    jobs: int = 1
    plan_only: bool = False
    reward: RewardRecipe | None = None
    # Rows every other row is also compared with on test, paired per user (`report.versus`).
    versus: tuple[str, ...] = ()

    def is_rlhf(self, row: Row) -> bool:
        """Whether `row` optimises against a reward model (needs `reward.ckpt`)."""
        return self.objectives[row.objective]["name"] in RLHF_OBJECTIVES


def _objective(objectives: Mapping[str, Any], name: str, stage: str, where: str) -> None:
    if name not in objectives:
        raise DataError(
            f"{where}: objective {name!r} is not among study.objectives {sorted(objectives)} "
            f"(add `- /objective@study.objectives.{name}: {name}` to the study's defaults)"
        )
    if objectives[name].get("stage") != stage:
        raise DataError(f"{where}: objective {name!r} is a {objectives[name].get('stage')}-stage "
                        f"objective, expected a {stage}-stage one")  # fmt: skip


def _grid(row: str, grid: Mapping[str, Any]) -> dict[str, list[Any]]:
    flat = flatten(grid)
    for key, values in flat.items():
        if not isinstance(values, list) or not values:
            raise DataError(f"study.rows.{row}.grid.{key}={values!r}: a grid setting is a "
                            "non-empty list of the values to select from")  # fmt: skip
    return flat


def _selected_grids(path: Path, rows: list[str]) -> dict[str, dict[str, list[Any]]]:
    """The selected point of each row of a finished study, as one-point grids."""
    if not path.is_file():
        raise DataError(f"study.recipe_from={path}: no such file (run that study first, with "
                        "study.publish set, or point at its study.json)")  # fmt: skip
    done = {r["name"]: r for r in json.loads(path.read_text())["rows"] if r.get("kind") == "row"}
    missing = [r for r in rows if r not in done]
    if missing:
        raise DataError(f"study.recipe_from={path}: no selected recipe for row(s) {missing} "
                        f"(it has {sorted(done)})")  # fmt: skip
    return {r: {k: [v] for k, v in done[r]["selected"].items()} for r in rows}


def _selection_metric(name: str, ks: list[int]) -> str:
    """A metric a real log can give on valid: never truth/* (no real user has the truth, and
    the argmax selection would also pick the worst point of truth/utility_regret_at_K)."""
    where = "study.selection.metric"
    if TRUTH_METRIC.match(name):
        raise DataError(f"{where}={name!r}: a study selects on an observable valid metric; "
                        "truth/* is for study.report.metrics only")  # fmt: skip
    return _metric(name, ks, where)


def _metric(name: str, ks: list[int], where: str) -> str:
    if name in MCAR_METRICS or name in PAPER_METRICS:
        return name
    match = METRIC.match(name) or TRUTH_METRIC.match(name)
    # mrr is computed within the top max(eval.k) list, so its one cut-off is max(eval.k).
    if match is None or int(match.group(1)) not in (
        [max(ks)] if name.startswith("mrr") else ks
    ):
        raise DataError(f"{where}={name!r}: expected hr_at_K, recall_at_K or ndcg_at_K with K in "
                        f"eval.k {ks}, mrr_at_{max(ks)}, on an mcar split one of "
                        f"{', '.join(MCAR_METRICS + PAPER_METRICS)}, or on the synthetic log "
                        f"truth/<m>_at_K with m one of {', '.join(TRUTH_METRICS)}")  # fmt: skip
    return name


def study_spec(study: DictConfig, eval_k: list[int]) -> StudySpec:
    """The checked settings of a composed `study` block; DataError naming the bad setting."""
    s: dict[str, Any] = OmegaConf.to_container(study, resolve=True)  # type: ignore[assignment]
    split = s.get("selection", {}).get("split", SELECTION_SPLIT)
    if split != SELECTION_SPLIT:
        raise DataError(
            f"study.selection.split={split!r}: hyperparameters are selected on the valid split "
            "only; test is read once, for the selected recipe (DESIGN.md, 'Study protocol')"
        )
    objectives = s.get("objectives") or {}
    ref = s["reference"]
    _objective(objectives, ref["objective"], "reference", "study.reference.objective")
    seeds = {"study.reference_seeds": s["reference_seeds"], "study.seeds": s["seeds"]}
    for where, values in seeds.items():
        if not values or len(set(values)) != len(values):
            raise DataError(f"{where}={values}: expected a non-empty list of distinct seeds")
    raw_rows = s.get("rows") or {}
    if not raw_rows:
        raise DataError("study.rows is empty: a study needs at least one preference row")
    grids = ({name: _grid(name, r.get("grid") or {}) for name, r in raw_rows.items()}
             if s.get("recipe_from") is None
             else _selected_grids(Path(s["recipe_from"]), list(raw_rows)))  # fmt: skip
    rows = []
    for name, r in raw_rows.items():
        _objective(objectives, r["objective"], "preference", f"study.rows.{name}.objective")
        rows.append(Row(name, r["objective"], flatten(r.get("overrides") or {}), grids[name]))
    reward = None
    rlhf = [r.name for r in rows if objectives[r.objective]["name"] in RLHF_OBJECTIVES]
    if rlhf:
        recipe = s.get("reward") or {}
        missing = [k for k in ("objective", "lr", "max_epochs") if recipe.get(k) is None]
        if missing:
            raise DataError(f"study.rows {rlhf}: RLHF rows train against a reward model, and "
                            f"study.reward lacks {missing} (e.g. study.reward: {{objective: "
                            "bradley_terry, lr: 1.0e-3, max_epochs: 3}, with `- /objective@"
                            "study.objectives.bradley_terry: bradley_terry` in the defaults)")  # fmt: skip
        _objective(objectives, recipe["objective"], "reward", "study.reward.objective")
        reward = RewardRecipe(recipe["objective"], float(recipe["lr"]), int(recipe["max_epochs"]))
    controls = s.get("controls", {})
    if controls.get("sft", True):
        _objective(objectives, SFT, "preference", "study.controls.sft")
    jobs = s.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise DataError(f"study.jobs={jobs!r}: expected a whole number >= 1, the training runs "
                        "at a time (e.g. the number of cores)")  # fmt: skip
    report = s.get("report", {})
    ci = float(report.get("ci", 0.95))
    if not 0 < ci < 1:
        raise DataError(f"study.report.ci={ci}: expected a level in (0, 1), e.g. 0.95")
    versus = tuple(report.get("versus") or ())
    unknown = [v for v in versus if v not in raw_rows]
    if unknown:
        raise DataError(f"study.report.versus={list(versus)}: {unknown} not among study.rows "
                        f"{list(raw_rows)}")  # fmt: skip
    return StudySpec(
        name=s["name"],
        reference=ReferenceRecipe(ref["objective"], float(ref["lr"]), int(ref["max_epochs"]),
                                  ref.get("early_stopping_patience"),
                                  flatten(ref.get("overrides") or {})),
        reference_seeds=tuple(s["reference_seeds"]),
        seeds=tuple(s["seeds"]),
        fine_tune=flatten(s.get("fine_tune") or {}),
        rows=tuple(rows),
        objectives=objectives,
        selection_metric=_selection_metric(s.get("selection", {}).get("metric", "ndcg_at_10"),
                                           eval_k),
        sft_control=bool(controls.get("sft", True)),
        continue_control=bool(controls.get("continue", True)),
        popularity=bool(s.get("baselines", {}).get("popularity", True)),
        metrics=tuple(_metric(m, eval_k, "study.report.metrics")
                      for m in report.get("metrics", ["ndcg_at_10", "hr_at_10"])),
        n_resamples=int(report.get("n_resamples", 1000)),
        ci=ci,
        versus=versus,
        out_dir=Path(s["out_dir"]),
        eval_cache=Path(s["eval_cache"]),
        publish=None if s.get("publish") is None else Path(s["publish"]),
        jobs=jobs,
        plan_only=bool(s.get("plan_only", False)),
        reward=reward,
    )  # fmt: skip
