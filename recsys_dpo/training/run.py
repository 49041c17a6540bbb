"""The training stages as library functions: a composed hydra config -> a finished run directory.

    train_reference(cfg)   stage 1: a next-item loss (`objective.stage: reference`); with
                           `mode=continue` the compute-matched control (DESIGN.md, "Evaluation")
    train_preference(cfg)  stage 2: a DPO-family objective against `reference.ckpt`, or an
                           RLHF one (rlhf_exact, rlhf_pg, rloo) against the reward model of
                           `reward.ckpt` (`train_rlhf`)
    train_reward(cfg)      the RLHF route's reward model r_phi, Bradley-Terry on the same pairs
                           (`objective.stage: reward`), started from `reference.ckpt`

Both seed everything, build the DataModule from `cfg.paths.prepared`, instantiate
`cfg.trainer` with a checkpoint callback (best by val/ndcg_at_k, the reward model's by
val/accuracy, and last) and an MLflow logger,
fit (resuming from `cfg.ckpt_path` when given), and write `result.json` beside the checkpoints
in `<paths.runs>/<stage>/<model>-<objective>-<config hash>/`. Bad settings (an objective of the
other stage, an unusable reference checkpoint) raise `DataError` before any training, so the
entry points print one clear message and exit 2.
"""

import json
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch import LightningDataModule, LightningModule, seed_everything
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    RichProgressBar,
)
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from recsys_dpo.artifacts import config_hash, stage_lock
from recsys_dpo.data.datamodule import (
    TRAIN_MODE,
    PairDataModule,
    PreparedDataset,
    RowsDataset,
    SequenceDataModule,
    load_prepared,
)
from recsys_dpo.data.schema import USER_IDX
from recsys_dpo.errors import DataError
from recsys_dpo.models import Recommender
from recsys_dpo.retrieval.hard_negatives import reference_hard_negatives
from recsys_dpo.retrieval.seen import removed_items
from recsys_dpo.stage import plain
from recsys_dpo.tracking.mlflow_utils import open_tracking
from recsys_dpo.training.callbacks import StepSeed
from recsys_dpo.training.checkpoints import AtomicCheckpointIO, checkpoint_callbacks, write_atomic
from recsys_dpo.training.false_negatives import (
    false_negative_share,
    later_positive_hits,
    not_future_weights,
)
from recsys_dpo.training.preference_module import PreferenceModule, pair_logps
from recsys_dpo.training.reference_module import (
    ReferenceModule,
    check_sizes,
    load_model,
    model_weights,
    read_checkpoint,
    trained_on,
    weights_for,
)
from recsys_dpo.training.reward_module import RewardModule
from recsys_dpo.training.rlhf_module import RLHF_OBJECTIVES, RLHFModule

# Settings that change how a run is watched, resumed or evaluated, not what it trains: a
# resumed run keeps its directory, and turning MLflow off does not start a new one.
UNHASHED = ("ckpt_path", "progress", "tracking", "eval", "export", "force")
# Written into the run directory when an attempt starts (result.json only when it ends).
RUN_RECORD = "run.json"


@contextmanager
def bad_setting(what: str) -> Iterator[None]:
    """Re-raise a constructor's ValueError / FileNotFoundError about `what` as a DataError,
    so the entry point reports it as bad input (one message, exit 2), not as a crash."""
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        raise DataError(f"{what}: {err}") from err


def require_stage(cfg: DictConfig, stage: str) -> None:
    """Refuse an objective of the other stage (e.g. train_reference with objective=dpo)."""
    if cfg.objective.stage != stage:
        script = f"recsys-dpo train-{cfg.objective.stage}"
        raise DataError(
            f"objective={cfg.objective.name} is a {cfg.objective.stage}-stage objective, but "
            f"this is the {stage} stage: use {script}, or pick a {stage} objective"
        )


