"""Export takes only a finished, intact evaluation of the very checkpoint and dataset it bundles
(recsys_dpo.pipeline.check_evaluation), and load_bundle only intact files. Each foreign or
half-written input was exported before, with a model card quoting the other model's numbers;
now each exits 2 with one message naming what is wrong."""

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from test_artifacts import entry_point, modes
from test_train_cli import config

from recsys_dpo.artifacts import read_manifest, write_manifest
from recsys_dpo.errors import DataError
from recsys_dpo.export.bundle import load_bundle
from recsys_dpo.pipeline import run_pipeline

TINY = ("model.dim=16", "model.n_layers=1", "model.n_heads=1", "trainer.max_epochs=1",
        "pipeline.reference.max_epochs=2", "eval.n_resamples=100", "eval.k=[5,10]",
        "train.batch_size=128", "progress=false", "tracking.enabled=false")  # fmt: skip


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> dict:
    """A whole tiny pipeline run in-process (its result), plus a second dataset of the same
    log and vocabulary but other settings (its negatives), so another dataset hash."""
    root = tmp_path_factory.mktemp("export")
    result = run_pipeline(config("run", root, *TINY))
    other = root / "other"
    # Composed from the pipeline's own root config, so the same log and split (the quickstart's).
    entry_point("prepare")(config("run", root, "progress=false", f"paths.prepared={other}",
                                  "data.pairs.next_item.num_negatives=2"))  # fmt: skip
    return {"root": root, "result": result, "other": other}


def export(done: dict, tmp_path: Path, evaluation: Path, ckpt: str | None = None,
           prepared: Path | None = None):  # fmt: skip
    """pipelines/export.py's entry point on these inputs (default: the pipeline's own)."""
    manifest = read_manifest(done["result"].bundle)
    cfg = config("run", done["root"], *TINY, f"export.ckpt='{ckpt or manifest['policy_ckpt']}'",
                 f"export.evaluation={evaluation}", f"export.out={tmp_path / 'bundle'}",
                 *([f"paths.prepared={prepared}"] if prepared else []))  # fmt: skip
    return entry_point("export")(cfg)


def refused(capsys, excinfo, *words: str) -> str:
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    message = " ".join(err.split())
    assert all(w in message for w in words), err
    return message


def test_the_pipelines_own_evaluation_exports(done, tmp_path):
    out = export(done, tmp_path, Path(done["result"].evaluation))
    manifest = read_manifest(out)
    assert manifest["policy_sha256"] == read_manifest(done["result"].evaluation)["ckpt_sha256"]
    assert modes(out) == {("dir", 0o755), ("file", 0o644)}
    assert modes(Path(done["result"].bundle)) == {("dir", 0o755), ("file", 0o644)}


def test_a_killed_evaluations_temp_dir_is_refused(done, tmp_path, capsys):
    evaluation = Path(done["result"].evaluation)
    half = tmp_path / f".{evaluation.name}.tmp-999999-x"
    shutil.copytree(evaluation, half)
    (half / "manifest.json").unlink()
    with pytest.raises(SystemExit) as excinfo:
        export(done, tmp_path, half)
    refused(capsys, excinfo, str(half), "no manifest.json", "incomplete")
    assert not (tmp_path / "bundle").exists()


def test_an_evaluation_of_another_checkpoint_is_refused(done, tmp_path, capsys):
    reference = done["result"].evaluation
    ckpt = json.loads((Path(reference) / "metrics.json").read_text())["config"]["reference_ckpt"]
    with pytest.raises(SystemExit) as excinfo:
        export(done, tmp_path, Path(reference), ckpt=ckpt)
    refused(capsys, excinfo, "it evaluated the checkpoint", ckpt)
    assert not (tmp_path / "bundle").exists()


def test_an_evaluation_on_another_dataset_is_refused(done, tmp_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        export(done, tmp_path, Path(done["result"].evaluation), prepared=done["other"])
    refused(capsys, excinfo, "evaluated on the dataset", str(done["other"]))
    assert not (tmp_path / "bundle").exists()


def test_an_evaluation_of_the_same_config_on_other_content_is_refused(done, tmp_path, capsys):
    """The log re-read at the same path a day later: the same config (so the same config hash)
    and vocabulary, other events. The dataset hash is of the content, so export refuses."""
    evaluation = Path(done["result"].evaluation)
    prepared = Path(json.loads((evaluation / "metrics.json").read_text())["config"]["prepared"])
    later = tmp_path / "prepared"
    shutil.copytree(prepared, later)
    payload = {k: v for k, v in read_manifest(later).items() if k != "files"}
    test = pl.read_parquet(later / "test.parquet")
    test.head(len(test) - 1).write_parquet(later / "test.parquet")
    write_manifest(later, payload)
    assert read_manifest(later)["config_hash"] == read_manifest(prepared)["config_hash"]
    with pytest.raises(SystemExit) as excinfo:
        export(done, tmp_path, evaluation, prepared=later)
    refused(capsys, excinfo, "evaluated on the dataset", str(later))
    assert not (tmp_path / "bundle").exists()


def test_an_edited_metrics_file_is_refused(done, tmp_path, capsys):
    evaluation = tmp_path / "evaluation"
    shutil.copytree(done["result"].evaluation, evaluation)
    metrics = json.loads((evaluation / "metrics.json").read_text())
    metrics["models"]["policy"]["ndcg_at_10"] = 0.99
    (evaluation / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(SystemExit) as excinfo:
        export(done, tmp_path, evaluation)
    refused(capsys, excinfo, str(evaluation / "metrics.json"), "sha256 differs")
    assert not (tmp_path / "bundle").exists()


def test_load_bundle_refuses_a_changed_file(done, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(done["result"].bundle, bundle)
    histories = bundle / "histories.json"
    histories.write_bytes(histories.read_bytes()[:-10])
    with pytest.raises(DataError, match=f"{histories}: sha256 differs"):
        load_bundle(bundle)
