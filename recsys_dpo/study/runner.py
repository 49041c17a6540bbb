"""The study runner: plan -> cached runs -> selection on valid -> one test read-out -> table.

    run_study(spec, template)   `template` is the composed root config without its `study`
                                block: the dataset, model, trainer and eval settings every run
                                of the study starts from

1. The dataset is prepared (skipped when up to date) and every planned run's config checked
   against its stage's schema (`check_plan`), then one reference per reference seed.
2. Every row is fine-tuned from every reference at every grid point (and fine-tuning seed);
   each run is evaluated on valid. The selected point of a row is the one with the best mean
   valid metric across references and seeds (the first in grid order on a tie): one recipe per
   row, not one per reference.
3. Test is read only now, once per selected recipe and reference; with the references, the
   most-popular-unseen baseline and each row's matched controls, built at its selected point:
   `sft` (same chosen events, steps, lr, epochs, seed and start point, no preference term) and
   `continue-<N>steps` (stage-1 training continued from the same reference for the N optimizer
   steps the row took, at its lr). Every entry has valid and test figures.
4. study.json and table.md go to `spec.out_dir` (and study.json to `spec.publish` if set),
   with the valid reward-KL frontier (`frontier_points`, with reward models also the RLHF
   optimum itself at each beta, `optimum_point`) and each entry's training cost.

The training runs of each phase (the references; every row's every grid point from every
reference; every row's controls) are independent: `spec.jobs` of them train at a time, in
single-threaded worker processes (`recsys_dpo.study.workers`), each run directory in one job
only (`Study.train_all`). Evaluations stay in this process. `plan_study` prints the plan and
what of it is cached without training anything (`study.plan_only`).

Caching is by configuration, never by name: a training run is the run directory of its config
hash (`recsys_dpo.training.run.run_dir`, trained only when it has no result.json, through the
pipeline's own `Pipeline.train`); an evaluation is `<eval_cache>/<key>`, key = hash of (the
checkpoint's sha256, the prepared dataset's manifest, the eval settings, the split). A second
run of the same study trains and evaluates nothing; a changed setting re-runs what it changes.

Test evaluations can only be asked for recipes that `select` returned (and the references,
baseline and controls); `check_test_reads` audits that before anything is written.

Hyperparameters are searched on a grid, not with hydra's Optuna sweeper: that plugin holds
optuna below 3 (2.10.1, 2021), and a hydra sweeper runs one job per trial that hands back one
float, so it could neither select per row across references nor guarantee the single test
read-out after selection; on grids of a few points Optuna's GridSampler enumerates the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from recsys_dpo.artifacts import (
    atomic_dir,
    config_hash,
    content_hash,
    file_sha256,
    read_manifest,
    write_manifest,
)
from recsys_dpo.data.datamodule import PreparedDataset
from recsys_dpo.data.schema import USER_IDX
from recsys_dpo.errors import DataError
from recsys_dpo.evaluation.evaluator import (
    EvalResult,
    RetrievalConfig,
    evaluate,
    policy_kl,
    request_metric_name,
    train_popularity,
)
from recsys_dpo.models import Recommender
from recsys_dpo.models.rlhf_optimum import RLHFOptimum
from recsys_dpo.pipeline import Pipeline, stage_config
from recsys_dpo.settings import TrainPreference, TrainReference, TrainReward, validate
from recsys_dpo.stage import plain
from recsys_dpo.study.popularity import MostPopular
from recsys_dpo.study.report import frontier_point, write_report
from recsys_dpo.study.spec import SELECTION_SPLIT, SFT, Row, StudySpec
from recsys_dpo.study.stats import mean_sd
from recsys_dpo.study.workers import job_pool, run_jobs, train_job
from recsys_dpo.tracking.mlflow_utils import Tracker, check_reachable
from recsys_dpo.training.reference_module import load_model, read_checkpoint, trained_on
from recsys_dpo.training.rlhf_module import RLHF_OBJECTIVES
from recsys_dpo.training.run import run_dir

POPULARITY = "most_popular"
# The frontier row of the RLHF optimum pi_ref exp(r / beta) / Z itself (`optimum_point`).
OPTIMUM = "pi* (closed form)"
# Eval settings that name or place an output, or set the CI, not what a model scores.
EVAL_UNHASHED = ("ckpt", "split", "name", "out_dir", "n_resamples", "ci")
# A continued stage-1 run stops at max_steps; its epoch cap must never bind first.
UNBOUNDED_EPOCHS = 1_000_000


@dataclass(frozen=True)
class Run:
    """A finished training run: its directory and the checkpoint evaluated (best on valid)."""

    run_dir: str
    ckpt: str
    last_ckpt: str
    lr: float
    # result.json's epochs: the best one (by valid) and where training stopped.
    epochs: dict[str, Any] = field(default_factory=dict)
    # result.json's `cost` (training.run.fit_cost); None for a run trained before it existed.
    cost: dict[str, Any] | None = None


def run_of(job: Job, result: dict[str, Any]) -> Run:
    """The run of `job` from its result.json."""
    ckpt = result["best_ckpt"] or result["last_ckpt"]
    epochs = {k: result.get(k) for k in ("best_epoch", "stopped_epoch")}
    return Run(str(Path(ckpt).parent), ckpt, result["last_ckpt"], float(job.cfg.train.lr), epochs,
               result.get("cost"))


@dataclass(frozen=True)
class Evaluation:
    """One model on one split: per-user metrics (by user_idx) and the aggregates."""

    key: str
    split: str
    model: str
    per_user: pl.DataFrame
    aggregates: dict[str, float]


@dataclass(frozen=True, eq=False)
class Job:
    """One planned training run: its stage, config and run name (`<model>-<objective>...`)."""

    stage: str
    cfg: DictConfig
    name: str

    def out(self) -> str:
        """Its run directory: where `Pipeline.train` trains it, named by its config hash."""
        return str(run_dir(self.cfg, self.stage, self.name))


# Evaluations of one entry: [reference][fine-tuning seed].
Grid2 = list[list[Evaluation]]


@dataclass
class Ledger:
    """What this invocation did: runs trained vs reused, evaluations computed vs reused."""

    trained: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    eval_reused: list[str] = field(default_factory=list)


def select_point(valid_scores: list[list[float]]) -> int:
    """The index of the grid point with the best mean valid score across references and seeds
    (the first on ties). Only valid figures ever reach it."""
    means = [float(np.mean(s)) for s in valid_scores]
    return int(np.argmax(means))


def with_request_metrics(result: EvalResult, data: PreparedDataset) -> pl.DataFrame:
    """The per-user table, plus, on an `mcar` split (one request per user: their random
    items), each user's `mcar/` and `coat_paper/` metrics as columns, so the study compares
    them per user like the others (mcar/: NaN for a user without both a relevant and a
    non-relevant item). Every request's user has a row, also one without a relevant item and
    so without a ranking query (NaN in the full-catalog metrics): coat_paper/ counts them."""
    if result.per_request is None or result.request_metrics != "mcar":
        return result.per_user
    owners = (data.events(result.split).filter(pl.col("request_id").is_not_null())
              .select("request_id", USER_IDX).unique())  # fmt: skip
    if owners["request_id"].n_unique() != owners.height:
        raise RuntimeError(f"{result.split}: an mcar request spans several users")
    columns = {c: request_metric_name("mcar", c) for c in result.per_request.columns
               if c != "request_id"}  # fmt: skip
    table = result.per_request.rename(columns).join(owners, on="request_id").drop("request_id")
    return result.per_user.join(
        table.with_columns(pl.col(USER_IDX).cast(result.per_user[USER_IDX].dtype)),
        on=USER_IDX, how="full", coalesce=True,
    ).sort(USER_IDX)


# Part of every evaluation's cache key: the metric names' spelling (`ndcg_at_10`; evaluations
# cached when they were `ndcg@10` have other keys, so a re-run recomputes rather than misreads)
# and the metric sets (+truth: the synthetic log's truth/* columns; +coat_paper: the published
# Coat protocol; an evaluation cached before them lacks them).
EVAL_FORMAT = "metric_at_k+truth+coat_paper"


@dataclass(frozen=True)
class Scored:
    """A model the cache evaluates: its name in the ledger, its identity (a checkpoint's
    sha256, or a hash of what it is built from) and how to build it."""

    name: str
    identity: str
    load: Callable[[], Recommender]

    @classmethod
    def of(cls, run: Run, dataset: dict[str, Any]) -> Scored:
        # Loaded with the dataset's record: a checkpoint of another vocabulary is refused.
        return cls(run.ckpt, file_sha256(Path(run.ckpt)), partial(load_model, run.ckpt, dataset))


class EvalCache:
    """Evaluations keyed by (checkpoint sha256, dataset manifest, eval settings, split)."""

    def __init__(self, root: Path, data: PreparedDataset, eval_cfg: DictConfig, ledger: Ledger,
                 console: Console) -> None:  # fmt: skip
        manifest = read_manifest(data.path)
        self.root, self.data, self.ledger, self.console = root, data, ledger, console
        self.dataset = content_hash(manifest)
        self.settings = {k: v for k, v in plain(eval_cfg).items() if k not in EVAL_UNHASHED}
        self.k = list(eval_cfg.k)
        self.retrieval = RetrievalConfig(eval_cfg.index, eval_cfg.nlist, eval_cfg.nprobe,
                                         eval_cfg.use_gpu)  # fmt: skip
        self.head_fraction, self.batch_size = eval_cfg.head_fraction, eval_cfg.batch_size
        self.kl_chunk, self.seen = eval_cfg.kl_chunk, eval_cfg.seen

    def key(self, identity: str, split: str) -> str:
        """The cache key of the model `identity` (its checkpoint sha256) on `split`."""
        return config_hash({"model": identity, "dataset": self.dataset, "eval": self.settings,
                            "split": split, "format": EVAL_FORMAT})  # fmt: skip

    def has(self, identity: str, split: str) -> bool:
        return (self.root / self.key(identity, split) / "manifest.json").is_file()

    def get(self, scored: Scored, split: str) -> Evaluation:
        """The evaluation of the model `scored` on `split`."""
        model = scored.name
        key = self.key(scored.identity, split)
        out = self.root / key
        if not (out / "manifest.json").is_file():
            result = evaluate(scored.load(), self.data, split, self.k, retrieval=self.retrieval,
                              head_fraction=self.head_fraction, batch_size=self.batch_size,
                              kl_chunk=self.kl_chunk, seen=self.seen, what=model)  # fmt: skip
            with atomic_dir(out) as tmp:
                with_request_metrics(result, self.data).write_parquet(tmp / "per_user.parquet")
                (tmp / "metrics.json").write_text(json.dumps(result.aggregates, indent=2))
                write_manifest(tmp, {"config_hash": key, "model": model, "split": split,
                                     "dataset": self.dataset, "eval": self.settings})  # fmt: skip
            self.ledger.evaluated.append(f"{split}:{model}")
            self.console.print(f"[dim]evaluated {model} on {split} -> {out}[/]", highlight=False)
        else:
            self.ledger.eval_reused.append(f"{split}:{model}")
        return Evaluation(key, split, model, pl.read_parquet(out / "per_user.parquet"),
                          json.loads((out / "metrics.json").read_text()))  # fmt: skip

    def kl(self, policy: Scored, reference: Run, dataset: dict[str, Any], split: str,
           reward: str | None = None, beta: float | None = None) -> dict[str, float]:  # fmt: skip
        """The means over `split`'s users of the exact KL(policy || reference) and, with a
        `reward` checkpoint, of the reward gain E_pi[r] - E_ref[r] and (with `beta`) the
        KL(pi* || policy) to the RLHF optimum at beta (`evaluator.policy_kl`), cached by the
        models' identities (checkpoint sha256; and beta) like an evaluation."""
        ids = {"policy": policy.identity,
               "reference": file_sha256(Path(reference.ckpt)),
               **({} if reward is None else {"reward": file_sha256(Path(reward))}),
               **({} if beta is None else {"beta": beta})}  # fmt: skip
        out = self.root / self.key(config_hash(ids), f"{split}:kl")
        if not (out / "manifest.json").is_file():
            table = policy_kl(policy.load(), load_model(reference.ckpt, dataset),
                              self.data, split,
                              reward=None if reward is None else load_model(reward, dataset),
                              beta=beta,
                              seen=self.seen, batch_size=self.batch_size,
                              kl_chunk=self.kl_chunk)  # fmt: skip
            with atomic_dir(out) as tmp:
                table.write_parquet(tmp / "per_user.parquet")
                write_manifest(tmp, {"model": policy.name, "reference": reference.ckpt,
                                     "reward": reward, "split": split, **ids})  # fmt: skip
            self.ledger.evaluated.append(f"{split}:kl:{policy.name}")
        else:
            self.ledger.eval_reused.append(f"{split}:kl:{policy.name}")
        table = pl.read_parquet(out / "per_user.parquet")
        return {c: float(table[c].mean()) for c in table.columns if c != USER_IDX}