def require_reference(cfg: DictConfig, data: PreparedDataset) -> dict[str, Any]:
    """The model spec of `reference.ckpt` for the data: checked against the data's vocabulary
    (its hash, `check_vocab`; one extending the reference's grows it, `weights_for`) and
    sizes."""
    path = cfg.reference.ckpt
    if path is None:
        raise DataError(
            "reference.ckpt is not set: pass reference.ckpt=<a checkpoint written by "
            "recsys-dpo train-reference on this dataset>"
        )
    with bad_setting(f"reference.ckpt={path} on {cfg.paths.prepared}"):
        checkpoint = read_checkpoint(path)
    spec, _ = weights_for(checkpoint, trained_on(data), f"reference.ckpt={path}")
    with bad_setting(f"reference.ckpt={path} on {cfg.paths.prepared}"):
        check_sizes(spec, "the reference", n_items=data.n_items, n_users=data.n_users)
    return spec


def require_reward(cfg: DictConfig, data: PreparedDataset) -> None:
    """`reward.ckpt`, the RLHF objectives' reward model, checked against the data's
    vocabulary (its hash, `check_vocab`; grown for an extension, `weights_for`) and sizes."""
    path = cfg.reward.ckpt
    if path is None:
        raise DataError(
            f"objective={cfg.objective.name} optimises against a reward model: pass "
            "reward.ckpt=<a checkpoint written by recsys-dpo train-reward on this dataset>"
        )
    checkpoint = read_checkpoint(path, f"reward.ckpt={path}")
    spec, _ = weights_for(checkpoint, trained_on(data), f"reward.ckpt={path}")
    with bad_setting(f"reward.ckpt={path} on {cfg.paths.prepared}"):
        check_sizes(spec, "the reward model", n_items=data.n_items, n_users=data.n_users)


def run_dir(cfg: DictConfig, stage: str, name: str) -> Path:
    """`<paths.runs>/<stage>/<name>-<hash of the config that decides training>`, name being
    `<model>-<objective>`."""
    config = {k: v for k, v in plain(cfg).items() if k not in UNHASHED}
    # Unset: the hashes of runs before the key. A set source is resolved into reference.ckpt
    # by the entry points (recsys_dpo/reference_source.py), which is hashed.
    if config.get("reward") == {"ckpt": None}:
        del config["reward"]
    if "source" in config.get("reference", {}) and config["reference"]["source"] is None:
        del config["reference"]["source"]
    if "pairs_since" in config.get("train", {}) and config["train"]["pairs_since"] is None:
        del config["train"]["pairs_since"]
    return Path(cfg.paths.runs) / stage / f"{name}-{config_hash(config)}"


def mlflow_logger(cfg: DictConfig, run_name: str, out: Path) -> MLFlowLogger | bool:
    """Lightning's MLFlowLogger with the seed and the whole resolved config as (flattened)
    params and the config as a YAML artifact; False (no logger) when tracking is disabled.
    `tracking.run_id` (set by the pipeline runner) logs into that existing run, e.g. a child
    of the pipeline's parent run, instead of a new one; a resumed run logs into the run it
    left RUNNING (see `resumed_run`). `tracking.tags` (set by the entry points: the lineage of
    `reference.source`) are set on the run."""
    if not cfg.tracking.enabled:
        return False
    open_tracking(cfg.tracking.uri, cfg.tracking.experiment)  # a fresh sqlite store, set up once
    # Under DDP every rank runs this; only the launching one owns the run directory.
    resumed = resumed_run(cfg, out) if rank_zero_only.rank == 0 else None
    logger = MLFlowLogger(
        experiment_name=cfg.tracking.experiment,
        tracking_uri=cfg.tracking.uri,
        run_name=run_name,
        run_id=resumed or cfg.tracking.get("run_id"),
    )
    for key, value in (cfg.tracking.get("tags") or {}).items():
        logger.experiment.set_tag(logger.run_id, key, value)
    if resumed is None:  # a resumed run has its params already (MLflow refuses changing them)
        logger.log_hyperparams(plain(cfg))
        logger.experiment.log_text(
            logger.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml"
        )
    return logger


