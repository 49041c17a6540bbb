"""The study runner (recsys_dpo/study/): the two-level bootstrap against closed forms and
simulation, selection on valid only (test-based selection refused, exit 2; no test read of a
grid point that was not selected), and the tiny synthetic study end to end through
`pipelines/study.py`: valid and test for every entry, matched controls, popularity, and the
cache (a re-run trains nothing; a changed grid value re-trains only its runs); `study.jobs=2`
(the same study, a worker's bad input and a killed worker) and `study.plan_only`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import SHARED_DATA, run_pipeline
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from scipy import stats as scipy_stats
from test_tracking_server import server as tracking_server  # noqa: F401 (a fixture)

from recsys_dpo.errors import DataError
from recsys_dpo.evaluation.metrics import paired_bootstrap_ci
from recsys_dpo.study.runner import select_point
from recsys_dpo.study.spec import study_spec
from recsys_dpo.study.stats import hierarchical_bootstrap_ci, mean_sd

ROOT = Path(__file__).resolve().parents[1]


def test_one_reference_is_exactly_the_paired_bootstrap():
    rng = np.random.default_rng(3)
    a, b = rng.random(257), rng.random(257) + 0.05
    for chunk in (10_000_000, 1000):  # one chunk, and several
        ours = hierarchical_bootstrap_ci((b - a)[None], 500, 7, 0.1, chunk_elements=chunk)
        plain = paired_bootstrap_ci(a, b, 500, 7, 0.1, chunk_elements=chunk)
        np.testing.assert_allclose(ours, plain, rtol=0, atol=1e-12)


def test_one_reference_matches_scipys_percentile_bootstrap():
    d = np.random.default_rng(0).normal(0.02, 0.1, 400)
    ours = hierarchical_bootstrap_ci(d[None], 4000, 0)
    ref = scipy_stats.bootstrap((d,), np.mean, n_resamples=4000, method="percentile",
                                random_state=1).confidence_interval  # fmt: skip
    width = ref.high - ref.low
    assert abs(ours[1] - ref.low) < 0.1 * width and abs(ours[2] - ref.high) < 0.1 * width


def test_two_level_ci_covers_the_mean_over_references_where_users_alone_do_not():
    """Simulated gains whose reference-to-reference spread (sd 0.02 over 8 references) is
    larger than the user noise's standard error (0.05 / sqrt(8 * 60)): the two-level CI covers
    the true mean 0.01 about as often as it claims, a bootstrap over users alone (references
    pooled) about half the time."""
    rng = np.random.default_rng(11)
    hits_two, hits_users, trials = 0, 0, 150
    for t in range(trials):
        d = rng.normal(0.01, 0.02, (8, 1))[:, [0] * 60] + rng.normal(0, 0.05, (8, 60))
        _, lo, hi = hierarchical_bootstrap_ci(d, 400, t)
        hits_two += lo <= 0.01 <= hi
        _, lo, hi = hierarchical_bootstrap_ci(d.reshape(1, -1), 400, t)
        hits_users += lo <= 0.01 <= hi
    assert hits_two / trials >= 0.85
    assert hits_users / trials <= 0.6


def test_mean_sd_and_selection_rule():
    assert mean_sd([1.0]) == (1.0, 0.0)
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(np.sqrt(2)))
    # The best mean across references wins, not the best single reference; first on ties.
    assert select_point([[0.30, 0.10], [0.21, 0.21], [0.21, 0.21]]) == 1


def tiny_study(**changes) -> OmegaConf:
    study = OmegaConf.load(ROOT / "recsys_dpo/conf/study/synthetic_tiny.yaml")["study"]
    root = OmegaConf.load(ROOT / "recsys_dpo/conf/run_study.yaml")["study"]
    objectives = {
        n: OmegaConf.load(ROOT / f"recsys_dpo/conf/objective/{n}.yaml")
        for n in ("ce", "dpo", "sft")
    }
    cfg = OmegaConf.merge(
        root, study, {"objectives": objectives, "out_dir": "o", "eval_cache": "e"}
    )
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def test_spec_refuses_selection_on_test_and_unknown_objectives():
    assert study_spec(tiny_study(), [10, 20]).rows[0].points() == [
        {"objective.beta": 0.1}, {"objective.beta": 1.0}]  # fmt: skip
    with pytest.raises(DataError, match=r"study.selection.split='test'.*valid split only"):
        study_spec(tiny_study(**{"selection.split": "test"}), [10, 20])
    with pytest.raises(DataError, match=r"study.rows.rpo.objective: objective 'ipo'"):
        study_spec(tiny_study(**{"rows.rpo.objective": "ipo"}), [10, 20])
    with pytest.raises(DataError, match=r"study.selection.metric='ndcg_at_5'"):
        study_spec(tiny_study(**{"selection.metric": "ndcg_at_5"}), [10, 20])
    with pytest.raises(DataError, match=r"selection.metric='truth/utility_at_10': a study sel"):
        study_spec(tiny_study(**{"selection.metric": "truth/utility_at_10"}), [10, 20])
    for bad in ("truth/utility_at_5", "truth/clicks_at_10"):  # K not in eval.k; no such metric
        with pytest.raises(DataError, match=r"truth/<m>_at_K with m one of utility, ctr"):
            study_spec(tiny_study(**{"report.metrics": [bad]}), [10, 20])
    assert study_spec(tiny_study(jobs=2), [10, 20]).jobs == 2
    for bad in (0, 1.5, True):
        with pytest.raises(DataError, match=rf"study.jobs={bad!r}: expected a whole number"):
            study_spec(tiny_study(jobs=bad), [10, 20])


def study(tmp: Path, job: str, *overrides: str):
    return run_pipeline("study.py", "study=synthetic_tiny", f"paths.artifacts={tmp / 'art'}",
                        f"hydra.run.dir={tmp / job}", *overrides, cwd=tmp)  # fmt: skip


def test_selecting_on_test_exits_2_before_any_work(tmp_path):
    done = study(tmp_path, "job", "study.selection.split=test")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "study.selection.split='test'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "art").exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("study")
    done = study(tmp, "job1")
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp / "art" / "studies" / "synthetic_tiny"
    return tmp, json.loads((out / "study.json").read_text())


def test_every_entry_has_valid_and_test_and_the_row_its_controls(tiny):
    tmp, result = tiny
    names = [r["name"] for r in result["rows"]]
    assert names[:3] == ["most-popular-unseen", "reference", "rpo"]
    assert names[3] == "sft @ rpo" and names[4].startswith("continue-")
    steps = result["rows"][4]["steps"]
    assert names[4] == f"continue-{steps[0]}steps @ rpo" and steps[0] > 0
    for row in result["rows"]:
        for split in ("valid", "test"):
            figure = row[split]["ndcg_at_10"]
            assert len(figure["per_reference"]) == 2 and 0 <= figure["mean"] <= 1
    rpo = result["rows"][2]
    assert set(rpo["deltas"]) == {"vs reference", "vs sft", "vs continue"}
    d = rpo["deltas"]["vs sft"]["ndcg_at_10"]
    assert d["lo"] <= d["mean"] <= d["hi"] and len(d["per_reference"]) == 2
    # The synthetic log's exact truth/* figures, per user like the ranking metrics.
    for row in result["rows"]:
        assert 0 < row["test"]["truth/ctr_at_10"]["mean"] < 1
        assert np.isfinite(row["test"]["truth/utility_at_10"]["mean"])
    d = rpo["deltas"]["vs sft"]["truth/utility_at_10"]
    assert d["lo"] <= d["mean"] <= d["hi"] and len(d["per_reference"]) == 2
    assert [g["selected"] for g in rpo["grid"]].count(True) == 1
    best = max(rpo["grid"], key=lambda g: g["valid"]["mean"])
    assert best["selected"] and rpo["selected"] == best["point"]
    table = (tmp / "art" / "studies" / "synthetic_tiny" / "table.md").read_text()
    assert "chosen on **valid ndcg_at_10** only" in table and "two-level" in table
    assert "| rpo | objective.beta=" in table
    # The frontier of a study without RLHF rows: the reference and the grid, no reward gain.
    assert [p["row"] for p in result["frontier"]] == ["reference", "rpo", "rpo"]
    assert all("reward_gain" not in p and p["kl"]["mean"] >= 0 for p in result["frontier"])


def test_continue_control_takes_the_rows_optimizer_steps(tiny):
    import torch

    _, result = tiny
    rows = {r["name"]: r for r in result["rows"]}
    cont = next(r for n, r in rows.items() if n.startswith("continue-"))
    for pref_dirs, cont_dirs in zip(rows["rpo"]["runs"], cont["runs"], strict=True):
        pref = torch.load(Path(pref_dirs[0]) / "last.ckpt", weights_only=True)["global_step"]
        ctrl = torch.load(Path(cont_dirs[0]) / "last.ckpt", weights_only=True)["global_step"]
        assert ctrl == pref == cont["steps"][0]


def test_no_test_evaluation_of_a_grid_point_that_was_not_selected(tiny):
    tmp, result = tiny
    rpo = next(r for r in result["rows"] if r["name"] == "rpo")
    unselected = {d for g in rpo["grid"] if not g["selected"] for s in g["runs"] for d in s}
    assert len(unselected) == 2
    evaluated = [
        json.loads(m.read_text()) for m in (tmp / "art" / "study_evals").glob("*/manifest.json")
    ]
    by_split = {s: {str(Path(e["model"]).parent) for e in evaluated if e["split"] == s}
                for s in ("valid", "test")}  # fmt: skip
    assert unselected <= by_split["valid"]  # they were evaluated, on valid only
    assert not unselected & by_split["test"]
    selected = {d for s in rpo["runs"] for d in s}
    assert selected <= by_split["test"]


def test_second_run_trains_and_evaluates_nothing(tiny):
    tmp, first = tiny
    assert len(first["cache"]["trained"]) == 2 + 4 + 2 + 2  # refs, grid, sft, continue
    done = study(tmp, "job2", f"study.publish={tmp / 'results' / 'study_synthetic_tiny.json'}")
    assert done.returncode == 0, done.stderr[-3000:]
    text = (tmp / "art" / "studies" / "synthetic_tiny" / "study.json").read_text()
    again = json.loads(text)
    assert again["cache"]["trained"] == [] and again["cache"]["evaluated"] == []
    assert again["rows"] == first["rows"]
    assert (tmp / "results" / "study_synthetic_tiny.json").read_text() == text  # published


def test_a_changed_grid_value_retrains_only_its_runs(tiny):
    tmp, first = tiny
    done = study(tmp, "job3", "study.rows.rpo.grid.objective.beta=[0.1,0.5]")
    assert done.returncode == 0, done.stderr[-3000:]
    changed = json.loads((tmp / "art" / "studies" / "synthetic_tiny" / "study.json").read_text())
    rpo = next(r for r in changed["rows"] if r["name"] == "rpo")
    new_point = next(g for g in rpo["grid"] if g["point"] == {"objective.beta": 0.5})
    trained = changed["cache"]["trained"]
    assert sorted(trained) == sorted(d for s in new_point["runs"] for d in s)
    refs = {d for s in first["rows"][1]["runs"] for d in s}
    assert refs <= set(changed["cache"]["reused"])


def test_recipe_from_fixes_every_row_at_its_selected_point(tiny, tmp_path):
    _, result = tiny
    path = tmp_path / "study.json"  # the first run's (later tests re-run the study)
    path.write_text(json.dumps(result))
    spec = study_spec(tiny_study(recipe_from=str(path)), [10, 20])
    rpo = next(r for r in result["rows"] if r["name"] == "rpo")
    assert spec.rows[0].points() == [rpo["selected"]]
    with pytest.raises(DataError, match="no selected recipe for row"):
        study_spec(tiny_study(recipe_from=str(path), **{"rows.other": {"objective": "dpo"}}),
                   [10, 20])  # fmt: skip


def compose_study(name: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "recsys_dpo" / "conf"), version_base="1.3"):
        return compose("run_study", [f"study={name}", *overrides])


def in_process(tmp: Path, monkeypatch, *overrides: str):
    """The tiny study's runner objects in this process, on the artifacts under tmp."""
    from rich.console import Console

    from recsys_dpo.pipeline import Pipeline
    from recsys_dpo.study.runner import Study, template_of
    from recsys_dpo.tracking.mlflow_utils import Tracker

    # As the study's subprocess had it: paths.* are part of every run's config hash.
    monkeypatch.setenv("RECSYS_DPO_SHARED_DATA", str(SHARED_DATA))
    cfg = compose_study("synthetic_tiny", f"paths.artifacts={tmp / 'art'}", *overrides)
    spec, template = study_spec(cfg.study, list(cfg.eval.k)), template_of(cfg)
    pipe = Pipeline(template, Tracker(template.tracking), Console(quiet=True))
    return Study(spec, template, pipe, pipe.prepare(), Console(quiet=True))