class Study:
    """One study's runs, evaluations and the guard on test reads."""

    def __init__(self, spec: StudySpec, template: DictConfig, pipe: Pipeline,
                 data: PreparedDataset, console: Console, pool: ProcessPoolExecutor | None = None,
                 parent_run: str | None = None) -> None:  # fmt: skip
        """`pool`: the workers that train (None: this process does); `parent_run`: the study's
        MLflow parent run, open in this process, that the workers' runs go under."""
        self.spec, self.template, self.pipe = spec, template, pipe
        self.pool, self.parent_run = pool, parent_run
        self.ledger = Ledger()
        # Runs of this invocation by run directory: each is trained (or found cached) once.
        self.runs: dict[str, Run] = {}
        self.cache = EvalCache(spec.eval_cache, data, template.eval, self.ledger, console)
        self.popularity = train_popularity(data)
        self.popularity_id = config_hash({POPULARITY: self.popularity.tolist()})
        self.dataset = trained_on(data)
        self.model_name = template.model.name
        # Models whose test figures may be read: extended only by the read-out step, which
        # closes the selection: no grid is searched after a test figure was read.
        self.test_allowed: set[str] = set()
        self.test_reads: list[str] = []
        self.selection_open = True
        # Reference checkpoint -> its reward model's checkpoint (the RLHF rows' reward.ckpt),
        # and its trained run (for its cost).
        self.rewards: dict[str, str] = {}
        self.reward_runs: dict[str, Run] = {}

    def job(self, stage: str, cfg: DictConfig, suffix: str = "") -> Job:
        return Job(stage, cfg, f"{self.model_name}-{cfg.objective.name}{suffix}")

    def train_all(self, jobs: list[Job],
                  then: Callable[[Run], list[Job]] | None = None) -> list[Run]:  # fmt: skip
        """Train (or reuse, same config hash: the pipeline's own skip rule) every job, and
        `then(run)`'s jobs as soon as the run of one of `jobs` is done (e.g. the grid from a reference while
        the other references train: no worker idles at a phase's end). Identical configs are
        trained once, so two workers never share a run directory (its stage lock would
        refuse the second). The runs of `jobs`, in order; every run is in `self.runs`."""
        planned: list[tuple[str, Job]] = []

        def calls(batch: list[Job]) -> list[tuple[Any, ...]]:
            new = []
            for job in batch:
                out = job.out()
                if out not in self.runs and all(out != o for o, _ in planned):
                    planned.append((out, job))
                    new.append(self._call(job))
            return new

        def after(i: int, outcome: tuple[dict[str, Any], bool]) -> list[tuple[Any, ...]]:
            out, job = planned[i]
            self.runs[out] = run_of(job, outcome[0])
            return calls(then(self.runs[out])) if then and i < n_first else []

        first = calls(jobs)
        n_first = len(first)  # `then`'s own jobs have no follow-ups
        fn = self._train_here if self.pool is None else train_job
        outcomes = run_jobs(self.pool, fn, first, after)
        for (out, _), (_, trained) in zip(planned, outcomes, strict=True):
            (self.ledger.trained if trained else self.ledger.reused).append(self.runs[out].run_dir)
        return [self.runs[job.out()] for job in jobs]

    def _call(self, job: Job) -> tuple[Any, ...]:
        """`job` as the arguments of the function that trains it: `_train_here` or, in a
        worker, `workers.train_job` (plain containers: they are pickled)."""
        if self.pool is None:
            return (job,)
        return (plain(self.template), self.parent_run, job.stage, plain(job.cfg), job.name)

    def _train_here(self, job: Job) -> tuple[dict[str, Any], bool]:
        before = len(self.pipe.ran)
        result = self.pipe.train(job.stage, job.cfg, job.name)
        return result, len(self.pipe.ran) > before

    def _objective(self, name: str) -> dict[str, Any]:
        return dict(self.spec.objectives[name])

    def reference_config(self, seed: int) -> DictConfig:
        recipe = self.spec.reference
        return stage_config(self.template, objective=self._objective(recipe.objective),
                            mode="fresh", seed=seed, **recipe.updates())  # fmt: skip

    def preference_config(self, row: Row, point: dict[str, Any], ref_ckpt: str,
                          seed: int) -> DictConfig:  # fmt: skip
        updates = {"reference.ckpt": ref_ckpt, **self.spec.fine_tune, **row.overrides, **point}
        if self.spec.is_rlhf(row):
            updates["reward.ckpt"] = self.rewards[ref_ckpt]
        return stage_config(self.template, objective=self._objective(row.objective), seed=seed,
                            **updates)  # fmt: skip

    def sft_config(self, row: Row, point: dict[str, Any], ref_ckpt: str, seed: int) -> DictConfig:
        """`sft` matched to the row at `point`: the same settings without the preference
        objective's. Its hard negatives are dropped too: the SFT loss never reads rejected
        items, and without them rows that share chosen events, lr and epochs share one run."""
        updates = {k: v for k, v in {**row.overrides, **point}.items()
                   if not k.startswith(("objective.", "reference.hard_negatives"))}  # fmt: skip
        return self.preference_config(Row(f"sft @ {row.name}", SFT, updates, {}), {}, ref_ckpt,
                                      seed)  # fmt: skip

    def continue_config(self, ref_ckpt: str, lr: float, steps: int, seed: int) -> DictConfig:
        """Stage-1 training continued from `ref_ckpt` for `steps` optimizer steps at `lr`."""
        recipe = self.spec.reference
        updates = {**recipe.updates(), "reference.ckpt": ref_ckpt, "train.lr": lr,
                   "trainer.max_steps": steps, "trainer.max_epochs": UNBOUNDED_EPOCHS,
                   "train.early_stopping_patience": None}  # fmt: skip
        return stage_config(self.template, objective=self._objective(recipe.objective),
                            mode="continue", seed=seed, **updates)  # fmt: skip

    def reward_config(self, ref_ckpt: str) -> DictConfig:
        """The reward model of the reference `ref_ckpt`, trained from it at the first
        fine-tuning seed (one per reference, shared by every RLHF row and grid point) on the
        pairs the rows fine-tune on: `study.fine_tune` (e.g. train.max_pairs_per_user), its lr
        and epochs replaced by `study.reward`'s."""
        recipe = self.spec.reward
        assert recipe is not None, "reward_config: the study has no RLHF row"
        return stage_config(self.template, objective=self._objective(recipe.objective),
                            seed=self.spec.seeds[0],
                            **{"reference.ckpt": ref_ckpt, **self.spec.fine_tune,
                               **recipe.updates()})  # fmt: skip

    def reward_jobs(self, ckpts: list[str]) -> list[Job]:
        """The reward models the RLHF rows need, one per reference checkpoint (none without
        an RLHF row)."""
        if not any(self.spec.is_rlhf(r) for r in self.spec.rows):
            return []
        return [self.job("reward", self.reward_config(c)) for c in ckpts]

    def train_rewards(self, refs: list[Run]) -> None:
        """Train (or reuse) each reference's reward model; fills `self.rewards`."""
        ckpts = [r.ckpt for r in refs]
        runs = self.train_all(self.reward_jobs(ckpts))
        self.reward_runs |= dict(zip(ckpts, runs, strict=False))
        self.rewards |= {c: r.ckpt for c, r in self.reward_runs.items()}

    def reference_jobs(self) -> list[Job]:
        return [self.job("reference", self.reference_config(s)) for s in self.spec.reference_seeds]

    def references(self) -> list[Run]:
        return self.train_all(self.reference_jobs())

    def grid_jobs(self, row: Row, ckpts: list[str]) -> list[Job]:
        """Every point of `row` from every reference checkpoint and seed (point-major)."""
        return [self.job("preference", self.preference_config(row, p, ckpt, s))
                for p in row.points() for ckpt in ckpts for s in self.spec.seeds]  # fmt: skip

    def read(self, run: Run | None, split: str) -> Evaluation:
        """A model's figures on a split (run None: the popularity baseline). Figures of any
        split but valid only for what the read-out step allowed."""
        model = POPULARITY if run is None else run.ckpt
        if split != SELECTION_SPLIT:
            if model not in self.test_allowed:
                raise RuntimeError(f"refusing a {split} read of {model}: it is not a selected "
                                   "recipe, a reference, a baseline or a matched control")  # fmt: skip
            self.test_reads.append(model)
        scored = (Scored(model, self.popularity_id, partial(MostPopular, self.popularity))
                  if run is None else Scored.of(run, self.dataset))  # fmt: skip
        return self.cache.get(scored, split)

    def read_out(self, name: str, kind: str, models: list[list[Run | None]],
                 **info: Any) -> Entry:  # fmt: skip
        """An entry read on valid and test; `models` [reference][seed] (None: the popularity
        baseline) are allowed a test read from now on."""
        self.selection_open = False
        self.test_allowed |= {POPULARITY if r is None else r.ckpt for s in models for r in s}
        epochs = [[{} if r is None else r.epochs for r in s] for s in models]
        costs = [[None if r is None else r.cost for r in s] for s in models]
        return Entry(name, kind, [[self.read(r, "valid") for r in s] for s in models],
                     [[self.read(r, "test") for r in s] for s in models], epochs=epochs,
                     costs=costs, **info)  # fmt: skip


