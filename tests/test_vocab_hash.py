"""Checkpoints know their vocabulary (issue 15, item 3): a model trained on one prepared dataset
is refused on another whose ids mean other items, even with the same sizes.

Two datasets are prepared from the same hand-made click log, the second with its item ids
permuted (same users, items and counts, so the same n_items and n_users); a reference trained on
the first must be refused by every consumer of the second: the preference stage, mode=continue,
the evaluation (eval.ckpt and reference.ckpt) and the export, through the real CLIs where the
stage has one.
"""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import composed, run_pipeline
from omegaconf import DictConfig

from recsys_dpo.artifacts import content_hash
from recsys_dpo.commands import evaluate as evaluate_cli
from recsys_dpo.data.datamodule import load_prepared
from recsys_dpo.data.prepare import prepare_dataset
from recsys_dpo.data.vocab import ITEMS_SCHEMA, USERS_SCHEMA, Vocab, check_extends
from recsys_dpo.errors import DataError
from recsys_dpo.pipeline import export_bundle
from recsys_dpo.stage import exits_cleanly_on_bad_input
from recsys_dpo.training.reference_module import read_checkpoint
from recsys_dpo.training.run import train_preference, train_reference

N_USERS, N_ITEMS, CLICKS = 120, 40, 6
SMALL = ("model=sasrec", "model.dim=8", "model.n_layers=1", "model.n_heads=1", "data.max_len=10",
         "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
         "+trainer.num_sanity_val_steps=0", "train.batch_size=64", "progress=false",
         "tracking.enabled=false")  # fmt: skip


def click_log(item_names: list[str]) -> pl.LazyFrame:
    """Each user clicks CLICKS distinct random items (fixed seed); item k is named item_names[k]."""
    rng = np.random.default_rng(0)
    items = np.stack([rng.choice(N_ITEMS, CLICKS, replace=False) for _ in range(N_USERS)])
    return pl.LazyFrame({
        "user_id": np.repeat([f"u{u}" for u in range(N_USERS)], CLICKS),
        "item_id": [item_names[i] for i in items.reshape(-1)],
        "timestamp": np.tile(np.arange(CLICKS), N_USERS) + 1_000,
    })  # fmt: skip


def prepare(out: Path, item_names: list[str]) -> Path:
    prepare_dataset(
        click_log(item_names), source="hand-made", out_dir=out,
        validation={"drop_duplicates": True, "min_events_per_user": 3}, split={"kind": "loo"},
        pairs={"next_item": {"num_negatives": 3, "max_context": 10, "seed": 0}}, progress=False,
    )  # fmt: skip
    return out


NAMES = [f"i{k}" for k in range(N_ITEMS)]
PERMUTED = [NAMES[k] for k in np.random.default_rng(1).permutation(N_ITEMS)]


def config(name: str, prepared: Path, root: Path, *overrides: str) -> DictConfig:
    return composed(name, prepared, root, *SMALL, *overrides)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """Datasets `a` and `b` (b = a with permuted item ids) and a reference trained on a."""
    root = tmp_path_factory.mktemp("vocab_hash")
    a, b = prepare(root / "a", NAMES), prepare(root / "b", PERMUTED)
    run = train_reference(config("train_reference", a, root, f"paths.runs={root / 'runs'}"))
    ckpt = Path(json.loads((run / "result.json").read_text())["last_ckpt"])
    return {"root": root, "a": a, "b": b, "ckpt": ckpt}


def test_permuted_dataset_has_the_same_sizes_but_another_vocab_hash(setup):
    a, b = load_prepared(setup["a"]), load_prepared(setup["b"])
    assert (a.n_items, a.n_users) == (b.n_items, b.n_users)
    assert a.manifest["vocab_hash"] != b.manifest["vocab_hash"]
    # the manifest's hash is the vocab files' own, and the checkpoint carries a's
    assert Vocab.load(a.path).content_hash() == a.manifest["vocab_hash"]
    trained_on = read_checkpoint(setup["ckpt"])["dataset"]
    assert trained_on["vocab_hash"] == a.manifest["vocab_hash"]
    assert trained_on["dataset_hash"] == content_hash(a.manifest)


