"""benchmarks/peer/compare.py: the peer gets the study's reference recipe, and its top-K lists
land on the right users in rank order (a misaligned row would score one user's list against
another's target, silently)."""

import sys
from pathlib import Path

import numpy as np
import polars as pl
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "peer"))

import compare  # noqa: E402


def test_the_peer_gets_the_study_reference_recipe_at_fixed_epochs(tmp_path: Path) -> None:
    cfg, study_epochs = compare.reference_config(tmp_path / "data", tmp_path, 3, 1)
    settings = compare.peer_settings(cfg, 3, 1)
    # the study file's own cap, whatever it is set to
    assert study_epochs == OmegaConf.load(ROOT / "recsys_dpo/conf/study/ml1m_sasrec.yaml").study.reference.max_epochs
    assert cfg.trainer.max_epochs == 3 and cfg.train.early_stopping_patience is None
    assert cfg.objective.name == "ce" and cfg.mode == "fresh" and cfg.seed == 1
    assert settings == {
        "n_factors": 64, "n_blocks": 2, "n_heads": 1, "dropout_rate": 0.2,
        "session_max_len": 200, "batch_size": 128, "lr": 1e-3, "epochs": 3, "seed": 1,
        "gradient_clip_val": 1.0, "k": compare.K,
    }  # fmt: skip


def test_peer_lists_are_aligned_to_the_query_users_in_rank_order(tmp_path: Path) -> None:
    k = compare.K
    # User 7 listed in reverse rank order, user 3 not at all, user 9 not a query user.
    rows = [(7, r, 100 + r) for r in reversed(range(k))] + [(9, 0, 55)]
    frame = pl.DataFrame(rows, schema=["user_idx", "rank", "item_idx"], orient="row")
    frame.write_parquet(tmp_path / "topk.parquet")
    ranked = compare.lists_from_parquet(tmp_path / "topk.parquet", np.array([3, 7]))
    assert ranked[0].tolist() == [-1] * k
    assert ranked[1].tolist() == [100 + r for r in range(k)]
    scores = compare.scored(ranked, [np.array([100]), np.array([102])])
    assert scores["hr_at_10"].tolist() == [0.0, 1.0]
    assert np.isclose(scores["ndcg_at_10"][1], 1 / np.log2(4))
