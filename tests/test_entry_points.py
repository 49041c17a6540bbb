"""The checks every entry point makes before any work, through the real CLIs: a bad setting
(recsys_dpo.settings) or an unreachable tracking server exits 2 within seconds with one line
naming the key, and nothing is trained or written. tests/test_settings.py covers the rules."""

import json
import socket
from pathlib import Path

import pytest
from conftest import CONF, run_pipeline
from hydra import compose, initialize_config_dir
from test_pipeline import TINY

from recsys_dpo.errors import DataError
from recsys_dpo.stage import exits_cleanly_on_bad_input
from recsys_dpo.training.run import train_reference

DATA = ("data.reader.n_users=200", "data.reader.n_items=60", "data.max_len=20")
# An entry point that retried (255 s for an unreachable MLflow server) fails by timing out.
FAST = 60


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """(artifacts root with a tiny prepared synthetic dataset, a reference checkpoint on it)."""
    root = tmp_path_factory.mktemp("artifacts")
    done = run_pipeline("prepare.py", f"paths.artifacts={root}", "progress=false", *DATA, cwd=root)
    assert done.returncode == 0, done.stderr
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train_reference", overrides=[
            f"paths.artifacts={root}", *DATA, "model.dim=16", "model.n_layers=1",
            "model.n_heads=1", "trainer.max_epochs=1", "progress=false",
            "tracking.enabled=false", f"paths.runs={root / 'refs'}"])  # fmt: skip
    run = train_reference(cfg)
    return root, Path(json.loads((run / "result.json").read_text())["best_ckpt"])


def stage(script: str, prepared: tuple[Path, Path], tmp: Path, *overrides: str):
    """`script` on the prepared dataset, its outputs (runs, evaluations) under `tmp`."""
    root, ckpt = prepared
    return run_pipeline(
        script, f"paths.prepared={root / 'prepared' / 'synthetic'}", f"paths.runs={tmp / 'runs'}",
        f"eval.out_dir={tmp / 'eval'}", f"reference.ckpt={ckpt}", *DATA, "model.dim=16",
        "model.n_layers=1", "model.n_heads=1", "trainer.max_epochs=1", "progress=false",
        *overrides, f"hydra.run.dir={tmp / 'job'}", cwd=tmp, timeout=FAST,
    )  # fmt: skip


def whole_run(tmp: Path, *overrides: str):
    """pipelines/run.py with tiny settings, all its outputs under `tmp`."""
    return run_pipeline("run.py", f"paths.artifacts={tmp / 'artifacts'}", *TINY, *overrides,
                        f"hydra.run.dir={tmp / 'job'}", cwd=tmp, timeout=FAST)  # fmt: skip


def refused(done, *fragments: str) -> str:
    """The one-line message of a run that exited 2 without a traceback, naming `fragments`."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("script", ["train_reference.py", "train_preference.py", "run.py"])
def test_unreachable_tracking_server_fails_fast(prepared, tmp_path, script):
    uri = f"http://127.0.0.1:{closed_port()}"
    if script == "run.py":
        done = whole_run(tmp_path, f"tracking.uri={uri}")
    else:
        done = stage(script, prepared, tmp_path, f"tracking.uri={uri}")
    refused(done, f"tracking.uri={uri}", "tracking server does not answer")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "artifacts").exists()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize(
    ("script", "overrides", "message"),
    [("train_reference.py", ["train.k=0"], "config: train.k=0: must be >= 1"),
     ("train_preference.py", ["train.batch_size=0"], "config: train.batch_size=0: must be >= 1"),
     ("evaluate.py", ["eval.batch_size=0", "eval.ckpt=REF"],
      "config: eval.batch_size=0: must be >= 1")],
)  # fmt: skip
def test_bad_setting_fails_before_any_work(prepared, tmp_path, script, overrides, message):
    overrides = [o.replace("REF", str(prepared[1])) for o in overrides]
    done = stage(script, prepared, tmp_path, "tracking.enabled=false", *overrides)
    refused(done, message)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "eval").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["objective=bce"], "config: objective=bce is a reference-stage loss"),
     (["pipeline.reference.objective.name=dpo", "pipeline.reference.objective.stage=preference"],
      "pipeline.reference.objective.stage=preference: must be 'reference'")],
)  # fmt: skip
def test_run_refuses_an_objective_of_the_wrong_stage_up_front(tmp_path, overrides, message):
    refused(whole_run(tmp_path, *overrides), message)
    assert not (tmp_path / "artifacts").exists()  # not even the prepared dataset
    assert not (tmp_path / "mlflow.db").exists()


def test_a_refusal_prints_its_message_whole_on_one_line(capsys):
    message = "x" * 150 + " columns [user_id, ts], tag [/x]"

    @exits_cleanly_on_bad_input
    def stage_that_refuses() -> None:
        raise DataError(message)

    with pytest.raises(SystemExit) as exited:
        stage_that_refuses()
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"
