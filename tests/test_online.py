"""The online loop (recsys_dpo/online/loop.py) and its benchmark on a tiny simulator."""

import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from recsys_dpo.data.synthetic import SyntheticConfig, simulate
from recsys_dpo.models.mf import MF
from recsys_dpo.online.loop import (
    METHODS,
    OnlineArm,
    OnlineSettings,
    PairRows,
    Policy,
    Slates,
    dpo_epochs,
    impression_pairs,
    logged_slates,
    run_online,
    serve,
    sft_epochs,
    simulate_clicks,
    train_reference,
    truth_readout,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import online_loop  # noqa: E402

TINY = SyntheticConfig(n_users=60, n_items=30, mean_requests=3.0, slate_size=5, dim=4)
SETTINGS = OnlineSettings(rounds=2, users_per_round=20, dpo_epochs=1, rloo_k=4, rloo_steps=5,
                          reference_epochs=2, dim=5, eval_k=5)  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    return simulate(TINY)


def _true_scores(truth) -> torch.Tensor:
    n_users, n_items = truth.config.n_users, truth.config.n_items
    utility = truth.utility(np.arange(n_users)[:, None], np.arange(n_items)[None, :])
    pad = np.full((n_users, 1), -np.inf)
    return torch.as_tensor(np.concatenate([pad, utility], axis=1))


def test_a_round_served_by_true_utility_beats_random(tiny):
    truth, _ = tiny
    oracle = _true_scores(truth)
    random = torch.randn(
        oracle.shape, generator=torch.Generator().manual_seed(0), dtype=oracle.dtype
    )
    random[:, 0] = -np.inf
    users = np.arange(truth.config.n_users)
    served = {}
    for name, scores in (("oracle", oracle), ("random", random)):
        items = serve(scores, 5, "topk", torch.Generator().manual_seed(1))
        clicks = simulate_clicks(truth, users, items, np.random.default_rng(2))
        served[name] = (
            truth.utility(users[:, None], items - 1).mean(),
            clicks.mean(),
            truth_readout(truth, scores, oracle, 5)["truth/utility_at_5"],
        )
    assert served["oracle"][0] > served["random"][0] + 0.5
    assert served["oracle"][1] > served["random"][1]
    assert served["oracle"][2] > served["random"][2] + 0.5
    # The oracle's own read-out has zero regret; a uniform policy's expected utility is the
    # catalog mean, and its KL to itself is 0.
    assert truth_readout(truth, oracle, oracle, 5)["truth/utility_regret_at_5"] == pytest.approx(0)
    uniform = torch.zeros_like(oracle)
    uniform[:, 0] = -np.inf
    flat = truth_readout(truth, uniform, uniform, 5)
    assert flat["truth/expected_utility"] == pytest.approx(oracle[:, 1:].mean().item())
    assert flat["kl/policy_ref"] == pytest.approx(0, abs=1e-12)


def test_simulated_clicks_match_the_click_model_per_position(tiny):
    truth, _ = tiny
    n = 20_000
    users = np.full(n, 3)
    items = np.tile(np.array([4, 9, 1, 17, 30]), (n, 1))  # model item index (truth row + 1)
    clicks = simulate_clicks(truth, users, items, np.random.default_rng(0))
    p = truth.click_probability(np.array([3]), items[0] - 1, np.arange(5))
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(clicks.mean(axis=0) - p) < 4 * se)


def test_impression_pairs_are_clicked_vs_shown_not_clicked():
    slates = Slates(
        np.array([7, 8]),
        np.array([[1, 2, 3], [4, 5, 6]]),
        np.array([[False, True, True], [False, False, False]]),
    )
    pairs = impression_pairs(slates)
    assert pairs.users.tolist() == [7, 7]
    assert pairs.chosen.tolist() == [2, 3]
    assert pairs.rejected.tolist() == [[1, 0], [1, 0]]
    assert pairs.mask.tolist() == [[True, False], [True, False]]


def test_logged_slates_keep_display_order(tiny):
    truth, events = tiny
    logged = logged_slates(events, truth)
    first = events.filter(events["request_id"] == events["request_id"][0]).sort("position")
    row = int(np.flatnonzero(logged.users == truth.user_index[first["user_id"][0]])[0])
    assert logged.items.shape[1] == TINY.slate_size
    assert logged.clicked.sum() == events["clicked"].sum()
    assert (logged.items[row] - 1).tolist() == [truth.item_index[i] for i in first["item_id"]]


