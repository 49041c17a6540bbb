"""The evaluation stage: protocol, metrics against brute force, comparison, outputs, bad input.

A hand-made click log (every user clicks a few distinct random items) is prepared with the real
prepare stage; test models implement the real `Recommender` interface.
"""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import CONF, run_pipeline
from hydra import compose, initialize_config_dir
from torch import Tensor, nn

from recsys_dpo.commands import evaluate as evaluate_cli
from recsys_dpo.data.datamodule import load_prepared
from recsys_dpo.data.prepare import prepare_dataset
from recsys_dpo.data.vocab import Vocab
from recsys_dpo.errors import DataError
from recsys_dpo.evaluation.evaluator import compare, evaluate, train_popularity
from recsys_dpo.evaluation.report import write_outputs
from recsys_dpo.models import SASRec, TwoTower
from recsys_dpo.models.base import Batch, Recommender
from recsys_dpo.training.reference_module import model_spec, trained_on

N_USERS, CLICKS = 400, 6


def click_log(n_users: int, n_items: int, seed: int) -> pl.LazyFrame:
    """Each user clicks CLICKS distinct random items, one per time step."""
    rng = np.random.default_rng(seed)
    items = np.stack([rng.choice(n_items, CLICKS, replace=False) for _ in range(n_users)])
    return pl.LazyFrame({
        "user_id": np.repeat([f"u{u}" for u in range(n_users)], CLICKS),
        "item_id": [f"i{i}" for i in items.reshape(-1)],
        "timestamp": np.tile(np.arange(CLICKS), n_users) + 1_000,
    })  # fmt: skip


def prepare(out: Path, n_items: int, seed: int = 0):
    prepare_dataset(
        click_log(N_USERS, n_items, seed), source="hand-made", out_dir=out,
        validation={"drop_duplicates": True, "min_events_per_user": 3}, split={"kind": "loo"},
        pairs={"next_item": {"num_negatives": 3, "max_context": 10, "seed": seed}},
        progress=False,
    )  # fmt: skip
    return load_prepared(out)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("small") / "prepared", n_items=40)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("big") / "prepared", n_items=1000, seed=1)


class TableModel(Recommender):
    """Fixed user and item vectors: s(u, i) = <users[u], items[i]> (ignores the context)."""

    name = "table"

    def __init__(self, users: Tensor, items: Tensor) -> None:
        super().__init__()
        self.n_items = items.shape[0]
        self.config = {"n_items": self.n_items, "max_len": 10}
        self.users, self.items = nn.Parameter(users), nn.Parameter(items)

    def user_embeddings(self, batch: Batch) -> Tensor:
        return self.users[batch["user_idx"]]

    def _item_vectors(self, items: Tensor) -> Tensor:
        return self.items[items]


def held_out(data, split: str) -> dict[int, int]:
    """user_idx -> the user's held-out positive of `split` (leave-one-out: exactly one)."""
    rows = data.events(split).filter(pl.col("clicked"))
    return dict(zip(rows["user_idx"].to_list(), rows["item_idx"].to_list(), strict=True))


def history(data, split: str) -> dict[int, list[int]]:
    """user_idx -> positives before `split`, in time order (an independent protocol copy)."""
    before = ["train"] if split == "valid" else ["train", "valid"]
    rows = pl.concat([data.events(s) for s in before]).filter(pl.col("clicked"))
    rows = rows.sort("user_idx", "timestamp", "seq")
    return {u: g["item_idx"].to_list() for (u,), g in rows.group_by("user_idx", maintain_order=True)}


def oracle(data, split: str) -> TableModel:
    """One-hot items; each user's vector points at their held-out item, which ranks first."""
    items = torch.eye(data.n_items)
    items[0] = 0
    users = torch.zeros(data.n_users, data.n_items)
    for user, target in held_out(data, split).items():
        users[user, target] = 1.0
    return TableModel(users, items)


def sasrec(data, seed: int) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(n_items=data.n_items, n_users=data.n_users, dim=8, n_layers=1, n_heads=1,
                  max_len=10).eval()  # fmt: skip


