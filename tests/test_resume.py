"""Training checkpoints under faults, through the real CLIs (issue 15 items 1, 8, 9; issue 11.5).

- A run SIGKILLed after some epoch >= 1 and resumed from `<run dir>/last.ckpt` ends with
  exactly the weights of an uninterrupted run (both stages, early stopping on), and its MLflow
  run (real sqlite store) ends FINISHED instead of staying RUNNING.
- A disk that fills up during training (a real small tmpfs, as root) leaves only complete
  checkpoints and stops with one message, exit 2.
- An empty, truncated, random or non-checkpoint file given as any checkpoint setting is one
  message, exit 2, no traceback.
- Early stopping stops when val/ndcg_at_k does not improve, and says so in result.json.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import ROOT, SHARED_DATA, run_pipeline

from recsys_dpo.errors import DataError
from recsys_dpo.training.reference_module import read_checkpoint

DATA = ("data.reader.n_users=200", "data.reader.n_items=60", "data.max_len=20")
# Sampled negatives and dropout: the RNG matters, so a resume that redraws them differs.
TRAIN = ("model.dim=16", "model.n_layers=1", "model.n_heads=1", "train.batch_size=16",
         "trainer.deterministic=true", "progress=false")  # fmt: skip
REFERENCE = ("objective=bce", "objective.num_negatives=8", "train.lr=1e-2")
EPOCHS = 10
# On in the kill tests: its state (best score, epochs without improvement) must resume too.
PATIENCE = ("train.early_stopping_patience=3",)
# result.json entries a resumed run must share with the uninterrupted one.
SAME_RESULT = ("val/ndcg_at_10", "best_epoch", "stopped_epoch", "stopped_early")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """A tiny prepared synthetic dataset, made once by the prepare CLI."""
    root = tmp_path_factory.mktemp("artifacts")
    done = run_pipeline("prepare.py", f"paths.artifacts={root}", "progress=false", *DATA, cwd=root)
    assert done.returncode == 0, done.stderr
    return root


def tracking(db: Path, experiment: str) -> tuple[str, ...]:
    return ("tracking.enabled=true", f"tracking.uri=sqlite:///{db}",
            f"tracking.experiment={experiment}")  # fmt: skip


def only_run(runs: Path) -> Path:
    [run] = [p for p in runs.iterdir() if p.is_dir()]
    return run


def result(run: Path) -> dict:
    return json.loads((run / "result.json").read_text())


def start(script: str, *overrides: str, cwd: Path) -> subprocess.Popen:
    """A pipelines/ entry point as a background process (output to files, not pipes)."""
    env = {**os.environ, "RECSYS_DPO_SHARED_DATA": str(SHARED_DATA), "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "pipelines" / script), *overrides],
        cwd=cwd,
        env=env,
        stdout=(cwd / "stdout.txt").open("w"),
        stderr=(cwd / "stderr.txt").open("w"),
    )


def saved_epoch(ckpt: Path) -> int:
    """The epoch of a checkpoint being rewritten by a live process (-1 if none or mid-write:
    only the fixed writer guarantees a complete file at every instant)."""
    try:
        return read_checkpoint(ckpt)["epoch"]
    except DataError:
        return -1


def kill_after_epoch(proc: subprocess.Popen, runs: Path, epoch: int, timeout: float = 240) -> Path:
    """SIGKILL `proc` as soon as some run dir under `runs` has a last.ckpt of `epoch` or
    later; that run dir."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run finished before it could be killed"
        for last in runs.glob("*/*/last.ckpt"):
            if saved_epoch(last) >= epoch:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return last.parent
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no last.ckpt of epoch >= {epoch} within {timeout} s")


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = read_checkpoint(a), read_checkpoint(b)
    assert (sa["epoch"], sa["global_step"]) == (sb["epoch"], sb["global_step"])
    assert sa["state_dict"].keys() == sb["state_dict"].keys()
    assert all(torch.equal(sa["state_dict"][k], sb["state_dict"][k]) for k in sa["state_dict"])


