"""One command end to end: prepare -> reference -> preference -> evaluate -> export.

With `reference.source` set (the production model, `models:/<name>@production`, a bundle or a
checkpoint; recsys_dpo/reference_source.py) no reference is trained: the candidate is
fine-tuned from, and evaluated against, that checkpoint, and the source's lineage is recorded
as `lineage.reference_*` tags on the parent run, the preference child and the registered
version, in the bundle manifest (`reference_source`) and in the model card.

For an objective of the RLHF route (rlhf_exact, rlhf_pg, rloo) a reward-model stage runs
between reference and preference (`reward_model`: Bradley-Terry from the reference on the same
pairs, recipe `pipeline.reward`), unless `reward.ckpt` names one.

`run_pipeline(cfg)` takes the config composed by `recsys_dpo/conf/run.yaml` (the root config plus a
`pipeline` block and `force`) and runs each stage's library function on the previous stage's
files. A stage is skipped when its output already exists for the same config hash (the prepared
manifest, a training run directory's result.json, the evaluation and bundle manifests; the
evaluation's also for the same checkpoint sha256) unless `force=true`. Export takes only a
finished, intact evaluation of the very checkpoint and dataset it bundles (`check_evaluation`).
Each stage's output has one writer at a time (`recsys_dpo.artifacts.stage_lock`): a second
identical run stops with exit 2 and the owner's pid and host. MLflow gets one parent run per
pipeline and one child per stage (`recsys_dpo.tracking.mlflow_utils`); the training stages log
into their child through `tracking.run_id`. The config is checked (`recsys_dpo.settings.Run`)
and the tracking server probed before any work. With `pipeline.optimized_metric` set (a tuning
sweep, hparams_search=optuna) the policy is also evaluated on the valid split, before the test
split, and that metric's value is the result's `valid_value`, which pipelines/run.py returns to
the sweeper.

The result (`PipelineResult`) is printed as a table, written as `pipeline_result.json` into the
hydra job directory, and gathered by `SummaryCallback` into `summary.md` / `summary.json` at the
end of a multirun sweep.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from recsys_dpo.artifacts import (
    config_hash,
    content_hash,
    file_sha256,
    read_manifest,
    stage_lock,
    verify_files,
)
from recsys_dpo.data.datamodule import PreparedDataset, load_prepared
from recsys_dpo.data.prepare import dataset_hash, prepare_dataset
from recsys_dpo.data.vocab import Vocab
from recsys_dpo.errors import DataError
from recsys_dpo.evaluation.counterfactual import OpeConfig, add_ope
from recsys_dpo.evaluation.evaluator import (
    Comparison,
    RetrievalConfig,
    build_queries,
    compare,
    train_popularity,
)
from recsys_dpo.evaluation.report import summary_table, write_outputs
from recsys_dpo.export.bundle import log_pyfunc, model_card, write_bundle
from recsys_dpo.quiet import quiet_output
from recsys_dpo.reference_source import Lineage, from_config
from recsys_dpo.settings import Run
from recsys_dpo.stage import data_features, plain, preflight
from recsys_dpo.tracking.mlflow_utils import Tracker
from recsys_dpo.training.reference_module import load_model, trained_on
from recsys_dpo.training.rlhf_module import RLHF_OBJECTIVES
from recsys_dpo.training.run import run_dir, train_preference, train_reference, train_reward

# Keys of recsys_dpo/conf/run.yaml that steer the runner only; the stages never see them.
RUNNER_KEYS = ("pipeline", "force", "export")
RESULT_FILE = "pipeline_result.json"


@dataclass
class PipelineResult:
    """What one pipeline run produced: the candidate against its reference on the primary
    metric (mean paired delta and CI; `candidate`: its CI lies above 0), where everything went
    (the prepared dataset, both checkpoints, the evaluation directory, the bundle), the MLflow
    parent run and its child run per stage (None and {} without tracking), and which stages
    ran. `metrics` is the evaluation's metrics.json."""

    name: str
    model: str
    objective: str
    beta: float | None
    primary: str
    reference: float
    policy: float
    delta: float
    lo: float
    hi: float
    kl: float
    candidate: bool
    prepared: str
    reference_ckpt: str
    policy_ckpt: str
    evaluation: str
    bundle: str
    parent_run_id: str | None
    stage_run_ids: dict[str, str]
    registered: str | None
    ran: list[str]
    # With pipeline.optimized_metric set: that metric of the policy on the valid split, the
    # value a hyperparameter sweep optimises (hparams_search=optuna).
    optimized_metric: str | None = None
    valid_value: float | None = None

    @cached_property
    def metrics(self) -> dict[str, Any]:
        return json.loads((Path(self.evaluation) / "metrics.json").read_text())


