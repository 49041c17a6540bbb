"""What a run prints and where it tracks, as a CI job sees it: `pipelines/run.py` on a tiny log
with stdout and stderr going to files and no terminal anywhere. Third-party noise is gone
(recsys_dpo/quiet.py), RECSYS_DPO_VERBOSE=1 brings it back, the wide tables keep whole rows,
and MLFLOW_TRACKING_URI picks the store, its experiment tagged for the model-training view."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF, ROOT, SHARED_DATA
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from test_pipeline import TINY

from recsys_dpo.quiet import LOG_COLUMNS, VERBOSE_ENV
from recsys_dpo.tracking.mlflow_utils import EXPERIMENT_KIND, MODEL_TRAINING, open_tracking

NOISE = (
    "💡 Tip",
    "litlogger",
    "GPU available:",
    "TPU available:",
    "Seed set to",
    "deprecated",
    "Passing a Python object as `python_model`",
    "Failed to infer model signature",
    "Downloading artifacts",
    "Creating initial MLflow database tables",
    "Loading faiss",
)


def no_terminal_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("COLUMNS", "MLFLOW_TRACKING_URI", VERBOSE_ENV)}  # fmt: skip
    return {**env, "RECSYS_DPO_SHARED_DATA": str(SHARED_DATA), "HYDRA_FULL_ERROR": "0", **extra}


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> tuple[Path, str, str]:
    """A whole tiny pipeline, tracking to the store MLFLOW_TRACKING_URI names (no tracking.uri
    given), progress on as a user runs it; its (directory, stdout, stderr)."""
    tmp = tmp_path_factory.mktemp("output")
    out, err = tmp / "stdout.txt", tmp / "stderr.txt"
    overrides = [o for o in TINY if o != "progress=false"]
    with out.open("w") as stdout, err.open("w") as stderr:
        done = subprocess.run(
            [sys.executable, str(ROOT / "pipelines" / "run.py"), f"paths.artifacts={tmp / 'a'}",
             *overrides, f"hydra.run.dir={tmp / 'job'}"],
            cwd=tmp, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, timeout=600,
            env=no_terminal_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'env.db'}"),
        )  # fmt: skip
    assert done.returncode == 0, err.read_text()[-3000:]
    return tmp, out.read_text(), err.read_text()


def test_no_third_party_noise(logged):
    _, stdout, stderr = logged
    for line in NOISE:
        assert line not in stdout and line not in stderr, line
    assert "Epoch" in stdout  # the project's own progress and tables still print


def test_wide_table_rows_are_whole_in_a_file(logged):
    _, stdout, _ = logged
    # The summary row: run, objective, beta, both scores, the delta with its CI, KL, verdict.
    row = next(line for line in stdout.splitlines() if "quickstart-sasrec" in line)
    assert 80 < len(row) <= LOG_COLUMNS
    assert "…" not in row and row.count("[") == 1 and row.count("]") == 1 and "dpo" in row
    assert "ope/pseudo_inverse_ctr" in stdout  # the evaluation table's longest metric name
    assert "\n\n\n" not in stdout  # no blank lines left by progress bars a file cannot show


def test_mlflow_tracking_uri_and_the_experiment_kind(logged):
    tmp, _, _ = logged
    assert not (tmp / "mlflow.db").exists()  # not the default store: the environment's
    experiment = MlflowClient(f"sqlite:///{tmp / 'env.db'}").get_experiment_by_name("recsys-dpo")
    assert experiment.tags[EXPERIMENT_KIND] == MODEL_TRAINING
    assert len(MlflowClient(f"sqlite:///{tmp / 'env.db'}").search_runs(
        [experiment.experiment_id])) == 6  # fmt: skip


def test_an_explicit_tracking_uri_wins_over_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        from_env = compose("run").tracking.uri
        given = compose("run", overrides=[f"tracking.uri=sqlite:///{tmp_path}/x.db"]).tracking.uri
    assert from_env == "http://127.0.0.1:5999"
    assert given == f"sqlite:///{tmp_path}/x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert compose("run").tracking.uri == "sqlite:///mlflow.db"


def test_an_existing_experiment_gets_the_kind_and_a_set_kind_is_kept(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    plain_id = client.create_experiment("old")
    other_id = client.create_experiment("other", tags={EXPERIMENT_KIND: "genai_development"})
    open_tracking(uri, "old")
    open_tracking(uri, "other")
    assert client.get_experiment(plain_id).tags[EXPERIMENT_KIND] == MODEL_TRAINING
    assert client.get_experiment(other_id).tags[EXPERIMENT_KIND] == "genai_development"


LIGHTNING_NOISE = """
import logging, warnings
from recsys_dpo.quiet import quiet_output
quiet_output()
from lightning.pytorch import Trainer, seed_everything
seed_everything(0)
Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
logging.getLogger("faiss.loader").info("Loading faiss with AVX2 support.")
warnings.warn("old API is deprecated", DeprecationWarning)
warnings.warn("this FutureWarning is no deprecation", FutureWarning)
warnings.warn("a plain user warning", UserWarning)
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_brings_the_noise_back(verbose):
    logging_setup = "import logging; logging.basicConfig(level=logging.INFO)\n"
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", logging_setup + LIGHTNING_NOISE],
        cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
        env=no_terminal_env(**({VERBOSE_ENV: "1"} if verbose else {})),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    noise = ("Seed set to 0", "GPU available:", "TPU available:", "💡 Tip", "Loading faiss",
             "old API is deprecated")  # fmt: skip
    assert [n in done.stderr for n in noise] == [verbose] * len(noise), done.stderr
    # Warnings that are no deprecation always pass.
    assert "no deprecation" in done.stderr and "a plain user warning" in done.stderr