def test_no_test_read_before_the_read_out_and_no_search_after_it(tiny, monkeypatch):
    """The runner's guard itself, on the tiny study's cached runs (nothing is trained)."""
    from recsys_dpo.study.runner import search_rows

    study = in_process(tiny[0], monkeypatch)
    refs = study.references()
    assert study.ledger.trained == [] and len(study.ledger.reused) == 2
    with pytest.raises(RuntimeError, match="refusing a test read"):
        study.read(refs[0], "test")
    study.read_out("reference", "reference", [[r] for r in refs])
    with pytest.raises(RuntimeError, match="a grid searched after the test read-out"):
        search_rows(study, refs)


def test_the_ml1m_and_ml100k_studies_compose_and_check():
    cfg = compose_study("ml1m_sasrec")
    spec = study_spec(cfg.study, list(cfg.eval.k))
    assert cfg.data.name == "ml1m_sas" and len(spec.reference_seeds) >= 3
    assert spec.reference.early_stopping_patience == 5 and spec.reference.max_epochs == 40
    # Sized to fit one session with study.jobs=2 (the file's comment has the arithmetic).
    assert {r.name: len(r.points()) for r in spec.rows} == {"rpo": 4, "dpo_hard": 1, "sft": 2}
    cfg = compose_study("ml100k_sasrec")
    assert cfg.data.name == "ml100k_sas" and cfg.data.split.kind == "loo"
    assert cfg.study.rows == compose_study("ml1m_sasrec").study.rows  # the recipe, untouched
    if Path(cfg.study.recipe_from).is_file():  # the ML-1M study has published its table
        assert all(len(r.points()) == 1 for r in study_spec(cfg.study, list(cfg.eval.k)).rows)
    else:
        with pytest.raises(DataError, match="study.recipe_from=.*study_ml1m_sasrec.json"):
            study_spec(cfg.study, list(cfg.eval.k))


