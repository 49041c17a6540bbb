"""Off-policy evaluation in the evaluate stage: `pipelines/run.py` on a temporal split of the
synthetic log adds the ope section (estimates, lifts, diagnostics, the exact simulated value)
to metrics.json, MLflow and the model card, and an independent re-computation of the
candidate's IPS from the files on disk agrees; logs without propensities or split
leave-one-out are skipped with the reason, or refused when OPE is required."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import bad_input_message, run_pipeline

from recsys_dpo.data.datamodule import load_prepared
from recsys_dpo.errors import DataError
from recsys_dpo.evaluation.counterfactual import logged_slates, unavailable
from recsys_dpo.training.reference_module import load_model, trained_on

TINY = ("data.reader.n_users=300", "data.reader.n_items=60", "data.max_len=10", "model.dim=16",
        "trainer.max_epochs=1", "pipeline.reference.max_epochs=2", "eval.n_resamples=100",
        "train.batch_size=128", "progress=false", "tracking.enabled=false",
        "data.split.kind=temporal")  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("ope")
    done = run_pipeline("run.py", f"paths.artifacts={tmp / 'artifacts'}", *TINY,
                        "pipeline.primary_metric=ope/snips_ctr", f"hydra.run.dir={tmp / 'job'}",
                        cwd=tmp)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp / "job" / "pipeline_result.json").read_text())
    assert "online CTR, off-policy (snips, 95% CI): policy" in " ".join(done.stdout.split())
    assert "exact (simulator): policy" in " ".join(done.stdout.split())
    return tmp, result


def metrics_of(result: dict) -> dict:
    return json.loads((Path(result["evaluation"]) / "metrics.json").read_text())


def test_metrics_json_has_the_ope_section_lifts_and_the_exact_value(run):
    _, result = run
    metrics = metrics_of(result)
    section = metrics["ope"]
    assert section["counts"]["requests"] > 0 and section["counts"]["requests_skipped"] == 0
    assert section["policy"] == {"kind": "epsilon_greedy", "epsilon": 0.1, "temperature": 1.0,
                                 "clip": None}
    for role in ("policy", "reference"):
        values = metrics["models"][role]
        for name in ("ips", "snips", "direct_method", "doubly_robust", "pseudo_inverse"):
            assert section["models"][role]["estimates"][name]["lo"] <= values[f"ope/{name}_ctr"]
        assert 0 < values["ope/exact_ctr"] < 1
        assert 0 < section["models"][role]["diagnostics"]["ess_share"] <= 1
    lift = metrics["deltas"]["ope/snips_ctr"]
    assert lift["lo"] <= lift["mean"] <= lift["hi"]
    assert section["exact_lift"] == pytest.approx(
        metrics["models"]["policy"]["ope/exact_ctr"] - metrics["models"]["reference"]["ope/exact_ctr"])
    # The candidate rule read the off-policy lift.
    assert result["primary"] == "ope/snips_ctr" and result["delta"] == lift["mean"]
    assert result["candidate"] == (lift["lo"] > 0)
    card = (Path(result["bundle"]) / "MODEL_CARD.md").read_text()
    assert f"{lift['mean']:+.4f} [{lift['lo']:+.4f}, {lift['hi']:+.4f}]" in card
    assert "true lift on the simulator" in card
    assert "ope/exact_ctr" in (Path(result["evaluation"]) / "report.md").read_text()
    # The exact truth/* of each model's top-K, with their paired CIs (evaluation/truth.py).
    for role in ("policy", "reference"):
        assert 0 < metrics["models"][role]["truth/ctr_at_10"] < 1
        assert metrics["models"][role]["truth/utility_regret_at_10"] >= 0
    truth = metrics["deltas"]["truth/utility_at_10"]
    assert truth["lo"] <= truth["mean"] <= truth["hi"]
    assert truth["mean"] == pytest.approx(metrics["models"]["policy"]["truth/utility_at_10"]
                                          - metrics["models"]["reference"]["truth/utility_at_10"])


def _context(data, user: int, max_len: int) -> torch.Tensor:
    positives = pl.concat([data.events(s) for s in ("train", "valid")]).filter(
        pl.col("clicked") & (pl.col("user_idx") == user)).sort("timestamp", "seq")
    items = positives["item_idx"].to_list()[-max_len:]
    return torch.tensor([[0] * (max_len - len(items)) + items])


def test_ips_recomputed_by_hand_from_the_files(run):
    """The policy's IPS from test.parquet, the checkpoint and the epsilon-greedy formula,
    request by request, without the library's OPE code."""
    _, result = run
    metrics = metrics_of(result)
    data = load_prepared(metrics["config"]["prepared"])
    model = load_model(metrics["config"]["ckpt"], trained_on(data)).eval()
    max_len = int(model.config["max_len"])
    test = data.events("test").sort("request_id", "position")
    items = model.item_embeddings().detach().double()
    terms, pi_cache = [], {}
    for _, rows in test.group_by(["request_id"], maintain_order=True):
        user = int(rows["user_idx"][0])
        if user not in pi_cache:
            batch = {"user_idx": torch.tensor([user]), "context": _context(data, user, max_len)}
            with torch.no_grad():
                scores = (model.user_embeddings(batch).double() @ items.T)[0].numpy()
            scores[0] = -np.inf
            history = _context(data, user, 10_000)[0].numpy()
            scores[history[history > 0]] = -np.inf  # eval.seen=remove
            pi_cache[user] = scores
        scores = pi_cache[user]
        eligible = int(np.isfinite(scores).sum())
        top = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[: rows.height]
        for item, slot, click, mu in rows.select("item_idx", "position", "clicked",
                                                 "propensity").iter_rows():  # fmt: skip
            pi = 0.9 * (top[slot] == item) + (0.1 / eligible if np.isfinite(scores[item]) else 0)
            terms.append(pi / mu * click)
    assert np.mean(terms) == pytest.approx(metrics["models"]["policy"]["ope/ips_ctr"], rel=1e-9)


