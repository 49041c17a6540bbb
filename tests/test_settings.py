"""The config schema (recsys_dpo.settings) on configs composed exactly as the CLIs compose them:
every preset passes, and each bad setting is refused with one line naming the key, the value
and what is allowed. tests/test_entry_points.py runs a few of these through the real CLIs."""

import pytest
from conftest import CONF
from hydra import compose, initialize_config_dir

from recsys_dpo.errors import DataError
from recsys_dpo.settings import (
    Evaluate,
    ExportStage,
    Prepare,
    Run,
    TrainPreference,
    TrainReference,
    validate,
)
from recsys_dpo.stage import plain

# Each entry point's root config and schema.
STAGES = {"prepare": ("config", Prepare), "train_reference": ("train_reference", TrainReference),
          "train_preference": ("config", TrainPreference), "evaluate": ("config", Evaluate),
          "export": ("run", ExportStage), "run": ("run", Run)}  # fmt: skip
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def check(stage: str, *overrides: str) -> None:
    config_name, schema = STAGES[stage]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides))
    validate(plain(cfg), schema)


@pytest.mark.parametrize("stage", STAGES)
def test_the_default_config_passes(stage):
    check(stage)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_passes(preset):
    check("run", f"experiment={preset}")


@pytest.mark.parametrize(
    ("overrides", "two_tower"),
    [(("model=two_tower",), True), (("model=two_tower", "objective=bpr"), False)],
)
def test_other_models_and_objectives_pass(overrides, two_tower):
    check("run" if two_tower else "train_reference", *overrides)


