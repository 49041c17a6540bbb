"""The typed schema of the composed config, checked by every entry point before any work.

A bad setting fails in a second with one line naming the key, the value and what is allowed
(`config: train.batch_size=0: must be >= 1`), instead of a traceback mid-run, a run that trains
on nonsense (`train.k=0` picks the best checkpoint by ndcg_at_0), or `recsys-dpo run` refusing
its objective only after it has trained the reference.

One pydantic model per config section and one per entry point (`Prepare`, `TrainReference`,
`TrainPreference`, `TrainReward`, `Evaluate`, `Export`, `Run`) gathering the sections that stage reads, with
its cross-field rules. A new key is one line in its section. Keys the schema does not name pass
through: hydra already refuses unknown keys (struct mode), and the stages read the DictConfig
itself. Registries of names (losses, index kinds, splits) are the library's own, looked up
only when a value is checked (`one_of`): they sit in modules that import torch or faiss, which
prepare.py does not need.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)

from recsys_dpo.errors import DataError

# Numbers and flags are strict: True is not 1, and "0.1" is not a number.
Int = Annotated[int, Strict()]
Count = Annotated[int, Strict(), Field(ge=1)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
Positive = Annotated[float, Strict(), Field(gt=0)]
NonNegative = Annotated[float, Strict(), Field(ge=0)]
Fraction = Annotated[float, Strict(), Field(ge=0, le=1)]
Bool = Annotated[bool, Strict()]


def one_of(registry: str) -> AfterValidator:
    """A name of the library's registry `module:attribute` (a tuple or dict of names)."""
    module, attribute = registry.split(":")

    def check(value: str) -> str:
        allowed = getattr(importlib.import_module(module), attribute)
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return AfterValidator(check)


class Section(BaseModel):
    """A config block; unnamed keys pass, names like pipeline.name=2024 stay strings."""

    model_config = ConfigDict(extra="allow", frozen=True, coerce_numbers_to_str=True)


class Paths(Section):
    artifacts: str
    prepared: str
    runs: str


class Validation(Section):
    drop_duplicates: Bool
    min_events_per_user: NonNegativeInt
    non_finite: Annotated[str, one_of("recsys_dpo.data.validate:NON_FINITE")] = "error"


class Split(Section):
    kind: Annotated[str, one_of("recsys_dpo.data.splits:SPLITTERS")]
    # The window split's (recsys_dpo.data.splits.window_bounds); other kinds' keys pass.
    train_end: Count | None = None
    valid_periods: NonNegativeInt = 0
    test_periods: Count = 1
    train_periods: Count | None = None
    period: Annotated[str, one_of("recsys_dpo.data.splits:WINDOW_PERIODS")] = "day"

    @model_validator(mode="after")
    def window_has_an_end(self) -> Split:
        if self.kind == "window" and self.train_end is None:
            raise ValueError("data.split.kind=window: data.split.train_end (the first period "
                             "after the train window) is missing")
        return self


class Data(Section):
    name: str
    max_len: Count
    validation: Validation
    split: Split
    pair_splits: list[Annotated[str, one_of("recsys_dpo.data.splits:SPLITS")]]
    n_buckets: Count
    # a prepared dataset whose vocabulary this one extends (set with +data.base_vocab=, so
    # configs without it keep their hashes)
    base_vocab: str | None = None


Dropout = Annotated[float, Strict(), Field(ge=0, lt=1)]


class SASRecModel(Section):
    name: Literal["sasrec"]
    dim: Count
    n_layers: Count
    n_heads: Count
    max_len: Count
    dropout: Dropout

    @model_validator(mode="after")
    def heads_split_dim(self) -> SASRecModel:
        if self.dim % self.n_heads:
            raise ValueError(
                f"model.dim={self.dim}, model.n_heads={self.n_heads}: dim must be a multiple "
                "of n_heads"
            )
        return self


class TwoTowerModel(Section):
    name: Literal["two_tower"]
    dim: Count
    hidden: list[Count]
    use_user_id: Bool
    use_history: Bool
    max_len: Count
    dropout: Dropout
    features: Literal["none", "ids_and_features", "features_only"] = "none"

    @model_validator(mode="after")
    def has_a_user_input(self) -> TwoTowerModel:
        if not (self.use_user_id or self.use_history):
            raise ValueError(
                "model.use_user_id=false, model.use_history=false: the user tower needs at "
                "least one of them"
            )
        return self