@pytest.mark.parametrize("split", ["valid", "test"])
def test_oracle_model_scores_perfectly(data, split):
    result = evaluate(oracle(data, split), data, split, k=[1, 5])
    assert result.counts["users"] == len(held_out(data, split)) == N_USERS
    for name in ("hr_at_1", "ndcg_at_1", "hr_at_5", "ndcg_at_5", "mrr_at_5"):
        assert result.aggregates[name] == 1.0


def test_random_model_hits_k_over_n(big):
    generator = torch.Generator().manual_seed(0)
    model = TableModel(torch.randn(big.n_users, 16, generator=generator),
                       torch.randn(big.n_items, 16, generator=generator))  # fmt: skip
    k = 100
    result = evaluate(model, big, "test", k=[k])
    # Under a random ranking the target is uniform over the unseen real items.
    n_seen = np.array([len(h) for h in history(big, "test").values()])
    expected = np.mean(k / (big.n_items - 1 - n_seen))
    sd = np.sqrt(expected * (1 - expected) / N_USERS)
    assert abs(result.aggregates[f"hr_at_{k}"] - expected) < 4 * sd


def test_matches_brute_force_full_scores(data):
    model, k = sasrec(data, seed=3), [3, 10]
    result = evaluate(model, data, "test", k=k)
    targets, histories = held_out(data, "test"), history(data, "test")
    users = sorted(targets)
    context = torch.zeros(len(users), 10, dtype=torch.long)
    for row, user in enumerate(users):
        items = histories[user][-10:]
        context[row, 10 - len(items):] = torch.tensor(items)
    with torch.no_grad():
        scores = model.full_scores({"user_idx": torch.tensor(users), "context": context})
    for row, user in enumerate(users):
        seen = [i for i in set(histories[user]) if i != targets[user]]
        scores[row, seen] = float("-inf")
    target_scores = scores[torch.arange(len(users)), torch.tensor([targets[u] for u in users])]
    rank = (scores > target_scores[:, None]).sum(1).numpy()
    per_user = result.per_user.sort("user_idx")
    assert per_user["user_idx"].to_list() == users
    for cut in k:
        hit = (rank < cut).astype(float)
        np.testing.assert_array_equal(per_user[f"hr_at_{cut}"].to_numpy(), hit)
        np.testing.assert_allclose(per_user[f"ndcg_at_{cut}"].to_numpy(), hit / np.log2(rank + 2),
                                   rtol=1e-6)  # fmt: skip


def test_compare_with_itself_is_exactly_zero(data):
    model = sasrec(data, seed=1)
    result = compare(model, model, data, "test", k=[5, 10], n_resamples=200)
    assert result.deltas and {"hr_at_5", "ndcg_at_10", "mrr_at_10"} <= set(result.deltas)
    for name, delta in result.deltas.items():
        assert (delta.mean, delta.lo, delta.hi) == (0.0, 0.0, 0.0), name
        assert not delta.significant
    assert (result.per_user["kl"].to_numpy() == 0).all()
    assert result.aggregates["log_ratio_margin"] == 0.0


def test_compare_detects_a_better_policy(data):
    result = compare(oracle(data, "test"), sasrec(data, seed=2), data, "test", k=[5],
                     n_resamples=200)  # fmt: skip
    assert result.deltas["hr_at_5"].significant and result.deltas["hr_at_5"].lo > 0
    assert (result.per_user["kl"].to_numpy() > 0).all()


