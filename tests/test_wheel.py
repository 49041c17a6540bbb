"""`pip install` of a built wheel, outside the checkout, runs the quickstart: the console script
and the Python API of the installed package (the configs come from the package, no file of the
checkout is importable), both on one working directory."""

import json
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, installed_env
from test_pipeline import TINY

OVERRIDES = ("experiment=quickstart", *TINY, "tracking.uri=sqlite:///mlflow.db")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("user")
    assert ROOT not in work.parents
    return work


def test_the_package_and_its_configs_come_from_the_virtualenv(installed, workdir):
    done = subprocess.run(
        [str(installed / "python"), "-c", "import recsys_dpo.conf as c; print(c.__file__)"],
        cwd=workdir, env=installed_env(installed), capture_output=True, text=True, check=True,
    )  # fmt: skip
    conf = Path(done.stdout.strip()).parent
    assert installed.parent in conf.parents and (conf / "experiment" / "quickstart.yaml").is_file()


def test_console_script_runs_the_quickstart_outside_the_checkout(installed, workdir):
    done = subprocess.run(
        ["recsys-dpo", "run", *OVERRIDES, "hydra.run.dir=job"], cwd=workdir,
        env=installed_env(installed), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((workdir / "job" / "pipeline_result.json").read_text())
    assert result["ran"] == ["prepare", "reference", "preference", "evaluate", "export"]
    bundle, evaluation = workdir / result["bundle"], workdir / result["evaluation"]
    assert (bundle / "manifest.json").is_file() and (bundle / "MODEL_CARD.md").is_file()
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert "ndcg_at_10" in metrics["deltas"] and (workdir / "mlflow.db").is_file()


def test_api_of_the_installed_package_composes_what_the_console_script_did(installed, workdir):
    """Same overrides, same working directory: every stage is found up to date (the same
    config hashes), and the result points at the console script's outputs."""
    script = ("import json; from dataclasses import asdict; from recsys_dpo import api; "
              f"print(json.dumps(asdict(api.run({list(OVERRIDES)!r}))))")  # fmt: skip
    done = subprocess.run([str(installed / "python"), "-c", script], cwd=workdir,
                          env=installed_env(installed), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    cli = json.loads((workdir / "job" / "pipeline_result.json").read_text())
    assert result["ran"] == []
    for key in ("prepared", "reference_ckpt", "policy_ckpt", "evaluation", "bundle", "candidate"):
        assert result[key] == cli[key], key
    assert set(result["stage_run_ids"]) == {"prepare", "reference", "preference", "evaluate",
                                            "export"}  # fmt: skip