def resumed_run(cfg: DictConfig, out: Path) -> str | None:
    """The MLflow run of `out`'s previous, killed attempt when this attempt resumes it.

    A killed process never ends its MLflow run, so it would stay RUNNING forever. The run id
    of every attempt is recorded in `<out>/run.json` when it starts; if that run is still
    RUNNING, a resumed attempt (`ckpt_path` set, no `tracking.run_id` from the pipeline
    runner) logs on into it, and any other attempt marks it KILLED and starts its own.
    """
    record = out / RUN_RECORD
    if not record.is_file():
        return None
    previous = json.loads(record.read_text()).get("mlflow_run_id")
    if previous is None or previous == cfg.tracking.get("run_id"):
        return None
    client = MlflowClient(cfg.tracking.uri)
    try:
        status = client.get_run(previous).info.status
    except MlflowException:  # another tracking store, or the run was deleted
        return None
    if status != "RUNNING":
        return None
    if cfg.ckpt_path is not None and cfg.tracking.get("run_id") is None:
        return previous
    client.set_terminated(previous, "KILLED")
    return None


def run_lock(out: Path) -> AbstractContextManager[Path]:
    """The run directory's `stage_lock` (writable, one writer: a second identical run exits 2),
    taken by the launching process only, as DDP re-runs the script per rank into `out`."""
    return stage_lock(out) if rank_zero_only.rank == 0 else nullcontext(out)


def _peak_rss_mb(reset: bool = False) -> float | None:
    """This process's peak resident memory (VmHWM) in MiB, first reset to the current RSS
    when `reset` (Linux >= 4.0: /proc/self/clear_refs); None where /proc does not have it."""
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kib = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")), None)
    return None if kib is None else int(kib) / 1024


@contextmanager
def fit_cost(trainer: Any) -> Iterator[dict[str, Any]]:
    """What one `trainer.fit` cost, filled in on exit: `fit_seconds` (wall; this attempt's,
    so a resumed run counts its last attempt only), `optimizer_steps` (the trainer's
    global_step), `peak_rss_mb` (the process's peak RSS during the fit, reset at its start so
    a worker that trained earlier runs does not carry their peak) and `peak_gpu_mb` (CUDA's
    max allocated, None on CPU). Data preparation and negative mining before the fit are not
    in it."""
    cost: dict[str, Any] = {}
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    _peak_rss_mb(reset=True)
    start = time.perf_counter()
    yield cost
    cost.update(
        fit_seconds=round(time.perf_counter() - start, 3),
        optimizer_steps=int(trainer.global_step),
        peak_rss_mb=_peak_rss_mb(),
        peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if gpu else None,
    )


def fit(
    cfg: DictConfig,
    module: LightningModule,
    data: LightningDataModule,
    out: Path,
    run_name: str,
    monitor: str | None = None,
) -> Path:
    """Fit with checkpoints in `out` and write `result.json`.

    Checkpoints: the best by `monitor` (a validation metric to maximise; by default
    val/ndcg_at_k), and `last.ckpt`, the latest state, at every epoch end
    (and every `train.ckpt_every_n_steps` steps); all written atomically. With
    `train.early_stopping_patience` set, training stops once `monitor` has not improved for
    that many epochs. result.json's `cost` is `fit_cost`'s. `<out>/run.json` records the attempt's MLflow run at its start, so a
    later attempt can resume into that run or mark it KILLED.
    """
    if cfg.ckpt_path is not None:
        read_checkpoint(cfg.ckpt_path, f"ckpt_path={cfg.ckpt_path}")
    monitor = monitor or f"val/ndcg_at_{cfg.train.k}"
    best, latest = checkpoint_callbacks(out, monitor, cfg.train.ckpt_every_n_steps)
    callbacks: list[Callback] = [StepSeed(cfg.seed), best, *latest]
    patience = cfg.train.early_stopping_patience
    stopper = None if patience is None else EarlyStopping(monitor, patience=patience, mode="max")
    if stopper is not None:
        callbacks.append(stopper)
    if cfg.progress:
        callbacks.append(RichProgressBar())
    logger = mlflow_logger(cfg, run_name, out)
    if logger and (cfg.train.lr_schedule != "constant" or cfg.train.warmup_steps):
        callbacks.append(LearningRateMonitor(logging_interval="step"))  # the metric `lr`
    run_id = logger.run_id if logger else None
    owner = rank_zero_only.rank == 0  # DDP re-runs the script per rank into `out`
    if owner:
        record = {"run": run_name, "mlflow_run_id": run_id}
        write_atomic(out / RUN_RECORD, json.dumps(record).encode())
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=logger,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=out,
        enable_progress_bar=cfg.progress,
        enable_model_summary=cfg.progress,
    )
    with fit_cost(trainer) as cost:
        trainer.fit(module, data, ckpt_path=cfg.ckpt_path)
    score = best.best_model_score
    result = {
        "run": run_name,
        "best_ckpt": best.best_model_path or None,
        monitor: None if score is None else float(score),
        # Epochs count from 0, as in the checkpoint names.
        "best_epoch": read_checkpoint(best.best_model_path)["epoch"] if score is not None else None,
        "stopped_epoch": trainer.current_epoch - 1,
        "stopped_early": stopper is not None
        and stopper.stopping_reason is not EarlyStoppingReason.NOT_STOPPED,
        "last_ckpt": latest[0].best_model_path or None,
        "seed": cfg.seed,
        "mlflow_run_id": run_id,
        "cost": cost,
    }
    if owner:
        write_atomic(out / "result.json", json.dumps(result, indent=2).encode())
    Console(quiet=not cfg.progress).print(
        f"[bold]{run_name}[/]: best {monitor} = {result[monitor]} (epoch {result['best_epoch']})"
        f" -> {result['best_ckpt']}",
        highlight=False,
    )
    return out