def killed_and_resumed(script: str, overrides: tuple[str, ...], tmp: Path, db: Path) -> Path:
    """Run `script`, SIGKILL it once last.ckpt has epoch >= 1, resume it from that last.ckpt
    (same settings, same MLflow store); the run dir. Checks the MLflow run on the way."""
    runs = tmp / "runs"
    proc = start(script, *overrides, *tracking(db, "killed"), f"paths.runs={runs}", cwd=tmp)
    run = kill_after_epoch(proc, runs, 1)
    assert proc.returncode == -signal.SIGKILL and not (run / "result.json").exists()
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("killed").experiment_id
    [killed] = client.search_runs([experiment])
    assert killed.info.status == "RUNNING"  # what a killed process leaves behind
    done = run_pipeline(script, *overrides, *tracking(db, "killed"), f"paths.runs={runs}",
                        f"ckpt_path={run / 'last.ckpt'}", cwd=tmp)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # The resumed attempt logged on into the killed run and ended it.
    [resumed] = client.search_runs([experiment])
    assert resumed.info.run_id == killed.info.run_id == result(run)["mlflow_run_id"]
    assert resumed.info.status == "FINISHED"
    return run


def common(artifacts: Path) -> tuple[str, ...]:
    """The settings every kill test trains both its runs with."""
    return (f"paths.artifacts={artifacts}", *DATA, *TRAIN, f"trainer.max_epochs={EPOCHS}",
            *PATIENCE)  # fmt: skip


def train_straight(script: str, overrides: tuple[str, ...], tmp: Path) -> Path:
    """An uninterrupted run (no tracking); its run dir."""
    done = run_pipeline(script, *overrides, "tracking.enabled=false", f"paths.runs={tmp}",
                        cwd=tmp)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return only_run(tmp / script.removeprefix("train_").removesuffix(".py"))


@pytest.fixture(scope="module")
def straight_reference(artifacts, tmp_path_factory) -> Path:
    """An uninterrupted reference run (its last.ckpt is the preference runs' reference)."""
    return train_straight("train_reference.py", stage_settings(artifacts, None, "reference"),
                          tmp_path_factory.mktemp("straight"))  # fmt: skip


@pytest.fixture(scope="module")
def straight_preference(artifacts, straight_reference, tmp_path_factory) -> Path:
    return train_straight("train_preference.py",
                          stage_settings(artifacts, straight_reference, "preference"),
                          tmp_path_factory.mktemp("straight"))  # fmt: skip


def stage_settings(artifacts: Path, reference: Path | None, stage: str) -> tuple[str, ...]:
    """A kill test's settings: those of `common`, and the stage's objective or reference."""
    if stage == "reference":
        return (*common(artifacts), *REFERENCE)
    return (*common(artifacts), f"reference.ckpt={reference}/last.ckpt")


@pytest.mark.parametrize("stage", ["reference", pytest.param("preference", marks=pytest.mark.slow)])
def test_killed_run_resumes_to_the_uninterrupted_weights(artifacts, stage, request, tmp_path):
    """Both stages share fit(); the preference case runs with -m slow."""
    straight = request.getfixturevalue(f"straight_{stage}")
    reference = request.getfixturevalue("straight_reference")
    settings = stage_settings(artifacts, reference, stage)
    run = killed_and_resumed(f"train_{stage}.py", settings, tmp_path, tmp_path / "mlflow.db")
    expected, got = result(straight), result(run)
    # last.ckpt is the state training ended in, not that of the best epoch.
    assert read_checkpoint(straight / "last.ckpt")["epoch"] == expected["stopped_epoch"]
    assert_same_weights(run / "last.ckpt", straight / "last.ckpt")
    assert {k: got[k] for k in SAME_RESULT} == {k: expected[k] for k in SAME_RESULT}
    assert_same_weights(Path(got["best_ckpt"]), Path(expected["best_ckpt"]))


