"""One writer per stage output, and a fresh sqlite tracking store set up once: real processes,
real signals. A second run on a locked output stops at once with exit 2 and the owner's pid and
host; a lock whose owner was killed is taken over; two identical pipelines started together
train once and register one model version; four tracked runs starting together on a new sqlite
file all succeed (they raced in MLflow's schema migrations before)."""

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_pipeline
from mlflow.tracking import MlflowClient
from test_pipeline import TINY

from recsys_dpo.artifacts import stage_lock
from recsys_dpo.errors import DataError

HOLD = """
import sys, time
from recsys_dpo.artifacts import stage_lock
with stage_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def wait_for(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"{what}: the process ended first"
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def test_locked_output_is_refused_with_the_owner_then_taken_over_after_kill(tmp_path):
    out = tmp_path / "eval" / "run-test"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DataError) as err, stage_lock(out):
            pass
        message = str(err.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert str(out) in message and "in use by another run" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed owner's lock file is still there, but its lock died with it.
    assert (out.parent / "run-test.lock").is_file()
    with stage_lock(out):
        assert f'"pid": {os.getpid()}' in (out.parent / "run-test.lock").read_text()
    assert not (out.parent / "run-test.lock").exists()


def freeze_outside_the_store(proc: subprocess.Popen, db: Path, tries: int = 200) -> None:
    """SIGSTOP `proc` at a moment it holds no lock on the sqlite file `db`. Frozen inside a
    metric write it would hold the store's lock for as long as it is stopped, and any other
    run would fail with 'database is locked' (CI saw this once): a test artefact, since a
    running process holds that lock for milliseconds. An exclusive transaction succeeds only
    when no other connection holds any lock, and a stopped process cannot take a new one."""
    for _ in range(tries):
        proc.send_signal(signal.SIGSTOP)
        probe = sqlite3.connect(db, timeout=0.2, isolation_level=None)
        try:
            probe.execute("BEGIN EXCLUSIVE")
            probe.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.02)
        finally:
            probe.close()
    raise AssertionError(f"{db} stayed locked by pid {proc.pid} through {tries} tries")


def test_two_identical_pipelines_at_once_train_once_and_register_one_version(tmp_path):
    """The first run is frozen (SIGSTOP) mid-training, after its first checkpoint (so not
    inside its tracking set-up) and outside any write to the tracking store, so the second
    surely starts while the first holds the reference run directory; the second must stop
    with exit 2."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tiny = [o for o in TINY if not o.startswith("pipeline.reference.max_epochs=")]
    args = [sys.executable, str(ROOT / "pipelines" / "run.py"), f"paths.artifacts={tmp_path}",
            *tiny, "pipeline.reference.max_epochs=5", f"tracking.uri={uri}"]  # fmt: skip
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    first = subprocess.Popen([*args, f"hydra.run.dir={tmp_path / 'job1'}"], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    locks = tmp_path / "runs" / "reference"
    wait_for(lambda: any(locks.glob("*.lock")) and any(locks.glob("*/*.ckpt")),
             "the first run's training lock and first checkpoint", first)  # fmt: skip
    freeze_outside_the_store(first, tmp_path / "mlflow.db")
    try:
        second = subprocess.run([*args, f"hydra.run.dir={tmp_path / 'job2'}"], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    finally:
        first.send_signal(signal.SIGCONT)
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    [run_dir] = [p for p in locks.iterdir() if p.is_dir()]
    message = " ".join(second.stderr.split())  # rich may wrap the line
    assert f"pid {first.pid} on host {socket.gethostname()}" in message
    assert run_dir.name in message
    assert not [p for p in run_dir.glob("*.ckpt") if "-v1" in p.name]
    assert not (tmp_path / "job2" / "pipeline_result.json").exists()
    client = MlflowClient(uri)
    [model] = client.search_registered_models()
    assert len(client.search_model_versions(f"name='{model.name}'")) == 1


def test_concurrent_first_use_of_a_new_sqlite_store(tmp_path):
    """Four tracked runs start at once on a fresh sqlite file: each sets the store up or waits
    for the one that does (before: 3 of 4 died in MLflow's migrations, 'table ... already
    exists' / alembic CommandError / CircularDependencyError)."""
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    script = (
        "import sys\n"
        "from omegaconf import OmegaConf\n"
        "from recsys_dpo.tracking.mlflow_utils import Tracker\n"
        "t = Tracker(OmegaConf.create({'enabled': True, 'uri': sys.argv[1], "
        "'experiment': 'recsys-dpo'}))\n"
        "with t.parent('p', {}) as run, t.child('prepare') as child:\n"
        "    t.set_tags(child, {'ok': 1})\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, uri], stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]  # fmt: skip
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(e[-1500:] for e in errors)
    client = MlflowClient(uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "recsys-dpo"]
    assert len(client.search_runs([experiment.experiment_id])) == 8
    assert not (tmp_path / "fresh.db.lock").exists()


def test_prepare_refuses_an_output_another_run_is_writing(tmp_path):
    prepared = tmp_path / "prepared" / "synthetic"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(prepared)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        done = run_pipeline("prepare.py", f"paths.artifacts={tmp_path}", "progress=false",
                            "data.reader.n_users=50", "data.reader.n_items=20", cwd=tmp_path)  # fmt: skip
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"pid {holder.pid}" in " ".join(done.stderr.split())
    assert not prepared.exists()