def model_features(model_cfg: dict[str, Any],
                   data: PreparedDataset) -> tuple[np.ndarray, np.ndarray] | None:  # fmt: skip
    """The (user, item) attribute matrices of the dataset when `model_cfg` asks for features
    (model.features other than none; their widths are set in model_cfg, in place), else None.
    DataError when the dataset was prepared without them."""
    if model_cfg.get("features", "none") == "none":
        return None
    user, item = data.features("user"), data.features("item")
    if user is None or item is None:
        raise DataError(
            f"model.features={model_cfg['features']}: the prepared dataset {data.path} has no "
            "user / item features (prepare it with data.features set, e.g. data=coat)"
        )
    model_cfg |= {"user_features_dim": user.shape[1], "item_features_dim": item.shape[1]}
    return user, item


def reference_settings(cfg: DictConfig, data: PreparedDataset) -> dict[str, Any]:
    """ReferenceModule kwargs: a fresh model from cfg.model and cfg.objective, or (continue)
    the reference checkpoint's own model and loss, started from its weights."""
    if cfg.mode == "fresh":
        model_cfg = plain(cfg.model)
        objective = plain(cfg.objective)
        return {
            "model_name": model_cfg.pop("name"),
            "model_cfg": model_cfg,
            "loss": objective["name"],
            "num_negatives": objective.get("num_negatives", 100),
        }
    if cfg.mode != "continue":
        raise DataError(f"mode={cfg.mode}: expected 'fresh' or 'continue'")
    require_reference(cfg, data)
    saved = read_checkpoint(cfg.reference.ckpt).get("hyper_parameters", {})
    keep = ("model_name", "model_cfg", "loss", "num_negatives", "gbce_t")
    return {**{k: saved[k] for k in keep if k in saved}, "init_from": str(cfg.reference.ckpt)}


def rating_threshold(cfg: DictConfig) -> float:
    """objective.relevant of objective=rating_bce (by default data.reader.relevant): the rating
    at or above which a rated item is liked. DataError when neither sets one."""
    value = OmegaConf.select(cfg, "objective.relevant")
    if value is None:  # mode=continue: the reference's loss, whatever cfg.objective is
        value = OmegaConf.select(cfg, "data.reader.relevant")
    if value is None:
        raise DataError(
            f"objective=rating_bce needs objective.relevant (the rating at or above which a "
            f"rated item is liked): data={cfg.data.name} sets no data.reader.relevant"
        )
    return float(value)


def module_settings(cfg: DictConfig, data: Any) -> dict[str, Any]:
    """What every training module takes alike: the optimizer's step (train.lr, weight_decay,
    lr_schedule, warmup_steps), the validation cut-off train.k and the dataset it trains on."""
    return {"lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay,
            "lr_schedule": cfg.train.lr_schedule, "warmup_steps": cfg.train.warmup_steps,
            "k": cfg.train.k, "dataset": trained_on(data.dataset)}  # fmt: skip