def stage_config(cfg: DictConfig, **updates: Any) -> DictConfig:
    """A copy of cfg without the runner's keys, with dotted-key updates applied."""
    out = OmegaConf.create({k: v for k, v in cfg.items() if k not in RUNNER_KEYS})
    with open_dict(out):
        for key, value in updates.items():
            OmegaConf.update(out, key, value, merge=False)
    return out


def prepare_config(cfg: DictConfig) -> dict[str, Any]:
    """What decides the prepared dataset (its manifest's config hash): data and seed only, so a
    sweep over objectives reuses one dataset."""
    return {"data": plain(cfg.data), "seed": cfg.seed}


# The training stages `Pipeline.train` runs, by name (the reward model: the RLHF route's).
STAGES = {"reference": train_reference, "preference": train_preference, "reward": train_reward}


class Pipeline:
    """The stages in order, each with its skip rule, tracked under one parent run."""

    def __init__(self, cfg: DictConfig, tracker: Tracker, console: Console) -> None:
        self.cfg = cfg
        self.tracker = tracker
        self.console = console
        self.ran: list[str] = []
        self.run_ids: dict[str, str] = {}

    @contextmanager
    def child(self, stage: str) -> Iterator[str | None]:
        """The stage's MLflow child run (tracker.child), its id kept for the result."""
        with self.tracker.child(stage) as run:
            if run is not None:
                self.run_ids[stage] = run
            yield run

    def _fresh(self, done: bool, stage: str, where: Path) -> bool:
        """True when the stage must run; logs the skip otherwise."""
        if done and not self.cfg.force:
            self.console.print(f"[dim]{stage}: up to date, skipped ({where})[/]", highlight=False)
            return False
        self.ran.append(stage)
        return True

    def prepare(self) -> PreparedDataset:
        cfg, out = self.cfg, Path(self.cfg.paths.prepared)
        wanted = dataset_hash(prepare_config(cfg))
        done = (out / "manifest.json").is_file() and read_manifest(out)["config_hash"] == wanted
        with self.child("prepare") as run:
            if self._fresh(done, "prepare", out):
                reader = instantiate(cfg.data.reader, _partial_=True)
                summary = prepare_dataset(
                    reader(), source=str(cfg.data.reader.path), out_dir=out,
                    validation=plain(cfg.data.validation), split=plain(cfg.data.split),
                    pairs=plain(cfg.data.pairs), pair_splits=list(cfg.data.pair_splits),
                    n_buckets=cfg.data.n_buckets, config=prepare_config(cfg),
                    progress=cfg.progress, features=data_features(cfg),
                    base_vocab=cfg.data.get("base_vocab"),
                )  # fmt: skip
                self.console.print(summary.table())
            self.tracker.set_tags(run, {"skipped": "prepare" not in self.ran})
            data = load_prepared(out)
            self.tracker.log_dataset(run, out, data.manifest)
        return data

    def train(self, stage: str, stage_cfg: DictConfig, name: str,
              tags: Mapping[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
        """Run (or skip) one training stage; its result.json. `tags` go on its child run."""
        out = run_dir(stage_cfg, stage, name)
        done = (out / "result.json").is_file()
        with self.child(stage) as run:
            if self._fresh(done, stage, out):
                with open_dict(stage_cfg):
                    stage_cfg.tracking.run_id = run
                out = STAGES[stage](stage_cfg)
            result = json.loads((out / "result.json").read_text())
            self.tracker.set_tags(run, {"skipped": stage not in self.ran, "run_dir": out,
                                        "trained_in_run": result.get("mlflow_run_id"),
                                        **(tags or {})})  # fmt: skip
        return result

    def evaluate(
        self, data: PreparedDataset, policy: str, reference: str, split: str | None = None
    ) -> Path:
        """Policy vs reference on `split` (default eval.split, the test split; the evaluator's
        library), with its metrics, report and plots on the child run (`evaluate`, or
        `evaluate-<split>` for another split)."""
        cfg = self.cfg
        split = split or cfg.eval.split
        stage = "evaluate" if split == cfg.eval.split else f"evaluate-{split}"
        config = {**plain(cfg.eval), "split": split, "ckpt": policy,
                  "reference_ckpt": reference, "prepared": str(data.path), "seed": cfg.seed}  # fmt: skip
        out = Path(cfg.eval.out_dir) / f"{Path(policy).parent.name}-{split}"
        done = (out / "manifest.json").is_file() and (
            read_manifest(out).get("config_hash") == config_hash(config)
            and read_manifest(out).get("ckpt_sha256") == file_sha256(Path(policy))
        )
        with self.child(stage) as run:
            if self._fresh(done, stage, out):
                with stage_lock(out):  # before computing: a second identical run stops here
                    self._evaluate(data, policy, reference, out, config, split)
            self.tracker.set_tags(run, {"skipped": stage not in self.ran})
            self.tracker.log_metrics(
                run, eval_metrics(json.loads((out / "metrics.json").read_text()))
            )
            self.tracker.log_artifacts(run, out, "evaluation")
        return out

    def _evaluate(self, data: PreparedDataset, policy: str, reference: str, out: Path,
                  config: dict, split: str) -> None:  # fmt: skip
        cfg = self.cfg
        models = {"policy": load_model(policy, trained_on(data)),
                  "reference": load_model(reference, trained_on(data))}
        outcome = compare_models(cfg, data, models, (policy, reference), split)
        add_ope(outcome, models, data, cfg.eval.ope.enabled,
                OpeConfig.from_eval(cfg.eval, cfg.seed), cfg.eval.seen, cfg.eval.batch_size)
        write_outputs(out, outcome, Vocab.load(data.path), train_popularity(data), config)
        self.console.print(summary_table(outcome))

    def export(
        self, data: PreparedDataset, policy: str, evaluation: Path, better: bool,
        lineage: Lineage | None = None,
    ) -> tuple[Path, str | None]:  # fmt: skip
        """The candidate bundle, logged as a pyfunc model and registered; (bundle, version).
        The version is tagged with `lineage` (the reference.source it was fine-tuned from)."""
        cfg = self.cfg
        _, manifest = bundle_manifest(cfg, data, policy, evaluation, lineage)
        out = Path(cfg.pipeline.bundle_dir) / Path(policy).parent.name
        done = (out / "manifest.json").is_file() and (
            read_manifest(out).get("config_hash") == manifest["config_hash"]
        )
        name = f"{cfg.pipeline.name}-{cfg.model.name}"
        with self.child("export") as run:
            if self._fresh(done, "export", out):
                export_bundle(cfg, data, policy, evaluation, out, lineage=lineage)
            self.tracker.set_tags(run, {"skipped": "export" not in self.ran, "bundle": out})
            version = None
            if run is not None:
                version = log_pyfunc(out, name, self.run_ids.get("evaluate"))
                self.tracker.mark_candidate(name, version, better)
                if lineage is not None:
                    self.tracker.tag_version(name, version, lineage.tags())
        return out, version


def compare_models(cfg: DictConfig, data: PreparedDataset, models: Mapping[str, Any],
                   names: tuple[str, str], split: str) -> Comparison:  # fmt: skip
    """models["policy"] vs models["reference"] on `split` under the eval settings of `cfg`
    (the evaluator's `compare`); `names` name them in its output."""
    return compare(
        models["policy"], models["reference"], data, names=names, split=split,
        k=list(cfg.eval.k), n_resamples=cfg.eval.n_resamples, seed=cfg.seed,
        ci=cfg.eval.ci, retrieval=RetrievalConfig(cfg.eval.index, cfg.eval.nlist,
        cfg.eval.nprobe, cfg.eval.use_gpu), head_fraction=cfg.eval.head_fraction,
        batch_size=cfg.eval.batch_size, kl_chunk=cfg.eval.kl_chunk,
        progress=cfg.progress, seen=cfg.eval.seen,
    )  # fmt: skip


def check_evaluation(evaluation: Path, policy: str, data: PreparedDataset) -> dict[str, Any]:
    """metrics.json of `evaluation` once it is known to be a finished, intact evaluation of
    the `policy` checkpoint on `data`: its manifest present, its files matching their sha256,
    and its recorded checkpoint sha256 and dataset hash those of `policy` and `data`. Anything
    else is a DataError, so a model card never shows another model's numbers."""
    if not Path(policy).is_file():
        raise DataError(f"{policy}: no such checkpoint file")
    manifest = read_manifest(evaluation)
    if manifest.get("stage") != "evaluate" or "metrics.json" not in manifest.get("files", {}):
        raise DataError(f"{evaluation}: not an evaluation output directory (its manifest is of "
                        f"stage {manifest.get('stage')!r}); pass the recsys-dpo evaluate "
                        "output of this checkpoint")  # fmt: skip
    verify_files(evaluation, manifest)
    metrics = json.loads((evaluation / "metrics.json").read_text())
    evaluated = metrics.get("config", {}).get("ckpt")
    sha = file_sha256(Path(policy))
    if manifest.get("ckpt_sha256") != sha:
        raise DataError(f"{evaluation}: it evaluated the checkpoint {evaluated} (sha256 "
                        f"{str(manifest.get('ckpt_sha256'))[:12]}), not {policy} (sha256 "
                        f"{sha[:12]}); evaluate this checkpoint (recsys-dpo evaluate) and "
                        "export with that output")  # fmt: skip
    wanted = content_hash(data.manifest)
    if manifest.get("dataset_hash") != wanted:
        raise DataError(f"{evaluation}: it was evaluated on the dataset "
                        f"{metrics.get('config', {}).get('prepared')} (hash "
                        f"{manifest.get('dataset_hash')}), not on {data.path} (hash {wanted}); "
                        "evaluate on this dataset, or set paths.prepared to that one")  # fmt: skip
    return metrics


def bundle_manifest(
    cfg: DictConfig, data: PreparedDataset, policy: str, evaluation: Path,
    lineage: Lineage | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """(metrics, the bundle manifest's payload) of a checked evaluation (`check_evaluation`);
    the payload's config_hash decides whether an existing bundle is up to date. With
    `lineage`, the payload's `reference_source` records it (and the hash covers it)."""
    metrics = check_evaluation(evaluation, policy, data)
    sha = read_manifest(evaluation)["ckpt_sha256"]  # the policy's, as just checked
    key = [policy, sha, metrics["config_hash"], cfg.pipeline.primary_metric]
    source = {} if lineage is None else {"reference_source": lineage.record()}
    if source:  # only then: the bundles of every other run keep their hashes
        key.append(source["reference_source"])
    return metrics, {
        "policy_ckpt": policy,
        "policy_sha256": sha,
        "evaluation": str(evaluation),
        "dataset_hash": content_hash(data.manifest),
        "config_hash": config_hash(key),
        # the seen-item policy topk.parquet was ranked under: Bundle.recommend applies it
        "seen": cfg.eval.seen,
        **source,
    }


def export_bundle(
    cfg: DictConfig,
    data: PreparedDataset,
    policy: str,
    evaluation: Path,
    out: Path,
    what: str | None = None,
    lineage: Lineage | None = None,
) -> Path:
    """Write the candidate bundle of the `policy` checkpoint (copied in, policy.ckpt), its
    evaluation directory (metrics.json, topk.parquet; checked by `check_evaluation`) and
    prepared dataset into `out`. `what` names the policy in messages (the setting that gave
    it, e.g. export.ckpt=...); `lineage`, the reference.source it was fine-tuned from, goes
    into the manifest and the model card."""
    # First: the checkpoint's vocabulary is this dataset's (the evaluation's dataset hash is a
    # hash of the config, which a re-prepared log of other ids can share).
    model = load_model(policy, trained_on(data), what)
    metrics, manifest = bundle_manifest(cfg, data, policy, evaluation, lineage)
    primary = cfg.pipeline.primary_metric
    card = model_card(f"{cfg.pipeline.name}-{cfg.model.name}", plain(cfg.data),
                      plain(cfg.objective), metrics, primary, decide(metrics, primary), model,
                      cfg.eval.seen, data_window(data),
                      None if lineage is None else lineage.card_line())  # fmt: skip
    return write_bundle(out, model, Vocab.load(data.path), user_histories(data),
                        evaluation / "topk.parquet", card, manifest, checkpoint=policy)  # fmt: skip


def eval_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """metrics.json -> flat MLflow metrics: <model>/<metric>, delta/<metric> with _lo/_hi."""
    out = {
        f"{role}/{n}": v for role, values in metrics["models"].items() for n, v in values.items()
    }
    out |= {f"comparison/{n}": v for n, v in metrics.get("comparison", {}).items()}
    for name, d in metrics.get("deltas", {}).items():
        out |= {
            f"delta/{name}": d["mean"],
            f"delta_lo/{name}": d["lo"],
            f"delta_hi/{name}": d["hi"],
        }
    return out


def user_histories(data: PreparedDataset) -> pl.DataFrame:
    """user_id, history (item ids): each test user's positives before the test split, the
    context the evaluator ranked them with."""
    queries = build_queries(data, "test")
    values = queries.history.values.numpy()
    idx = [
        values[s:e]
        for s, e in zip(queries.history.starts.tolist(), queries.history.ends.tolist(), strict=True)
    ]
    vocab = Vocab.load(data.path)
    item_ids = np.empty(vocab.n_items, dtype=object)
    item_ids[vocab.items["item_idx"].to_numpy()] = vocab.items["item_id"].to_numpy()
    users = vocab.users.sort("user_idx")["user_id"].to_numpy()
    return pl.DataFrame({
        "user_id": users[queries.user_idx].tolist(),
        "history": [item_ids[h].tolist() for h in idx],
    }, schema={"user_id": pl.Utf8, "history": pl.List(pl.Utf8)})  # fmt: skip


def data_window(data: PreparedDataset) -> tuple[int, int] | None:
    """(min, max) timestamp of the training split's events; None when it is empty."""
    stamps = data.events("train")["timestamp"]
    return None if stamps.is_empty() else (int(stamps.min()), int(stamps.max()))


def decide(metrics: dict[str, Any], primary: str) -> bool:
    """The policy is a candidate when the lower CI bound of its paired delta on `primary` > 0."""
    delta = metrics.get("deltas", {}).get(primary)
    if delta is None:
        raise DataError(f"pipeline.primary_metric={primary}: not among the evaluated deltas "
                        f"{sorted(metrics.get('deltas', {}))}")  # fmt: skip
    return delta["lo"] > 0


def run_pipeline(
    cfg: DictConfig, overrides: Sequence[str] = (), tags: Mapping[str, str] | None = None
) -> PipelineResult:
    """All five stages under one MLflow parent run (see the module docstring); `tags` go on
    that run too (a retraining replay nests it under its own run: `mlflow.parentRunId`)."""
    preflight(cfg, Run)
    lineage = from_config(cfg)  # before any work: a bad source fails in seconds
    console = Console(quiet=not cfg.progress)
    tracker = Tracker(cfg.tracking)
    pipe = Pipeline(cfg, tracker, console)
    name = f"{cfg.pipeline.name}-{cfg.model.name}-{cfg.objective.name}"
    tags = {"pipeline": cfg.pipeline.name, "model": cfg.model.name,
            "objective": cfg.objective.name, **(tags or {})}  # fmt: skip
    with tracker.parent(name, tags) as parent:
        tracker.log_config(parent, cfg, list(overrides))
        data = pipe.prepare()
        tracker.log_dataset(parent, data.path, data.manifest)
        ref_ckpt = reference_model(pipe, cfg, lineage)
        lineage_tags = {} if lineage is None else lineage.tags()
        tracker.set_tags(parent, lineage_tags)
        pref_cfg = stage_config(cfg, **{"reference.ckpt": ref_ckpt, "reference.source": None,
                                        "reward.ckpt": reward_model(pipe, cfg, ref_ckpt)})  # fmt: skip
        policy = pipe.train("preference", pref_cfg, f"{cfg.model.name}-{cfg.objective.name}",
                            lineage_tags)  # fmt: skip
        pol_ckpt = policy["best_ckpt"] or policy["last_ckpt"]
        optimized = cfg.pipeline.optimized_metric
        # The sweep's objective is read before, and never from, the test evaluation.
        valid = None if optimized is None else valid_score(pipe, data, pol_ckpt, ref_ckpt)
        evaluation = pipe.evaluate(data, pol_ckpt, ref_ckpt)
        metrics = json.loads((evaluation / "metrics.json").read_text())
        primary = cfg.pipeline.primary_metric
        better = decide(metrics, primary)
        bundle, version = pipe.export(data, pol_ckpt, evaluation, better, lineage)
        delta = metrics["deltas"][primary]
        result = PipelineResult(
            name=cfg.pipeline.name, model=cfg.model.name, objective=cfg.objective.name,
            beta=cfg.objective.get("beta"), primary=primary,
            reference=metrics["models"]["reference"][primary],
            policy=metrics["models"]["policy"][primary], delta=delta["mean"], lo=delta["lo"],
            hi=delta["hi"], kl=metrics.get("comparison", {}).get("kl", float("nan")),
            candidate=better, prepared=str(data.path), reference_ckpt=ref_ckpt,
            policy_ckpt=pol_ckpt, evaluation=str(evaluation), bundle=str(bundle),
            parent_run_id=parent, stage_run_ids=pipe.run_ids, registered=None if version is
            None else f"{cfg.pipeline.name}-{cfg.model.name}/{version}", ran=pipe.ran,
            optimized_metric=optimized, valid_value=valid,
        )  # fmt: skip
        tracker.log_metrics(parent, eval_metrics(metrics))
        if valid is not None:
            tracker.log_metrics(parent, {f"valid/{optimized}": valid})
        tracker.set_tags(parent, {"candidate": "better" if better else "not_better",
                                  "bundle": bundle})  # fmt: skip
    return result


def reference_model(pipe: Pipeline, cfg: DictConfig, lineage: Lineage | None) -> str:
    """The reference checkpoint of stage 2: `lineage`'s (reference.source, no training), or
    the one stage 1 trains (recipe pipeline.reference)."""
    if lineage is not None:
        pipe.console.print(f"reference: {lineage.origin} (reference.source={lineage.source}) "
                           f"-> {lineage.ckpt}", highlight=False)  # fmt: skip
        return lineage.ckpt
    ref_cfg = stage_config(cfg, objective=cfg.pipeline.reference.objective, mode="fresh",
                           **{"trainer.max_epochs": cfg.pipeline.reference.max_epochs,
                              "train.lr": cfg.pipeline.reference.lr})  # fmt: skip
    reference = pipe.train("reference", ref_cfg, f"{cfg.model.name}-{ref_cfg.objective.name}")
    return reference["best_ckpt"] or reference["last_ckpt"]


def reward_model(pipe: Pipeline, cfg: DictConfig, ref_ckpt: str) -> str | None:
    """reward.ckpt for stage 2: as given, or, for an RLHF objective without one, the reward
    model the pipeline trains from the reference on the same pairs (pipeline.reward; its own
    stage, MLflow child and cached run directory); None for the DPO family."""
    if cfg.reward.ckpt is not None or cfg.objective.name not in RLHF_OBJECTIVES:
        return cfg.reward.ckpt
    recipe = cfg.pipeline.reward
    reward_cfg = stage_config(cfg, objective=recipe.objective,
                              **{"reference.ckpt": ref_ckpt, "reference.source": None,
                                 "reward.ckpt": None,
                                 "trainer.max_epochs": recipe.max_epochs,
                                 "train.lr": recipe.lr})  # fmt: skip
    done = pipe.train("reward", reward_cfg, f"{cfg.model.name}-{recipe.objective.name}")
    return done["best_ckpt"] or done["last_ckpt"]


def valid_score(pipe: Pipeline, data: PreparedDataset, policy: str, reference: str) -> float:
    """pipeline.optimized_metric of the policy on the valid split (its own evaluation, child
    run `evaluate-valid`)."""
    metric = pipe.cfg.pipeline.optimized_metric
    values = json.loads((pipe.evaluate(data, policy, reference, "valid") / "metrics.json")
                        .read_text())["models"]["policy"]  # fmt: skip
    if metric not in values:
        raise DataError(f"pipeline.optimized_metric={metric}: not among the metrics of the "
                        f"valid evaluation {sorted(values)}")  # fmt: skip
    return float(values[metric])


# Sweep columns: (header, the row's cell) of every run.
Columns = list[tuple[str, list[str]]]


def swept_columns(results: Sequence[PipelineResult], swept: Sequence[Mapping[str, str]]) -> Columns:
    """One column per swept key (`swept`: each run's values of them, e.g. {"objective.beta":
    "0.1"}), then the tuning objective when the runs have one."""
    # A sweep over the objective group has its column already (`objective`).
    keys = list(dict.fromkeys(k for values in swept for k in values if k != "objective"))
    columns = [(k, [values.get(k, "") for values in swept]) for k in keys]
    if results and results[0].optimized_metric is not None:
        columns.append((f"valid {results[0].optimized_metric}",
                        [f"{r.valid_value:.4f}" for r in results]))  # fmt: skip
    return columns


def summary(
    results: Sequence[PipelineResult],
    title: str = "candidates",
    swept: Sequence[Mapping[str, str]] = (),
) -> Table:
    """One row per pipeline run: the candidate against its reference on the primary metric,
    after the values of the swept keys (`swept_columns`)."""
    table = Table(title=title)
    columns = swept_columns(results, swept)
    for column in ("run", *(c for c, _ in columns), "objective", "beta", "reference", "policy",
                   "delta [95% CI]", "KL", "candidate"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("run", "objective") else "right")
    for i, r in enumerate(results):
        table.add_row(
            f"{r.name}-{r.model}", *(cells[i] for _, cells in columns), r.objective, str(r.beta),
            f"{r.reference:.4f}", f"{r.policy:.4f}", f"{r.delta:+.4f} [{r.lo:+.4f}, {r.hi:+.4f}]",
            f"{r.kl:.4f}", "yes" if r.candidate else "not better",
        )  # fmt: skip
    return table


def summary_markdown(
    results: Sequence[PipelineResult], swept: Sequence[Mapping[str, str]] = ()
) -> str:
    """summary.md: the summary table as markdown, primary metric named in the header, one
    column per swept key (`swept_columns`)."""
    primary = results[0].primary if results else "ndcg_at_10"
    columns = swept_columns(results, swept)
    extra = "".join(f" {c} |" for c, _ in columns)
    lines = [
        f"# Candidates ({primary}, policy vs reference, paired bootstrap CI)", "",
        f"| run |{extra} objective | beta | reference | policy | delta | CI | KL | candidate | "
        "bundle |",
        "|---|" + "---|" * len(columns) + "---|---:|---:|---:|---:|---|---:|---|---|",
    ]  # fmt: skip
    lines += [
        f"| {r.name}-{r.model} |{''.join(f' {cells[i]} |' for _, cells in columns)} "
        f"{r.objective} | {r.beta} | {r.reference:.4f} | {r.policy:.4f} | "
        f"{r.delta:+.4f} | [{r.lo:+.4f}, {r.hi:+.4f}] | {r.kl:.4f} | "
        f"{'yes' if r.candidate else 'not better'} | {r.bundle} |"
        for i, r in enumerate(results)
    ]
    return "\n".join(lines) + "\n"


def write_summary(
    directory: Path, results: Sequence[PipelineResult], swept: Sequence[Mapping[str, str]] = ()
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "summary.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    (directory / "summary.md").write_text(summary_markdown(results, swept))


def job_dir() -> Path | None:
    """The hydra job's output directory (None outside a hydra app)."""
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def save_result(result: PipelineResult, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RESULT_FILE).write_text(json.dumps(asdict(result), indent=2))


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a multirun sweeps: its sweep overrides (`objective=dpo,sdpo`) and the
    sweeper's own search space (`hydra.sweeper.params`, e.g. hparams_search=optuna's)."""
    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [o.key_or_group for o in overrides if o.is_sweep_override()]
    return list(dict.fromkeys([*keys, *(config.hydra.sweeper.get("params") or {})]))


def job_values(job: Path, subdir: str | None, keys: Sequence[str]) -> dict[str, str]:
    """The values of `keys` in a job's overrides as hydra recorded them
    (`<job>/<hydra.output_subdir>/overrides.yaml`; nothing when it keeps none)."""
    record = None if subdir is None else job / subdir / "overrides.yaml"
    if record is None or not record.is_file():
        return {}
    given = OverridesParser.create().parse_overrides(list(OmegaConf.load(record)))
    values = {o.key_or_group: o.get_value_element_as_str() for o in given}
    return {k: values[k] for k in keys if k in values}


def natural(path: Path) -> int:
    """A sweep job directory's order: its job number (hydra.sweep.subdir), 10 after 9."""
    return int(path.parent.name) if path.parent.name.isdigit() else -1


class SummaryCallback(Callback):
    """At the end of a sweep, gather every job's pipeline_result.json into summary.md/json in
    the sweep directory, with a column per swept key, and print the comparison table."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        quiet_output()  # the table's width: this runs outside the jobs' entry point
        sweep = Path(config.hydra.sweep.dir)
        files = sorted(sweep.glob(f"*/{RESULT_FILE}"), key=lambda p: (natural(p), str(p)))
        results = [PipelineResult(**json.loads(p.read_text())) for p in files]
        if not results:
            return
        keys = swept_keys(config)
        swept = [job_values(p.parent, config.hydra.output_subdir, keys) for p in files]
        write_summary(sweep, results, swept)
        Console().print(summary(results, f"sweep {sweep}", swept))
        Console().print(f"summary written to [bold]{sweep / 'summary.md'}[/]", highlight=False)
