"""`recsys-dpo run` (as `pipelines/run.py`) end to end on a tiny synthetic log, then what MLflow holds, read back with
MlflowClient: a parent run with one child per stage, config params and artifacts, the dataset
input, training and evaluation metrics, the registered candidate; a re-run skips every stage."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import run_pipeline
from mlflow.tracking import MlflowClient

from recsys_dpo.artifacts import read_manifest
from recsys_dpo.tracking.mlflow_utils import CANDIDATE_ALIAS, flat_params

# Every stage runs, on a log small enough for CI (a few seconds of training).
TINY = ("data.reader.n_users=300", "data.reader.n_items=80", "data.max_len=10", "model.dim=16",
        "trainer.max_epochs=1", "pipeline.reference.max_epochs=2", "eval.n_resamples=100",
        "train.batch_size=128", "progress=false")  # fmt: skip
STAGES = {"prepare", "reference", "preference", "evaluate", "export"}


def run(tmp: Path, job: str, *overrides: str) -> subprocess.CompletedProcess:
    """pipelines/run.py with the tiny settings, artifacts under tmp, hydra's job dir tmp/job."""
    return run_pipeline("run.py", f"paths.artifacts={tmp / 'artifacts'}", *TINY, *overrides,
                        f"hydra.run.dir={tmp / job}", cwd=tmp)  # fmt: skip


def job_result(tmp: Path, job: str) -> dict:
    return json.loads((tmp / job / "pipeline_result.json").read_text())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("pipeline")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    done = run(tmp, "job1", f"tracking.uri={uri}", "seed=3")
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, uri


def runs_of(uri: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("recsys-dpo")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_one_parent_with_a_child_per_stage(pipeline):
    tmp, uri = pipeline
    runs = runs_of(uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == job_result(tmp, "job1")["parent_run_id"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId")
                == parent.info.run_id}  # fmt: skip
    assert set(children) == STAGES
    # the result names each stage's child run (the training stages log as "reference" and
    # "preference")
    assert job_result(tmp, "job1")["stage_run_ids"] == {
        name: r.info.run_id for name, r in children.items()}  # fmt: skip
    assert all(r.info.status == "FINISHED" for r in runs)
    assert job_result(tmp, "job1")["ran"] == [
        "prepare",
        "reference",
        "preference",
        "evaluate",
        "export",
    ]


def test_config_params_artifacts_and_dataset_input(pipeline):
    tmp, uri = pipeline
    client = MlflowClient(uri)
    parent = next(r for r in runs_of(uri) if "mlflow.parentRunId" not in r.data.tags)
    params = parent.data.params
    assert params["seed"] == "3"
    assert params["data.reader.n_users"] == "300"  # an override reaches the params
    assert "seed=3" in params["overrides"]
    assert params["objective.name"] == "dpo" and params["pipeline.name"] == "quickstart"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "config.yaml" in artifacts
    manifest = read_manifest(tmp / "artifacts" / "prepared" / "synthetic")
    digests = [d.dataset.digest for d in parent.inputs.dataset_inputs]
    assert digests == [manifest["config_hash"]]


def test_training_and_evaluation_metrics(pipeline):
    tmp, uri = pipeline
    client = MlflowClient(uri)
    children = {r.info.run_name: r for r in runs_of(uri) if r.data.tags.get("mlflow.parentRunId")}
    assert "val/ndcg_at_10" in children["reference"].data.metrics
    assert {"loss", "rewards/margins", "rewards/accuracies"} <= set(
        children["preference"].data.metrics
    )
    history = client.get_metric_history(children["preference"].info.run_id, "loss")
    assert len(history) >= 1
    metrics = json.loads((Path(job_result(tmp, "job1")["evaluation"]) / "metrics.json").read_text())
    logged = children["evaluate"].data.metrics
    assert logged["policy/ndcg_at_10"] == pytest.approx(metrics["models"]["policy"]["ndcg_at_10"])
    assert logged["delta_lo/ndcg_at_10"] == pytest.approx(metrics["deltas"]["ndcg_at_10"]["lo"])
    # The quickstart's log has propensities and a temporal split: the off-policy estimates too.
    assert logged["policy/ope/snips_ctr"] == pytest.approx(
        metrics["models"]["policy"]["ope/snips_ctr"])
    assert logged["reference/ope/exact_ctr"] == pytest.approx(
        metrics["models"]["reference"]["ope/exact_ctr"])
    assert logged["delta_lo/ope/snips_ctr"] == pytest.approx(metrics["deltas"]["ope/snips_ctr"]["lo"])
    files = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id, "evaluation")}
    assert {"evaluation/report.md", "evaluation/curves.png", "evaluation/kl.png"} <= files
    assert "config.yaml" in {a.path for a in client.list_artifacts(
        children["reference"].info.run_id)}  # fmt: skip