@dataclass
class Entry:
    """One line of the study table: valid and test evaluations [reference][seed]."""

    name: str
    kind: str  # baseline | reference | row | control
    valid: Grid2
    test: Grid2
    of: str | None = None
    selected: dict[str, Any] | None = None
    grid: list[dict[str, Any]] | None = None
    runs: list[list[str]] | None = None
    epochs: list[list[dict[str, Any]]] | None = None
    costs: list[list[dict[str, Any] | None]] | None = None
    steps: list[int] | None = None
    compare_with: dict[str, Entry] = field(default_factory=dict)


@dataclass(frozen=True)
class Selected:
    """A row's grid searched on valid: every point's valid mean and sd, the chosen point and
    its runs [reference][seed]."""

    row: Row
    grid: list[dict[str, Any]]
    point: dict[str, Any]
    runs: list[list[Run]]
    unselected: list[str]
    # Every grid point's runs [point][reference][seed] (the frontier reads them on valid).
    point_runs: list[list[list[Run]]] = field(default_factory=list)


def search_rows(study: Study, refs: list[Run]) -> list[Selected]:
    """Fine-tune every row at every grid point from every reference (one batch of jobs),
    evaluate each run on valid and select each row's point."""
    rows, seeds = study.spec.rows, study.spec.seeds
    if not study.selection_open:
        raise RuntimeError(f"rows {[r.name for r in rows]}: a grid searched after the test "
                           "read-out began")  # fmt: skip
    ckpts = [ref.ckpt for ref in refs]
    runs = iter(study.train_all([job for row in rows for job in study.grid_jobs(row, ckpts)]))
    return [select_row(study, row, [[[next(runs) for _ in seeds] for _ in refs]
                                    for _ in row.points()]) for row in rows]  # fmt: skip


