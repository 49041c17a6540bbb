"""The training entry points end to end: hydra configs, run directories, resume, MLflow.

Every model x objective runs in-process on a tiny prepared synthetic dataset (config composed
with hydra exactly as the CLI composes it); one real subprocess per stage checks the scripts.
"""

import json
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
import torch
from conftest import CONF, run_pipeline
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from recsys_dpo.data.datamodule import (
    PairDataModule,
    latest_events,
    load_prepared,
    pair_examples,
)
from recsys_dpo.data.synthetic import load_truth, true_utility
from recsys_dpo.errors import DataError
from recsys_dpo.training.reference_module import ReferenceModule, load_model, read_checkpoint
from recsys_dpo.training.run import (
    attach_rejected_weights,
    reference_settings,
    train_preference,
    train_reference,
    use_reference_hard_negatives,
)

MODELS = ("sasrec", "two_tower")
REFERENCE_OBJECTIVES = ("ce", "sampled_softmax", "bce", "bpr")
PREFERENCE_OBJECTIVES = ("dpo", "dpop", "cdpo", "ipo", "hinge", "sdpo", "simpo", "kto", "sft")
DATA = ("data.reader.n_users=200", "data.reader.n_items=60", "data.max_len=20")
SMALL = ("model.dim=16", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
         "+trainer.limit_val_batches=2", "+trainer.num_sanity_val_steps=0",
         "train.batch_size=64", "progress=false", "tracking.enabled=false")  # fmt: skip


def small_model(model: str) -> tuple[str, ...]:
    return ("model.n_layers=1", "model.n_heads=1") if model == "sasrec" else ("model.hidden=[16]",)


def negatives(objective: str) -> tuple[str, ...]:
    return () if objective == "ce" else ("objective.num_negatives=8",)