def test_the_synthetic_impressions_study_trains_on_impression_pairs_only():
    cfg = compose_study("synthetic_impressions")
    spec = study_spec(cfg.study, list(cfg.eval.k))
    assert cfg.data.name == "synthetic" and cfg.model.name == "two_tower"
    assert cfg.data.pairs.next_item is None and cfg.data.pairs.impressions is not None
    assert spec.selection_metric == "ndcg_at_10" and len(spec.reference_seeds) >= 3
    assert spec.metrics[:2] == ("truth/utility_at_10", "truth/ctr_at_10")
    assert {r.name for r in spec.rows} == {"dpo", "dpo+sft", "cdpo"} and spec.sft_control


def test_the_synthetic_negatives_study_mines_next_item_negatives_three_ways():
    cfg = compose_study("synthetic_negatives")
    spec = study_spec(cfg.study, list(cfg.eval.k))
    assert cfg.data.name == "synthetic" and cfg.model.name == "sasrec"
    assert cfg.data.pairs.impressions is None and cfg.data.pairs.next_item is not None
    assert cfg.train.max_pairs_per_user == 8 and len(spec.reference_seeds) >= 3
    assert spec.selection_metric == "ndcg_at_10" and spec.sft_control
    assert spec.metrics[:3] == ("ndcg_at_10", "truth/utility_at_10", "truth/ctr_at_10")
    rows = {r.name: r for r in spec.rows}
    assert {n: r.objective for n, r in rows.items()} == {
        "dpo_hard": "dpo", "dpo_band": "dpo", "dpo_weighted": "dpo", "dpo+sft_band": "dpo"}  # fmt: skip
    assert rows["dpo_hard"].overrides == {"reference.hard_negatives": 16}
    assert rows["dpo_weighted"].overrides == rows["dpo_hard"].overrides
    assert rows["dpo_band"].overrides == {
        "reference.hard_negatives": 16, "reference.hard_negatives_band": [20, 100]}  # fmt: skip
    band_sft = {**rows["dpo_band"].overrides, "objective.sft_alpha": 1.0}
    assert rows["dpo+sft_band"].overrides == band_sft
    weighted = rows["dpo_weighted"].points()
    assert {p["objective.rejected_weight_horizon"] for p in weighted} == {2, 10}
    # The runner adds the key no yaml has (OmegaConf.update in open_dict): no `+` needed.
    from recsys_dpo.study.runner import Study, template_of

    template = template_of(cfg)
    study = Study.__new__(Study)
    study.spec, study.template = spec, template
    run = study.preference_config(rows["dpo_weighted"], weighted[-1], "ref.ckpt", 0)
    assert run.objective.rejected_weight_horizon == 10 and run.reference.hard_negatives == 16
    assert run.reference.hard_negatives_band is None and run.train.max_pairs_per_user == 8


