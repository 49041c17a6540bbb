"""The retraining replay (recsys_dpo/retrain.py): the promotion rule on cases built to tie and
to win, the `production` alias moved in a real sqlite registry only when the rule holds, and a
tiny replay of 3 windows of the drifting synthetic log end to end through pipelines/run.py,
read back from MLflow."""

import copy
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import CONF, bad_input_message, run_pipeline
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import open_dict

from recsys_dpo import api
from recsys_dpo.data.vocab import Vocab
from recsys_dpo.errors import DataError
from recsys_dpo.evaluation.evaluator import Delta
from recsys_dpo.evaluation.metrics import paired_bootstrap_ci
from recsys_dpo.retrain import (
    PRODUCTION_ALIAS,
    alias_history,
    promote,
    record_decision,
)
from recsys_dpo.tracking.mlflow_utils import open_tracking
from recsys_dpo.training.run import run_dir

# test_pipeline.TINY on the drifting log: 14 days of 300 users and 80 items.
TINY = ("data.reader.n_users=300", "data.reader.n_items=80", "data.max_len=10", "model.dim=16",
        "trainer.max_epochs=1", "pipeline.reference.max_epochs=2", "eval.n_resamples=100",
        "train.batch_size=128", "progress=false")  # fmt: skip
NAME = "retrain_synthetic-sasrec"


