"""No non-finite number passes silently (issue 15, item 5).

A NaN score compares false with everything, so `(scores >= nan).sum() - 1` ranked a NaN target
at -1 and NDCG@k came out inf: a reference trained at lr 1e30 was cached with val/ndcg_at_10
"Infinity" (exit 0). Both training stages now stop with a message naming the stage and the
setting (exit 2, no result.json, no checkpoint of the diverged state); the in-training ranking
and the evaluator refuse non-finite scores.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import CONF, run_pipeline
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from recsys_dpo.errors import DataError
from recsys_dpo.evaluation.evaluator import evaluate
from recsys_dpo.models import SASRec
from recsys_dpo.training.guards import NonFinite, require_finite
from recsys_dpo.training.ranking_eval import mask_seen, target_rank
from recsys_dpo.training.run import train_preference, train_reference

# A tiny synthetic dataset and model; 4 train batches, so the loss at lr 1e30 turns non-finite
# (step 1) well before the epoch ends.
DATA = ("data.reader.n_users=200", "data.reader.n_items=60", "data.max_len=20")
SMALL = ("model=sasrec", "model.dim=16", "model.n_layers=1", "model.n_heads=1",
         "trainer.max_epochs=1", "+trainer.limit_val_batches=2", "+trainer.num_sanity_val_steps=0",
         "train.batch_size=64", "progress=false", "tracking.enabled=false")  # fmt: skip


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nonfinite")
    done = run_pipeline("prepare.py", f"paths.artifacts={root}", "progress=false", *DATA, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def config(name: str, artifacts: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=[f"paths.artifacts={artifacts}", *DATA, *SMALL, *overrides])


@pytest.fixture(scope="module")
def reference(artifacts) -> str:
    """A finite reference checkpoint (one step)."""
    cfg = config("train_reference", artifacts, "+trainer.limit_train_batches=1",
                 f"paths.runs={artifacts / 'ref'}")  # fmt: skip
    return json.loads((train_reference(cfg) / "result.json").read_text())["last_ckpt"]


def assert_stopped(done, stage: str, runs: Path) -> None:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert f"{stage} stage: the" in message and "is nan at epoch 0 step" in message, message
    assert "lower train.lr (1e+30)" in message, message
    # nothing that looks finished: no result.json, no checkpoint of the diverged weights
    assert not list(runs.rglob("result.json")) and not list(runs.rglob("*.ckpt"))


def test_reference_stage_stops_on_a_nan_loss(artifacts, tmp_path):
    done = run_pipeline("train_reference.py", f"paths.artifacts={artifacts}", *DATA, *SMALL,
                        "train.lr=1e30", f"paths.runs={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert_stopped(done, "reference", tmp_path)


def test_preference_stage_stops_on_a_nan_loss(artifacts, reference, tmp_path):
    done = run_pipeline("train_preference.py", f"paths.artifacts={artifacts}", *DATA, *SMALL,
                        f"reference.ckpt={reference}", "train.lr=1e30", f"paths.runs={tmp_path}",
                        cwd=tmp_path)  # fmt: skip
    assert_stopped(done, "preference", tmp_path)


@pytest.mark.parametrize("stage", ["reference", "preference"])
def test_a_finite_loss_with_diverged_weights_stops_at_validation(artifacts, reference, stage,
                                                                 tmp_path):  # fmt: skip
    """One step at lr 1e30: that step's loss was finite, but the weights it left score inf or
    NaN; before, val/ndcg_at_10 = Infinity became the best checkpoint and result.json."""
    overrides = ("+trainer.limit_train_batches=1", "train.lr=1e30", f"paths.runs={tmp_path}")
    train = train_reference if stage == "reference" else train_preference
    name = "train_reference" if stage == "reference" else "config"
    cfg = config(name, artifacts, *overrides, f"reference.ckpt={reference}")
    with pytest.raises(DataError, match=rf"^{stage} stage: validation scores .*not finite .* at "
                                        r"epoch 0 step 1, .*lower train.lr \(1e\+30\)"):  # fmt: skip
        train(cfg)
    assert not list(tmp_path.rglob("result.json")) and not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_target_rank_refuses_non_finite_scores(bad):
    scores = torch.tensor([[float("-inf"), 0.5, 0.2, 0.1], [float("-inf"), 0.3, 0.2, 0.1]])
    target = torch.tensor([1, 2])
    assert target_rank(scores, target).tolist() == [0, 1]
    # a masked item (-inf) is fine, a NaN or +inf anywhere is not: NaN ranked the target -1
    assert target_rank(mask_seen(scores, torch.tensor([[2], [1]])), target).tolist() == [0, 0]
    for row, col in ((0, 1), (1, 3)):  # the target's own score, another item's
        broken = scores.clone()
        broken[row, col] = bad
        with pytest.raises(DataError, match="validation scores .*not finite|of the targets is"):
            target_rank(broken, target, "validation scores")


def test_require_finite_names_what_and_the_kinds():
    require_finite(torch.ones(3), "x")
    with pytest.raises(NonFinite, match=r"^the loss is nan$"):
        require_finite(torch.tensor(float("nan")), "the loss")
    with pytest.raises(NonFinite, match=r"scores have 2 of 3 values not finite \(nan, -inf\)"):
        require_finite(torch.tensor([1.0, float("nan"), float("-inf")]), "scores")


def test_evaluator_refuses_a_model_with_nan_scores(artifacts):
    from recsys_dpo.data.datamodule import load_prepared

    data = load_prepared(artifacts / "prepared" / "synthetic")
    torch.manual_seed(0)
    model = SASRec(n_items=data.n_items, n_users=data.n_users, dim=8, n_layers=1, n_heads=1,
                   max_len=10).eval()  # fmt: skip
    evaluate(model, data, "test", k=[5])  # finite: fine
    with torch.no_grad():
        model.item_emb.weight[3] = float("nan")
    with pytest.raises(DataError, match=r"eval.ckpt=x.ckpt cannot be evaluated: its (user|item) vectors "
                                        r"have \d+ of \d+ values not finite \(nan\)"):  # fmt: skip
        evaluate(model, data, "test", k=[5], what="eval.ckpt=x.ckpt")
