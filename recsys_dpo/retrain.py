"""The retraining loop replayed over rolling windows, with MLflow's registry as its record.

    recsys-dpo run experiment=retrain_synthetic          # 5 daily windows of data=synthetic_drift
    python pipelines/run.py experiment=retrain_synthetic

With `pipeline.retrain.windows` set (`Retrain`: `windows` N, `first_train_end` t_0, `horizon` h,
`period` day|month), `recsys-dpo run` replays what a ranker retrained every period goes
through: window w (t_w = t_0 + w*h) is a `window` split that trains on the periods before t_w
and, after the preset's `valid_periods` v, tests on t_w+v..t_w+v+h-1 (`data.split.train_end`,
`test_periods`, `period`), prepared into `<paths.prepared>/window-<w>` with its
vocabulary extending window w-1's (`data.base_vocab`: new items and users get appended rows,
recsys_dpo/data/vocab.py). Each window is one `run_pipeline` run:

- window 0 has no production model yet: it trains the first reference, fine-tunes a candidate
  from it, and that registered version becomes `production` whatever its CI (the loop's
  bootstrap, `promoted` true in its row);
- window w > 0 trains no reference: `reference.source=models:/<name>@production`, so the
  candidate is fine-tuned from production (on every train pair of its window, or with
  `fine_tune_on: new` on the pairs of the events after production's own train window only,
  `train.pairs_since`: the newest logs), evaluated against it on the window's test periods
  (paired bootstrap CI of `pipeline.primary_metric`), and `production`
  moves to the candidate's version only when `promote` holds: the CI's lower bound above 0.
  A CI that spans 0 (a tie) never moves the alias.

The record: one MLflow parent run per replay (`retrain-<name>-<model>`, tag
`retrain=replay`) with each window's pipeline run as its child (`mlflow.parentRunId`; the
stages nest below that), metrics `retrain/lift`, `retrain/lo`, `retrain/hi`,
`retrain/promoted`, `retrain/new_item_share`, `retrain/new_user_share`, `retrain/wall_s`
(the loop's run; the scratch arm's time not counted) on the window's run and as
steps (step = w) of `lift`, `lo`, `hi`, `promoted` on the parent, which also holds the table
(`retrain.json`, `retrain.md`) and the plot `lift_per_window.png`. Every version of the
replay is tagged `production.window=<w>` and `production.promoted=true|false`, so the alias's
history is readable from the registry (`alias_history`). `new_item_share` is the share of the
test periods' events whose item has no event in that window's train split (items that
arrived during the test periods: the reference scores them through its appended rows);
`new_user_share` the share of the test users with no event before the test periods (ranked
for from an empty history: most of ML-100k's, whose users rate within a month or two).

Never retraining: in every window w > 0 the version serving during its test periods
(production before the window's decision, so no look-ahead) is compared with window 0's
model, never retrained, on the same test periods (`vs_frozen`, paired CI; exactly 0 while
production is still window 0's version), and the table ends with its mean over the windows.
With `from_scratch: true` each window w > 0 also runs the whole pipeline with a fresh
reference on the same prepared data (registered as `<pipeline.name>-scratch`, its run tagged
`retrain.arm=scratch` beside the loop's `retrain.arm=loop`), and the serving version is
compared with that model's candidate the same way (`vs_scratch`).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from recsys_dpo.artifacts import read_manifest  # noqa: E402
from recsys_dpo.data.datamodule import PreparedDataset, load_prepared  # noqa: E402
from recsys_dpo.data.schema import ITEM_IDX, USER_IDX  # noqa: E402
from recsys_dpo.errors import DataError  # noqa: E402
from recsys_dpo.evaluation.evaluator import Delta  # noqa: E402
from recsys_dpo.pipeline import compare_models, run_pipeline  # noqa: E402
from recsys_dpo.settings import Retrain  # noqa: E402
from recsys_dpo.tracking.mlflow_utils import PARENT_TAG, open_tracking  # noqa: E402
from recsys_dpo.training.reference_module import load_model, trained_on  # noqa: E402

PRODUCTION_ALIAS = "production"
# Tags on each registered version of a replay: its window, and whether it became production.
WINDOW_TAG = "production.window"
PROMOTED_TAG = "production.promoted"


def promote(delta: Delta) -> bool:
    """The promotion rule: the candidate replaces production only when the paired CI of the
    primary metric's delta (candidate - production) lies above 0. A CI spanning 0, or an
    undefined one (NaN), keeps production."""
    return delta.lo > 0


def record_decision(
    client: MlflowClient, name: str, version: str, window: int, promoted: bool
) -> None:
    """Tag `version` of model `name` with its window and the decision, and move the
    `production` alias to it only when `promoted`."""
    client.set_model_version_tag(name, version, WINDOW_TAG, str(window))
    client.set_model_version_tag(name, version, PROMOTED_TAG, str(promoted).lower())
    if promoted:
        client.set_registered_model_alias(name, PRODUCTION_ALIAS, version)


def alias_history(client: MlflowClient, name: str) -> list[tuple[int, str]]:
    """(window, version) of every version that became production, in window order: the
    `production` alias's history, read from the registry's version tags."""
    versions = client.search_model_versions(f"name='{name}'")
    promoted = [(int(v.tags[WINDOW_TAG]), str(v.version)) for v in versions
                if v.tags.get(PROMOTED_TAG) == "true"]  # fmt: skip
    return sorted(promoted)


@dataclass
class WindowRow:
    """One window of a replay: its train end and test periods, the production version the
    candidate was compared with (None in window 0: its own fresh reference), the candidate's
    version, the primary metric's lift (candidate - production, mean paired delta) and its
    CI, the decision, new items' share of the test events, the window's wall time, its
    MLflow run and the candidate's checkpoint. `vs_frozen` (`_lo`, `_hi`): the primary
    metric's paired delta of the version serving during the test periods (production before
    the decision) minus window 0's model, never retrained (NaN in window 0); `vs_scratch`
    (`_lo`, `_hi`): the same version minus a model trained from scratch on the window
    (`Retrain.from_scratch`; NaN when off and in window 0)."""

    window: int
    train_end: int
    test_periods: list[int]
    production: str | None
    candidate: str
    lift: float
    lo: float
    hi: float
    promoted: bool
    new_item_share: float
    new_user_share: float
    wall_s: float
    run_id: str
    ckpt: str
    vs_frozen: float = float("nan")
    vs_frozen_lo: float = float("nan")
    vs_frozen_hi: float = float("nan")
    vs_scratch: float = float("nan")
    vs_scratch_lo: float = float("nan")
    vs_scratch_hi: float = float("nan")


def new_item_share(data: PreparedDataset) -> float:
    """The share of the test split's events whose item has no event in the train split."""
    test = data.events("test").select(ITEM_IDX)
    if test.is_empty():
        return 0.0
    known = data.events("train").select(ITEM_IDX).unique()
    return float(test.join(known, on=ITEM_IDX, how="anti").height / test.height)