def tie(n_users: int = 400) -> Delta:
    """The paired CI of per-user deltas built symmetric around 0 (+d and -d, each user once)."""
    production = np.full(n_users, 0.5)
    d = np.linspace(0.01, 0.3, n_users // 2)
    candidate = production + np.concatenate([d, -d])
    return Delta(*paired_bootstrap_ci(production, candidate, 500, seed=0))


def test_the_rule_keeps_production_on_a_tie_and_on_identical_models():
    spanning = tie()
    assert spanning.mean == pytest.approx(0, abs=1e-12)
    assert spanning.lo < 0 < spanning.hi
    assert not promote(spanning)
    same = np.random.default_rng(0).random(300)
    assert not promote(Delta(*paired_bootstrap_ci(same, same.copy(), 200, seed=1)))  # [0, 0]
    assert not promote(Delta(float("nan"), float("nan"), float("nan")))
    assert promote(Delta(*paired_bootstrap_ci(same, same + 0.01, 200, seed=1)))


def test_the_alias_moves_only_when_the_rule_holds(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = open_tracking(uri, "recsys-dpo")
    client.create_registered_model(NAME)
    versions = [str(client.create_model_version(NAME, str(tmp_path)).version) for _ in range(3)]
    record_decision(client, NAME, versions[0], 0, True)
    record_decision(client, NAME, versions[1], 1, promote(tie()))
    assert str(client.get_model_version_by_alias(NAME, PRODUCTION_ALIAS).version) == versions[0]
    assert client.get_model_version(NAME, versions[1]).tags["production.promoted"] == "false"
    record_decision(client, NAME, versions[2], 2, promote(Delta(0.02, 0.01, 0.03)))
    assert str(client.get_model_version_by_alias(NAME, PRODUCTION_ALIAS).version) == versions[2]
    assert alias_history(client, NAME) == [(0, versions[0]), (2, versions[2])]


@pytest.mark.parametrize(("overrides", "named"), [
    (("experiment=retrain_synthetic", "tracking.enabled=false"), "tracking.enabled=true"),
    (("pipeline.retrain.windows=2",), "pipeline.retrain.first_train_end"),
    (("experiment=retrain_synthetic", "train.pairs_since=5"), "fine_tune_on=all|new"),
])  # fmt: skip
def test_a_replay_without_what_it_needs_is_refused_before_any_work(tmp_path, overrides, named):
    done = run_pipeline("run.py", *overrides, f"paths.artifacts={tmp_path / 'a'}",
                        f"hydra.run.dir={tmp_path / 'job'}", cwd=tmp_path)  # fmt: skip
    assert named in bad_input_message(done)
    assert not (tmp_path / "a").exists()


def test_the_python_api_runs_the_replay_and_run_refuses_it(tmp_path):
    given = ["experiment=retrain_synthetic", f"paths.artifacts={tmp_path / 'a'}"]
    with pytest.raises(DataError, match="tracking.enabled=true"):
        api.retrain([*given, "tracking.enabled=false"])
    with pytest.raises(DataError, match="recsys_dpo.api.retrain"):
        api.run(given)
    assert not (tmp_path / "a").exists()


def test_an_unset_pairs_since_leaves_the_run_hashes_as_they_were():
    """Runs trained before train.pairs_since existed keep their directories (and caches)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["reference.ckpt=r.ckpt"])
        since = compose("config", overrides=["reference.ckpt=r.ckpt", "train.pairs_since=5"])
    before = copy.deepcopy(cfg)
    with open_dict(before):
        del before.train["pairs_since"]
    assert run_dir(cfg, "preference", "x") == run_dir(before, "preference", "x")
    assert run_dir(since, "preference", "x") != run_dir(cfg, "preference", "x")


def not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


@pytest.fixture(scope="module")
def replayed(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("retrain")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    done = run_pipeline("run.py", "experiment=retrain_synthetic", "pipeline.retrain.windows=3",
                        "pipeline.retrain.fine_tune_on=new",
                        f"paths.artifacts={tmp / 'artifacts'}", *TINY, f"tracking.uri={uri}",
                        f"hydra.run.dir={tmp / 'job'}", cwd=tmp)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp / "job" / "retrain.json").read_text(), parse_constant=not_json)
    return {"tmp": tmp, "uri": uri, "rows": rows, "stdout": done.stdout}


def test_each_window_is_compared_with_the_production_of_its_time(replayed):
    rows, client = replayed["rows"], MlflowClient(replayed["uri"])
    assert [r["window"] for r in rows] == [0, 1, 2]
    assert [r["train_end"] for r in rows] == [8, 9, 10]
    assert [r["test_periods"] for r in rows] == [[9], [10], [11]]
    assert rows[0]["production"] is None and rows[0]["promoted"]
    production = rows[0]["candidate"]
    for row in rows[1:]:
        assert row["production"] == production
        # the candidate was fine-tuned from that version (its lineage tag)
        tags = client.get_model_version(NAME, row["candidate"]).tags
        assert tags["lineage.reference_version"] == production
        assert row["promoted"] == (row["lo"] > 0)
        assert tags["production.promoted"] == str(row["promoted"]).lower()
        if row["promoted"]:
            production = row["candidate"]
    assert str(client.get_model_version_by_alias(NAME, PRODUCTION_ALIAS).version) == production
    assert alias_history(client, NAME) == [(r["window"], r["candidate"]) for r in rows
                                           if r["promoted"]]  # fmt: skip
    prepared = replayed["tmp"] / "artifacts" / "prepared" / "synthetic_drift"
    for row in rows:
        assert 0 <= row["new_item_share"] <= 1 and row["wall_s"] > 0
        # new users: the test users with no train or valid event, read from the parquet files
        split = {s: set(pl.read_parquet(prepared / f"window-{row['window']}" / f"{s}.parquet")
                        ["user_idx"].to_list()) for s in ("train", "valid", "test")}  # fmt: skip
        new = split["test"] - split["train"] - split["valid"]
        assert row["new_user_share"] == pytest.approx(len(new) / len(split["test"]))
        assert row["lo"] <= row["lift"] <= row["hi"]
    assert "| window | train end |" in replayed["stdout"]


def test_the_serving_model_is_compared_with_never_retraining(replayed):
    """vs_frozen: the version serving during a window's test days minus window 0's model; the
    same model while production has not moved (exactly 0), else a CI around its mean."""
    rows = replayed["rows"]
    assert rows[0]["vs_frozen"] is None
    for row in rows[1:]:
        if row["production"] == rows[0]["candidate"]:
            assert row["vs_frozen"] == row["vs_frozen_lo"] == row["vs_frozen_hi"] == 0
        else:
            assert row["vs_frozen_lo"] <= row["vs_frozen"] <= row["vs_frozen_hi"]
        metrics = MlflowClient(replayed["uri"]).get_run(row["run_id"]).data.metrics
        assert metrics["retrain/vs_frozen"] == pytest.approx(row["vs_frozen"])
    mean = np.mean([r["vs_frozen"] for r in rows[1:]])
    assert f"never-retrained window-0 model: {mean:+.4f}" in replayed["stdout"]


def test_the_serving_model_is_compared_with_retraining_from_scratch(replayed):
    """from_scratch (the preset's): each later window also trains a fresh pipeline, registered
    apart (<name>-scratch), with no lineage, and the serving version is compared with it."""
    rows, client = replayed["rows"], MlflowClient(replayed["uri"])
    assert rows[0]["vs_scratch"] is None
    for row in rows[1:]:
        assert row["vs_scratch_lo"] <= row["vs_scratch"] <= row["vs_scratch_hi"]
        assert row["vs_scratch_lo"] < row["vs_scratch_hi"]  # two different models
    fresh = client.search_model_versions("name='retrain_synthetic-scratch-sasrec'")
    assert len(fresh) == 2
    assert not any(k.startswith("lineage.") for v in fresh for k in v.tags)


def test_fine_tune_on_new_trains_each_candidate_on_what_production_has_not_seen(replayed):
    """fine_tune_on=new: window w's candidate fine-tunes on the pairs of the events at or after
    the end of its production version's train window (window w-1's while production moves,
    else an earlier one's); the scratch arm on all its pairs."""
    rows, client = replayed["rows"], MlflowClient(replayed["uri"])
    prepared = replayed["tmp"] / "artifacts" / "prepared" / "synthetic_drift"
    made = {r["candidate"]: r["window"] for r in rows}
    for row in rows[1:]:
        since = int(client.get_run(row["run_id"]).data.params["train.pairs_since"])
        # the cut between the train and valid events of production's own window, read from
        # its files: every event production trained on lies before it, the rest at or after
        window = prepared / f"window-{made[row['production']]}"
        train, valid = (pl.read_parquet(window / f"{s}.parquet")["timestamp"] for s in
                        ("train", "valid"))  # fmt: skip
        assert train.max() < since <= valid.min()
    experiment = client.get_experiment_by_name("recsys-dpo").experiment_id
    scratch = client.search_runs([experiment], "tags.`retrain.arm` = 'scratch'")
    assert len(scratch) == len(rows) - 1
    for run in scratch:
        assert run.data.params["train.pairs_since"] == "None"


def test_each_window_extends_the_previous_vocabulary(replayed):
    prepared = sorted((replayed["tmp"] / "artifacts" / "prepared").glob("*/window-*"))
    assert [p.name for p in prepared] == ["window-0", "window-1", "window-2"]
    for before, after in zip(prepared, prepared[1:], strict=False):
        old, new = Vocab.load(before), Vocab.load(after)
        # existing ids keep their rows; new ones are appended
        for side in ("items", "users"):
            ids = [c for c in getattr(old, side).columns if c != "count"]
            kept = getattr(new, side).select(ids).head(getattr(old, side).height)
            assert kept.equals(getattr(old, side).select(ids))
        assert new.n_items >= old.n_items


def test_mlflow_holds_one_replay_run_with_a_child_per_window(replayed):
    rows, client = replayed["rows"], MlflowClient(replayed["uri"])
    experiment = client.get_experiment_by_name("recsys-dpo").experiment_id
    (parent,) = client.search_runs([experiment], "tags.retrain = 'replay'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs([experiment],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")  # fmt: skip
    loop = [c.info.run_id for c in children if c.data.tags["retrain.arm"] == "loop"]
    assert sorted(loop) == sorted(r["run_id"] for r in rows)
    scratch = [c for c in children if c.data.tags["retrain.arm"] == "scratch"]
    assert sorted(c.data.tags["retrain.window"] for c in scratch) == ["1", "2"]
    for row in rows:
        metrics = client.get_run(row["run_id"]).data.metrics
        assert metrics["retrain/lift"] == pytest.approx(row["lift"])
        assert metrics["retrain/promoted"] == float(row["promoted"])
        assert metrics["retrain/new_item_share"] == pytest.approx(row["new_item_share"])
    history = client.get_metric_history(parent.info.run_id, "lift")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1, 2]
    files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"retrain.json", "retrain.md", "lift_per_window.png"} <= files
    png = Path(client.download_artifacts(parent.info.run_id, "lift_per_window.png"))
    assert png.read_bytes()[:4] == b"\x89PNG"