def select_row(study: Study, row: Row, runs: list[list[list[Run]]]) -> Selected:
    """A row's point selected on valid from its runs [point][reference][seed]."""
    metric, points = study.spec.selection_metric, row.points()
    scores = [[study.read(r, SELECTION_SPLIT).aggregates[metric] for per_ref in point
               for r in per_ref] for point in runs]  # fmt: skip
    best = select_point(scores)
    grid = [{"point": p, "valid": dict(zip(("mean", "sd"), mean_sd(s), strict=True)),
             "selected": i == best, "runs": [[r.run_dir for r in per_ref] for per_ref in point]}
            for i, (p, s, point) in enumerate(zip(points, scores, runs, strict=True))]  # fmt: skip
    unselected = [r.ckpt for i, point in enumerate(runs) if i != best
                  for per_ref in point for r in per_ref]  # fmt: skip
    return Selected(row, grid, points[best], runs[best], unselected, runs)


# Stands for a reference checkpoint while the plan is checked, before any is trained.
PLANNED_CKPT = "<the reference's best checkpoint>"
PLANNED_REWARD = "<its reward model's best checkpoint>"


def check_plan(study: Study) -> int:
    """Every run's config checked against its stage's schema (`recsys_dpo.settings`) before
    anything is trained, so a bad grid value fails in seconds, not after the references; the
    message names the row and point. The number of configs checked."""
    spec, seed = study.spec, study.spec.seeds[0]
    plan = [("study.reference", study.reference_config(s), TrainReference)
            for s in spec.reference_seeds]  # fmt: skip
    plan += [("study.reward", job.cfg, TrainReward) for job in study.reward_jobs([PLANNED_CKPT])]
    if spec.reward is not None:
        study.rewards.setdefault(PLANNED_CKPT, PLANNED_REWARD)
    for row in spec.rows:
        for p in row.points():
            where = f"study.rows.{row.name} at {p or 'its fixed settings'}"
            cfg = study.preference_config(row, p, PLANNED_CKPT, seed)
            plan += [(where, cfg, TrainPreference),
                     (f"{where} (its sft control)", study.sft_config(row, p, PLANNED_CKPT, seed),
                      TrainPreference),
                     (f"{where} (its continue control)",
                      study.continue_config(PLANNED_CKPT, float(cfg.train.lr), 1, seed),
                      TrainReference)]  # fmt: skip
    for where, cfg, schema in plan:
        try:
            validate(plain(cfg), schema)
        except DataError as err:
            raise DataError(f"{where}: {err}") from err
    return len(plan)