class MFModel(Section):
    name: Literal["mf"]
    dim: Count
    max_len: Count


Model = Annotated[SASRecModel | TwoTowerModel | MFModel, Field(discriminator="name")]


class ReferenceObjective(Section):
    """A stage-1 (next-item) loss."""

    name: Annotated[str, one_of("recsys_dpo.training.reference_module:REFERENCE_LOSSES")]
    stage: Literal["reference"]
    num_negatives: Count | None = None


def flip_rate(value: Any) -> float | str:
    """A label-flip rate in [0, 0.5), or "auto": the false-negative share measured on the train
    pairs at train time (`recsys_dpo/training/false_negatives.py`)."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, float | int) or not 0 <= value < 0.5:
        raise ValueError("must be a rate in [0, 0.5) or auto")
    return float(value)


class PreferenceObjective(Section):
    """A stage-2 objective: the DPO family, or the RLHF route against `reward.ckpt`."""

    name: Annotated[str, one_of("recsys_dpo.training.rlhf_module:PREFERENCE_OBJECTIVES")]
    stage: Literal["preference"]
    beta: Positive
    label_smoothing: Annotated[Any, AfterValidator(flip_rate)] = 0.0
    gamma: Annotated[float, Strict()] = 0.0
    lambda_d: Positive = 1.0
    lambda_u: Positive = 1.0
    lambda_: NonNegative = 0.0
    sft_alpha: NonNegative = 0.0
    # H of the pair weights (1 - pi_ref(rejected))^H (training/false_negatives.py); None: off.
    rejected_weight_horizon: NonNegative | None = None
    # rloo's samples per row (the RLHF route, training/rlhf_module.py); None for the others.
    k: Count | None = None

    @model_validator(mode="after")
    def loss_accepts_its_settings(self) -> PreferenceObjective:
        """The loss's own check of its parameters (e.g. gamma set for dpo, which ignores it),
        run here so that run.py refuses them before it trains the reference."""
        from recsys_dpo.training.preference_module import objective_params
        from recsys_dpo.training.rlhf_module import RLHF_OBJECTIVES, rlhf_params

        settings = {"label_smoothing": self.label_smoothing, "gamma": self.gamma,
                    "lambda_d": self.lambda_d, "lambda_u": self.lambda_u, "lambda_": self.lambda_}  # fmt: skip
        try:
            if self.name in RLHF_OBJECTIVES:
                rlhf_params(self.name, self.beta, self.k, sft_alpha=self.sft_alpha, **settings)
            elif self.k is not None:
                raise ValueError(f"k={self.k} is rloo's number of samples per row")
            else:
                objective_params(self.name, self.beta, **settings)
        except ValueError as err:
            raise ValueError(f"objective={self.name}: {err}") from err
        if self.rejected_weight_horizon is not None and self.name in ("sdpo", "kto",
                                                                      *RLHF_OBJECTIVES):
            kind = {"sdpo": "listwise", "kto": "unpaired"}.get(self.name, "an RLHF objective")
            raise ValueError(
                f"objective={self.name} objective.rejected_weight_horizon="
                f"{self.rejected_weight_horizon}: per-pair weights need a pairwise loss; "
                f"{self.name} is {kind}"
            )  # fmt: skip
        if self.name == "sft" and self.sft_alpha == 0:
            raise ValueError(
                "objective=sft objective.sft_alpha=0: the SFT baseline trains the SFT term "
                "alone, set sft_alpha > 0"
            )
        return self


class RewardObjective(Section):
    """The reward-model stage's loss (`recsys_dpo.objectives.reward`)."""

    name: Literal["bradley_terry"]
    stage: Literal["reward"]


Objective = Annotated[
    ReferenceObjective | PreferenceObjective | RewardObjective, Field(discriminator="stage")
]


class Train(Section):
    batch_size: Count
    lr: Positive
    weight_decay: NonNegative
    num_workers: NonNegativeInt
    max_negatives: Count | None
    max_pairs_per_user: Count | None
    pairs_since: NonNegativeInt | None = None
    k: Count
    early_stopping_patience: Count | None = None
    ckpt_every_n_steps: Count | None = None
    lr_schedule: Annotated[str, one_of("recsys_dpo.training.schedule:LR_SCHEDULES")] = "constant"
    warmup_steps: NonNegativeInt = 0


