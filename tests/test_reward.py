"""The reward-model stage: the Bradley-Terry loss and its metrics against closed forms and
brute force, then `recsys-dpo train-reward` on a tiny synthetic log whose true utilities are
known."""

import math
from pathlib import Path

import mlflow
import polars as pl
import pytest
import torch
from conftest import bad_input_message, run_pipeline
from test_train_cli import BIASED, config, result, small_model

from recsys_dpo import api
from recsys_dpo.commands import prepare
from recsys_dpo.data.datamodule import pair_examples
from recsys_dpo.data.synthetic import true_preference_accuracy
from recsys_dpo.errors import DataError
from recsys_dpo.objectives.preference import dpo
from recsys_dpo.objectives.reward import (
    bradley_terry,
    calibration_bins,
    expected_calibration_error,
    mean_margin,
    pair_accuracy,
)
from recsys_dpo.training.preference_module import pair_logps
from recsys_dpo.training.reference_module import load_model, read_checkpoint
from recsys_dpo.training.run import preference_pairs, train_reference, train_reward


def test_bradley_terry_is_the_mean_negative_log_likelihood_over_real_pairs():
    r_chosen = torch.tensor([1.0, 0.0])
    r_rejected = torch.tensor([[0.0, 3.0], [2.0, -7.0]])
    mask = torch.tensor([[True, True], [True, False]])
    nll = lambda m: math.log1p(math.exp(-m))  # noqa: E731  -log sigma(m)
    row_0, row_1 = (nll(1.0) + nll(-2.0)) / 2, nll(-2.0)
    assert bradley_terry(r_chosen, r_rejected, mask).item() == pytest.approx((row_0 + row_1) / 2)
    weight = torch.tensor([3.0, 1.0])
    assert bradley_terry(r_chosen, r_rejected, mask, weight).item() == pytest.approx(
        (3 * row_0 + row_1) / 4
    )


@pytest.mark.parametrize("per_pair", [False, True])
def test_bradley_terry_is_dpo_at_beta_1_against_a_zero_reference(per_pair):
    """The reward model's likelihood is DPO's with the reference's log-ratio taken off: one
    Bradley-Terry model of the same pairs, weighted the same way."""
    gen = torch.Generator().manual_seed(0)
    r_chosen, r_rejected = torch.randn(6, generator=gen), torch.randn(6, 4, generator=gen)
    mask = torch.rand(6, 4, generator=gen) > 0.4
    mask[:, 0] = True
    shape = (6, 4) if per_pair else (6,)
    weight = torch.rand(shape, generator=gen)
    zero = torch.zeros(6)
    expected = dpo(r_chosen, r_rejected, zero, zero[:, None].expand(6, 4), mask, weight, beta=1.0)
    assert torch.allclose(bradley_terry(r_chosen, r_rejected, mask, weight), expected.loss)


def test_bradley_terry_has_its_closed_form_gradient():
    """d l / d r_c = -(1 - sigma(m)) = -sigma(-m) for one pair."""
    r_chosen = torch.tensor([0.3], requires_grad=True)
    bradley_terry(r_chosen, torch.tensor([[1.1]])).backward()
    assert r_chosen.grad.item() == pytest.approx(-torch.sigmoid(torch.tensor(0.8)).item())


def test_accuracy_and_margin_count_real_pairs_only_and_ties_as_wrong():
    r_chosen = torch.tensor([1.0, 2.0, 0.0])
    r_rejected = torch.tensor([[0.0, 1.0], [2.0, 5.0], [-1.0, 9.0]])
    mask = torch.tensor([[True, True], [True, False], [True, False]])
    # Real pairs: 1>0 right, 1=1 a tie (wrong), 2=2 a tie (wrong), 0>-1 right.
    assert pair_accuracy(r_chosen, r_rejected, mask).item() == pytest.approx(2 / 4)
    assert mean_margin(r_chosen, r_rejected, mask).item() == pytest.approx((1 + 0 + 0 + 1) / 4)
    assert pair_accuracy(torch.zeros(3), torch.zeros(3, 2)).item() == 0.0  # a constant reward


def brute_force_ece(margins: list[float], n_bins: int = 10) -> float:
    """Each pair in both orders, (sigma(m), 1) and (sigma(-m), 0); 10 equal bins, last closed."""
    forecasts = [(1 / (1 + math.exp(-m)), 1.0) for m in margins]
    forecasts += [(1 / (1 + math.exp(m)), 0.0) for m in margins]
    total = 0.0
    for b in range(n_bins):
        inside = [(p, y) for p, y in forecasts if min(int(p * n_bins), n_bins - 1) == b]
        if inside:
            total += abs(sum(p for p, _ in inside) - sum(y for _, y in inside))
    return total / len(forecasts)