def test_the_coat_study_selects_on_the_valid_mcar_ranking():
    cfg = compose_study("coat_mf")
    spec = study_spec(cfg.study, list(cfg.eval.k))
    assert cfg.data.name == "coat" and cfg.data.split.kind == "mcar"
    assert spec.selection_metric == "mcar/ndcg_at_5" and len(spec.reference_seeds) >= 3
    assert {r.name for r in spec.rows} == {"dpo", "dpop", "cdpo", "sft"}


def test_the_ml100k_feedback_study_fine_tunes_on_the_rating_pairs_alone():
    cfg = compose_study("ml100k_feedback")
    spec = study_spec(cfg.study, list(cfg.eval.k))
    assert cfg.data.name == "ml100k" and cfg.data.split.kind == "loo"
    # The preset's next_item pairs are off (null), so the prepared pairs, which every
    # preference row and its sft control read, are the rating pairs: >= 4 vs <= 2.
    pairs = OmegaConf.to_container(cfg.data.pairs, resolve=True)
    assert {name for name, kwargs in pairs.items() if kwargs is not None} == {"feedback"}
    assert (pairs["feedback"]["high"], pairs["feedback"]["low"]) == (4.0, 2.0)
    assert {r.name: r.objective for r in spec.rows} == {
        "dpo": "dpo", "dpo_sft": "dpo", "dpop": "dpop", "cdpo": "cdpo", "sft": "sft"}  # fmt: skip
    assert all(spec.objectives[r.objective]["stage"] == "preference" for r in spec.rows)
    assert next(r for r in spec.rows if r.name == "dpo_sft").overrides == {
        "objective.sft_alpha": 1.0}  # fmt: skip
    assert spec.sft_control and spec.popularity and len(spec.reference_seeds) >= 3
    assert spec.selection_metric == "ndcg_at_10"
    # The ML-1M / ML-100k SASRec studies' reference recipe and model (its max_len is the
    # dataset's), so the references compare.
    sas = compose_study("ml1m_sasrec")
    assert cfg.study.reference == sas.study.reference
    assert {**cfg.model, "max_len": None} == {**sas.model, "max_len": None}


