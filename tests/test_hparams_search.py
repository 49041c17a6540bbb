"""hparams_search=optuna: hydra's Optuna sweeper (the hydra-optuna-sweeper plugin, in the dev
and optuna extras) tunes on VALID. A real two-trial sweep of the tiny pipeline: every trial's
objective is its policy's valid NDCG@10, evaluated before its test split; the sweep's best is
the best of those, and summary.md has a column per tuned key."""

import json

import pytest
import yaml
from conftest import run_pipeline
from test_pipeline import TINY


def policy_value(evaluation: str) -> float:
    return json.loads(open(f"{evaluation}/metrics.json").read())["models"]["policy"]["ndcg_at_10"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("optuna")
    done = run_pipeline("run.py", "hparams_search=optuna", "hydra.sweeper.n_trials=2",
                        f"paths.artifacts={tmp / 'a'}", *TINY, "tracking.enabled=false",
                        f"hydra.sweep.dir={tmp / 'sweep'}", cwd=tmp)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    trials = [json.loads((tmp / "sweep" / str(i) / "pipeline_result.json").read_text())
              for i in range(2)]  # fmt: skip
    return tmp / "sweep", trials


def test_the_objective_is_the_valid_metric_read_before_test(sweep):
    _, trials = sweep
    for trial in trials:
        assert trial["optimized_metric"] == "ndcg_at_10"
        # the valid evaluation first, then the test one (which no trial's objective reads)
        assert trial["ran"][-3:] == ["evaluate-valid", "evaluate", "export"]
        valid_dir = trial["evaluation"].removesuffix("-test") + "-valid"
        assert trial["valid_value"] == pytest.approx(policy_value(valid_dir))
        assert trial["valid_value"] != pytest.approx(policy_value(trial["evaluation"]))


def test_the_sweep_picks_the_best_valid_trial(sweep):
    directory, trials = sweep
    results = yaml.safe_load((directory / "optimization_results.yaml").read_text())
    best = max(trials, key=lambda t: t["valid_value"])
    assert results["best_value"] == pytest.approx(best["valid_value"])
    assert results["best_params"]["objective.beta"] == pytest.approx(best["beta"])
    assert len({t["beta"] for t in trials}) == 2  # two points of the search space were tried


def test_summary_has_the_tuned_keys_and_the_objective(sweep):
    directory, trials = sweep
    lines = (directory / "summary.md").read_text().splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header[:4] == ["run", "objective.beta", "train.lr", "valid ndcg_at_10"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[4:]]
    assert [float(r[1]) for r in rows] == pytest.approx([t["beta"] for t in trials])
    assert [float(r[3]) for r in rows] == pytest.approx([t["valid_value"] for t in trials],
                                                        abs=1e-4)  # fmt: skip