def plan_study(spec: StudySpec, template: DictConfig) -> str:
    """What `run_study` would train and evaluate, and how much of it is cached, as text;
    nothing is trained or tracked (the dataset is prepared if it is not: the evaluations'
    cache keys name it). Controls depend on the selection, so they are counted as bounds."""
    quiet = Console(quiet=True)
    untracked = OmegaConf.create({**plain(template.tracking), "enabled": False})
    pipe = Pipeline(template, Tracker(untracked), quiet)
    study = Study(spec, template, pipe, pipe.prepare(), quiet)
    check_plan(study)
    force = bool(template.force)

    def cached(job: Job) -> dict[str, Any] | None:
        path = Path(job.out()) / "result.json"
        return json.loads(path.read_text()) if path.is_file() and not force else None

    def evaluated(result: dict[str, Any] | None, split: str) -> bool:
        ckpt = result and (result["best_ckpt"] or result["last_ckpt"])
        return bool(ckpt) and study.cache.has(file_sha256(Path(ckpt)), split)

    refs = {job.out(): cached(job) for job in study.reference_jobs()}
    # A reference not trained yet stands in by name: its runs cannot be cached either.
    ckpts = [r["best_ckpt"] or r["last_ckpt"] if r else f"<reference {i}, not trained yet>"
             for i, r in enumerate(refs.values())]  # fmt: skip
    rewards = {job.out(): cached(job) for job in study.reward_jobs(ckpts)}
    # A reward model not trained yet stands in by name, like a reference.
    study.rewards |= {c: r["best_ckpt"] or r["last_ckpt"] if r else f"<reward of {c}>"
                      for c, r in zip(ckpts, rewards.values(), strict=False)}  # fmt: skip
    grid = {job.out(): cached(job) for row in spec.rows for job in study.grid_jobs(row, ckpts)}
    n_each = len(ckpts) * len(spec.seeds)
    with_sft = [r for r in spec.rows
                if spec.sft_control and spec.objectives[r.objective]["name"] != SFT]  # fmt: skip
    sft_new = {job.out() for r in with_sft for p in r.points() for c in ckpts for s in spec.seeds
               for job in [study.job("preference", study.sft_config(r, p, c, s))]} - set(grid)  # fmt: skip
    n_sft = len(with_sft) * n_each
    n_cont = len(spec.rows) * n_each if spec.continue_control else 0
    n_pop = int(spec.popularity)
    runs = {**refs, **grid}
    pop_cached = {split: spec.popularity and study.cache.has(study.popularity_id, split)
                  for split in (SELECTION_SPLIT, "test")}  # fmt: skip
    valid_cached = pop_cached[SELECTION_SPLIT] + sum(evaluated(r, SELECTION_SPLIT)
                                                     for r in runs.values())  # fmt: skip
    test_cached = pop_cached["test"] + sum(evaluated(r, "test") for r in refs.values())
    points = ", ".join(f"{r.name} {len(r.points())}" for r in spec.rows)
    lines = [
        f"plan of study {spec.name} (study.jobs={spec.jobs} training runs at a time):",
        f"  reference runs:   {len(refs)} ({sum(r is not None for r in refs.values())} cached)",
        f"  reward models:    {len(rewards)} ({sum(r is not None for r in rewards.values())}"
        " cached): one per reference, for the RLHF rows",
        f"  fine-tuning runs: {len(grid)} ({sum(r is not None for r in grid.values())} cached):"
        f" grid points {points}; each x {len(ckpts)} references x {len(spec.seeds)} seeds,"
        " identical configs once",
        f"  controls, at the selected points: sft {n_sft} ("
        f"{f'up to {len(sft_new)} new' if sft_new else 'all among the fine-tuning runs'}),"
        f" continue up to {n_cont} new (rows taking the same steps and lr from a reference"
        " share one)",
        f"  evaluations: valid {n_pop + len(runs)} ({valid_cached} cached) + one per new control;"
        f" test {n_pop + len(refs) + len(spec.rows) * n_each} (the baseline, the references and"
        f" the selected points; {test_cached} of the baseline and references cached) + one per"
        " control",
    ]
    return "\n".join(lines)