def test_vocab_hash_is_stable_and_sees_reordering():
    items = pl.DataFrame({"item_id": ["x", "y"], "item_idx": [1, 2], "count": [2, 1]},
                         schema=ITEMS_SCHEMA)  # fmt: skip
    users = pl.DataFrame({"user_id": ["u1", "u2"], "user_idx": [0, 1]}, schema=USERS_SCHEMA)
    vocab = Vocab(items, users)
    # pinned: checkpoints of earlier runs must keep matching the datasets they were trained on
    assert vocab.content_hash() == "29b41128f1d13994"
    # row order of the tables and the counts do not matter; which id each index means does
    assert Vocab(items.reverse().with_columns(count=0), users.reverse()).content_hash() == (
        vocab.content_hash()
    )
    swapped = items.with_columns(pl.col("item_id").reverse())
    assert Vocab(swapped, users).content_hash() != vocab.content_hash()
    sizes = (vocab.n_items, vocab.n_users)
    check_extends(vocab.content_hash(), sizes, vocab, "x.ckpt")
    with pytest.raises(DataError, match="x.ckpt: its vocabulary hash is 0+, but"):
        check_extends("0" * 16, sizes, vocab, "x.ckpt")


def assert_refused(done, ckpt: Path, setup) -> None:
    a, b = load_prepared(setup["a"]), load_prepared(setup["b"])
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())  # rich wraps long lines
    for part in (str(ckpt), a.manifest["vocab_hash"], b.manifest["vocab_hash"], "re-train"):
        assert part in message, (part, message)


def test_preference_stage_refuses_a_reference_of_the_permuted_dataset(setup, tmp_path):
    done = run_pipeline("train_preference.py", f"paths.prepared={setup['b']}",
                        f"reference.ckpt={setup['ckpt']}", f"paths.artifacts={tmp_path}", *SMALL,
                        cwd=tmp_path)  # fmt: skip
    assert_refused(done, setup["ckpt"], setup)
    assert not (tmp_path / "runs").exists()


def test_evaluation_refuses_a_checkpoint_of_the_permuted_dataset(setup, tmp_path):
    done = run_pipeline("evaluate.py", f"paths.prepared={setup['b']}", f"eval.ckpt={setup['ckpt']}",
                        f"paths.artifacts={tmp_path}", "eval.k=[5]", "progress=false",
                        cwd=tmp_path)  # fmt: skip
    assert_refused(done, setup["ckpt"], setup)
    assert not list(tmp_path.rglob("metrics.json"))


def test_the_other_consumers_refuse_it_too(setup, tmp_path, capsys):
    root, b, ckpt = setup["root"], setup["b"], setup["ckpt"]
    # the same reference trained on b is fine as a policy; the foreign one as its reference is not
    own = train_reference(config("train_reference", b, root, f"paths.runs={root / 'runs_b'}"))
    own_ckpt = json.loads((own / "result.json").read_text())["last_ckpt"]
    evaluate = exits_cleanly_on_bad_input(evaluate_cli.run)
    with pytest.raises(SystemExit, match="2"):
        evaluate(config("config", b, tmp_path, f"eval.ckpt={own_ckpt}",
                        f"reference.ckpt={ckpt}", "eval.k=[5]"))  # fmt: skip
    message = " ".join(capsys.readouterr().err.split())
    assert f"reference.ckpt={ckpt}" in message and "vocabulary hash" in message
    with pytest.raises(DataError, match="vocabulary hash"):
        train_reference(config("train_reference", b, root, "mode=continue",
                               f"reference.ckpt={ckpt}", f"paths.runs={tmp_path}"))  # fmt: skip
    with pytest.raises(DataError, match="vocabulary hash"):
        train_preference(config("config", b, root, f"reference.ckpt={ckpt}",
                                "reference.hard_negatives=3", f"paths.runs={tmp_path}"))  # fmt: skip
    with pytest.raises(DataError, match="vocabulary hash"):
        export_bundle(config("run", b, root), load_prepared(b), str(ckpt), tmp_path / "eval",
                      tmp_path / "bundle")  # fmt: skip
    assert not (tmp_path / "bundle").exists() and not list(tmp_path.glob("*/*.ckpt"))


def test_a_checkpoint_without_the_hash_is_refused_with_a_retrain_hint(setup, tmp_path):
    old = read_checkpoint(setup["ckpt"])
    del old["dataset"]
    path = tmp_path / "old.ckpt"
    torch.save(old, path)
    with pytest.raises(DataError, match=r"old.ckpt.*no vocabulary hash.*re-train"):
        train_preference(config("config", setup["a"], setup["root"], f"reference.ckpt={path}",
                                f"paths.runs={tmp_path}"))  # fmt: skip
