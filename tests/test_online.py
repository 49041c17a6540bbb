"""The online loop (recsys_dpo/online/loop.py) on a tiny simulator."""

import numpy as np
import pytest
import torch

from recsys_dpo.data.synthetic import SyntheticConfig, simulate
from recsys_dpo.online.loop import (
    METHODS,
    OnlineSettings,
    Slates,
    impression_pairs,
    logged_slates,
    run_online,
    serve,
    simulate_clicks,
    truth_readout,
)

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