def new_users(data: PreparedDataset) -> set[int]:
    """The test split's users with no event before it (train or valid): users the models rank
    for from an empty history."""
    before = pl.concat([data.events(s).select(USER_IDX) for s in ("train", "valid")])
    return set(data.events("test")[USER_IDX].unique().to_list()) - set(before[USER_IDX].to_list())


def new_user_share(data: PreparedDataset) -> float:
    """The share of the test split's users that are `new_users`."""
    test = data.events("test")[USER_IDX].n_unique()
    return len(new_users(data)) / test if test else 0.0


def window_config(cfg: DictConfig, settings: Retrain, window: int, previous: Path | None,
                  scratch: bool = False, pairs_since: int | None = None) -> DictConfig:  # fmt: skip
    """The pipeline config of `window`: its window split, its own prepared directory
    extending `previous`'s vocabulary, and (after window 0) production as the reference;
    `scratch`: a fresh reference instead, registered as <pipeline.name>-scratch;
    `pairs_since`: train.pairs_since of the loop's candidate (not the scratch arm's)."""
    updates = {
        "data.split.kind": "window",
        "data.split.train_end": settings.first_train_end + window * settings.horizon,
        "data.split.test_periods": settings.horizon,
        "data.split.period": settings.period,
        "paths.prepared": str(Path(cfg.paths.prepared) / f"window-{window}"),
        "pipeline.retrain.windows": None,
    }
    if previous is not None:
        updates["data.base_vocab"] = str(previous)
    if scratch:
        updates["pipeline.name"] = f"{cfg.pipeline.name}-scratch"
    elif previous is not None:
        updates["reference.source"] = f"models:/{model_name(cfg)}@{PRODUCTION_ALIAS}"
        if pairs_since is not None:
            updates["train.pairs_since"] = pairs_since
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for key, value in updates.items():
            OmegaConf.update(out, key, value, merge=False)
    return out


def model_name(cfg: DictConfig) -> str:
    """The registered model the pipeline exports to (recsys_dpo.pipeline.Pipeline.export)."""
    return f"{cfg.pipeline.name}-{cfg.model.name}"