def test_restart_without_resume_marks_the_killed_mlflow_run_killed(artifacts, tmp_path):
    """A fresh attempt in a killed run's directory (no ckpt_path) ends the old MLflow run as
    KILLED and logs into a new one."""
    db, runs = tmp_path / "mlflow.db", tmp_path / "runs"
    overrides = (f"paths.artifacts={artifacts}", *DATA, *TRAIN, *REFERENCE, *tracking(db, "r"),
                 f"trainer.max_epochs={EPOCHS}", f"paths.runs={runs}")  # fmt: skip
    run = kill_after_epoch(start("train_reference.py", *overrides, cwd=tmp_path), runs, 0)
    killed = json.loads((run / "run.json").read_text())["mlflow_run_id"]
    done = run_pipeline("train_reference.py", *overrides, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("r").experiment_id
    status = {r.info.run_id: r.info.status for r in client.search_runs([experiment])}
    assert status == {killed: "KILLED", result(run)["mlflow_run_id"]: "FINISHED"}


def mid_epoch_step(ckpt: Path) -> int | None:
    """The global step of a checkpoint saved within an epoch (None: at an epoch's end, or
    no complete file yet)."""
    try:
        saved = read_checkpoint(ckpt)
    except DataError:
        return None
    progress = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    return None if progress["is_last_batch"] else saved["global_step"]


@pytest.mark.slow
def test_ckpt_every_n_steps_rewrites_last_ckpt_within_an_epoch(artifacts, tmp_path):
    """train.ckpt_every_n_steps=4: a run killed while last.ckpt holds a mid-epoch state
    resumes from it and finishes."""
    runs = tmp_path / "runs"
    overrides = (f"paths.artifacts={artifacts}", *DATA, *TRAIN, *REFERENCE,
                 "tracking.enabled=false", f"trainer.max_epochs={EPOCHS}",
                 "train.ckpt_every_n_steps=4", f"paths.runs={runs}")  # fmt: skip
    proc = start("train_reference.py", *overrides, cwd=tmp_path)
    deadline, step = time.monotonic() + 240, None
    while step is None:
        assert proc.poll() is None and time.monotonic() < deadline, "no mid-epoch last.ckpt"
        for last in runs.glob("*/*/last.ckpt"):
            step = mid_epoch_step(last)
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert step % 4 == 0
    done = run_pipeline("train_reference.py", *overrides, f"ckpt_path={last}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert result(last.parent)["stopped_epoch"] == EPOCHS - 1


def test_early_stopping_stops_when_valid_ndcg_does_not_improve(artifacts, tmp_path):
    """lr 1e-12 leaves the weights (and so val/ndcg_at_10) unchanged: with patience 1 the run
    stops after epoch 1 of 6 and result.json says so."""
    done = run_pipeline("train_reference.py", f"paths.artifacts={artifacts}", *DATA, *TRAIN,
                        *REFERENCE, "train.lr=1e-12", "train.early_stopping_patience=1",
                        "trainer.max_epochs=6", "tracking.enabled=false",
                        f"paths.runs={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = result(only_run(tmp_path / "reference"))
    assert (out["best_epoch"], out["stopped_epoch"], out["stopped_early"]) == (0, 1, True)
    assert read_checkpoint(out["last_ckpt"])["epoch"] == 1


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root; skipped otherwise), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                             capture_output=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_disk_leaves_only_complete_checkpoints(
    artifacts, straight_reference, small_disk, tmp_path
):
    """Room for about 2.5 checkpoints: epoch 0 writes the best and last.ckpt, epoch 1 runs out
    of space. The stage exits 2 with one message naming the run directory, and every .ckpt
    left there is complete (the previous last.ckpt), no temp file behind."""
    size = (straight_reference / "last.ckpt").stat().st_size
    (small_disk / "filler").write_bytes(b"\0" * (free_bytes(small_disk) - int(2.5 * size)))
    done = run_pipeline("train_reference.py", f"paths.artifacts={artifacts}", *DATA, *TRAIN,
                        *REFERENCE, f"trainer.max_epochs={EPOCHS}", "tracking.enabled=false",
                        f"paths.runs={small_disk}", cwd=tmp_path)  # fmt: skip
    run = only_run(small_disk / "reference")
    message = " ".join(done.stderr.split())
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and message.count("error:") == 1
    assert f"{run}: cannot write" in message and "No space left on device" in message
    ckpts = sorted(p.name for p in run.iterdir() if ".ckpt" in p.name)
    assert "last.ckpt" in ckpts and not any(name.endswith(".tmp") for name in ckpts), ckpts
    for name in ckpts:
        read_checkpoint(run / name)  # complete: loads and is a checkpoint
    assert read_checkpoint(run / "last.ckpt")["epoch"] == 0


BAD_FILES = ("empty", "truncated", "random", "not_a_checkpoint")


@pytest.fixture(scope="module")
def bad_files(straight_reference, tmp_path_factory) -> dict[str, Path]:
    """Files that are not checkpoints, each named .ckpt."""
    tmp = tmp_path_factory.mktemp("bad")
    real = (straight_reference / "last.ckpt").read_bytes()
    files = {name: tmp / f"{name}.ckpt" for name in BAD_FILES}
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(real[: len(real) // 2])
    files["random"].write_bytes(random.Random(0).randbytes(4096))
    torch.save({"weights": torch.zeros(3)}, files["not_a_checkpoint"])
    return files


@pytest.mark.parametrize("kind", BAD_FILES)
def test_read_checkpoint_refuses_what_is_not_a_checkpoint(bad_files, kind):
    with pytest.raises(DataError, match=f"{bad_files[kind]}: not a recsys_dpo checkpoint"):
        read_checkpoint(bad_files[kind])


# (script, the setting given the bad file, the bad file, other overrides): every checkpoint
# setting of every stage, each bad kind at least once (all of them with -m slow).
BAD_INPUTS = [
    ("train_preference.py", "reference.ckpt", "empty", ()),
    ("train_reference.py", "reference.ckpt", "truncated", ("mode=continue",)),
    ("train_reference.py", "ckpt_path", "random", REFERENCE),
    ("evaluate.py", "eval.ckpt", "not_a_checkpoint", ()),
    pytest.param(
        "evaluate.py", "reference.ckpt", "truncated", ("eval.ckpt=GOOD",), marks=pytest.mark.slow
    ),
]


@pytest.mark.parametrize(("script", "setting", "kind", "extra"), BAD_INPUTS)
def test_a_bad_checkpoint_file_is_one_message_and_exit_2(
    artifacts, straight_reference, bad_files, tmp_path, script, setting, kind, extra
):
    good = straight_reference / "last.ckpt"
    extra = tuple(o.replace("GOOD", str(good)) for o in extra)
    done = run_pipeline(script, f"paths.artifacts={artifacts}", *DATA, *TRAIN, *extra,
                        f"{setting}={bad_files[kind]}", "tracking.enabled=false",
                        f"paths.runs={tmp_path}", f"eval.out_dir={tmp_path}", cwd=tmp_path)  # fmt: skip
    message = " ".join(done.stderr.split())
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and message.count("error:") == 1, done.stderr
    assert f"{setting}" in message and f"{bad_files[kind]}: not a recsys_dpo checkpoint" in message
    assert not list(tmp_path.glob("*/*/*.ckpt"))  # nothing trained


@pytest.mark.slow
def test_export_of_a_bad_checkpoint_is_one_message_and_exit_2(artifacts, bad_files, tmp_path):
    """A broken export.ckpt is refused by the one loader before its evaluation is checked."""
    done = run_pipeline("export.py", f"paths.artifacts={artifacts}", *DATA,
                        f"export.ckpt={bad_files['truncated']}", f"export.evaluation={tmp_path}",
                        f"export.out={tmp_path / 'bundle'}", "tracking.enabled=false",
                        cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    message = " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr and message.count("error:") == 1
    assert f"export.ckpt={bad_files['truncated']}: not a recsys_dpo checkpoint" in message
    assert not (tmp_path / "bundle").exists()