def check_test_reads(study: Study, unselected: list[str], lines: list[Entry]) -> None:
    """Every test read is of a model the read-out allowed, and none is of a grid point that
    was not selected, unless that very run is also a matched control (e.g. the `sft` row's
    other point is the `sft` control of another row). Raises before anything is written."""
    controls = {e.model for line in lines if line.kind == "control" for s in line.test for e in s}
    leaked = sorted((set(study.test_reads) & set(unselected)) - controls)
    if leaked or not set(study.test_reads) <= study.test_allowed:
        raise RuntimeError(f"test figures were read for non-selected runs: {leaked}")


def template_of(cfg: DictConfig) -> DictConfig:
    """The composed root config without its `study` block, resolved once: what every run of
    the study starts from. Resolving pins the data settings that interpolate `seed` (reader,
    pair sampling) to the root seed, so a reference seed varies training, not the dataset."""
    return OmegaConf.create({k: v for k, v in plain(cfg).items() if k != "study"})


@dataclass(frozen=True)
class Controls:
    """A selected row's matched control runs, reference-major then seed, and the optimizer
    steps each `continue` run is given (the row's run's own)."""

    sft: list[Job]
    cont: list[Job]
    steps: list[int]


def control_jobs(study: Study, sel: Selected, refs: list[Run]) -> Controls:
    """`sft` at the row's selected point (unless the row is an `sft` row) and stage-1 training
    continued from the same reference for the steps the row's run took (its last
    checkpoint's global_step), at its lr."""
    spec = study.spec
    pairs = [(ref, seed, run) for ref, per_ref in zip(refs, sel.runs, strict=True)
             for seed, run in zip(spec.seeds, per_ref, strict=True)]  # fmt: skip
    sft = ([study.job("preference", study.sft_config(sel.row, sel.point, ref.ckpt, seed))
            for ref, seed, _ in pairs]
           if spec.sft_control and spec.objectives[sel.row.objective]["name"] != SFT
           else [])  # fmt: skip
    steps = ([int(read_checkpoint(run.last_ckpt)["global_step"]) for *_, run in pairs]
             if spec.continue_control else [])  # fmt: skip
    cont = [study.job("reference", study.continue_config(ref.ckpt, run.lr, n, seed), "-continue")
            for (ref, seed, run), n in zip(pairs, steps, strict=False)]  # fmt: skip
    return Controls(sft, cont, steps)


