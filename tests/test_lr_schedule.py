"""train.lr_schedule / train.warmup_steps (recsys_dpo/training/schedule.py): torch's schedulers
give the closed-form learning rate at every step, and both training stages, trained for real,
step them per optimizer step and log `lr` to MLflow as they go."""

import math
from pathlib import Path

import pytest
import torch
from conftest import run_pipeline
from mlflow.tracking import MlflowClient
from test_train_cli import DATA, config, result

from recsys_dpo.errors import DataError
from recsys_dpo.training.run import train_preference, train_reference
from recsys_dpo.training.schedule import lr_scheduler

LR = 0.01


def closed_form(step: int, schedule: str, warmup: int, total: int, lr: float = LR) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    return lr * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


def lrs(schedule: str, warmup: int, total: int) -> list[float]:
    """The lr of each of `total` optimizer steps, stepping the scheduler as Lightning does."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = lr_scheduler(optimizer, schedule, warmup, total)
    out = []
    for _ in range(total):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize(("schedule", "warmup", "total"),
                         [("cosine", 4, 20), ("cosine", 0, 10), ("cosine", 1, 7),
                          ("constant", 5, 12)])  # fmt: skip
def test_lr_follows_the_closed_form(schedule, warmup, total):
    got = lrs(schedule, warmup, total)
    assert got == pytest.approx([closed_form(s, schedule, warmup, total) for s in range(total)],
                                abs=1e-12)  # fmt: skip
    if warmup:
        assert got[warmup - 1] == pytest.approx(LR)  # warmup ends at the full lr
    if schedule == "cosine":
        # up during the warmup, down from then on
        assert got == sorted(got[:warmup]) + sorted(got[warmup:], reverse=True)


def test_constant_without_warmup_has_no_scheduler_and_bad_warmups_are_refused():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    assert lr_scheduler(optimizer, "constant", 0, 10) is None
    with pytest.raises(ValueError, match="warmup_steps=10: the run has only 10 optimizer steps"):
        lr_scheduler(optimizer, "cosine", 10, 10)
    with pytest.raises(ValueError, match="lr_schedule='linear'"):
        lr_scheduler(optimizer, "linear", 0, 10)


# Three optimizer steps per epoch, logged at every step.
STEPS = ("model.dim=16", "model.n_layers=1", "model.n_heads=1", "train.batch_size=32",
         "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1",
         "+trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1", "progress=false")  # fmt: skip


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("schedule")
    done = run_pipeline("prepare.py", f"paths.artifacts={root}", "progress=false", *DATA, cwd=root)
    assert done.returncode == 0, done.stderr
    return root


def logged_lr(uri: str, run_dir: Path) -> list[tuple[int, float]]:
    history = MlflowClient(uri).get_metric_history(result(run_dir)["mlflow_run_id"], "lr")
    return [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]


def test_both_stages_step_the_schedule_and_log_it(artifacts):
    uri = f"sqlite:///{artifacts / 'mlflow.db'}"
    tracked = ("tracking.enabled=true", f"tracking.uri={uri}")
    # Stage 1: 2 epochs = 6 steps, 2 of warmup, then cosine.
    ref = train_reference(config("train_reference", artifacts, *STEPS, *tracked,
                                 "trainer.max_epochs=2", f"train.lr={LR}",
                                 "train.lr_schedule=cosine", "train.warmup_steps=2"))  # fmt: skip
    assert logged_lr(uri, ref) == [(s, pytest.approx(closed_form(s, "cosine", 2, 6)))
                                   for s in range(6)]  # fmt: skip
    # Stage 2 from it: 3 steps of warmup to lr, then constant.
    pol = train_preference(config("config", artifacts, *STEPS, *tracked, "objective=dpo",
                                  f"reference.ckpt={result(ref)['last_ckpt']}",
                                  "trainer.max_epochs=2", "train.lr=0.001",
                                  "train.warmup_steps=3"))  # fmt: skip
    assert logged_lr(uri, pol) == [
        (s, pytest.approx(closed_form(s, "constant", 3, 6, lr=0.001))) for s in range(6)
    ]
    # The scheduler is in the checkpoint, so a resumed run continues the schedule.
    saved = torch.load(result(pol)["last_ckpt"], weights_only=True)["lr_schedulers"]
    assert saved and saved[0]["last_epoch"] == 6


def test_default_is_a_constant_lr_with_no_scheduler(artifacts):
    run = train_reference(config("train_reference", artifacts, *STEPS, "tracking.enabled=false",
                                 "trainer.max_epochs=1", "paths.runs=" + str(artifacts / "c")))  # fmt: skip
    checkpoint = torch.load(result(run)["last_ckpt"], weights_only=True)
    assert checkpoint["lr_schedulers"] == []
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == 1e-3


def test_a_warmup_longer_than_the_run_is_refused_before_training(artifacts):
    cfg = config("train_reference", artifacts, *STEPS, "tracking.enabled=false",
                 "trainer.max_epochs=1", "train.lr_schedule=cosine", "train.warmup_steps=3",
                 "paths.runs=" + str(artifacts / "w"))  # fmt: skip
    with pytest.raises(DataError, match="train.warmup_steps=3: the run has only 3 optimizer"):
        train_reference(cfg)
    assert not list((artifacts / "w").rglob("*.ckpt"))
