"""The study runner's RLHF rows and reward-KL frontier, end to end on the tiny synthetic
study (recsys_dpo/conf/study/synthetic_rlhf_tiny.yaml): one reward model per reference, shared
across grid points and reused on a rerun; every grid point's exact valid KL to its reference,
checked against a brute-force full-softmax KL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_pipeline

NAME = "synthetic_rlhf_tiny"


def study(tmp: Path, job: str, *overrides: str):
    return run_pipeline("study.py", f"study={NAME}", f"paths.artifacts={tmp / 'art'}",
                        f"hydra.run.dir={tmp / job}", *overrides, cwd=tmp)  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("frontier")
    done = study(tmp, "job1")
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, json.loads((tmp / "art" / "studies" / NAME / "study.json").read_text())


def hparams(ckpt: str) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]


def test_one_reward_model_per_reference_shared_by_its_rlhf_runs(tiny):
    tmp, result = tiny
    rewards = sorted((tmp / "art" / "runs" / "reward").iterdir())
    assert len(rewards) == 2  # 2 references, 2 betas: still one reward model each
    assert sum("/reward/" in r for r in result["cache"]["trained"]) == 2
    row = next(r for r in result["rows"] if r["name"] == "rlhf_exact")
    grid_runs = [run for g in row["grid"] for per_ref in g["runs"] for run in per_ref]
    assert len(grid_runs) == 4
    seen = set()
    for run in grid_runs:
        hp = hparams(json.loads((Path(run) / "result.json").read_text())["last_ckpt"])
        # The reward model was trained from this very run's reference.
        assert hparams(hp["reward_ckpt"])["reference_ckpt"] == hp["reference_ckpt"]
        seen.add(hp["reward_ckpt"])
    assert len(seen) == 2
    # The controls stay reward-free: the sft control of the RLHF row is the DPO row's.
    names = [r["name"] for r in result["rows"]]
    assert names == ["most-popular-unseen", "reference", "dpo", "sft @ dpo", "rlhf_exact",
                     "sft @ rlhf_exact"]  # fmt: skip
    sft = {r["name"]: r["runs"] for r in result["rows"] if r["kind"] == "control"}
    assert sft["sft @ dpo"] == sft["sft @ rlhf_exact"]
    # report.versus: [dpo]: the RLHF row is compared with DPO directly, DPO not with itself.
    deltas = {r["name"]: r["deltas"] for r in result["rows"]}
    assert "vs row dpo" in deltas["rlhf_exact"] and "vs row dpo" not in deltas["dpo"]
    direct = deltas["rlhf_exact"]["vs row dpo"]["truth/utility_at_10"]
    via_sft = [deltas[r]["vs sft"]["truth/utility_at_10"]["mean"] for r in ("rlhf_exact", "dpo")]
    # Both sft controls are the same runs, so the direct delta is the difference of the two.
    assert direct["mean"] == pytest.approx(via_sft[0] - via_sft[1], abs=1e-9)
    assert direct["lo"] <= direct["mean"] <= direct["hi"]
    assert all(set(r["valid"]) == {"ndcg_at_10", "truth/utility_at_10"} for r in result["rows"])


def test_the_frontier_has_every_grid_point_with_its_exact_valid_kl(tiny):
    from recsys_dpo.data.datamodule import load_prepared
    from recsys_dpo.evaluation.evaluator import build_queries, embed_users, evaluate, item_vectors
    from recsys_dpo.models.rlhf_optimum import RLHFOptimum
    from recsys_dpo.study.runner import OPTIMUM
    from recsys_dpo.training.reference_module import load_model, trained_on

    tmp, result = tiny
    frontier = result["frontier"]
    assert [(p["row"], p["point"].get("objective.beta")) for p in frontier] == [
        ("reference", None), ("dpo", 0.1), ("dpo", 1.0), ("rlhf_exact", 0.1), ("rlhf_exact", 1.0),
        (OPTIMUM, 0.1), (OPTIMUM, 1.0),
    ]  # fmt: skip
    trained, optima = frontier[1:5], frontier[5:]
    assert frontier[0]["kl"]["mean"] == 0.0 and frontier[0]["reward_gain"]["mean"] == 0.0
    rows = {r["name"]: r for r in result["rows"]}
    refs = [run for per_ref in rows["reference"]["runs"] for run in per_ref]
    data = load_prepared(next((tmp / "art" / "prepared").iterdir()))
    queries = build_queries(data, "valid")

    def scores(ckpt: str) -> torch.Tensor:
        model = load_model(ckpt, trained_on(data)).eval()
        with torch.no_grad():
            return (embed_users(model, queries) @ item_vectors(model)[1:].T).double()  # no pad

    def log_softmax(ckpt: str) -> torch.Tensor:
        return scores(ckpt).log_softmax(-1)

    ckpt = {run: json.loads((Path(run) / "result.json").read_text()) for run in refs}
    reward_of = {}  # reference checkpoint -> its reward model's
    for out in (tmp / "art" / "runs" / "reward").iterdir():
        best = json.loads((out / "result.json").read_text())["best_ckpt"]
        reward_of[hparams(best)["reference_ckpt"]] = best
    for point in trained:
        row = rows[point["row"]]
        grid = next(g for g in row["grid"] if g["point"] == point["point"])
        assert point["selected"] == grid["selected"]
        # The frontier's y is the very valid figure the grid was selected by.
        assert point["valid"]["ndcg_at_10"]["mean"] == pytest.approx(grid["valid"]["mean"])
        for kl, (run,), ref in zip(point["kl"]["per_reference"], grid["runs"], refs, strict=True):
            res = json.loads((Path(run) / "result.json").read_text())
            log_p = log_softmax(res["best_ckpt"] or res["last_ckpt"])
            log_q = log_softmax(ckpt[ref]["best_ckpt"] or ckpt[ref]["last_ckpt"])
            brute = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
            assert kl == pytest.approx(brute, rel=1e-3, abs=1e-7)
            # Every row's reward gain under its reference's reward model, DPO's too.
            r = scores(reward_of[ckpt[ref]["best_ckpt"] or ckpt[ref]["last_ckpt"]])
            gain = point["reward_gain"]["per_reference"][refs.index(ref)]
            brute_gain = ((log_p.exp() - log_q.exp()) * r).sum(-1).mean().item()
            assert gain == pytest.approx(brute_gain, rel=1e-3, abs=1e-6)
            # How far from the RLHF optimum pi_ref exp(r / beta) / Z at the row's own beta.
            log_opt = (log_q + r / point["point"]["objective.beta"]).log_softmax(-1)
            to_opt = point["kl_to_optimum"]["per_reference"][refs.index(ref)]
            brute_opt = (log_opt.exp() * (log_opt - log_p)).sum(-1).mean().item()
            assert to_opt == pytest.approx(brute_opt, rel=1e-3, abs=1e-6)
    # The closed-form optimum at each beta, nothing trained: its KL to the reference and its
    # reward gain against brute force; its valid figure the evaluator's of the served s_ref + r/beta.
    for point in optima:
        beta = point["point"]["objective.beta"]
        assert not point["selected"] and point["kl_to_optimum"]["mean"] == 0.0
        for i, ref in enumerate(refs):
            ref_ckpt = ckpt[ref]["best_ckpt"] or ckpt[ref]["last_ckpt"]
            log_q, r = log_softmax(ref_ckpt), scores(reward_of[ref_ckpt])
            log_opt = (log_q + r / beta).log_softmax(-1)
            brute = (log_opt.exp() * (log_opt - log_q)).sum(-1).mean().item()
            assert point["kl"]["per_reference"][i] == pytest.approx(brute, rel=1e-3, abs=1e-7)
            brute_gain = ((log_opt.exp() - log_q.exp()) * r).sum(-1).mean().item()
            assert point["reward_gain"]["per_reference"][i] == pytest.approx(brute_gain, rel=1e-3)
            served = RLHFOptimum(load_model(ref_ckpt, trained_on(data)),
                                 load_model(reward_of[ref_ckpt], trained_on(data)), beta)  # fmt: skip
            ndcg = evaluate(served, data, "valid", [10]).aggregates["ndcg_at_10"]
            assert point["valid"]["ndcg_at_10"]["per_reference"][i] == pytest.approx(ndcg)
    # a smaller beta moves further from the reference
    assert optima[0]["kl"]["mean"] > optima[1]["kl"]["mean"] > 0
    assert (tmp / "art" / "studies" / NAME / "frontier.png").stat().st_size > 0
    table = (tmp / "art" / "studies" / NAME / "table.md").read_text()
    assert "## Reward-KL frontier (valid)" in table and "test is read once" in table


def test_every_entry_and_reward_model_reports_what_its_training_cost(tiny):
    tmp, result = tiny
    for row in result["rows"][1:]:  # the baseline trains nothing
        runs = [run for per_ref in row["runs"] for run in per_ref]
        steps = [torch.load(json.loads((Path(r) / "result.json").read_text())["last_ckpt"],
                            map_location="cpu", weights_only=False)["global_step"] for r in runs]
        cost = row["cost"]
        assert cost["runs"] == len(runs) and cost["optimizer_steps"]["mean"] == pytest.approx(
            sum(steps) / len(steps))  # fmt: skip
        assert cost["fit_seconds"]["mean"] > 0 and cost["peak_rss_mb"] > 100
    assert result["rows"][0]["cost"] is None
    # One epoch each over the same pairs (study.fine_tune's max_pairs_per_user: 2), the same
    # batches: the reward model takes as many steps as a fine-tuning run.
    rows = {r["name"]: r for r in result["rows"]}
    assert result["reward_cost"]["runs"] == 2
    assert (result["reward_cost"]["optimizer_steps"]["mean"]
            == rows["dpo"]["cost"]["optimizer_steps"]["mean"] > 0)  # fmt: skip
    table = (tmp / "art" / "studies" / NAME / "table.md").read_text()
    assert "## Cost" in table and "| reward model (once per reference" in table


def test_a_rerun_trains_nothing_and_the_plan_counts_the_reward_models(tiny):
    tmp, first = tiny
    done = study(tmp, "plan", "study.plan_only=true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reward models:    2 (2 cached)" in done.stdout
    assert "fine-tuning runs: 8 (8 cached)" in done.stdout
    done = study(tmp, "job2")
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((tmp / "art" / "studies" / NAME / "study.json").read_text())
    assert again["cache"]["trained"] == [] and again["cache"]["evaluated"] == []
    assert again["frontier"] == first["frontier"]


def test_an_rlhf_row_without_a_reward_recipe_is_refused():
    from omegaconf import OmegaConf

    from recsys_dpo.errors import DataError
    from recsys_dpo.study.spec import study_spec

    cfg = OmegaConf.load(ROOT / "recsys_dpo" / "conf" / "study" / f"{NAME}.yaml")["study"]
    cfg.objectives = {n: {"name": n, "stage": s} for n, s in (
        ("ce", "reference"), ("dpo", "preference"), ("rlhf_exact", "preference"),
        ("sft", "preference"), ("bradley_terry", "reward"))}  # fmt: skip
    cfg.out_dir, cfg.eval_cache = "/tmp/o", "/tmp/e"
    assert study_spec(cfg, [10, 20]).reward.max_epochs == 1
    del cfg.reward
    with pytest.raises(DataError, match=r"study.reward lacks \['objective', 'lr', 'max_epochs'\]"):
        study_spec(cfg, [10, 20])
    cfg.reward = {"objective": "bradley_terry", "lr": 0.01, "max_epochs": 1}
    cfg.report.versus = ["dpo", "ppo"]
    with pytest.raises(DataError, match=r"study.report.versus=\['dpo', 'ppo'\]: \['ppo'\] not"):
        study_spec(cfg, [10, 20])


def test_the_frontier_preset_composes_four_methods_over_one_beta_grid():
    from hydra import compose, initialize_config_dir

    from recsys_dpo.study.spec import study_spec

    with initialize_config_dir(str(ROOT / "recsys_dpo" / "conf"), version_base="1.3"):
        cfg = compose("run_study", ["study=synthetic_rlhf_frontier"])
    spec = study_spec(cfg.study, list(cfg.eval.k))
    assert [r.name for r in spec.rows] == ["dpo", "rlhf_exact", "rlhf_pg", "rloo"]
    assert [spec.is_rlhf(r) for r in spec.rows] == [False, True, True, True]
    assert all(r.grid == {"objective.beta": [0.1, 0.3, 1.0, 3.0]} for r in spec.rows)
    assert spec.reward is not None and spec.reward.objective == "bradley_terry"
    assert len(spec.reference_seeds) == 3 and spec.selection_metric == "ndcg_at_10"
    assert spec.metrics == ("truth/utility_at_10", "truth/ctr_at_10", "ndcg_at_10")
    assert cfg.data.name == "synthetic" and cfg.data.pairs.next_item is None  # impressions only