def test_outputs_in_original_ids_without_seen_items(data, tmp_path):
    model, k = sasrec(data, seed=4), 7
    outcome = compare(model, sasrec(data, seed=5), data, "test", k=[k], n_resamples=50)
    vocab = Vocab.load(data.path)
    out = write_outputs(tmp_path / "eval", outcome, vocab, train_popularity(data), {"k": [k]})
    assert {"metrics.json", "per_user.parquet", "topk.parquet", "report.md", "curves.png",
            "kl.png", "popularity.png", "manifest.json"} <= {p.name for p in out.iterdir()}
    topk = pl.read_parquet(out / "topk.parquet")
    assert topk.columns == ["user_id", "rank", "item_id", "score"]
    # Original ids round-trip through the vocab.
    idx = topk.join(vocab.items, on="item_id", how="left")["item_idx"]
    assert idx.null_count() == 0
    np.testing.assert_array_equal(idx.to_numpy(), outcome.policy.topk_items.reshape(-1))
    by_user = topk.group_by("user_id").agg("rank", "item_id", "score")
    assert by_user.height == N_USERS
    events = pl.concat([data.events(s) for s in ("train", "valid")]).filter(pl.col("clicked"))
    seen = events.group_by("user_id").agg(pl.col("item_id").alias("seen"))
    for row in by_user.join(seen, on="user_id").iter_rows(named=True):
        assert row["rank"] == list(range(1, k + 1))
        assert not set(row["item_id"]) & set(row["seen"])
        assert row["score"] == sorted(row["score"], reverse=True)
    payload = json.loads((out / "metrics.json").read_text())
    assert set(payload["models"]) == {"policy", "reference"} and "hr_at_7" in payload["deltas"]
    assert "| hr_at_7 |" in (out / "report.md").read_text()


def test_bad_inputs_raise_clear_errors(data, tmp_path):
    model = sasrec(data, seed=0)
    with pytest.raises(DataError, match=r"every k must lie in \[1, 40\].*max k=41"):
        evaluate(model, data, "test", k=[10, 41])
    other = SASRec(n_items=data.n_items + 5, n_users=0, dim=8, n_layers=1, n_heads=1, max_len=10)
    with pytest.raises(DataError, match=f"n_items={data.n_items + 5}.*n_items={data.n_items}"):
        evaluate(other, data, "test")
    few = TwoTower(n_items=data.n_items, n_users=10, dim=8, hidden=[], max_len=10)
    with pytest.raises(DataError, match=r"n_users=10.* user\(s\) beyond it"):
        evaluate(few, data, "test")
    empty = tmp_path / "empty"
    empty.mkdir()
    for file in data.path.iterdir():
        (empty / file.name).write_bytes(file.read_bytes())
    data.events("test").filter(~pl.col("clicked")).write_parquet(empty / "test.parquet")
    with pytest.raises(DataError, match="test split has no positive"):
        evaluate(model, empty, "test")


def save_checkpoint(model: Recommender, path: Path, data) -> Path:
    """A checkpoint as the training modules write it on `data` (model, dataset, state_dict)."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": model_spec(model, "model."), "dataset": trained_on(data),
                "state_dict": state}, path)  # fmt: skip
    return path


def test_cli_end_to_end(data, tmp_path):
    policy = save_checkpoint(sasrec(data, seed=6), tmp_path / "policy.ckpt", data)
    reference = save_checkpoint(sasrec(data, seed=7), tmp_path / "reference.ckpt", data)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"paths.prepared={data.path}", f"paths.artifacts={tmp_path}", f"eval.ckpt={policy}",
            f"reference.ckpt={reference}", "eval.k=[5,10]", "eval.n_resamples=50",
            "progress=false", "eval.name=run",
        ])  # fmt: skip
    out = evaluate_cli.run(cfg)
    assert out == tmp_path / "eval" / "run"
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["config"]["ckpt"] == str(policy) and payload["counts"]["users"] == N_USERS
    per_user = pl.read_parquet(out / "per_user.parquet")
    assert {"user_id", "hr_at_5/policy", "hr_at_5/reference", "hr_at_5/delta", "kl"} <= set(
        per_user.columns
    )


def test_cli_exits_2_on_bad_input(data, tmp_path):
    ckpt = save_checkpoint(sasrec(data, seed=0), tmp_path / "model.ckpt", data)
    done = run_pipeline("evaluate.py", f"paths.prepared={data.path}", f"eval.ckpt={ckpt}",
                        f"paths.artifacts={tmp_path}", "eval.k=[10,500]", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "every k must lie in [1, 40]" in done.stderr
    assert not (tmp_path / "eval").exists()