def train_reference(cfg: DictConfig) -> Path:
    """Stage 1: train (or, mode=continue, train further) a reference ranker; the run dir."""
    require_stage(cfg, "reference")
    seed_everything(cfg.seed, workers=True)
    model_name = cfg.model.name
    if cfg.mode == "continue" and cfg.reference.ckpt is not None:
        with bad_setting(f"reference.ckpt={cfg.reference.ckpt}"):
            model_name = model_weights(read_checkpoint(cfg.reference.ckpt))[0]["name"]
    settings = reference_settings(cfg, load_prepared(cfg.paths.prepared))
    data = SequenceDataModule(
        cfg.paths.prepared,
        max_len=cfg.data.max_len,
        batch_size=cfg.train.batch_size,
        seed=cfg.seed,
        mode=TRAIN_MODE[model_name],
        num_workers=cfg.train.num_workers,
        seen=cfg.eval.seen,
        rating_threshold=rating_threshold(cfg) if settings["loss"] == "rating_bce" else None,
    )
    features = None if "init_from" in settings else model_features(settings["model_cfg"],
                                                                   data.dataset)  # fmt: skip
    with bad_setting(f"model={model_name} objective={settings['loss']}"):
        module = ReferenceModule(
            **settings,
            n_items=data.n_items,
            n_users=data.n_users,
            **module_settings(cfg, data),
        )
    if features is not None:  # buffers: saved with the weights, so loaded with every checkpoint
        module.model.set_features(*(torch.from_numpy(f) for f in features))
    name = f"{model_name}-{settings['loss']}" + ("-continue" if cfg.mode == "continue" else "")
    with run_lock(run_dir(cfg, "reference", name)) as out:
        return fit(cfg, module, data, out, f"reference/{name}")


@torch.no_grad()
def attach_reference_logps(rows: RowsDataset, reference: Recommender, batch_size: int) -> None:
    """Add `ref_chosen` [N] and `ref_rejected` [N, K] (log pi_ref, full catalog) to pair rows,
    so the preference module needs no reference model (precompute=true). Padded rejected slots
    get the chosen item's value, as the live path computes them."""
    chosen, rejected = [], []
    for start in range(0, len(rows), batch_size):
        batch = rows.__getitems__(list(range(start, min(start + batch_size, len(rows)))))
        ref_chosen, ref_rejected = pair_logps(
            reference.full_scores(batch), batch["chosen"], batch["rejected"]
        )
        chosen.append(ref_chosen)
        rejected.append(ref_rejected)
    rows.columns["ref_chosen"] = torch.cat(chosen)
    rows.columns["ref_rejected"] = torch.cat(rejected)


def _pair_sets(data: PairDataModule) -> Iterator[tuple[RowsDataset, list[np.ndarray]]]:
    """The train and valid pair rows, each with its rows' users' train positives (what the
    seen policy may remove from the reference's ranking)."""
    positives = {
        user: np.asarray(items, dtype=np.int64)
        for user, items in data.train_sequences.select(USER_IDX, "items").iter_rows()
    }
    none = np.zeros(0, dtype=np.int64)
    for rows in (data.train_set, data.valid_pairs):
        if rows is not None:
            yield rows, [positives.get(int(u), none) for u in rows.columns["user_idx"]]


def use_reference_hard_negatives(
    data: PairDataModule,
    reference: Recommender,
    num_negatives: int,
    skip: int,
    progress: bool,
    band: tuple[int, int] | None = None,
    seed: int = 0,
) -> None:
    """Replace the rejected items of the train and valid pairs by the reference's top-N items
    (after its first `skip`; or N drawn from its ranks band = (lo, hi)) that are neither chosen
    nor train positives of the user that the seen policy removes (`reference_hard`)."""
    for rows, exclude in _pair_sets(data):
        rows.columns["rejected"] = reference_hard_negatives(
            reference, rows, exclude, num_negatives, skip, progress=progress, seen=data.seen,
            band=band, seed=seed,
        )  # fmt: skip


