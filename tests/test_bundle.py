"""The A/B candidate bundle: reloaded in a FRESH process from its directory alone, it ranks
exactly what the trained checkpoint ranks (load_model + an independent brute-force top-K), and
agrees with the evaluator's topk.parquet."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import run_pipeline

from recsys_dpo.data.datamodule import load_prepared
from recsys_dpo.errors import DataError
from recsys_dpo.evaluation.evaluator import build_queries
from recsys_dpo.export.bundle import load_bundle
from recsys_dpo.training.reference_module import load_model

K = 10
FILES = {"user_tower.pt2", "item_embeddings.npy", "index.faiss", "vocab.json", "histories.json",
         "serve.py", "requirements.txt", "model.safetensors", "model.json", "policy.ckpt",
         "topk.parquet", "MODEL_CARD.md", "manifest.json"}  # fmt: skip
RECOMMEND = """
import json, sys
from recsys_dpo.export.bundle import load_bundle
bundle = load_bundle(sys.argv[1])
print(json.dumps({u: bundle.recommend(u, int(sys.argv[2])) for u in sys.argv[3:]}))
"""


@pytest.fixture(scope="module")
def bundle(untracked_run) -> tuple[Path, Path]:
    """(bundle dir, prepared dataset dir) of a tiny untracked pipeline run."""
    prepared = untracked_run["tmp"] / "artifacts" / "prepared" / "synthetic"
    return Path(untracked_run["bundle"]), prepared


def brute_force_topk(ckpt: str, prepared: Path, k: int) -> dict[str, list[tuple[str, float]]]:
    """Every test user's top-k by the checkpoint's full score matrix (no faiss), history
    removed, ties by item idx: an independent recomputation of what the bundle must return."""
    model = load_model(ckpt)
    data = load_prepared(prepared)
    queries = build_queries(data, "test")
    with torch.no_grad():
        scores = model.full_scores(queries.batch(slice(None), int(model.config["max_len"])))
    vocab_items = pl.read_parquet(prepared / "vocab_items.parquet").sort("item_idx")
    item_ids = ["<pad>", *vocab_items["item_id"].to_list()]
    users = pl.read_parquet(prepared / "vocab_users.parquet").sort("user_idx")["user_id"]
    out = {}
    for row, user in enumerate(queries.user_idx):
        s = scores[row].clone()
        history = queries.history.values[queries.history.starts[row] : queries.history.ends[row]]
        s[history] = float("-inf")
        order = np.lexsort((np.arange(len(s)), -s.numpy()))[:k]
        out[users[int(user)]] = [(item_ids[i], float(s[i])) for i in order]
    return out


def test_bundle_has_every_file(bundle):
    path, _ = bundle
    assert {p.name for p in path.iterdir()} == FILES
    card = (path / "MODEL_CARD.md").read_text()
    assert "objective: dpo, beta = 0.1" in card and "| ndcg_at_10 |" in card and "KL" in card
    for section in ("## How to load it", "## Input contract", "## Seen policy", "## Provenance",
                    "## Known limitations"):  # fmt: skip
        assert section in card
    assert "python serve.py" in card and "mlflow models serve" in card and "load_bundle" in card
    assert "context [B, 10] int64" in card and "ids are strings" in card
    assert "cold start: an unknown user_id is an error; serve a new user by their history" in card
    assert "- `remove` (eval.seen" in card and "torch==2.13.0" in card
    assert re.search(r"- code: git ([0-9a-f]{40}|unknown)", card)
    assert re.search(r"- data window: timestamp \d+ \.\. \d+ \(training split\)", card)


def test_fresh_process_recommends_what_the_checkpoint_ranks(bundle):
    path, prepared = bundle
    manifest = json.loads((path / "manifest.json").read_text())
    expected = brute_force_topk(manifest["policy_ckpt"], prepared, K)
    users = sorted(expected)[:40]
    done = subprocess.run([sys.executable, "-c", RECOMMEND, str(path), str(K), *users],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    for user in users:
        assert [i for i, _ in got[user]] == [i for i, _ in expected[user]]
        np.testing.assert_allclose([s for _, s in got[user]], [s for _, s in expected[user]],
                                   rtol=1e-4, atol=1e-4)  # fmt: skip


def test_bundle_agrees_with_the_evaluator_topk(bundle):
    """One seen policy (eval.seen, recorded in the bundle's manifest): the bundle serves, for
    EVERY test user, re-consumed targets included, the top-K the evaluator evaluated."""
    path, prepared = bundle
    loaded = load_bundle(path)
    assert json.loads((path / "manifest.json").read_text())["seen"] == "remove"
    data = load_prepared(prepared)
    queries = build_queries(data, "test")
    users = pl.read_parquet(prepared / "vocab_users.parquet").sort("user_idx")["user_id"]
    topk = pl.read_parquet(path / "topk.parquet").filter(pl.col("rank") <= K)
    evaluated = {u: g.sort("rank")["item_id"].to_list() for (u,), g in topk.group_by("user_id")}
    served = {users[int(u)]: [i for i, _ in loaded.recommend(users[int(u)], K)]
              for u in queries.user_idx}  # fmt: skip
    assert len(served) == len(queries) and served == evaluated


def test_recommend_by_history_equals_by_user_for_a_sequence_model(bundle):
    loaded = load_bundle(bundle[0])
    user = next(iter(loaded.histories))
    assert loaded.recommend(loaded.histories[user], 5) == loaded.recommend(user, 5)
    assert len(loaded.recommend(["no-such-item"], 5)) == 5
    with pytest.raises(DataError, match="unknown user_id"):
        loaded.recommend("no-such-user", 5)


def test_incomplete_bundle_is_refused(bundle, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in bundle[0].iterdir():
        if f.name != "manifest.json":
            (copy / f.name).write_bytes(f.read_bytes())
    with pytest.raises(DataError, match="incomplete"):
        load_bundle(copy)


def test_export_cli_rebuilds_the_same_bundle(bundle, tmp_path):
    path, prepared = bundle
    manifest = json.loads((path / "manifest.json").read_text())
    out = tmp_path / "exported"
    done = run_pipeline("export.py", f"paths.prepared={prepared}", "progress=false",
                        f"export.ckpt='{manifest['policy_ckpt']}'",
                        f"export.evaluation={manifest['evaluation']}", f"export.out={out}",
                        cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((out / "manifest.json").read_text())["files"]
    # Every file but the card (it names the raw log's path, here another paths.artifacts).
    for name in FILES - {"manifest.json", "MODEL_CARD.md"}:
        assert again[name]["sha256"] == manifest["files"][name]["sha256"]
    missing = run_pipeline("export.py", f"export.ckpt='{manifest['policy_ckpt']}'", cwd=tmp_path)
    assert missing.returncode == 2 and "export.evaluation" in missing.stderr