def config(name: str, artifacts: Path, *overrides: str) -> DictConfig:
    """The config the CLI would compose for `overrides`."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=[f"paths.artifacts={artifacts}", *DATA,
                                                   *overrides])  # fmt: skip


def result(run: Path) -> dict:
    return json.loads((run / "result.json").read_text())


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """A tiny prepared synthetic dataset, made once by the prepare CLI."""
    root = tmp_path_factory.mktemp("artifacts")
    done = run_pipeline("prepare.py", f"paths.artifacts={root}", "progress=false", *DATA, cwd=root)
    assert done.returncode == 0, done.stderr
    return root


@pytest.fixture(scope="module")
def references(artifacts) -> dict[str, Path]:
    """A full-softmax reference per model, trained a few epochs (the preference runs' start)."""
    ckpts = {}
    for model in MODELS:
        cfg = config("train_reference", artifacts, f"model={model}", *small_model(model),
                     "model.dim=16", "trainer.max_epochs=3", "train.batch_size=64",
                     "train.lr=1e-2", "progress=false", "tracking.enabled=false",
                     "paths.runs=" + str(artifacts / "refs"))  # fmt: skip
        ckpts[model] = Path(result(train_reference(cfg))["last_ckpt"])
    return ckpts


@pytest.mark.parametrize("objective", REFERENCE_OBJECTIVES)
@pytest.mark.parametrize("model", MODELS)
def test_every_reference_objective_trains(artifacts, model, objective):
    cfg = config("train_reference", artifacts, f"model={model}", f"objective={objective}",
                 *small_model(model), *negatives(objective), *SMALL)  # fmt: skip
    run = train_reference(cfg)
    assert run.parent == artifacts / "runs" / "reference"
    assert run.name.startswith(f"{model}-{objective}-")
    out = result(run)
    assert Path(out["best_ckpt"]).is_file() and Path(out["last_ckpt"]).is_file()
    assert "=" not in Path(out["best_ckpt"]).name  # usable as a hydra override value unquoted
    assert 0.0 <= out["val/ndcg_at_10"] <= 1.0 and out["seed"] == 0
    saved = read_checkpoint(out["last_ckpt"])
    assert saved["hyper_parameters"]["loss"] == objective
    assert load_model(out["best_ckpt"]).name == model


@pytest.mark.parametrize("objective", PREFERENCE_OBJECTIVES)
@pytest.mark.parametrize("model", MODELS)
def test_every_preference_objective_trains(artifacts, references, model, objective):
    cfg = config("config", artifacts, f"reference.ckpt={references[model]}",
                 f"objective={objective}", *SMALL)  # fmt: skip
    out = result(train_preference(cfg))
    saved = read_checkpoint(out["last_ckpt"])
    assert saved["hyper_parameters"]["objective"] == objective
    assert saved["model"]["name"] == model
    policy, reference = load_model(out["last_ckpt"]), load_model(references[model])
    moved = [not torch.equal(policy.state_dict()[k], v) for k, v in reference.state_dict().items()]
    assert any(moved), "the policy did not train"


def test_precomputed_reference_trains_the_same_policy(artifacts, references):
    """precompute=true scores the pairs once; with dropout off the update is the same."""
    runs = []
    for precompute in ("false", "true"):
        cfg = config("config", artifacts, f"reference.ckpt={references['two_tower']}",
                     f"reference.precompute={precompute}", *SMALL,
                     f"paths.runs={artifacts / ('pre-' + precompute)}")  # fmt: skip
        runs.append(load_model(result(train_preference(cfg))["last_ckpt"]).state_dict())
    assert all(torch.allclose(runs[0][k], runs[1][k], atol=1e-5) for k in runs[0])


@pytest.mark.parametrize(
    ("script", "overrides", "message"),
    [("train_reference", ["objective=dpo"], "preference-stage objective"),
     ("train_reference", ["objective=bce", "objective.num_negatives=500"], "num_negatives"),
     ("config", ["objective=bpr", "reference.ckpt=x.ckpt"], "reference-stage objective"),
     ("config", [], "reference.ckpt is not set"),
     ("config", ["reference.ckpt=/no/such.ckpt"], "does not exist"),
     ("config", ["objective.beta=-1", "reference.ckpt=REF"], "beta must be > 0")],
)  # fmt: skip
def test_bad_settings_fail_before_training(artifacts, references, script, overrides, message):
    overrides = [o.replace("REF", str(references["sasrec"])) for o in overrides]
    cfg = config(script, artifacts, *overrides, *SMALL)
    stage = train_reference if script == "train_reference" else train_preference
    with pytest.raises(DataError, match=message):
        stage(cfg)


def test_reference_hard_pairs_train_and_exclude_the_users_positives(artifacts, references):
    cfg = config("config", artifacts, f"reference.ckpt={references['sasrec']}",
                 "reference.hard_negatives=3", "train.max_pairs_per_user=2", *SMALL)  # fmt: skip
    assert result(train_preference(cfg))["last_ckpt"]
    data = PairDataModule(artifacts / "prepared" / "synthetic", max_len=20,
                          max_pairs_per_user=2)  # fmt: skip
    data.setup()
    use_reference_hard_negatives(data, load_model(references["sasrec"]), 3, 0, progress=False)
    positives = {u: set(items) for u, items in data.train_sequences.iter_rows()}
    rejected, users = data.train_set.columns["rejected"], data.train_set.columns["user_idx"]
    assert rejected.shape == (len(users), 3)
    for user, row in zip(users.tolist(), rejected.tolist(), strict=True):
        assert not positives[user] & set(row) and 0 not in row
    bad = config("config", artifacts, f"reference.ckpt={references['sasrec']}",
                 "reference.hard_negatives=500", *SMALL)  # fmt: skip
    with pytest.raises(DataError, match="reference.hard_negatives=500: .*leaves no room"):
        train_preference(bad)


def test_label_smoothing_auto_is_the_train_false_negative_share_of_band_negatives(
    artifacts, references
):
    """cdpo with label_smoothing=auto, negatives drawn from the reference's ranks 3..12 under
    eval.seen=keep (so later train positives can be drawn): the rate trained with is the share
    of the mined rejected items that the user clicks in a later train event, brute force."""
    ref = references["sasrec"]
    cfg = config("config", artifacts, f"reference.ckpt={ref}", "objective=cdpo",
                 "objective.label_smoothing=auto", "reference.hard_negatives=4",
                 "reference.hard_negatives_band=[3,12]", "eval.seen=keep",
                 "train.max_pairs_per_user=2", *SMALL)  # fmt: skip
    trained = read_checkpoint(result(train_preference(cfg))["last_ckpt"])
    rate = trained["hyper_parameters"]["label_smoothing"]

    data = PairDataModule(artifacts / "prepared" / "synthetic", max_len=20,
                          max_pairs_per_user=2, seen="keep")  # fmt: skip
    data.setup()
    use_reference_hard_negatives(data, load_model(ref), 4, 0, progress=False, band=(3, 12),
                                 seed=cfg.seed)  # fmt: skip
    pairs = latest_events(data.dataset.pairs("train"), 2)
    clicks = data.dataset.events("train").filter(pl.col("clicked"))
    last = {(u, i): (t, q) for u, i, t, q in clicks.select(
        "user_idx", "item_idx", "timestamp", "seq").sort("timestamp", "seq").iter_rows()}
    hits = real = 0
    for row, rejected in zip(pairs.iter_rows(named=True),
                             data.train_set.columns["rejected"].tolist(), strict=True):
        for item in rejected:
            real += item != 0
            when = last.get((row["user_idx"], item))
            hits += when is not None and when > (row["timestamp"], row["seq"])
    assert 0 < hits < real  # the measurement is not trivially 0 or 1 here
    assert rate == pytest.approx(hits / real)


def test_rejected_weights_match_a_brute_force_softmax_and_horizon_zero_is_plain_dpo(
    artifacts, references
):
    """objective.rejected_weight_horizon: the weights attached to the mined pairs are
    (1 - pi_ref)^H with pi_ref the reference's softmax over the items neither chosen nor a
    train positive of the user, brute force per row; and H = 0 trains bit for bit as plain
    DPO (same final weights)."""
    ref = references["sasrec"]
    common = (f"reference.ckpt={ref}", "reference.hard_negatives=4", "trainer.deterministic=true",
              "train.max_pairs_per_user=2", *SMALL)  # fmt: skip
    runs = [read_checkpoint(result(train_preference(config("config", artifacts, *common,
                                                           *extra)))["last_ckpt"])
            for extra in ((), ("+objective.rejected_weight_horizon=0",))]  # fmt: skip
    assert runs[1]["hyper_parameters"] == runs[0]["hyper_parameters"]
    assert all(torch.equal(runs[0]["state_dict"][k], runs[1]["state_dict"][k])
               for k in runs[0]["state_dict"])  # fmt: skip

    data = PairDataModule(artifacts / "prepared" / "synthetic", max_len=20, max_pairs_per_user=2)
    data.setup()
    model = load_model(ref, dropout=0.0)
    use_reference_hard_negatives(data, model, 4, 0, progress=False)
    attach_rejected_weights(data, model, 3.0, batch_size=64)
    rows = data.train_set
    positives = {u: set(items) for u, items in data.train_sequences.select(
        "user_idx", "items").iter_rows()}  # fmt: skip
    weights = rows.columns["rejected_weight"]
    assert weights.shape == rows.columns["rejected"].shape and (weights < 1).any()
    for r in range(0, len(rows), max(1, len(rows) // 7)):
        batch = rows.__getitems__([r])
        with torch.no_grad():
            scores = model.full_scores(batch)[0].double()
        gone = positives[int(batch["user_idx"][0])] | {int(batch["chosen"][0])}
        keep = [i for i in range(1, len(scores)) if i not in gone]
        z = torch.exp(scores[keep]).sum()
        for item, weight in zip(batch["rejected"][0].tolist(), weights[r].tolist(), strict=True):
            pi = float(torch.exp(scores[item]) / z)
            assert weight == pytest.approx((1 - pi) ** 3, rel=1e-4)


def test_reference_of_another_dataset_is_refused(artifacts, references, tmp_path):
    saved = read_checkpoint(references["sasrec"])
    saved["model"]["config"]["n_items"] += 5
    other = tmp_path / "other.ckpt"
    torch.save(saved, other)
    cfg = config("config", artifacts, f"reference.ckpt={other}", *SMALL)
    with pytest.raises(DataError, match=r"with n_items=\d+, but .* has n_items=\d+"):
        train_preference(cfg)


def test_resumed_run_ends_with_the_uninterrupted_weights(artifacts):
    common = ("objective=bce", "objective.num_negatives=8", "trainer.deterministic=true",
              *small_model("sasrec"), "model.dim=16", "train.batch_size=64", "progress=false",
              "tracking.enabled=false")  # fmt: skip
    straight = config("train_reference", artifacts, *common, "trainer.max_epochs=2",
                      f"paths.runs={artifacts / 'straight'}")  # fmt: skip
    first = config("train_reference", artifacts, *common, "trainer.max_epochs=1",
                   f"paths.runs={artifacts / 'resumed'}")  # fmt: skip
    last = Path(result(train_reference(first))["last_ckpt"])
    resumed = config("train_reference", artifacts, *common, "trainer.max_epochs=2",
                     f"ckpt_path={last}", f"paths.runs={artifacts / 'resumed'}")  # fmt: skip
    a = read_checkpoint(result(train_reference(straight))["last_ckpt"])
    b = read_checkpoint(result(train_reference(resumed))["last_ckpt"])
    assert b["epoch"] == a["epoch"] == 1 and b["global_step"] == a["global_step"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    one_epoch = read_checkpoint(last)["state_dict"]
    assert any(not torch.equal(one_epoch[k], a["state_dict"][k]) for k in one_epoch)


@pytest.mark.parametrize("model", MODELS)
def test_ddp_strategy_with_bf16_trains_on_two_cpu_processes(artifacts, references, model, tmp_path):
    """trainer=ddp as on GPUs, here on 2 CPU processes (gloo) in bf16 autocast: the launcher
    re-runs the script per rank, the frozen reference stays outside DDP's wrapped module."""
    done = run_pipeline("train_preference.py", f"paths.artifacts={artifacts}", *DATA,
                        f"reference.ckpt={references[model]}", "trainer=ddp",
                        "trainer.accelerator=cpu", "trainer.devices=2",
                        "trainer.precision=bf16-mixed", "trainer.max_epochs=1", "progress=false",
                        "tracking.enabled=false", f"paths.runs={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    [run] = (tmp_path / "preference").iterdir()
    policy, reference = load_model(result(run)["last_ckpt"]), load_model(references[model])
    assert all(torch.isfinite(v).all() for v in policy.state_dict().values())
    assert any(not torch.equal(policy.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_mlflow_records_params_and_metrics(artifacts, references, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config("config", artifacts, f"reference.ckpt={references['sasrec']}", *SMALL,
                 "tracking.enabled=true", f"tracking.uri={uri}", "tracking.experiment=t",
                 "trainer.log_every_n_steps=1", "seed=3")  # fmt: skip
    out = result(train_preference(cfg))
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert run.info.run_id == out["mlflow_run_id"]
    assert run.data.params["seed"] == "3"
    assert run.data.params["objective/name"] == "dpo"
    assert run.data.params["reference/ckpt"] == str(references["sasrec"])
    # The metric's one spelling, kept by MLflow as it is in checkpoints and metrics.json.
    assert {"val/ndcg_at_10", "rewards/margins", "val/rewards/margins"} <= set(run.data.metrics)


def test_continue_mode_starts_from_the_reference_with_its_own_loss(artifacts, references):
    cfg = config("train_reference", artifacts, "mode=continue",
                 f"reference.ckpt={references['two_tower']}", *SMALL)  # fmt: skip
    reference = read_checkpoint(references["two_tower"])
    settings = reference_settings(cfg, load_prepared(cfg.paths.prepared))
    assert settings["loss"] == reference["hyper_parameters"]["loss"] == "ce"
    sizes = {k: reference["model"]["config"][k] for k in ("n_items", "n_users")}
    start = ReferenceModule(**settings, **sizes).model.state_dict()
    ref = load_model(references["two_tower"]).state_dict()
    assert all(torch.equal(start[k], ref[k]) for k in ref)
    run = train_reference(cfg)
    assert run.name.startswith("two_tower-ce-continue-")
    after = read_checkpoint(result(run)["last_ckpt"])
    assert after["hyper_parameters"]["init_from"] == str(references["two_tower"])
    trained = load_model(result(run)["last_ckpt"]).state_dict()
    assert any(not torch.equal(trained[k], ref[k]) for k in ref)


# A log whose logging policy over-exposes popular items that users like less than the rest
# (popularity_bias < 0): a reference trained on clicks inherits that exposure bias, while
# clicked vs shown-not-clicked pairs of one request cancel exposure. Impression pairs only.
BIASED = ("data.reader.n_users=500", "data.reader.n_items=100", "data.max_len=20",
          "+data.reader.popularity_bias=-0.5", "~data.pairs.next_item")  # fmt: skip


@pytest.fixture(scope="module")
def biased(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("biased")
    done = run_pipeline("prepare.py", f"paths.artifacts={root}", "progress=false", *BIASED,
                        cwd=root)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return root


def heldout_true_agreement(artifacts: Path, ckpt: Path) -> float:
    """Over every (chosen, rejected) item pair of the valid and test impression pairs: the
    fraction the model orders as the true utility does (ties count as disagreement)."""
    prepared = artifacts / "prepared" / "synthetic"
    pairs = pl.concat([pl.read_parquet(prepared / f"pairs_{s}.parquet") for s in ("valid", "test")])
    rows = pair_examples(pairs, max_len=20, max_negatives=None)
    batch = rows.__getitems__(list(range(len(rows))))
    with torch.no_grad():
        scores = load_model(ckpt).full_scores(batch).double()
    real = batch["rejected"] != 0
    chosen_score = scores.gather(1, batch["chosen"][:, None])
    model_margin = (chosen_score - scores.gather(1, batch["rejected"]))[real]
    users = pl.read_parquet(prepared / "vocab_users.parquet").sort("user_idx")["user_id"]
    items = pl.read_parquet(prepared / "vocab_items.parquet").sort("item_idx")["item_id"]
    user_ids = users.gather(batch["user_idx"].unsqueeze(1).expand_as(real)[real].numpy()).to_list()
    chosen = items.gather(batch["chosen"].unsqueeze(1).expand_as(real)[real].numpy() - 1)
    rejected = items.gather(batch["rejected"][real].numpy() - 1)
    truth = load_truth(artifacts / "raw" / "synthetic")
    true_margin = (true_utility(truth, user_ids, chosen.to_list())
                   - true_utility(truth, user_ids, rejected.to_list()))  # fmt: skip
    agree = torch.sign(model_margin).numpy() == np.sign(true_margin)
    return float(agree.mean())


@pytest.mark.parametrize("model", MODELS)
def test_dpo_raises_agreement_with_the_true_preferences(biased, model):
    ref_cfg = config("train_reference", biased, f"model={model}", *small_model(model), *BIASED,
                     "model.dim=16", "trainer.max_epochs=3", "train.batch_size=64",
                     "train.lr=1e-2", "progress=false", "tracking.enabled=false")  # fmt: skip
    reference = Path(result(train_reference(ref_cfg))["last_ckpt"])
    cfg = config("config", biased, f"reference.ckpt={reference}", *BIASED, "objective.beta=0.1",
                 "trainer.max_epochs=3", "train.batch_size=64", "train.lr=1e-3",
                 "progress=false", "tracking.enabled=false")  # fmt: skip
    policy = Path(result(train_preference(cfg))["last_ckpt"])
    before = heldout_true_agreement(biased, reference)
    after = heldout_true_agreement(biased, policy)
    assert after > before + 0.03, (before, after)


@pytest.mark.slow
def test_cli_reference_and_preference(artifacts, tmp_path):
    """The documented commands, as real subprocesses (the only two in this file)."""
    small = [*SMALL, f"paths.artifacts={artifacts}", *DATA, f"paths.runs={tmp_path}"]
    done = run_pipeline("train_reference.py", "model=two_tower", "objective=bpr",
                        "objective.num_negatives=8", "model.hidden=[16]", *small, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    [run] = (tmp_path / "reference").iterdir()
    ckpt = result(run)["last_ckpt"]
    done = run_pipeline("train_preference.py", f"reference.ckpt={ckpt}", "objective=sdpo",
                        "objective.beta=0.1", *small, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    [run] = (tmp_path / "preference").iterdir()
    assert run.name.startswith("two_tower-sdpo-") and (run / "last.ckpt").is_file()
    bad = run_pipeline("train_reference.py", "objective=dpo", *small, cwd=tmp_path)
    assert bad.returncode == 2
    assert "preference-stage objective" in bad.stderr and "Traceback" not in bad.stderr