def test_loop_is_seeded_and_budgets_are_equal(tiny):
    truth, events = tiny
    first = run_online(truth, events, SETTINGS)
    second = run_online(truth, events, SETTINGS)
    assert first == second
    rows = {(r["round"], r["method"]): r for r in first["rounds"]}
    assert {m for _, m in rows} == set(METHODS)
    for round_ in (1, 2):
        online, rloo = rows[(round_, "online_dpo")], rows[(round_, "rloo")]
        assert online["exposures"] == rloo["exposures"] == 20 * TINY.slate_size
        assert online["exposures_total"] == rloo["exposures_total"] == round_ * 100
        assert rows[(round_, "offline_dpo")]["pair_rows"] == online["pair_rows"] > 0
        assert online["kl/policy_ref"] > 0 and rloo["kl/policy_ref"] > 0
    other = run_online(truth, events, OnlineSettings(**{**SETTINGS.__dict__, "seed": 1}))
    assert other != first


def test_sampled_serving_explores_and_unequal_budgets_are_refused(tiny):
    truth, _ = tiny
    scores = _true_scores(truth)
    sampled = serve(scores, 5, "sample", torch.Generator().manual_seed(0))
    top = serve(scores, 5, "topk", torch.Generator().manual_seed(0))
    assert (sampled != top).any()
    assert all(len(set(row)) == 5 and 0 not in row for row in sampled.tolist())
    with pytest.raises(ValueError, match="multiple of rloo_k"):
        OnlineSettings(users_per_round=7, rloo_k=4, rloo_steps=5).rloo_users_per_step(5)
    with pytest.raises(ValueError, match="serve"):
        OnlineSettings(serve="greedy")


def _frozen_reference(truth, events, settings):
    reference = train_reference(truth, logged_slates(events, truth), settings)
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def test_sft_arms_are_matched_and_leave_the_other_methods_unchanged(tiny):
    truth, events = tiny
    full = run_online(truth, events, SETTINGS)
    old_methods = ("offline_dpo", "online_dpo", "rloo")
    without = run_online(truth, events, SETTINGS, methods=old_methods)
    assert without["rounds"] == [r for r in full["rounds"] if r["method"] in old_methods]
    rows = {(r["round"], r["method"]): r for r in full["rounds"]}
    for round_ in (1, 2):
        online, sft = rows[(round_, "online_dpo")], rows[(round_, "online_sft")]
        assert sft["exposures"] == online["exposures"] == 20 * TINY.slate_size
        assert sft["exposures_total"] == online["exposures_total"]
        offline_sft = rows[(round_, "offline_sft")]
        assert offline_sft["exposures"] == 0
        assert offline_sft["pair_rows"] == rows[(round_, "offline_dpo")]["pair_rows"]
    # Round 1 serves both online arms from the reference with common random numbers: the same
    # clicks, so the same rows; only the update differs.
    assert rows[(1, "online_sft")]["pair_rows"] == rows[(1, "online_dpo")]["pair_rows"]
    assert rows[(1, "online_sft")]["kl/policy_ref"] != rows[(1, "online_dpo")]["kl/policy_ref"]
    # From round 2 each serves its own policy's slates (in this seeded run, a different number
    # of them clicked).
    assert rows[(2, "online_sft")]["pair_rows"] != rows[(2, "online_dpo")]["pair_rows"]
    with pytest.raises(ValueError, match="methods"):
        run_online(truth, events, SETTINGS, methods=("offline_dpo", "rloo"))


