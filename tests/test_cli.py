"""The `recsys-dpo` command line (recsys_dpo/cli.py) and the Python API (recsys_dpo/api.py):
subcommands hand their arguments to the stage's hydra app, an unknown one exits 2 with one line,
configs of the user's own are found (--config-dir / config_dir), and `api.run` returns what the
pipeline wrote. Run as `python -m recsys_dpo`, the console script's code; tests/test_wheel.py
runs the installed `recsys-dpo` itself."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, bad_input_message
from mlflow.tracking import MlflowClient
from test_pipeline import STAGES, TINY

from recsys_dpo import api
from recsys_dpo.data.synthetic import read_synthetic
from recsys_dpo.errors import DataError
from recsys_dpo.pipeline import decide

MYLOG = """\
defaults:
  - table
  - _self_
name: mylog
reader:
  path: clicks.parquet
  columns: {user_id: uid, item_id: sku, timestamp: ts, clicked: is_click, request_id: impression}
"""


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`recsys-dpo <args>` in `cwd` (the checkout's code, wherever cwd is)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "recsys_dpo", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def write_log(path: Path, n_users: int = 150) -> Path:
    """A small click log in column names of its own (uid, sku, ts, is_click, impression)."""
    read_synthetic(path.parent / "raw", n_users=n_users, n_items=60).rename(
        {"user_id": "uid", "item_id": "sku", "timestamp": "ts", "clicked": "is_click",
         "request_id": "impression"}).sink_parquet(path)  # fmt: skip
    return path


def test_unknown_command_exits_2_naming_the_commands(tmp_path):
    message = bad_input_message(cli("trian", cwd=tmp_path))
    assert "unknown command 'trian'" in message and "train-reference" in message


def test_help_lists_every_command_and_hydra_help_passes_through(tmp_path):
    done = cli("--help", cwd=tmp_path)
    assert done.returncode == 0
    for command in ("run", "prepare", "train-reference", "train-preference", "train-reward",
                    "evaluate", "export", "study"):  # fmt: skip
        assert f"\n  {command} " in done.stdout
    done = cli("train-preference", "--help", cwd=tmp_path)
    assert done.returncode == 0 and "objective: bce, bpr, bradley_terry, cdpo" in done.stdout


def test_overrides_and_cfg_job_pass_through_from_any_directory(tmp_path):
    done = cli("run", "--cfg", "job", "objective=sdpo", "objective.beta=0.3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "name: sdpo" in done.stdout and "beta: 0.3" in done.stdout
    assert "name: quickstart" in done.stdout  # run's default experiment, from the package


def test_a_bad_setting_through_the_console_script_is_one_line(tmp_path):
    message = bad_input_message(cli("prepare", "data.n_buckets=0", cwd=tmp_path))
    assert "data.n_buckets=0" in message


def test_configs_of_your_own_via_config_dir_and_api(tmp_path):
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "mylog.yaml").write_text(MYLOG)
    write_log(tmp_path / "clicks.parquet")
    done = cli("prepare", "--config-dir", "conf", "data=mylog", "progress=false", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "artifacts" / "prepared" / "mylog" / "manifest.json").is_file()
    # the API, from elsewhere, with the directory given
    other = tmp_path / "api"
    out = api.prepare(["data=mylog", f"data.reader.path={tmp_path / 'clicks.parquet'}",
                       f"paths.artifacts={other}", "progress=false"],
                      config_dir=tmp_path / "conf")  # fmt: skip
    assert out == other / "prepared" / "mylog" and (out / "manifest.json").is_file()
    with pytest.raises(DataError, match="no such directory"):
        api.config("prepare", ["data=mylog"], config_dir=tmp_path / "nowhere")


def test_api_refuses_bad_input_with_a_data_error(tmp_path):
    with pytest.raises(DataError, match="missing.parquet"):
        api.prepare(["data=table", f"data.reader.path={tmp_path / 'missing.parquet'}",
                     f"paths.artifacts={tmp_path}", "progress=false"])  # fmt: skip


def test_api_run_returns_every_output_and_the_decision(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = api.run([*TINY, f"paths.artifacts={tmp_path / 'a'}", f"tracking.uri={uri}"])
    assert (Path(result.prepared) / "manifest.json").is_file()
    assert Path(result.reference_ckpt).is_file() and Path(result.policy_ckpt).is_file()
    assert (Path(result.evaluation) / "metrics.json").is_file()
    assert (Path(result.bundle) / "manifest.json").is_file()
    assert result.candidate == decide(result.metrics, result.primary)
    assert result.policy == result.metrics["models"]["policy"][result.primary]
    assert set(result.ran) == STAGES and set(result.stage_run_ids) == STAGES
    client = MlflowClient(uri)
    for stage, run_id in result.stage_run_ids.items():
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert run.info.run_name == stage