@torch.no_grad()
def attach_rejected_weights(
    data: PairDataModule, reference: Recommender, horizon: float, batch_size: int
) -> None:
    """Add `rejected_weight` [N, K] to the train and valid pair rows: (1 - pi_ref)^horizon
    per rejected item, pi_ref the reference's softmax over the items its ranking keeps
    (`not_future_weights`). Computed once, before training; the rejected lists are made dense
    first so that the weights line up with every batch's rejected slots."""
    reference.eval()
    for rows, exclude in _pair_sets(data):
        rejected = rows.columns["rejected"]
        if not isinstance(rejected, torch.Tensor):
            rows.columns["rejected"] = rejected.take(torch.arange(len(rows)))
        weights = []
        for start in range(0, len(rows), batch_size):
            idx = list(range(start, min(start + batch_size, len(rows))))
            batch = rows.__getitems__(idx)
            logits = reference.full_scores(batch)
            removed = torch.zeros(logits.shape, dtype=torch.bool)
            for r, (i, chosen) in enumerate(zip(idx, batch["chosen"], strict=True)):
                removed[r, torch.from_numpy(removed_items(exclude[i], data.seen))] = True
                removed[r, chosen] = True
            weights.append(not_future_weights(logits, batch["rejected"], removed, horizon))
        rows.columns["rejected_weight"] = torch.cat(weights)


def train_false_negative_share(data: PairDataModule) -> float:
    """The share of the train pairs' real rejected items (as they will train: after mining
    and max_negatives) that the user clicks in a later train event (`false_negatives.py`).
    Reads the train split only."""
    data.setup()
    pairs = data.train_pairs()  # the rows setup() kept, in its order
    rejected = data.train_set.columns["rejected"]
    if not isinstance(rejected, torch.Tensor):
        rejected = rejected.take(torch.arange(len(data.train_set)))
    hits = later_positive_hits(pairs, rejected, data.dataset.events("train"))
    return false_negative_share(hits, rejected)


def label_smoothing(cfg: DictConfig, data: PairDataModule) -> float:
    """objective.label_smoothing, with `auto` measured on the train pairs (and printed)."""
    value = cfg.objective.get("label_smoothing", 0.0)
    if value != "auto":
        return value
    share = train_false_negative_share(data)
    if share >= 0.5:
        raise DataError(
            f"objective.label_smoothing=auto: {share:.1%} of the train pairs' rejected items "
            "are later train positives of the user, and a flip rate must be < 0.5: the pairs "
            "are mostly wrong, change their strategy rather than smooth them"
        )
    Console(quiet=not cfg.progress).print(
        f"objective.label_smoothing=auto: {share:.4f}, the share of rejected items the user "
        "clicks later in train"
    )
    return share


def preference_pairs(
    cfg: DictConfig, with_reference: bool = False
) -> tuple[PairDataModule, dict[str, Any], Recommender | None]:
    """The pairs both pair stages train on: pairs_train / pairs_valid of `cfg.paths.prepared`,
    their rejected items mined from the reference when `reference.hard_negatives` is set;
    with the model spec of `reference.ckpt` and the reference itself (dropout off) when it
    was needed for mining or `with_reference` asks for it, else None."""
    data = PairDataModule(
        cfg.paths.prepared,
        max_len=cfg.data.max_len,
        max_negatives=cfg.train.max_negatives,
        max_pairs_per_user=cfg.train.max_pairs_per_user,
        pairs_since=cfg.train.pairs_since,
        batch_size=cfg.train.batch_size,
        seed=cfg.seed,
        num_workers=cfg.train.num_workers,
        seen=cfg.eval.seen,
    )
    spec = require_reference(cfg, data.dataset)
    hard, band = cfg.reference.hard_negatives, cfg.reference.get("hard_negatives_band")
    reference = None
    if hard or with_reference:
        data.setup()
        reference = load_model(
            cfg.reference.ckpt, trained_on(data.dataset), f"reference.ckpt={cfg.reference.ckpt}",
            dropout=0.0,
        )  # fmt: skip
    if hard:
        setting = f"reference.hard_negatives={hard}" + (
            "" if band is None else f" reference.hard_negatives_band={list(band)}"
        )
        with bad_setting(setting):
            use_reference_hard_negatives(
                data, reference, hard, cfg.reference.hard_negatives_skip, cfg.progress,
                band=None if band is None else tuple(band), seed=cfg.seed,
            )  # fmt: skip
    return data, spec, reference