def run_study(spec: StudySpec, template: DictConfig, console: Console | None = None) -> Path:
    """Run the study (module docstring); the directory holding study.json and table.md."""
    console = console or Console(quiet=not template.progress)
    if template.tracking.enabled:
        check_reachable(template.tracking.uri)
    tracker = Tracker(template.tracking)
    pipe = Pipeline(template, tracker, console)
    with tracker.parent(f"study-{spec.name}", {"study": spec.name}) as parent_run, \
            job_pool(spec.jobs) as pool:  # fmt: skip
        data = pipe.prepare()
        study = Study(spec, template, pipe, data, console, pool, parent_run)
        check_plan(study)
        # Each reference's grid starts as soon as it is trained; search_rows then finds it.
        # Each reference's reward model and non-RLHF grid start as soon as it is trained; the
        # RLHF rows' grids need the reward model, so they start in search_rows.
        refs = study.train_all(study.reference_jobs(), then=lambda ref: [
            *study.reward_jobs([ref.ckpt]),
            *(job for row in spec.rows if not spec.is_rlhf(row)
              for job in study.grid_jobs(row, [ref.ckpt]))])  # fmt: skip
        study.train_rewards(refs)
        searched = search_rows(study, refs)
        frontier = frontier_points(study, searched, refs)
        # Every control is trained before any test figure is read: one batch of jobs.
        controls = [control_jobs(study, sel, refs) for sel in searched]
        made = iter(study.train_all([j for c in controls for j in (*c.sft, *c.cont)]))
        # The read-out: the only place test figures are read, for the selected recipes.
        lines = []
        if spec.popularity:
            lines.append(study.read_out("most-popular-unseen", "baseline", [[None]] * len(refs)))
        reference = study.read_out("reference", "reference", [[r] for r in refs],
                                   runs=[[r.run_dir] for r in refs])  # fmt: skip
        lines.append(reference)
        n_seeds = len(spec.seeds)
        for sel, ctl in zip(searched, controls, strict=True):
            row = study.read_out(sel.row.name, "row", sel.runs, selected=sel.point, grid=sel.grid,
                                 runs=[[r.run_dir for r in s] for s in sel.runs])  # fmt: skip
            row.compare_with["reference"] = reference
            lines.append(row)
            if ctl.sft:
                lines.append(_control(study, f"sft @ {row.name}", row, "sft",
                                      [next(made) for _ in ctl.sft], n_seeds, reference))  # fmt: skip
            if ctl.cont:
                steps = sorted(set(ctl.steps))
                name = f"continue-{'/'.join(map(str, steps))}steps @ {row.name}"
                lines.append(_control(study, name, row, "continue",
                                      [next(made) for _ in ctl.cont], n_seeds, reference,
                                      steps=steps))  # fmt: skip
        compare_rows(lines, spec.versus)
        check_test_reads(study, [c for sel in searched for c in sel.unselected], lines)
        out = write_report(spec, lines, study.ledger, sorted(set(study.test_reads)), frontier,
                           [study.reward_runs[r.ckpt].cost for r in refs]
                           if study.reward_runs else None)  # fmt: skip
        tracker.log_artifacts(parent_run, out, "study")
    return out