class Trainer(Section):
    max_epochs: Count


class Reference(Section):
    ckpt: str | None
    # models:/<name>@<alias>, models:/<name>/<version>, a bundle or a checkpoint, resolved to
    # reference.ckpt by the entry points (recsys_dpo/reference_source.py).
    source: Annotated[str, Field(min_length=1)] | None = None
    precompute: Bool
    hard_negatives: NonNegativeInt
    hard_negatives_skip: NonNegativeInt
    hard_negatives_band: Annotated[list[Count], Field(min_length=2, max_length=2)] | None = None

    @model_validator(mode="after")
    def one_reference(self) -> Reference:
        if self.source is not None and self.ckpt is not None:
            raise ValueError(
                f"reference.source={self.source} reference.ckpt={self.ckpt}: both name the "
                "reference, set one of them"
            )
        return self

    @model_validator(mode="after")
    def band_fits(self) -> Reference:
        """A band [lo, hi] of 1-based reference ranks to draw hard_negatives from, instead of
        the skip: it needs N > 0 negatives, lo <= hi, and room for N in it."""
        band = self.hard_negatives_band
        if band is None:
            return self
        lo, hi = band
        setting = f"reference.hard_negatives_band=[{lo},{hi}]"
        if lo > hi:
            raise ValueError(f"{setting}: need lo <= hi")
        if not 0 < self.hard_negatives <= hi - lo + 1:
            raise ValueError(
                f"{setting} reference.hard_negatives={self.hard_negatives}: need "
                f"1 <= hard_negatives <= hi - lo + 1 = {hi - lo + 1} negatives drawn from it"
            )
        if self.hard_negatives_skip:
            raise ValueError(
                f"{setting} reference.hard_negatives_skip={self.hard_negatives_skip}: the band "
                "replaces the skip (skip s, N negatives is the band [s+1, s+N]), set one of them"
            )
        return self


class Reward(Section):
    ckpt: str | None = None


class Tracking(Section):
    uri: Annotated[str, Field(min_length=1)]
    experiment: Annotated[str, Field(min_length=1)]
    enabled: Bool


class Ope(Section):
    enabled: Literal["auto", True, False]
    policy: Annotated[str, one_of("recsys_dpo.ranking_policy:POLICIES")]
    epsilon: Fraction
    temperature: Positive
    clip: Positive | None


class Eval(Section):
    ckpt: str | None
    split: Annotated[str, one_of("recsys_dpo.evaluation.evaluator:SPLITS_BEFORE")]
    k: Annotated[list[Count], Field(min_length=1)]
    seen: Annotated[str, one_of("recsys_dpo.retrieval.seen:SEEN_POLICIES")] = "remove"
    index: Annotated[str, one_of("recsys_dpo.retrieval.index:KINDS")]
    nlist: Count | None
    nprobe: Count
    use_gpu: Bool | None
    batch_size: Count
    kl_chunk: Count
    n_resamples: Count
    ci: Annotated[float, Strict(), Field(gt=0, lt=1)]
    head_fraction: Fraction
    name: str | None
    out_dir: str
    ope: Ope


class PipelineReference(Section):
    objective: ReferenceObjective
    max_epochs: Count
    lr: Positive


class PipelineReward(Section):
    """The reward model `recsys-dpo run` trains for an RLHF objective (unless reward.ckpt)."""

    objective: RewardObjective
    max_epochs: Count
    lr: Positive


class Retrain(Section):
    """`pipeline.retrain`: the replay of the retraining loop over rolling windows
    (recsys_dpo/retrain.py). Window w trains on the periods before first_train_end + w *
    horizon and is tested on the `horizon` periods after; `windows` null: no replay."""

    windows: Count | None = None
    first_train_end: Count | None = None
    horizon: Count = 1
    period: Literal["day", "month"] = "day"
    # Also train a model from scratch on each window, to compare the loop's serving model with.
    from_scratch: Bool = False
    # What the loop's candidate fine-tunes on after window 0: `all` its window's train pairs,
    # `new` only those of events production has not trained on (train.pairs_since).
    fine_tune_on: Literal["all", "new"] = "all"

    @model_validator(mode="after")
    def replay_has_a_start(self) -> Retrain:
        if self.windows is not None and self.first_train_end is None:
            raise ValueError("pipeline.retrain.windows is set: pipeline.retrain.first_train_end "
                             "(window 0's data.split.train_end) is missing")  # fmt: skip
        return self