@pytest.mark.parametrize(
    "path", sorted((ROOT / "recsys_dpo" / "conf" / "study").glob("*.yaml")), ids=lambda p: p.stem
)
def test_a_study_file_sets_only_keys_the_base_config_has(path):
    """Outside its `study` block a study file sets root settings; a misspelt one would be
    added silently (hydra merges into a plain config), so each must exist in the base."""
    from hydra import compose, initialize_config_dir
    from test_presets import unknown_keys

    body = OmegaConf.to_container(OmegaConf.load(path))
    groups = [f"{g.removeprefix('override /')}={choice}" for entry in body.pop("defaults", [])
              if isinstance(entry, dict) for g, choice in entry.items() if g.startswith("override")]  # fmt: skip
    body.pop("study")
    with initialize_config_dir(str(ROOT / "recsys_dpo" / "conf"), version_base="1.3"):
        base = compose("config", groups)
    assert unknown_keys(body, base) == []


def test_the_whole_plan_is_checked_before_any_training(tiny, monkeypatch):
    from recsys_dpo.study.runner import check_plan

    study = in_process(tiny[0], monkeypatch, "study.rows.rpo.grid.objective.beta=[0.1,-1.0]")
    with pytest.raises(DataError, match=r"study.rows.rpo at \{'objective.beta': -1.0\}: config: "
                       r"objective.beta=-1.0: must be > 0"):  # fmt: skip
        check_plan(study)
    assert study.ledger.trained == [] and study.ledger.reused == []
    # refs, then each point with its sft and continue controls
    assert check_plan(in_process(tiny[0], monkeypatch)) == 2 + 2 * 3