def compare_rows(lines: list[Entry], versus: tuple[str, ...]) -> None:
    """Every row is also compared with each row of `versus` (itself excepted), as `row <name>`:
    the same paired per-user test deltas as against its controls."""
    rows = {e.name: e for e in lines if e.kind == "row"}
    for entry in rows.values():
        for name in versus:
            if name != entry.name:
                entry.compare_with[f"row {name}"] = rows[name]


def frontier_points(study: Study, searched: list[Selected],
                    refs: list[Run]) -> list[dict[str, Any]]:  # fmt: skip
    """The reward-KL frontier on valid: the reference (KL 0), then every row's every grid point,
    each with its mean exact KL(pi || pi_ref) over valid users, its valid metrics (the
    selection metric and the report's) and, in a study with reward models, the reward gain
    E_pi[r] - E_ref[r] under its reference's reward model (every row's, DPO's too: the
    over-optimisation read-out) and, for a row with a beta, KL(pi* || pi) to that reward's
    RLHF optimum at the row's beta (does DPO reach what RLHF targets?), mean +- sd across
    references. Valid only: test is read once,
    for the selected recipes."""
    spec = study.spec
    metrics = list(dict.fromkeys((spec.selection_metric, *spec.metrics)))
    zeros = [[{"kl": 0.0, **({} if spec.reward is None else {"reward_gain": 0.0})}] for _ in refs]
    points = [frontier_point("reference", {}, zeros,
                             [[study.read(r, SELECTION_SPLIT)] for r in refs], metrics,
                             False)]  # fmt: skip
    betas: set[float] = set()
    for sel in searched:
        for point, runs, grid in zip(sel.row.points(), sel.point_runs, sel.grid, strict=True):
            objective = (study.preference_config(sel.row, point, refs[0].ckpt, spec.seeds[0])
                         .objective if spec.reward else {})  # fmt: skip
            beta = objective.get("beta")
            # pi*_beta is what the RLHF rows target; other objectives' beta may not be a KL weight
            if objective.get("name") in RLHF_OBJECTIVES:
                betas.add(float(beta))
            kls = [[study.cache.kl(Scored.of(r, study.dataset), ref, study.dataset,
                                   SELECTION_SPLIT,
                                   study.rewards[ref.ckpt] if spec.reward else None,
                                   None if beta is None else float(beta))
                      for r in per_ref]
                   for ref, per_ref in zip(refs, runs, strict=True)]  # fmt: skip
            evals = [[study.read(r, SELECTION_SPLIT) for r in per_ref] for per_ref in runs]
            points.append(frontier_point(sel.row.name, point, kls, evals, metrics,
                                         grid["selected"]))  # fmt: skip
    return points + [optimum_point(study, refs, beta, metrics) for beta in sorted(betas)]


def optimum_point(study: Study, refs: list[Run], beta: float,
                  metrics: list[str]) -> dict[str, Any]:  # fmt: skip
    """The frontier point of the RLHF optimum itself at `beta` (each beta of an RLHF row's
    grid): each reference's
    pi_ref exp(r / beta) / Z under its own reward model, served as the one inner-product model
    s_ref + r / beta (`models.rlhf_optimum.RLHFOptimum`), nothing trained: where the RLHF route
    would land with a perfect optimiser, so the rows' distance from it is the optimiser's and
    its distance from the reference the reward model's. KL(pi* || pi) is 0 by definition.
    Valid only, as every frontier point."""
    kls, evals = [], []
    for ref in refs:
        reward = study.rewards[ref.ckpt]
        identity = config_hash({"optimum_of": file_sha256(Path(ref.ckpt)),
                                "reward": file_sha256(Path(reward)), "beta": beta})  # fmt: skip
        scored = Scored(f"{OPTIMUM} beta={beta} of {ref.ckpt}", identity,
                        partial(rlhf_optimum, ref.ckpt, reward, beta, study.dataset))  # fmt: skip
        kls.append([{**study.cache.kl(scored, ref, study.dataset, SELECTION_SPLIT, reward),
                     "kl_to_optimum": 0.0}])  # fmt: skip
        evals.append([study.cache.get(scored, SELECTION_SPLIT)])
    return frontier_point(OPTIMUM, {"objective.beta": beta}, kls, evals, metrics, False)


def rlhf_optimum(ref_ckpt: str, reward_ckpt: str, beta: float,
                 dataset: dict[str, Any]) -> Recommender:  # fmt: skip
    return RLHFOptimum(load_model(ref_ckpt, dataset), load_model(reward_ckpt, dataset), beta)


def _control(study: Study, name: str, row: Entry, what: str, made: list[Run], n_seeds: int,
             reference: Entry, **info: Any) -> Entry:  # fmt: skip
    """The matched control `what` of `row` from its runs (reference-major, then seed); the row
    is compared with it, and it with the reference."""
    runs = [made[i : i + n_seeds] for i in range(0, len(made), n_seeds)]
    line = study.read_out(name, "control", runs, of=row.name,
                          runs=[[r.run_dir for r in s] for s in runs], **info)  # fmt: skip
    line.compare_with["reference"] = reference
    row.compare_with[what] = line
    return line