def test_ece_matches_brute_force_and_adds_up_over_batches():
    gen = torch.Generator().manual_seed(1)
    r_chosen, r_rejected = 2 * torch.randn(40, generator=gen), torch.randn(40, 3, generator=gen)
    mask = torch.rand(40, 3, generator=gen) > 0.3
    margins = (r_chosen[:, None] - r_rejected)[mask].tolist()
    bins = calibration_bins(r_chosen, r_rejected, mask)
    assert expected_calibration_error(bins).item() == pytest.approx(brute_force_ece(margins))
    halves = calibration_bins(r_chosen[:20], r_rejected[:20], mask[:20]) + calibration_bins(
        r_chosen[20:], r_rejected[20:], mask[20:]
    )
    assert torch.allclose(halves, bins)


def test_ece_is_zero_when_the_favoured_item_wins_as_often_as_forecast():
    """Four pairs at P = 3/4 for one item, which wins three times: calibrated. The same margins
    with the favoured item winning all four: under-confident by 1/4."""
    log3 = math.log(3)
    calibrated = calibration_bins(torch.tensor([log3, log3, log3, -log3]), torch.zeros(4, 1))
    assert expected_calibration_error(calibrated).item() == pytest.approx(0.0, abs=1e-6)
    sure = calibration_bins(torch.full((4,), log3), torch.zeros(4, 1))
    assert expected_calibration_error(sure).item() == pytest.approx(0.25)


# --- the stage ------------------------------------------------------------------------------

REWARD = ("model=two_tower", "trainer.max_epochs=4", "train.batch_size=64", "train.lr=1e-2",
          "progress=false", "tracking.enabled=false")  # fmt: skip


@pytest.fixture(scope="module")
def biased(tmp_path_factory) -> tuple[Path, Path]:
    """The exposure-biased tiny log of test_train_cli (impression pairs only) and a
    two-tower reference trained on its clicks."""
    root = tmp_path_factory.mktemp("reward")
    done = run_pipeline("prepare.py", f"paths.artifacts={root}", "progress=false", *BIASED,
                        cwd=root)  # fmt: skip
    assert done.returncode == 0, done.stderr
    cfg = config("train_reference", root, *BIASED, *small_model("two_tower"), "model.dim=16",
                 *REWARD)  # fmt: skip
    return root, Path(result(train_reference(cfg))["last_ckpt"])


def heldout_pairs(root: Path) -> tuple[pl.DataFrame, dict]:
    prepared = root / "prepared" / "synthetic"
    pairs = pl.concat([pl.read_parquet(prepared / f"pairs_{s}.parquet") for s in ("valid", "test")])
    rows = pair_examples(pairs, max_len=20, max_negatives=None)
    return prepared, rows.__getitems__(list(range(len(rows))))


@torch.no_grad()
def accuracies(root: Path, ckpt: Path) -> tuple[float, float]:
    """(pair accuracy on the held-out observed pairs, agreement with the true utilities: the
    share of those pairs whose item the model favours has the higher true utility)."""
    prepared, batch = heldout_pairs(root)
    scores = load_model(ckpt).full_scores(batch)
    real = batch["rejected"] != 0
    chosen = batch["chosen"].unsqueeze(1).expand_as(real)
    r_chosen, r_rejected = scores.gather(1, chosen), scores.gather(1, batch["rejected"])
    observed = pair_accuracy(r_chosen[:, 0], r_rejected, real).item()
    favoured = torch.where(r_chosen >= r_rejected, chosen, batch["rejected"])[real]
    other = torch.where(r_chosen >= r_rejected, batch["rejected"], chosen)[real]
    users = pl.read_parquet(prepared / "vocab_users.parquet").sort("user_idx")["user_id"]
    items = pl.read_parquet(prepared / "vocab_items.parquet").sort("item_idx")["item_id"]
    user_ids = users.gather(batch["user_idx"].unsqueeze(1).expand_as(real)[real].numpy())
    truth = true_preference_accuracy(
        root / "raw" / "synthetic", user_ids.to_list(),
        items.gather(favoured.numpy() - 1).to_list(), items.gather(other.numpy() - 1).to_list(),
    )  # fmt: skip
    return observed, truth


def test_reward_model_beats_its_reference_on_held_out_and_true_preferences(biased):
    root, reference = biased
    run = train_reward(config("train_reward", root, f"reference.ckpt={reference}", *BIASED,
                              *REWARD))  # fmt: skip
    assert run.parent == root / "runs" / "reward" and run.name.startswith("two_tower-bradley_")
    out = result(run)
    saved = read_checkpoint(out["best_ckpt"])
    assert saved["hyper_parameters"]["reference_ckpt"] == str(reference)
    ref_observed, ref_true = accuracies(root, reference)
    observed, true = accuracies(root, Path(out["best_ckpt"]))
    print(f"held-out pair accuracy {ref_observed:.3f} -> {observed:.3f}; "
          f"true-utility agreement {ref_true:.3f} -> {true:.3f}; "
          f"val/accuracy {out['val/accuracy']:.3f}")  # fmt: skip
    # The reference, trained on clicks, inherits the logging policy's exposure bias; the pairs
    # of one request cancel it, so the reward model orders held-out pairs better than the
    # reference and agrees more with the true utilities.
    assert observed > ref_observed + 0.03, (ref_observed, observed)
    assert true > max(ref_true, 0.5), (ref_true, true)


