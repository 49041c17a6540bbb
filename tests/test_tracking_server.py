"""Against a REAL `mlflow server` (sqlite backend, local artifact store) on a free local port:
a pipeline logs to it over HTTP and the runs read back; with no server there, the pipeline fails
within seconds, exit 2, one message, and writes nothing."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, wait_until_up
from mlflow.tracking import MlflowClient
from test_pipeline import run

from recsys_dpo.tracking.mlflow_utils import EXPERIMENT_KIND, MODEL_TRAINING


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tracking server's URI; killed at teardown."""
    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{tmp / 'backend.db'}", "--artifacts-destination", str(tmp / "store"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{uri}/health", proc, 90, "mlflow server")
        yield uri, tmp / "store"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_pipeline_logs_to_a_server_over_http(server, tmp_path):
    uri, store = server
    done = run(tmp_path, "job", f"tracking.uri={uri}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to a local store
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("recsys-dpo")
    assert experiment.tags[EXPERIMENT_KIND] == MODEL_TRAINING  # the UI's model-training view
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.info.run_name for r in children} == {"prepare", "reference", "preference",
                                                   "evaluate", "export"}  # fmt: skip
    assert "policy/ndcg_at_10" in parent.data.metrics
    assert "config.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert any(p.name == "config.yaml" for p in store.rglob("*"))  # proxied to the server's store
    assert client.search_model_versions("name='quickstart-sasrec'")


def test_unreachable_server_fails_fast_and_writes_nothing(tmp_path):
    start = time.monotonic()
    done = run(tmp_path, "job", f"tracking.uri=http://127.0.0.1:{free_port()}")
    assert done.returncode == 2
    assert "tracking server does not answer" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "artifacts").exists()
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "job" / "pipeline_result.json").exists()
    assert not Path(tmp_path / "mlruns").exists()