def replay(cfg: DictConfig, settings: Retrain, overrides: Sequence[str] = ()) -> list[WindowRow]:
    """The loop over `settings.windows` windows (module docstring); one row per window."""
    if not cfg.tracking.enabled:
        raise DataError("pipeline.retrain: the replay keeps production as the registry alias "
                        "models:/<name>@production; it needs tracking.enabled=true")  # fmt: skip
    if cfg.train.pairs_since is not None:
        raise DataError(f"train.pairs_since={cfg.train.pairs_since}: the replay sets it per "
                        "window; choose what candidates fine-tune on with "
                        "pipeline.retrain.fine_tune_on=all|new")  # fmt: skip
    client = open_tracking(str(cfg.tracking.uri), str(cfg.tracking.experiment))
    experiment = client.get_experiment_by_name(str(cfg.tracking.experiment)).experiment_id
    name = model_name(cfg)
    parent = client.create_run(experiment, run_name=f"retrain-{name}", tags={
        "retrain": "replay", "pipeline": cfg.pipeline.name, "model": cfg.model.name,
        "objective": cfg.objective.name, "overrides": " ".join(overrides) or "(none)",
    }).info.run_id  # fmt: skip
    for key, value in settings.model_dump().items():
        client.log_param(parent, f"retrain.{key}", str(value))
    rows: list[WindowRow] = []
    previous: Path | None = None
    status = "FAILED"
    try:
        for window in range(settings.windows):
            rows.append(run_window(cfg, settings, window, previous, client, parent, rows))
            previous = Path(cfg.paths.prepared) / f"window-{window}"
        status = "FINISHED"
    finally:
        if rows:
            log_table(client, parent, rows, cfg.pipeline.primary_metric)
        client.set_terminated(parent, status)
    return rows


def run_window(cfg: DictConfig, settings: Retrain, window: int, previous: Path | None,
               client: MlflowClient, parent: str, earlier: Sequence[WindowRow]) -> WindowRow:  # fmt: skip
    """One window's pipeline run, decision and metrics; `earlier`: the rows of the earlier
    windows."""
    name = model_name(cfg)
    ckpts = {r.candidate: r.ckpt for r in earlier}
    production = since = None
    if previous is not None:
        production = str(client.get_model_version_by_alias(name, PRODUCTION_ALIAS).version)
        if settings.fine_tune_on == "new":
            since = new_events_start(cfg, earlier, production)
    window_cfg = window_config(cfg, settings, window, previous, pairs_since=since)
    started = time.perf_counter()
    tags = {PARENT_TAG: parent, "retrain.window": str(window)}
    result = run_pipeline(window_cfg, tags={**tags, "retrain.arm": "loop"})
    wall = time.perf_counter() - started
    candidate = result.registered.split("/")[-1]
    data = load_prepared(Path(result.prepared))
    # Window 0 has nothing in production: its candidate is the loop's first production model.
    promoted = previous is None or promote(Delta(result.delta, result.lo, result.hi))
    record_decision(client, name, candidate, window, promoted)
    train_end = settings.first_train_end + window * settings.horizon
    first_test = train_end + int(cfg.data.split.get("valid_periods") or 0)
    row = WindowRow(
        window=window, train_end=train_end,
        test_periods=list(range(first_test, first_test + settings.horizon)),
        production=production, candidate=candidate, lift=result.delta, lo=result.lo,
        hi=result.hi, promoted=promoted, new_item_share=new_item_share(data),
        new_user_share=new_user_share(data), wall_s=wall,
        run_id=result.parent_run_id, ckpt=result.policy_ckpt,
    )  # fmt: skip
    if production is not None:
        frozen = ckpts[min(ckpts, key=int)]  # window 0's version: the lowest of the replay
        versus = paired_delta(window_cfg, data, ckpts[production], frozen)
        row.vs_frozen, row.vs_frozen_lo, row.vs_frozen_hi = versus.mean, versus.lo, versus.hi
    if production is not None and settings.from_scratch:
        fresh = run_pipeline(window_config(cfg, settings, window, previous, scratch=True),
                             tags={**tags, "retrain.arm": "scratch"})  # fmt: skip
        versus = paired_delta(window_cfg, data, ckpts[production], fresh.policy_ckpt)
        row.vs_scratch, row.vs_scratch_lo, row.vs_scratch_hi = versus.mean, versus.lo, versus.hi
    values = {"lift": row.lift, "lo": row.lo, "hi": row.hi, "promoted": float(promoted),
              "new_item_share": row.new_item_share, "new_user_share": row.new_user_share,
              "wall_s": wall,
              **{f"vs_{arm}{end}": getattr(row, f"vs_{arm}{end}")
                 for arm in ("frozen", "scratch") for end in ("", "_lo", "_hi")}}  # fmt: skip
    for key, value in values.items():
        if value == value:  # an undefined CI (NaN) is left out, as Tracker.log_metrics does
            client.log_metric(row.run_id, f"retrain/{key}", value)
            if key in ("lift", "lo", "hi", "promoted", "vs_frozen", "vs_scratch"):
                client.log_metric(parent, key, value, step=window)
    return row