class Pipeline(Section):
    name: Annotated[str, Field(min_length=1)]
    reference: PipelineReference
    reward: PipelineReward
    primary_metric: str
    optimized_metric: str | None = None
    bundle_dir: str
    # windows set: `recsys-dpo run` replays the retraining loop (recsys_dpo/retrain.py).
    retrain: Retrain = Retrain()


class Export(Section):
    ckpt: str | None
    evaluation: str | None
    out: str


class Stage(Section):
    """What every entry point reads."""

    seed: Int
    progress: Bool
    paths: Paths


class Prepare(Stage):
    data: Data


class Training(Stage):
    """Both training stages (each entry point refuses the other stage's objective itself)."""

    data: Data
    model: Model
    objective: Objective
    train: Train
    trainer: Trainer
    reference: Reference
    tracking: Tracking
    ckpt_path: str | None
    eval: Eval  # eval.seen also rules the in-training validation and reference_hard mining


class TrainReference(Training):
    mode: Literal["fresh", "continue"]


class TrainPreference(Training):
    reward: Reward = Reward()
    # False where the command trains the reward model itself (`recsys-dpo run`).
    reward_ckpt_required: ClassVar[bool] = True

    @model_validator(mode="after")
    def rlhf_objectives_take_a_reward_model(self) -> TrainPreference:
        """reward.ckpt is set exactly when the objective is one of the RLHF route's (or may be
        unset, where the command trains one), which score the catalog with the live reference
        (no precompute)."""
        from recsys_dpo.training.rlhf_module import RLHF_OBJECTIVES

        name, ckpt = self.objective.name, self.reward.ckpt
        if name in RLHF_OBJECTIVES and ckpt is None and self.reward_ckpt_required:
            raise ValueError(
                f"objective={name} optimises against a reward model: pass reward.ckpt=<a "
                "checkpoint written by recsys-dpo train-reward on this dataset>"
            )
        if name not in RLHF_OBJECTIVES and ckpt is not None:
            raise ValueError(
                f"reward.ckpt={ckpt} objective={name}: only the RLHF objectives "
                f"({', '.join(RLHF_OBJECTIVES)}) read a reward model; unset reward.ckpt"
            )
        if name in RLHF_OBJECTIVES and self.reference.precompute:
            raise ValueError(
                f"objective={name} reference.precompute=true: the RLHF objectives score the "
                "whole catalog with the live reference, set reference.precompute=false"
            )
        return self

    @model_validator(mode="after")
    def kto_scores_the_live_reference(self) -> TrainPreference:
        if self.objective.name == "kto" and self.reference.precompute:
            raise ValueError(
                "objective=kto reference.precompute=true: KTO takes its reference point from "
                "the exact KL to the live reference model, set reference.precompute=false"
            )
        return self


class TrainReward(Training):
    """recsys-dpo train-reward: the pairs and reference of the preference stage."""


class Evaluate(Stage):
    eval: Eval
    reference: Reference


class ExportStage(Stage):
    export: Export
    pipeline: Pipeline