def test_mlflow_records_the_reward_metrics_and_the_best_is_by_val_accuracy(biased, tmp_path):
    root, reference = biased
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config("train_reward", root, f"reference.ckpt={reference}", *BIASED, *REWARD,
                 "trainer.max_epochs=2", "tracking.enabled=true", f"tracking.uri={uri}",
                 "tracking.experiment=r", "trainer.log_every_n_steps=1",
                 f"paths.runs={tmp_path}")  # fmt: skip
    out = result(train_reward(cfg))
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("r").experiment_id])
    assert run.data.params["objective/name"] == "bradley_terry"
    names = {"loss", "accuracy", "margin", "val/loss", "val/accuracy", "val/margin", "val/ece",
             "val/ndcg_at_10"}  # fmt: skip
    assert names <= set(run.data.metrics), set(run.data.metrics)
    history = [m.value for m in client.get_metric_history(run.info.run_id, "val/accuracy")]
    assert len(history) == 2 and out["val/accuracy"] == pytest.approx(max(history))
    assert 0 <= run.data.metrics["val/ece"] <= 0.5


def test_train_reward_refuses_a_missing_reference_in_one_line(biased, tmp_path):
    root, _ = biased
    done = run_pipeline("train_reward.py", f"paths.artifacts={root}", *BIASED,
                        f"paths.runs={tmp_path}", *REWARD, cwd=tmp_path)  # fmt: skip
    assert "reference.ckpt is not set" in bad_input_message(done)
    assert not (tmp_path / "reward").exists()


def test_train_reward_refuses_a_log_without_valid_pairs_and_another_stages_objective(
    biased, tmp_path
):
    root, reference = biased
    with pytest.raises(DataError, match="preference-stage objective.*train-preference"):
        api.train_reward([f"paths.artifacts={root}", f"reference.ckpt={reference}", *BIASED,
                          *REWARD, "objective=dpo"])  # fmt: skip
    prepare.run(config("config", tmp_path, *BIASED, "progress=false",
                       "data.pair_splits=[train]"))  # fmt: skip
    ref = train_reference(config("train_reference", tmp_path, *BIASED, *small_model("two_tower"),
                                 "model.dim=16", *REWARD, "trainer.max_epochs=1"))  # fmt: skip
    with pytest.raises(DataError, match="no pairs_valid pairs.*selected on the valid ones"):
        train_reward(config("train_reward", tmp_path, f"reference.ckpt={result(ref)['last_ckpt']}",
                            *BIASED, *REWARD))  # fmt: skip
    assert not (tmp_path / "runs" / "reward").exists()


@torch.no_grad()
def test_reward_model_trains_on_the_mined_hard_negatives_of_the_preference_stage(biased):
    """reference.hard_negatives: the pairs the preference stage would train on (the
    reference's own top items), on which the reference's accuracy is poor by construction."""
    root, reference = biased
    overrides = (f"reference.ckpt={reference}", *BIASED, *REWARD, "reference.hard_negatives=3")
    data, _, model = preference_pairs(config("train_reward", root, *overrides))
    valid = data.valid_pairs.__getitems__(list(range(len(data.valid_pairs))))
    real = valid["rejected"] != 0
    assert real.sum(dim=1).eq(3).all()
    r_chosen, r_rejected = pair_logps(model.full_scores(valid), valid["chosen"], valid["rejected"])
    before = pair_accuracy(r_chosen, r_rejected, real).item()
    out = result(train_reward(config("train_reward", root, *overrides)))
    print(f"hard-negative valid pairs: reference {before:.3f}, reward {out['val/accuracy']:.3f}")
    assert out["val/accuracy"] > before + 0.1, (before, out["val/accuracy"])


def test_an_mf_reference_trains_a_reward_model_without_dropout_to_turn_off(biased, tmp_path):
    """MF takes no dropout: the reward model (and the hard-negative miner) load it as it is."""
    root, _ = biased
    ref_cfg = config("train_reference", root, *BIASED, "model=mf", "model.dim=8", *REWARD[1:],
                     "trainer.max_epochs=1", f"paths.runs={tmp_path}")  # fmt: skip
    reference = result(train_reference(ref_cfg))["last_ckpt"]
    run = train_reward(config("train_reward", root, f"reference.ckpt={reference}", *BIASED,
                              *REWARD[1:], "trainer.max_epochs=1", "reference.hard_negatives=2",
                              f"paths.runs={tmp_path}"))  # fmt: skip
    assert run.name.startswith("mf-bradley_terry-")
    assert load_model(result(run)["best_ckpt"]).name == "mf"