# What a run's cost records of the machine, not of the training: wall time and memory.
MEASURED = ("runs", "fit_seconds", "peak_rss_mb", "peak_gpu_mb")


def without_run_dirs(rows):
    """study.json rows without run directories (paths.* are part of every config hash) and
    without the costs' wall times and memory (the optimizer steps stay)."""
    if isinstance(rows, dict):
        return {k: without_run_dirs(v) for k, v in rows.items() if k not in MEASURED}
    return [without_run_dirs(v) for v in rows] if isinstance(rows, list) else rows


def test_two_jobs_give_the_same_study_and_a_rerun_trains_nothing(tiny, tmp_path):
    _, first = tiny  # study.jobs=1
    done = study(tmp_path, "job1", "study.jobs=2")
    assert done.returncode == 0, done.stderr[-3000:]
    path = tmp_path / "art" / "studies" / "synthetic_tiny" / "study.json"
    two = json.loads(path.read_text())
    assert without_run_dirs(two["rows"]) == without_run_dirs(first["rows"])
    assert len(two["cache"]["trained"]) == len(first["cache"]["trained"])
    again = study(tmp_path, "job2", "study.jobs=2")
    assert again.returncode == 0, again.stderr[-3000:]
    cache = json.loads(path.read_text())["cache"]
    assert cache["trained"] == [] and cache["evaluated"] == []
    assert sorted(cache["reused"]) == sorted(two["cache"]["trained"])


