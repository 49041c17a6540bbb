"""objective=rating_bce: a rating-model reference (pointwise BCE on the rated pairs, label
rating >= relevant), its validation on each user's held-out rated items, the study config
that uses it, and its refusal of a dataset without ratings."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import CONF

from recsys_dpo.data.datamodule import rated_examples, user_sequences
from recsys_dpo.errors import DataError
from recsys_dpo.evaluation.metrics import mcar_metrics
from recsys_dpo.objectives.reference import rating_bce
from recsys_dpo.study.spec import study_spec
from recsys_dpo.training.ranking_eval import candidate_ndcg


def test_rating_bce_matches_its_closed_form():
    torch.manual_seed(0)
    logits = torch.randn(50, dtype=torch.float64, requires_grad=True)
    liked = (torch.rand(50) < 0.4).float()
    loss = rating_bce(logits, liked)
    p = torch.sigmoid(logits.detach())
    expected = -(liked * torch.log(p) + (1 - liked) * torch.log(1 - p)).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()  # d/ds of the mean BCE: (sigma(s) - y) / M
    torch.testing.assert_close(logits.grad, (p - liked) / 50)
    # stable where log sigma would underflow: -log sigma(-100) = 100
    big = rating_bce(torch.tensor([-100.0, 100.0]), torch.tensor([True, False]))
    torch.testing.assert_close(big, torch.tensor(100.0))


def test_candidate_ndcg_matches_the_mcar_metric():
    """The rating reference's validation NDCG@k equals `mcar_metrics`' (an independent, numpy
    implementation) on the same users' candidate sets, ties included."""
    rng = np.random.default_rng(0)
    n_users, n_items, k = 7, 12, 3
    scores = torch.from_numpy(rng.integers(0, 4, (n_users, n_items)).astype(np.float64))
    scores[:, 0] = float("-inf")  # the padding column, as full_scores
    cands, targs, rows = [], [], []
    for u in range(n_users):
        items = rng.choice(np.arange(1, n_items), size=rng.integers(2, 8), replace=False)
        liked = rng.random(len(items)) < 0.5
        liked[0], liked[-1] = True, False  # both kinds, as rated_ranking_examples keeps
        cands.append(items), targs.append(items[liked])
        rows += [(u, i, bool(y)) for i, y in zip(items, liked, strict=True)]

    def pad(lists):
        out = torch.zeros(n_users, max(map(len, lists)), dtype=torch.long)
        for r, x in enumerate(lists):
            out[r, : len(x)] = torch.from_numpy(x)
        return out

    _, ndcg = candidate_ndcg(scores, pad(cands), pad(targs), k)
    user, item, rel = map(np.array, zip(*rows, strict=True))
    ref = mcar_metrics(scores.numpy()[user, item], rel, user, k)[f"ndcg_at_{k}"]
    np.testing.assert_allclose(ndcg.numpy(), ref)


def test_rated_examples_refuse_events_without_ratings():
    events = pl.DataFrame({"user_idx": [0, 0], "item_idx": [1, 2], "clicked": [True, True],
                           "timestamp": [0, 1], "seq": [0, 1]})  # fmt: skip
    with pytest.raises(DataError, match=r"train\.parquet: no rating column.*rating_bce"):
        rated_examples(events, user_sequences(events), 5, 4.0, "train.parquet")


def test_a_rated_rows_context_never_holds_its_own_target():
    """A liked target is one of the user's positives; left in its own context it would hand a
    history model the label. Each row's context is the user's positives less its target, in
    time order."""
    events = pl.DataFrame({"user_idx": [0, 0, 0, 1, 1], "item_idx": [3, 1, 2, 1, 4],
                           "clicked": [True, True, False, False, True],
                           "rating": [5.0, 4.0, 1.0, 2.0, 5.0],
                           "timestamp": [0, 1, 2, 0, 1], "seq": [0, 1, 2, 3, 4]})  # fmt: skip
    rows = rated_examples(events, user_sequences(events), 5, 4.0)
    contexts = rows.columns["context"].take(torch.arange(5)).tolist()
    want = [[0, 0, 0, 0, 1], [0, 0, 0, 0, 3], [0, 0, 0, 3, 1], [0, 0, 0, 0, 4], [0] * 5]
    assert contexts == want
    assert rows.columns["liked"].tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]