def new_events_start(cfg: DictConfig, earlier: Sequence[WindowRow], production: str) -> int:
    """The first unix second production has not trained on: the end of the train window of
    the window that produced it (its prepared manifest's split bounds)."""
    made = next(r.window for r in earlier if r.candidate == production)
    manifest = read_manifest(Path(cfg.paths.prepared) / f"window-{made}")
    return int(manifest["split"]["bounds"][1])


def paired_delta(cfg: DictConfig, data: PreparedDataset, model: str, other: str) -> Delta:
    """The primary metric's paired delta, `model` minus `other` (checkpoints), on the
    window's eval split (its vocabulary grown onto both)."""
    models = {"policy": load_model(model, trained_on(data)),
              "reference": load_model(other, trained_on(data))}  # fmt: skip
    outcome = compare_models(cfg, data, models, (model, other), cfg.eval.split)
    return outcome.deltas[cfg.pipeline.primary_metric]


def table_markdown(rows: Sequence[WindowRow], primary: str = "primary metric") -> str:
    """The replay's table, one line per window."""
    lines = [
        f"# Retraining replay ({primary}: candidate - production, paired bootstrap CI)", "",
        "| window | train end | test periods | production | candidate | lift | CI | promoted "
        "| new-item share | new-user share | wall s | serving vs never retrained [CI] | serving "
        "vs from scratch [CI] |",
        "|---:|---:|---|---:|---:|---:|---|---|---:|---:|---:|---|---|",
    ]  # fmt: skip
    lines += [
        f"| {r.window} | {r.train_end} | {r.test_periods[0]}..{r.test_periods[-1]} | "
        f"{r.production or '-'} | {r.candidate} | {r.lift:+.4f} | [{r.lo:+.4f}, {r.hi:+.4f}] | "
        f"{'yes' if r.promoted else 'no'} | {r.new_item_share:.3f} | {r.new_user_share:.3f} | "
        f"{r.wall_s:.1f} | "
        f"{ci_cell(r.vs_frozen, r.vs_frozen_lo, r.vs_frozen_hi)} | "
        f"{ci_cell(r.vs_scratch, r.vs_scratch_lo, r.vs_scratch_hi)} |"
        for r in rows
    ]  # fmt: skip
    for arm, what in (("frozen", "the never-retrained window-0 model"),
                      ("scratch", "a model trained from scratch on the window")):  # fmt: skip
        values = [getattr(r, f"vs_{arm}") for r in rows[1:]]
        if values and all(v == v for v in values):
            lines += ["", f"Mean over windows 1..{len(rows) - 1} of the serving model minus "
                      f"{what}: {sum(values) / len(values):+.4f}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def ci_cell(mean: float, lo: float, hi: float) -> str:
    return "-" if mean != mean else f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def lift_figure(rows: Sequence[WindowRow]) -> plt.Figure:
    """Lift per window with its CI; promoted windows filled."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [r.window for r in rows]
    lift = [r.lift for r in rows]
    err = [[r.lift - r.lo for r in rows], [r.hi - r.lift for r in rows]]
    ax.errorbar(x, lift, yerr=err, fmt="none", ecolor="grey", capsize=3)
    ax.scatter(x, lift, c=["tab:green" if r.promoted else "white" for r in rows],
               edgecolors="tab:green", zorder=3)  # fmt: skip
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("window")
    ax.set_ylabel("lift (candidate - production)")
    ax.set_xticks(x)
    ax.set_title("filled: promoted (window 0: vs its own fresh reference)", fontsize=9)
    fig.tight_layout()
    return fig


def rows_json(rows: Sequence[WindowRow]) -> list[dict]:
    """The rows as JSON objects, an undefined figure (NaN) as null: JSON has no NaN."""
    return [{k: None if v != v else v for k, v in asdict(r).items()} for r in rows]


def log_table(client: MlflowClient, run_id: str, rows: Sequence[WindowRow], primary: str) -> None:
    """The table (json, markdown) and the lift plot as artifacts of the replay's run."""
    client.log_dict(run_id, rows_json(rows), "retrain.json")
    client.log_text(run_id, table_markdown(rows, primary), "retrain.md")
    fig = lift_figure(rows)
    client.log_figure(run_id, fig, "lift_per_window.png")
    plt.close(fig)


def write_table(directory: Path, rows: Sequence[WindowRow], primary: str) -> None:
    """retrain.json and retrain.md into `directory` (the hydra job's)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "retrain.json").write_text(json.dumps(rows_json(rows), indent=2, allow_nan=False))
    (directory / "retrain.md").write_text(table_markdown(rows, primary))