def test_two_jobs_track_under_the_study_run(tracking_server, tmp_path):  # noqa: F811
    """The workers' runs go to a real tracking server, each a child of the study's parent run
    (open in the study's process), with its params and metrics."""
    uri, _ = tracking_server
    done = study(tmp_path, "job", "study.jobs=2", "tracking.enabled=true", f"tracking.uri={uri}")
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("recsys-dpo").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "study-synthetic_tiny")
    trained = [r for r in runs if r.info.run_name in ("reference", "preference")]
    assert len(trained) == 2 + 4 + 2 + 2  # refs, grid, sft, continue
    for run in trained:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED" and run.data.params and run.data.metrics
    assert parent.info.status == "FINISHED"
    # The study's outputs, the frontier plot with them, on its own run.
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert logged == {"study/study.json", "study/table.md", "study/frontier.png"}


def test_a_workers_bad_input_is_the_studys_one_line_error(tmp_path):
    done = study(tmp_path, "job", "study.jobs=2", "study.reference.lr=1e30")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: reference stage: the loss is nan at epoch 0 step 1"), last
    assert not list((tmp_path / "art" / "runs").rglob("result.json"))


def test_a_killed_worker_ends_the_study_at_once(tmp_path):
    env = {**os.environ, "RECSYS_DPO_SHARED_DATA": str(SHARED_DATA), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "pipelines" / "study.py"), "study=synthetic_tiny",
         f"paths.artifacts={tmp_path / 'art'}", f"hydra.run.dir={tmp_path / 'job'}",
         "study.jobs=2"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline, workers = time.monotonic() + 120, []
    while not workers and time.monotonic() < deadline and proc.poll() is None:
        workers = [c for c in psutil.Process(proc.pid).children()
                   if "spawn_main" in " ".join(c.cmdline())]  # fmt: skip
        time.sleep(0.1)
    assert workers, "no worker process was started"
    time.sleep(2)  # inside the reference phase (a worker imports torch, then trains)
    os.kill(workers[0].pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert "a training worker process died" in err.strip().splitlines()[-1]
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_a_killed_study_leaves_no_worker_training(tmp_path, sig):
    """The study's own process killed (a scheduler's SIGTERM, an OOM kill): its workers die
    with it instead of training on as orphans (which would hold run locks and the cores)."""
    env = {**os.environ, "RECSYS_DPO_SHARED_DATA": str(SHARED_DATA), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "pipelines" / "study.py"), "study=synthetic_tiny",
         f"paths.artifacts={tmp_path / 'art'}", f"hydra.run.dir={tmp_path / 'job'}",
         "study.jobs=2"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)  # fmt: skip
    deadline, workers = time.monotonic() + 120, []
    while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
        workers = [c for c in psutil.Process(proc.pid).children()
                   if "spawn_main" in " ".join(c.cmdline())]  # fmt: skip
        time.sleep(0.1)
    assert len(workers) == 2, "the workers were not started"
    time.sleep(2)  # inside the reference phase
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"{len(alive)} worker(s) still running after the study was killed"


def test_plan_only_counts_the_plan_and_its_cache_and_trains_nothing(tiny, tmp_path):
    done = study(tmp_path, "job", "study.plan_only=true", "study.jobs=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "plan of study synthetic_tiny (study.jobs=2 training runs at a time)" in done.stdout
    assert "reference runs:   2 (0 cached)" in done.stdout
    assert "fine-tuning runs: 4 (0 cached): grid points rpo 2" in done.stdout
    assert "sft 2 (up to 2 new), continue up to 2 new" in done.stdout
    assert "evaluations: valid 7 (0 cached)" in done.stdout
    assert not (tmp_path / "art" / "runs").exists()
    done = study(tiny[0], "plan", "study.plan_only=true")  # the tiny study, trained
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reference runs:   2 (2 cached)" in done.stdout
    assert "fine-tuning runs: 4 (4 cached)" in done.stdout
    assert "evaluations: valid 7 (7 cached)" in done.stdout
    assert "3 of the baseline and references cached" in done.stdout