def _toy_coat(root: Path, n_users: int = 24, n_items: int = 12) -> Path:
    """Two taste groups: even users rate items 1..6 five stars and 7..12 one star, odd users
    the reverse. Each rates a random 8 of the 12 in train.ascii, 4 of them in test.ascii."""
    rng = np.random.default_rng(0)
    train, test = np.zeros((n_users, n_items)), np.zeros((n_users, n_items))
    for u in range(n_users):
        taste = np.where((np.arange(n_items) < n_items // 2) == (u % 2 == 0), 5, 1)
        order = rng.permutation(n_items)
        train[u, order[:8]], test[u, order[8:]] = taste[order[:8]], taste[order[8:]]
    root.mkdir(parents=True)
    np.savetxt(root / "train.ascii", train, fmt="%d")
    np.savetxt(root / "test.ascii", test, fmt="%d")
    return root


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_the_rating_reference_ranks_liked_above_disliked(tmp_path):
    """A real prepare + train_reference on a toy Coat: every user's liked test items score
    above their disliked ones (the exposure CE reference cannot: every item is rated alike)."""
    from recsys_dpo.commands import prepare
    from recsys_dpo.data.datamodule import load_prepared
    from recsys_dpo.training.reference_module import load_model
    from recsys_dpo.training.run import train_reference

    _toy_coat(tmp_path / "shared" / "coat")
    overrides = [f"paths.artifacts={tmp_path / 'art'}", f"paths.shared_data={tmp_path / 'shared'}",
                 "data=coat", "data.features=null", "model=mf", "model.dim=4",
                 "objective=rating_bce", "train.lr=0.05", "trainer.max_epochs=30",
                 "train.batch_size=32", "train.k=2", "progress=false",
                 "tracking.enabled=false"]  # fmt: skip
    prepare.run(_compose("config", overrides))
    cfg = _compose("train_reference", overrides)
    out = json.loads((train_reference(cfg) / "result.json").read_text())
    data = load_prepared(cfg.paths.prepared)
    model = load_model(out["best_ckpt"])
    test = data.events("test")
    users = torch.arange(data.n_users)
    with torch.no_grad():
        scores = model.full_scores({"user_idx": users})
    s = scores.numpy()[test["user_idx"].to_numpy(), test["item_idx"].to_numpy()]
    for _, rows in test.with_columns(score=pl.Series(s)).group_by("user_idx"):
        liked, disliked = rows.filter(pl.col("clicked")), rows.filter(~pl.col("clicked"))
        if liked.height and disliked.height:
            assert liked["score"].min() > disliked["score"].max()
    assert out["val/ndcg_at_2"] == pytest.approx(1.0)


def test_the_rating_reference_needs_a_threshold():
    """objective=rating_bce on a dataset whose config sets no relevance threshold: DataError."""
    from recsys_dpo.training.run import rating_threshold

    assert rating_threshold(_compose("train_reference", ["data=coat", "objective=rating_bce"])) == 4
    cfg = _compose("train_reference", ["data=synthetic", "objective=rating_bce"])
    with pytest.raises(DataError, match="objective=rating_bce needs objective.relevant"):
        rating_threshold(cfg)


def test_the_coat_rating_study_changes_only_the_reference_objective():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        rating = compose("run_study", ["study=coat_mf_rating"])
        exposure = compose("run_study", ["study=coat_mf"])
    spec = study_spec(rating.study, list(rating.eval.k))
    assert spec.reference.objective == "rating_bce"
    assert spec.objectives["rating_bce"] == {"name": "rating_bce", "stage": "reference",
                                             "relevant": 4.0}  # fmt: skip
    assert rating.study.rows == exposure.study.rows and rating.model == exposure.model
    assert rating.study.selection == exposure.study.selection
    assert spec.reference.early_stopping_patience == 5 and len(spec.reference_seeds) >= 3