def train_preference(cfg: DictConfig) -> Path:
    """Stage 2: fine-tune the reference of `reference.ckpt` under `cfg.objective`; the run dir."""
    require_stage(cfg, "preference")
    seed_everything(cfg.seed, workers=True)
    objective = plain(cfg.objective)
    if objective["name"] in RLHF_OBJECTIVES:
        return train_rlhf(cfg)
    horizon = objective.get("rejected_weight_horizon")
    data, spec, reference = preference_pairs(
        cfg, with_reference=cfg.reference.precompute or horizon is not None
    )
    if horizon is not None:
        attach_rejected_weights(data, reference, horizon, cfg.train.batch_size)
    # After mining: `auto` measures the negatives the loss will see.
    smoothing = label_smoothing(cfg, data)
    with bad_setting(f"objective={objective['name']}"):
        module = PreferenceModule(
            str(cfg.reference.ckpt),
            data.n_items,
            data.n_users,
            objective=objective["name"],
            beta=objective.get("beta", 0.1),
            label_smoothing=smoothing,
            gamma=objective.get("gamma", 0.0),
            lambda_d=objective.get("lambda_d", 1.0),
            lambda_u=objective.get("lambda_u", 1.0),
            lambda_=objective.get("lambda_", 0.0),
            sft_alpha=objective.get("sft_alpha", 0.0),
            precompute=cfg.reference.precompute,
            **module_settings(cfg, data),
        )
    if cfg.reference.precompute:
        for rows in (data.train_set, data.valid_pairs):
            if rows is not None:
                attach_reference_logps(rows, reference, cfg.train.batch_size)
    name = f"{spec['name']}-{objective['name']}"
    with run_lock(run_dir(cfg, "preference", name)) as out:
        return fit(cfg, module, data, out, f"preference/{name}")


def train_rlhf(cfg: DictConfig) -> Path:
    """Stage 2, the RLHF route (`RLHFModule`): the policy of `reference.ckpt` optimised against
    the reward model of `reward.ckpt` on the contexts of the preference pairs (the same
    events DPO trains on, mined ones included); the run dir, as train_preference's."""
    data, spec, _ = preference_pairs(cfg)
    require_reward(cfg, data.dataset)
    objective = plain(cfg.objective)
    with bad_setting(f"objective={objective['name']}"):
        module = RLHFModule(
            str(cfg.reference.ckpt),
            str(cfg.reward.ckpt),
            data.n_items,
            data.n_users,
            objective=objective["name"],
            beta=objective["beta"],
            rloo_k=objective.get("k"),
            seed=cfg.seed,
            **module_settings(cfg, data),
        )
    name = f"{spec['name']}-{objective['name']}"
    with run_lock(run_dir(cfg, "preference", name)) as out:
        return fit(cfg, module, data, out, f"preference/{name}")


def train_reward(cfg: DictConfig) -> Path:
    """The reward-model stage: r_phi, the reference's architecture from its weights, fit to the
    preference pairs by Bradley-Terry (`RewardModule`), the best by val/accuracy; the run dir.
    DataError when the dataset has no train or no valid pairs (selection needs valid ones)."""
    require_stage(cfg, "reward")
    seed_everything(cfg.seed, workers=True)
    data, spec, _ = preference_pairs(cfg)
    data.setup()
    if len(data.train_set) == 0 or data.valid_pairs is None:
        split = "pairs_train" if len(data.train_set) == 0 else "pairs_valid"
        raise DataError(
            f"{data.dataset.path}: no {split} pairs, and the reward model trains on the train "
            "pairs and is selected on the valid ones: prepare the dataset with data.pairs set"
        )
    with bad_setting(f"objective={cfg.objective.name}"):
        module = RewardModule(
            str(cfg.reference.ckpt),
            **module_settings(cfg, data),
        )
    name = f"{spec['name']}-{cfg.objective.name}"
    with run_lock(run_dir(cfg, "reward", name)) as out:
        return fit(cfg, module, data, out, f"reward/{name}", monitor="val/accuracy")