def test_online_sft_trains_on_pairs_from_its_own_served_slates(tiny):
    truth, events = tiny
    settings = replace(SETTINGS, lr=0.1)  # large enough that the two policies' top-5s part
    reference = _frozen_reference(truth, events, settings)
    arms = {m: OnlineArm(Policy(reference, settings.lr), torch.Generator().manual_seed(3),
                         np.random.default_rng(4)) for m in ("dpo", "sft")}  # fmt: skip
    users = np.arange(20)
    first = {m: arm.collect(truth, users, "topk") for m, arm in arms.items()}
    assert (first["dpo"].items == first["sft"].items).all()
    assert (first["dpo"].clicked == first["sft"].clicked).all()
    dpo_epochs(arms["dpo"].policy, reference, arms["dpo"].pairs, settings,
               torch.Generator().manual_seed(5))  # fmt: skip
    sft_epochs(arms["sft"].policy, arms["sft"].pairs, settings, torch.Generator().manual_seed(5))
    second = {m: arm.collect(truth, users, "topk") for m, arm in arms.items()}
    with torch.no_grad():
        own_scores = arms["sft"].policy.model.full_scores({"user_idx": torch.as_tensor(users)})
    assert (second["sft"].items == torch.topk(own_scores, 5).indices.numpy()).all()
    assert (second["sft"].items != second["dpo"].items).any()
    pairs = arms["sft"].pairs
    expected = PairRows.concat([impression_pairs(first["sft"]), impression_pairs(second["sft"])])
    for field in ("users", "chosen", "rejected", "mask"):
        assert (getattr(pairs, field) == getattr(expected, field)).all()
    round_two = pairs.take(np.arange(len(impression_pairs(first["sft"])), len(pairs)))
    assert len(round_two) == second["sft"].clicked.sum() > 0
    for user, chosen, rejected, mask in zip(*asdict(round_two).values(), strict=True):
        slate, clicked = second["sft"].items[user], second["sft"].clicked[user]
        assert chosen in slate[clicked]
        assert sorted(rejected[mask]) == sorted(slate[~clicked])


def _chosen_ce(model: MF, pairs: PairRows) -> torch.Tensor:
    """-mean log softmax over the catalog (column 0, the padding item, left out) of the chosen."""
    with torch.no_grad():
        scores = model.full_scores({"user_idx": torch.as_tensor(pairs.users)})
    log_p = torch.log_softmax(scores[:, 1:], dim=-1)
    return -log_p[torch.arange(len(pairs)), torch.as_tensor(pairs.chosen) - 1].mean()


def test_one_sft_step_is_adams_first_step_down_the_chosen_items_ce(tiny):
    truth, events = tiny
    settings = replace(SETTINGS, dpo_epochs=1, batch_size=100_000, lr=1e-2)  # one full batch
    reference = _frozen_reference(truth, events, settings)
    pairs = impression_pairs(logged_slates(events, truth))
    policy = Policy(reference, settings.lr)
    params = list(policy.model.parameters())
    before = [p.detach().clone() for p in params]
    users = {"user_idx": torch.as_tensor(pairs.users)}
    log_p = torch.log_softmax(policy.model.full_scores(users)[:, 1:], dim=-1)
    ce = -log_p[torch.arange(len(pairs)), torch.as_tensor(pairs.chosen) - 1].mean()
    grads = torch.autograd.grad(ce, params)
    sft_epochs(policy, pairs, settings, torch.Generator().manual_seed(0))
    assert _chosen_ce(policy.model, pairs) < ce.detach() - 1e-3
    # Adam's first step is lr * g / (|g| + eps) per coordinate (bias-corrected moments g, g^2):
    # so the step taken is on exactly this CE's gradient, with no other term.
    for old, grad, new in zip(before, grads, params, strict=True):
        torch.testing.assert_close(new.detach() - old, -settings.lr * grad / (grad.abs() + 1e-8),
                                   rtol=1e-4, atol=1e-7)  # fmt: skip


def test_the_benchmark_tracks_a_parent_and_one_child_per_run_in_mlflow(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    payload = online_loop.run_benchmark(
        [0], ["topk", "sample"], [3e-3], SETTINGS, simulator=TINY, tracking_uri=uri
    )
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(online_loop.EXPERIMENT)
    found = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in found if r.info.run_name == "online-loop"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["seeds"] == "[0]" and parent.data.params["rounds"] == "2"
    children = {r.info.run_name: r for r in found
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}  # fmt: skip
    assert len(children) == len(found) - 1 == 2
    for run in payload["runs"]:
        child = children[f"seed=0 serve={run['serve']} lr=0.003"]
        result = run["result"]
        assert child.info.status == "FINISHED"
        assert child.data.params == {k: str(v) for k, v in result["settings"].items()}
        assert child.data.metrics["reference/truth/utility_at_5"] == pytest.approx(
            result["reference"]["truth/utility_at_5"], rel=1e-12
        )
        for method in METHODS:
            history = client.get_metric_history(child.info.run_id, f"{method}/truth/utility_at_5")
            expected = [r["truth/utility_at_5"] for r in result["rounds"] if r["method"] == method]
            assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2]
            assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
                expected, rel=1e-12
            )