BAD = [
    # stage, overrides, the message (exact, after "config: "); ++ sets a key that some configs
    # leave to its default
    ("train_reference", ["train.k=0"], "train.k=0: must be >= 1"),
    ("train_reference", ["train.batch_size=0"], "train.batch_size=0: must be >= 1"),
    ("train_preference", ["train.batch_size=-3"], "train.batch_size=-3: must be >= 1"),
    ("train_reference", ["train.batch_size=2.5"], "train.batch_size=2.5: must be an integer"),
    ("train_reference", ["train.batch_size=true"], "train.batch_size=true: must be an integer"),
    ("train_reference", ["train.lr=0"], "train.lr=0: must be > 0"),
    ("train_reference", ["train.lr=abc"], "train.lr=abc: must be a number"),
    ("train_reference", ["train.weight_decay=-0.1"], "train.weight_decay=-0.1: must be >= 0"),
    ("train_reference", ["trainer.max_epochs=0"], "trainer.max_epochs=0: must be >= 1"),
    ("train_reference", ["train.num_workers=-1"], "train.num_workers=-1: must be >= 0"),
    ("train_preference", ["train.max_negatives=0"], "train.max_negatives=0: must be >= 1"),
    ("train_preference", ["train.max_pairs_per_user=0"],
     "train.max_pairs_per_user=0: must be >= 1"),
    ("train_preference", ["++train.early_stopping_patience=0"],
     "train.early_stopping_patience=0: must be >= 1"),
    ("train_preference", ["++train.ckpt_every_n_steps=0"],
     "train.ckpt_every_n_steps=0: must be >= 1"),
    ("train_preference", ["objective.beta=0"], "objective.beta=0: must be > 0"),
    ("train_preference", ["objective=cdpo", "objective.label_smoothing=0.5"],
     "objective.label_smoothing=0.5: must be a rate in [0, 0.5) or auto"),
    ("train_preference", ["objective=cdpo", "objective.label_smoothing=-0.1"],
     "objective.label_smoothing=-0.1: must be a rate in [0, 0.5) or auto"),
    ("train_preference", ["objective=cdpo", "objective.label_smoothing=often"],
     "objective.label_smoothing=often: must be a rate in [0, 0.5) or auto"),
    ("train_preference", ["objective.sft_alpha=-1"], "objective.sft_alpha=-1: must be >= 0"),
    ("train_preference", ["objective=sft", "objective.sft_alpha=0"],
     "objective=sft objective.sft_alpha=0: the SFT baseline trains the SFT term alone, set "
     "sft_alpha > 0"),
    ("train_preference", ["+objective.gamma=0.5"],
     "objective=dpo: objective 'dpo' does not use {'gamma': 0.5}; it takes {'beta'}"),
    ("train_preference", ["objective=kto", "reference.precompute=true"],
     "objective=kto reference.precompute=true: KTO takes its reference point from the exact KL "
     "to the live reference model, set reference.precompute=false"),
    ("train_preference", ["reference.hard_negatives=-1"],
     "reference.hard_negatives=-1: must be >= 0"),
    ("train_preference", ["reference.hard_negatives_skip=-1"],
     "reference.hard_negatives_skip=-1: must be >= 0"),
    ("train_preference", ["objective.name=dpx"],
     "objective.name=dpx: must be one of dpo, dpop, cdpo, robust, ipo, hinge, sdpo, simpo, kto, "
     "sft, rlhf_exact, rlhf_pg, rloo"),
    ("train_preference", ["objective=rloo", "objective.k=1", "reward.ckpt=r.ckpt"],
     "objective=rloo: rloo needs k >= 2 samples per row (a leave-one-out baseline), got 1"),
    ("train_preference", ["objective=rlhf_pg", "+objective.gamma=0.5", "reward.ckpt=r.ckpt"],
     "objective=rlhf_pg: objective 'rlhf_pg' does not use {'gamma': 0.5}; it takes beta"),
    ("train_preference", ["objective=rloo", "+objective.rejected_weight_horizon=2",
                          "reward.ckpt=r.ckpt"],
     "objective=rloo objective.rejected_weight_horizon=2.0: per-pair weights need a pairwise "
     "loss; rloo is an RLHF objective"),
    ("train_preference", ["+objective.k=4"],
     "objective=dpo: k=4 is rloo's number of samples per row"),
    ("train_preference", ["objective=rlhf_exact"],
     "objective=rlhf_exact optimises against a reward model: pass reward.ckpt=<a checkpoint "
     "written by recsys-dpo train-reward on this dataset>"),
    ("train_preference", ["objective=rlhf_exact", "reward.ckpt=r.ckpt",
                          "reference.precompute=true"],
     "objective=rlhf_exact reference.precompute=true: the RLHF objectives score the whole "
     "catalog with the live reference, set reference.precompute=false"),
    ("train_preference", ["objective=dpop", "objective.lambda_=-1.0"],
     "objective.lambda_=-1.0: must be >= 0"),
    ("train_preference", ["+objective.label_smoothing=auto"],
     "objective=dpo: objective 'dpo' does not use {'label_smoothing': 'auto'}; it takes {'beta'}"),
    ("train_preference", ["reference.hard_negatives=4", "reference.hard_negatives_band=[5,3]"],
     "reference.hard_negatives_band=[5,3]: need lo <= hi"),
    ("train_preference", ["reference.hard_negatives=4", "reference.hard_negatives_band=[1,3]"],
     "reference.hard_negatives_band=[1,3] reference.hard_negatives=4: need 1 <= hard_negatives "
     "<= hi - lo + 1 = 3 negatives drawn from it"),
    ("train_preference", ["reference.hard_negatives_band=[1,3]"],
     "reference.hard_negatives_band=[1,3] reference.hard_negatives=0: need 1 <= hard_negatives "
     "<= hi - lo + 1 = 3 negatives drawn from it"),
    ("train_preference", ["reference.hard_negatives=2", "reference.hard_negatives_skip=1",
                          "reference.hard_negatives_band=[1,3]"],
     "reference.hard_negatives_band=[1,3] reference.hard_negatives_skip=1: the band replaces "
     "the skip (skip s, N negatives is the band [s+1, s+N]), set one of them"),
    ("train_reference", ["mode=resume"], "mode=resume: must be 'fresh' or 'continue'"),
    ("train_reference", ["objective.stage=other"],
     "objective.stage=other: must be 'reference' or 'preference' or 'reward'"),
    ("train_reference", ["objective.name=dpo"],
     "objective.name=dpo: must be one of ce, sampled_softmax, bce, gbce, bpr, rating_bce"),
    ("train_reference", ["objective=bpr", "objective.num_negatives=0"],
     "objective.num_negatives=0: must be >= 1"),
    ("train_reference", ["model.n_heads=3"],
     "model.dim=64, model.n_heads=3: dim must be a multiple of n_heads"),
    ("train_reference", ["model.dropout=1.0"], "model.dropout=1.0: must be < 1"),
    ("train_reference", ["model.name=gru"], "model.name=gru: must be 'sasrec' or 'two_tower' or 'mf'"),
    ("train_reference", ["tracking.enabled=maybe"],
     "tracking.enabled=maybe: must be true or false"),
    ("prepare", ["data.max_len=0"], "data.max_len=0: must be >= 1"),
    ("prepare", ["data.n_buckets=0"], "data.n_buckets=0: must be >= 1"),
    ("prepare", ["data.split.kind=random"],
     "data.split.kind=random: must be one of loo, temporal, window, mcar"),
    ("prepare", ["data.split.kind=window"], "data.split.kind=window: data.split.train_end (the "
     "first period after the train window) is missing"),
    ("prepare", ["data.split.kind=window", "+data.split.train_end=2", "+data.split.period=week"],
     "data.split.period=week: must be one of day, month"),
    ("prepare", ["data.split.kind=window", "+data.split.train_end=0"],
     "data.split.train_end=0: must be >= 1"),
    ("prepare", ["data.pair_splits=[train,dev]"],
     "data.pair_splits[1]=dev: must be one of train, valid, test"),
    ("prepare", ["++data.validation.non_finite=ignore"],
     "data.validation.non_finite=ignore: must be one of error, drop"),
    ("evaluate", ["++eval.seen=hide"], "eval.seen=hide: must be one of remove, keep"),
    ("evaluate", ["eval.batch_size=0"], "eval.batch_size=0: must be >= 1"),
    ("evaluate", ["eval.k=[10,0]"], "eval.k[1]=0: must be >= 1"),
    ("evaluate", ["eval.k=[]"], "eval.k=[]: must hold at least 1 value(s)"),
    ("evaluate", ["eval.split=train"], "eval.split=train: must be one of valid, test"),
    ("evaluate", ["eval.index=ivf"], "eval.index=ivf: must be one of flat, ivf_flat, ivf_pq, hnsw"),
    ("evaluate", ["eval.n_resamples=0"], "eval.n_resamples=0: must be >= 1"),
    ("evaluate", ["eval.ci=1"], "eval.ci=1: must be < 1"),
    ("evaluate", ["eval.ci=0"], "eval.ci=0: must be > 0"),
    ("evaluate", ["eval.head_fraction=1.5"], "eval.head_fraction=1.5: must be <= 1"),
    ("evaluate", ["eval.nprobe=0"], "eval.nprobe=0: must be >= 1"),
    ("evaluate", ["eval.kl_chunk=0"], "eval.kl_chunk=0: must be >= 1"),
    ("run", ["objective=bce"],
     "objective=bce is a reference-stage loss, but the objective of recsys-dpo run is the "
     "preference (stage 2) objective: pick one (e.g. objective=dpo) and give stage 1 its loss "
     "by pipeline.reference.objective.name=bce"),
    ("run", ["pipeline.reference.objective.stage=preference"],
     "pipeline.reference.objective.stage=preference: must be 'reference'"),
    ("run", ["pipeline.reference.objective.name=dpo"],
     "pipeline.reference.objective.name=dpo: must be one of ce, sampled_softmax, bce, gbce, bpr, "
     "rating_bce"),
    ("run", ["pipeline.reference.max_epochs=0"], "pipeline.reference.max_epochs=0: must be >= 1"),
    ("run", ["pipeline.reference.lr=-1"], "pipeline.reference.lr=-1: must be > 0"),
    ("run", ["pipeline.primary_metric=ndcg_at_50"],
     "pipeline.primary_metric=ndcg_at_50, eval.k=[10, 20]: the candidate rule needs a metric the "
     "evaluation computes, its cut-off must be in eval.k"),
    ("run", ["pipeline.optimized_metric=ndcg_at_50"],
     "pipeline.optimized_metric=ndcg_at_50, eval.k=[10, 20]: the sweep needs a metric the "
     "evaluation computes, its cut-off must be in eval.k"),
    ("run", ["train.lr_schedule=linear"],
     "train.lr_schedule=linear: must be one of constant, cosine"),
    ("run", ["train.warmup_steps=-1"], "train.warmup_steps=-1: must be >= 0"),
    ("run", ["pipeline.primary_metric=ope/bogus_ctr"],
     "pipeline.primary_metric=ope/bogus_ctr: an off-policy metric is ope/<estimator>_ctr with "
     "the estimator one of ips, snips, direct_method, doubly_robust, pseudo_inverse"),
    ("run", ["pipeline.primary_metric=ope/snips_ctr", "eval.ope.enabled=false"],
     "pipeline.primary_metric=ope/snips_ctr needs eval.ope.enabled auto or true"),
    ("evaluate", ["eval.ope.policy=softmax"],
     "eval.ope.policy=softmax: must be one of epsilon_greedy, plackett_luce"),
    ("evaluate", ["eval.ope.epsilon=2.0"], "eval.ope.epsilon=2.0: must be <= 1"),
    ("run", ["tracking.uri=''"], "tracking.uri='': must not be empty"),
    ("run", ["force=1"], "force=1: must be true or false"),
]  # fmt: skip


@pytest.mark.parametrize(("stage", "overrides", "message"), BAD,
                         ids=[" ".join(o) for _, o, _ in BAD])  # fmt: skip
def test_a_bad_setting_is_refused_with_one_line(stage, overrides, message):
    with pytest.raises(DataError) as caught:
        check(stage, *overrides)
    assert str(caught.value) == f"config: {message}"


def test_an_off_policy_primary_metric_passes():
    check("run", "pipeline.primary_metric=ope/snips_ctr")


def test_every_bad_key_is_named_in_one_line():
    with pytest.raises(DataError) as caught:
        check("run", "train.k=0", "train.batch_size=0", "eval.batch_size=0", "eval.k=[0,10]")
    assert str(caught.value) == ("config: train.batch_size=0: must be >= 1; train.k=0: must be "
                                 ">= 1; eval.k[0]=0: must be >= 1; eval.batch_size=0: must be "
                                 ">= 1")  # fmt: skip


def test_a_missing_key_is_named():
    with pytest.raises(DataError, match=r"^config: train\.k: missing$"):
        check("train_reference", "~train.k")