def test_registered_version_alias_matches_the_ci(pipeline):
    tmp, uri = pipeline
    client = MlflowClient(uri)
    result = job_result(tmp, "job1")
    metrics = json.loads((Path(result["evaluation"]) / "metrics.json").read_text())
    better = metrics["deltas"]["ndcg_at_10"]["lo"] > 0
    versions = client.search_model_versions("name='quickstart-sasrec'")
    assert len(versions) == 1
    version = versions[0]
    assert result["candidate"] == better
    assert version.tags["candidate"] == ("better" if better else "not_better")
    aliases = client.get_registered_model("quickstart-sasrec").aliases
    assert (aliases.get(CANDIDATE_ALIAS) == version.version) == better


def test_summary_written_and_rerun_skips_every_stage(pipeline):
    tmp, uri = pipeline
    assert "| quickstart-sasrec | dpo | 0.1 |" in (tmp / "job1" / "summary.md").read_text()
    done = run(tmp, "job2", f"tracking.uri={uri}", "seed=3")
    assert done.returncode == 0, done.stderr[-3000:]
    again = job_result(tmp, "job2")
    assert again["ran"] == []
    assert again["delta"] == job_result(tmp, "job1")["delta"]
    skipped = [r for r in runs_of(uri) if r.data.tags.get("mlflow.parentRunId")
               == again["parent_run_id"]]  # fmt: skip
    assert {r.data.tags["skipped"] for r in skipped} == {"True"}


def test_multirun_sweep_summary_has_a_column_per_swept_key(tmp_path):
    sweep = tmp_path / "sweep"
    done = run_pipeline("run.py", "-m", "objective.beta=0.05,0.2", f"paths.artifacts={tmp_path / 'a'}", *TINY, "tracking.enabled=false",
                        f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((sweep / "summary.json").read_text())
    assert [r["beta"] for r in rows] == [0.05, 0.2]  # in job order
    assert rows[1]["ran"] == ["preference", "evaluate", "export"]  # data and reference reused
    lines = (sweep / "summary.md").read_text().splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    # the swept key after the run; the overrides every job shares are no columns
    assert header[:3] == ["run", "objective.beta", "objective"]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[4:]]
    assert [c[1] for c in cells] == ["0.05", "0.2"]
    assert "objective.beta" in done.stdout  # the printed sweep table has them too


def test_flat_params_cut_to_mlflow_limit():
    params = flat_params({"a": {"b": 1, "c": {"d": "x" * 10_000}}, "e": [1, 2]})
    assert params == {"a.b": "1", "a.c.d": "x" * 6000, "e": "[1, 2]"}


def test_an_rlhf_objective_trains_its_reward_model_between_the_stages(tmp_path):
    """objective=rlhf_pg without reward.ckpt: a reward stage (its own MLflow child) trains the
    Bradley-Terry model from this very reference with pipeline.reward's recipe, and the policy
    optimises against it; reward.ckpt given: that one is used and no reward stage runs."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = run(tmp_path, "rlhf", f"tracking.uri={uri}", "objective=rlhf_pg",
               "pipeline.reward.max_epochs=1", "pipeline.reward.lr=0.01")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = job_result(tmp_path, "rlhf")
    assert "reward" in result["ran"] and set(result["stage_run_ids"]) >= {"reward", "preference"}
    hp = torch.load(result["policy_ckpt"], map_location="cpu", weights_only=False)
    reward_ckpt = hp["hyper_parameters"]["reward_ckpt"]
    reward = torch.load(reward_ckpt, map_location="cpu", weights_only=False)
    assert reward["hyper_parameters"]["reference_ckpt"] == result["reference_ckpt"]
    assert reward["epoch"] == 0  # pipeline.reward.max_epochs=1, not the preference stage's
    runs = {r.info.run_name for r in runs_of(uri)}
    assert "reward" in runs
    # The DPO family never trains one, and a given reward.ckpt is used as it is.
    again = run(tmp_path, "given", f"tracking.uri={uri}", "objective=rlhf_exact",
                f"reward.ckpt={reward_ckpt}")  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    given = job_result(tmp_path, "given")
    assert "reward" not in given["ran"]
    hp = torch.load(given["policy_ckpt"], map_location="cpu", weights_only=False)
    assert hp["hyper_parameters"]["reward_ckpt"] == reward_ckpt
    refused = run(tmp_path, "dpo", "tracking.enabled=false", f"reward.ckpt={reward_ckpt}")
    assert refused.returncode == 2 and "only the RLHF objectives" in refused.stderr
