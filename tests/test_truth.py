"""Exact truth metrics of a top-K on the synthetic log (recsys_dpo/evaluation/truth.py): the
evaluator's truth/* columns against a brute-force loop over users and positions calling
`true_utility` and `Truth.click_probability` with the string ids, the oracle's regret, and
their absence on a log that is not synthetic."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from test_evaluator import TableModel, history

from recsys_dpo.data.datamodule import load_prepared
from recsys_dpo.data.prepare import prepare_dataset
from recsys_dpo.data.synthetic import load_truth, read_synthetic, true_utility
from recsys_dpo.data.vocab import Vocab
from recsys_dpo.evaluation.evaluator import evaluate
from recsys_dpo.evaluation.truth import SYNTHETIC_READER, truth_metrics

KS = [3, 5]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("truth")
    raw = tmp / "raw"
    log = read_synthetic(raw, n_users=60, n_items=30, slate_size=5, mean_requests=4.0)
    prepare_dataset(
        log, source="synthetic", out_dir=tmp / "prepared",
        validation={"drop_duplicates": True, "min_events_per_user": 3}, split={"kind": "loo"},
        pairs={"impressions": {"max_context": 10}, "next_item": None},
        config={"data": {"reader": {"_target_": SYNTHETIC_READER, "path": str(raw)}}},
        progress=False,
    )  # fmt: skip
    return load_prepared(tmp / "prepared")


def random_model(data, seed: int) -> TableModel:
    g = torch.Generator().manual_seed(seed)
    return TableModel(torch.randn(data.n_users, 8, generator=g),
                      torch.randn(data.n_items, 8, generator=g))  # fmt: skip


def truth_model(data) -> TableModel:
    """Scores = the true utility: user [s U_u, 1], item [V_i, b_i] (padding row 0)."""
    truth = load_truth(data.manifest["config"]["data"]["reader"]["path"])
    vocab = Vocab.load(data.path)
    users = vocab.users.sort("user_idx")["user_id"].to_list()
    items = vocab.items.sort("item_idx")["item_id"].to_list()
    u = np.array([truth.user_index[x] for x in users])
    i = np.array([truth.item_index[x] for x in items])
    user_vec = np.hstack([truth.utility_scale * truth.user_vectors[u], np.ones((len(u), 1))])
    item_vec = np.zeros((data.n_items, user_vec.shape[1]))
    item_vec[vocab.items.sort("item_idx")["item_idx"].to_numpy(), :-1] = truth.item_vectors[i]
    item_vec[vocab.items.sort("item_idx")["item_idx"].to_numpy(), -1] = truth.item_bias[i]
    return TableModel(torch.tensor(user_vec, dtype=torch.float32),
                      torch.tensor(item_vec, dtype=torch.float32))  # fmt: skip


def brute_force(data, result, split: str) -> dict[str, np.ndarray]:
    """truth/* per evaluated user by loops over users and positions, from the string ids."""
    path = data.manifest["config"]["data"]["reader"]["path"]
    truth, vocab = load_truth(path), Vocab.load(data.path)
    user_id = dict(zip(vocab.users["user_idx"], vocab.users["user_id"], strict=True))
    item_id = dict(zip(vocab.items["item_idx"], vocab.items["item_id"], strict=True))
    seen = history(data, split)  # eval.seen=remove: every earlier positive is left out
    out = {f"truth/{m}_at_{k}": [] for m in ("utility", "ctr", "utility_regret") for k in KS}
    for row, u in enumerate(result.per_user["user_idx"].to_list()):
        served = [item_id[i] for i in result.topk_items[row]]
        rest = [item_id[i] for i in sorted(item_id) if i not in set(seen.get(u, []))]
        ideal = np.sort(true_utility(truth, [user_id[u]] * len(rest), rest))[::-1]
        for k in KS:
            utility = np.mean(true_utility(path, [user_id[u]] * k, served[:k]))
            clicks = [truth.click_probability(np.array(truth.user_index[user_id[u]]),
                                              np.array(truth.item_index[served[p]]), np.array(p))
                      for p in range(k)]  # fmt: skip
            out[f"truth/utility_at_{k}"].append(utility)
            out[f"truth/ctr_at_{k}"].append(float(np.sum(clicks)) / k)
            out[f"truth/utility_regret_at_{k}"].append(ideal[:k].mean() - utility)
    return {name: np.array(v) for name, v in out.items()}


@pytest.mark.parametrize("split", ["valid", "test"])
def test_truth_columns_match_the_brute_force(data, split):
    result = evaluate(random_model(data, 0), data, split, k=KS)
    expected = brute_force(data, result, split)
    for name, values in expected.items():
        np.testing.assert_allclose(result.per_user[name].to_numpy(), values, rtol=1e-9,
                                   atol=1e-12, err_msg=name)  # fmt: skip
        assert result.aggregates[name] == pytest.approx(values.mean())
    assert (expected["truth/utility_regret_at_3"] > 0).any()


def test_the_oracle_has_the_maximal_utility_and_ctr(data):
    """Ranked by the true utility, the regret is 0 and no model beats it on utility or CTR."""
    best = evaluate(truth_model(data), data, "test", k=KS).per_user
    for seed in range(3):
        other = evaluate(random_model(data, seed), data, "test", k=KS).per_user
        for k in KS:
            assert (other[f"truth/utility_regret_at_{k}"] >= -1e-12).all()
            assert (best[f"truth/utility_at_{k}"] >= other[f"truth/utility_at_{k}"] - 1e-5).all()
            assert (best[f"truth/ctr_at_{k}"] >= other[f"truth/ctr_at_{k}"] - 1e-6).all()
    for k in KS:  # float32 scores: a near-tie may swap, so not bit-exact
        assert best[f"truth/utility_regret_at_{k}"].abs().max() < 1e-5


def test_truth_metrics_formula_on_hand_arrays():
    utility = np.array([[3.0, 1.0, 2.0], [0.5, 0.0, 0.0]])  # user 1: one empty slot (0)
    click = np.array([[0.4, 0.2, 0.1], [0.3, 0.1, 0.0]])
    ideal = np.array([[3.0, 2.0, 1.0], [0.5, 0.2, 0.0]])
    out = truth_metrics(utility, click, ideal, [1, 3])
    np.testing.assert_allclose(out["truth/utility_at_3"], [2.0, 0.5 / 3])
    np.testing.assert_allclose(out["truth/ctr_at_3"], [0.7 / 3, 0.4 / 3])
    np.testing.assert_allclose(out["truth/utility_regret_at_3"], [0.0, 0.2 / 3])
    np.testing.assert_allclose(out["truth/utility_regret_at_1"], [0.0, 0.0])


def test_no_truth_columns_on_a_log_that_is_not_synthetic(tmp_path: Path):
    log = pl.LazyFrame({"user_id": [f"u{u}" for u in range(20) for _ in range(4)],
                        "item_id": [f"i{(u + j) % 10}" for u in range(20) for j in range(4)],
                        "timestamp": list(range(4)) * 20})  # fmt: skip
    prepare_dataset(log, source="hand-made", out_dir=tmp_path / "p",
                    validation={"min_events_per_user": 3}, split={"kind": "loo"},
                    pairs={"next_item": {"num_negatives": 2, "seed": 0}}, progress=False)  # fmt: skip
    data = load_prepared(tmp_path / "p")
    result = evaluate(random_model(data, 0), data, "test", k=[3])
    assert not [c for c in result.per_user.columns if c.startswith("truth/")]


def test_a_synthetic_log_gone_from_disk_leaves_truth_out_not_the_evaluation(tmp_path: Path):
    raw = tmp_path / "raw"
    log = read_synthetic(raw, n_users=30, n_items=20, slate_size=4, mean_requests=3.0)
    prepare_dataset(log, source="synthetic", out_dir=tmp_path / "prepared",
                    validation={"min_events_per_user": 3}, split={"kind": "loo"},
                    pairs={"impressions": {"max_context": 10}},
                    config={"data": {"reader": {"_target_": SYNTHETIC_READER, "path": str(raw)}}},
                    progress=False)  # fmt: skip
    data = load_prepared(tmp_path / "prepared")
    assert "truth/utility_at_3" in evaluate(random_model(data, 0), data, "test", k=[3]).per_user
    raw.rename(tmp_path / "moved")
    result = evaluate(random_model(data, 0), data, "test", k=[3])
    assert not [c for c in result.per_user.columns if c.startswith("truth/")]
    assert "ndcg_at_3" in result.per_user.columns


def test_a_pair_strategy_set_to_none_is_off(data):
    """`data.pairs.next_item=null` drops the preset's strategy: only impression pairs."""
    assert {s for by_source in data.manifest["pairs"].values() for s in by_source} == {
        "impressions"
    }