class Run(TrainPreference):
    """recsys-dpo run: the root objective is stage 2's, pipeline.reference.objective stage
    1's, so either one of the wrong stage is refused before the first stage runs."""

    pipeline: Pipeline
    force: Bool
    # An RLHF objective without reward.ckpt: the pipeline trains one (pipeline.reward).
    reward_ckpt_required: ClassVar[bool] = False

    @model_validator(mode="after")
    def objective_is_stage_2s(self) -> Run:
        name = self.objective.name
        if self.objective.stage != "preference":
            raise ValueError(
                f"objective={name} is a {self.objective.stage}-stage loss, but the objective of "
                "recsys-dpo run is the preference (stage 2) objective: pick one (e.g. "
                "objective=dpo) and give stage 1 its loss by "
                f"pipeline.reference.objective.name={name}"
            )
        return self

    @model_validator(mode="after")
    def metrics_are_evaluated(self) -> Run:
        """pipeline.primary_metric (the candidate rule, on test) and pipeline.optimized_metric
        (a sweep's objective, on valid) name metrics the evaluation computes."""
        self.check_metric("pipeline.primary_metric", self.pipeline.primary_metric)
        if self.pipeline.optimized_metric is not None:
            self.check_metric("pipeline.optimized_metric", self.pipeline.optimized_metric)
        return self

    def check_metric(self, key: str, metric: str) -> None:
        what = "the candidate rule" if key == "pipeline.primary_metric" else "the sweep"
        if metric.startswith("ope/"):
            from recsys_dpo.evaluation.ope import ESTIMATORS  # scipy: only when asked

            estimator = metric.removeprefix("ope/").removesuffix("_ctr")
            if estimator not in ESTIMATORS or not metric.endswith("_ctr"):
                raise ValueError(
                    f"{key}={metric}: an off-policy metric is ope/<estimator>_ctr with the "
                    f"estimator one of {', '.join(ESTIMATORS)}"
                )
            if self.eval.ope.enabled is False:
                raise ValueError(f"{key}={metric} needs eval.ope.enabled auto or true")
            return
        name, at, k = metric.rpartition("_at_")
        # impression/ metrics have their own cut-offs; the others are <name>_at_<one of eval.k>,
        # and mrr (within the top max(eval.k) list) only mrr_at_<max(eval.k)>.
        cuts = [max(self.eval.k)] if name == "mrr" else self.eval.k
        if at and not metric.startswith("impression/") and k not in map(str, cuts):
            raise ValueError(
                f"{key}={metric}, eval.k={list(self.eval.k)}: {what} needs a metric the "
                "evaluation computes, its cut-off must be in eval.k"
            )


S = TypeVar("S", bound=BaseModel)

# pydantic's error types -> what the setting must be.
BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
          "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}  # fmt: skip
RULES = {
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "int_parsing": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}


def validate(config: Mapping[str, Any], schema: type[S]) -> S:
    """`config` (the resolved config as plain data) as `schema`'s typed settings; DataError
    with one line naming every bad key otherwise."""
    try:
        return schema.model_validate(config)
    except ValidationError as err:
        faults = [describe(error, config) for error in err.errors()]
        raise DataError("config: " + "; ".join(dict.fromkeys(faults))) from err


def describe(error: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """One pydantic error as `key=value: what is allowed`."""
    key, kind, value = key_of(error["loc"], config), error["type"], error["input"]
    ctx = error.get("ctx", {})
    if kind == "missing":
        return f"{key}: missing"
    if kind == "value_error" and isinstance(value, Mapping):
        return str(ctx["error"])  # a cross-field rule, whose message names its keys
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        key = f"{key}.{ctx['discriminator'].strip(chr(39))}"
        if kind == "union_tag_not_found":
            return f"{key}: missing"
        return f"{key}={ctx['tag']}: must be {ctx['expected_tags'].replace(', ', ' or ')}"
    if kind in BOUNDS:
        name, op = BOUNDS[kind]
        rule = f"must be {op} {ctx[name]:g}"
    elif kind == "literal_error":
        rule = f"must be {ctx['expected']}"
    elif kind == "string_too_short":
        rule = "must not be empty"
    elif kind == "too_short":
        rule = f"must hold at least {ctx['min_length']} value(s)"
    elif kind == "value_error":
        rule = str(ctx["error"])
    else:
        rule = RULES.get(kind, error["msg"][:1].lower() + error["msg"][1:])
    return f"{key}={render(value)}: {rule}"


def key_of(loc: Sequence[str | int], config: Mapping[str, Any]) -> str:
    """The dotted key of a pydantic error location, without the branch tags pydantic puts in
    for a tagged union (`objective.preference.beta` -> `objective.beta`)."""
    key, node = "", config
    for i, part in enumerate(loc):
        if isinstance(part, int):
            key += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
        elif isinstance(node, Mapping) and (part in node or i == len(loc) - 1):
            key = f"{key}.{part}" if key else part
            node = node.get(part)
    return key


def render(value: Any) -> str:
    """A value as it is written in a hydra override."""
    if isinstance(value, str):
        return value or "''"
    return json.dumps(value, default=str)