def test_leave_one_out_and_missing_propensities_are_skipped_with_the_reason(run, tmp_path):
    tmp, result = run
    metrics = metrics_of(result)
    prepared = Path(metrics["config"]["prepared"])
    # A log without propensities: the same dataset, the column dropped (a real file).
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    for f in prepared.iterdir():
        frame = pl.read_parquet(f) if f.suffix == ".parquet" else None
        if frame is not None and "propensity" in frame.columns:
            frame.drop("propensity").write_parquet(stripped / f.name)
        else:
            (stripped / f.name).write_bytes(f.read_bytes())
    overrides = (f"paths.artifacts={tmp / 'artifacts'}", f"paths.prepared={stripped}",
                 f"eval.ckpt={metrics['config']['ckpt']}", "progress=false",
                 f"hydra.run.dir={tmp_path / 'eval'}", f"eval.out_dir={tmp_path / 'out'}")
    auto = run_pipeline("evaluate.py", *overrides, "eval.n_resamples=50", cwd=tmp_path)
    assert auto.returncode == 0, auto.stderr[-2000:]
    (out,) = (tmp_path / "out").iterdir()
    skipped = json.loads((out / "metrics.json").read_text())["ope"]["skipped"]
    assert "has no propensity column(s)" in skipped
    required = run_pipeline("evaluate.py", *overrides, "eval.ope.enabled=true",
                            "eval.name=required", cwd=tmp_path)  # fmt: skip
    assert "eval.ope.enabled=true: the test split of" in bad_input_message(required)
    # Leave-one-out: a real prepared dataset of the same log.
    loo = run_pipeline("prepare.py", *TINY[:3], "data.split.kind=loo", "progress=false",
                       f"paths.artifacts={tmp_path / 'loo'}", f"hydra.run.dir={tmp_path / 'p'}",
                       cwd=tmp_path)  # fmt: skip
    assert loo.returncode == 0, loo.stderr[-2000:]
    data = load_prepared(tmp_path / "loo" / "prepared" / "synthetic")
    assert "split leave-one-out" in unavailable(data, "test")
    with pytest.raises(DataError, match="leave-one-out"):
        logged_slates(data, "test")
