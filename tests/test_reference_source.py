"""`reference.source` (recsys_dpo/reference_source.py): the production model as the reference.

A tiny pipeline registers version 1 in a sqlite store and the test aliases it `production`, as
a promotion would; `recsys-dpo run reference.source=models:/<name>@production` on the same
data then trains no reference and fine-tunes from exactly that version's checkpoint (the
sha256 the registered bundle records), evaluates against it, and registers version 2 with the
lineage of version 1. A bundle directory and a plain checkpoint work the same way through
`recsys-dpo train-preference`; a tampered bundle, an unknown alias or model, an unreachable
registry and a source beside a ckpt are refused with one message naming the setting."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CONF, SHARED_DATA, bad_input_message, free_port, run_pipeline
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import open_dict
from test_pipeline import job_result, run

from recsys_dpo.artifacts import file_sha256, read_manifest
from recsys_dpo.errors import DataError
from recsys_dpo.reference_source import CACHE_DIR, CACHE_RECORD, apply, from_config, resolve
from recsys_dpo.training.run import run_dir

NAME = "quickstart-sasrec"
# train-preference on test_pipeline's tiny log (the stage's own keys of test_pipeline.TINY).
STAGE = ("data.reader.n_users=300", "data.reader.n_items=80", "data.max_len=10", "model.dim=16",
         "trainer.max_epochs=1", "train.batch_size=128", "progress=false")  # fmt: skip


@pytest.fixture(scope="module")
def production(tmp_path_factory) -> dict:
    """A tiny tracked pipeline whose registered version 1 is aliased `production`: its
    result, plus "tmp", "uri" and "manifest" (the bundle's)."""
    tmp = tmp_path_factory.mktemp("production")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    done = run(tmp, "job1", f"tracking.uri={uri}")
    assert done.returncode == 0, done.stderr[-3000:]
    result = job_result(tmp, "job1")
    assert result["registered"] == f"{NAME}/1"
    MlflowClient(uri).set_registered_model_alias(NAME, "production", "1")
    return {**result, "tmp": tmp, "uri": uri, "manifest": read_manifest(result["bundle"])}


def reference_of(policy_ckpt: str) -> str:
    """The reference checkpoint a policy checkpoint was fine-tuned from (its hyperparameter)."""
    saved = torch.load(policy_ckpt, map_location="cpu", weights_only=True)
    return saved["hyper_parameters"]["reference_ckpt"]


def train_preference(tmp: Path, production: dict, job: str, *overrides: str):
    """pipelines/train_preference.py on the production run's dataset, runs under tmp/runs."""
    return run_pipeline(
        "train_preference.py", f"paths.artifacts={tmp / 'artifacts'}",
        f"paths.prepared={production['prepared']}", f"paths.runs={tmp / 'runs'}", *STAGE,
        *overrides, f"hydra.run.dir={tmp / job}", cwd=tmp,
    )  # fmt: skip


def trained(tmp: Path) -> tuple[Path, dict]:
    """The one preference run directory under tmp/runs and its result.json."""
    (out,) = (tmp / "runs" / "preference").iterdir()
    return out, json.loads((out / "result.json").read_text())


def test_the_bundle_carries_its_policy_checkpoint(production):
    manifest = production["manifest"]
    assert manifest["files"]["policy.ckpt"]["sha256"] == manifest["policy_sha256"]
    assert manifest["policy_sha256"] == file_sha256(Path(production["policy_ckpt"]))
    assert "reference_source" not in manifest  # trained from its own reference


def test_run_fine_tunes_from_the_production_version(production):
    """No reference stage; the policy's reference is byte for byte the checkpoint of the
    registered version 1 (its bundle's policy_sha256), downloaded under paths.artifacts; the
    evaluation's reference is that model (version 1's own policy score on the same data);
    version 2, the preference child and the parent carry the lineage of version 1."""
    tmp, uri = production["tmp"], production["uri"]
    done = run(tmp, "job2", f"tracking.uri={uri}", f"reference.source=models:/{NAME}@production")
    assert done.returncode == 0, done.stderr[-3000:]
    result = job_result(tmp, "job2")
    assert result["ran"] == ["preference", "evaluate", "export"]  # the same data: prepared once
    assert "reference" not in result["stage_run_ids"]
    reference = Path(reference_of(result["policy_ckpt"]))
    sha = production["manifest"]["policy_sha256"]
    assert file_sha256(reference) == sha and result["reference_ckpt"] == str(reference)
    assert reference.is_relative_to(tmp / "artifacts" / CACHE_DIR / NAME / "1")
    assert result["reference"] == pytest.approx(production["policy"], abs=1e-12)

    client = MlflowClient(uri)
    assert result["registered"] == f"{NAME}/2"
    first = client.get_model_version(NAME, "1")
    tags = client.get_model_version(NAME, "2").tags
    assert tags["lineage.reference_model"] == NAME and tags["lineage.reference_version"] == "1"
    assert tags["lineage.reference_sha256"] == sha
    assert tags["lineage.reference_run_id"] == first.run_id
    assert tags["lineage.reference_source"] == f"models:/{NAME}@production"
    for run_id in (result["stage_run_ids"]["preference"], result["parent_run_id"]):
        run_tags = client.get_run(run_id).data.tags
        assert run_tags["lineage.reference_version"] == "1"
        assert run_tags["lineage.reference_sha256"] == sha

    manifest = read_manifest(result["bundle"])
    assert manifest["reference_source"]["version"] == "1"
    assert manifest["reference_source"]["sha256"] == sha
    card = (Path(result["bundle"]) / "MODEL_CARD.md").read_text()
    assert f"- fine-tuned from models:/{NAME}/1 (reference.source=models:/{NAME}@production" in card


def test_a_registry_version_is_downloaded_once(production, tmp_path):
    """By alias or by number, the same cached checkpoint; the second resolution downloads
    nothing (the cache record is not rewritten)."""
    cache = tmp_path / "cache"
    first = resolve(f"models:/{NAME}@production", production["uri"], cache)
    record = cache / NAME / "1" / CACHE_RECORD
    written = record.stat().st_mtime_ns
    again = resolve(f"models:/{NAME}/1", production["uri"], cache)
    assert again.ckpt == first.ckpt and record.stat().st_mtime_ns == written
    assert (first.version, first.alias, again.alias) == ("1", "production", None)
    assert first.sha256 == production["manifest"]["policy_sha256"]


def test_train_preference_from_a_bundle_directory(production, tmp_path):
    """The bundle's own policy.ckpt is the reference, and the stage's MLflow run says so."""
    bundle = Path(production["bundle"])
    done = train_preference(tmp_path, production, "job", f"reference.source={bundle}",
                            f"tracking.uri={production['uri']}")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    _, result = trained(tmp_path)
    assert reference_of(result["best_ckpt"]) == str(bundle / "policy.ckpt")
    tags = MlflowClient(production["uri"]).get_run(result["mlflow_run_id"]).data.tags
    assert tags["lineage.reference_kind"] == "bundle"
    assert tags["lineage.reference_bundle"] == str(bundle)
    assert tags["lineage.reference_sha256"] == production["manifest"]["policy_sha256"]


def test_train_preference_from_a_checkpoint_hashes_as_that_checkpoint(production, tmp_path):
    """reference.source=<ckpt> trains what reference.ckpt=<ckpt> trains, in its run directory."""
    ckpt = production["policy_ckpt"]
    done = train_preference(tmp_path, production, "job", f"reference.source={ckpt}",
                            "tracking.enabled=false")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out, result = trained(tmp_path)
    assert reference_of(result["best_ckpt"]) == ckpt
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        given = compose("config", overrides=[
            f"paths.artifacts={tmp_path / 'artifacts'}", f"paths.prepared={production['prepared']}",
            f"paths.runs={tmp_path / 'runs'}", f"paths.shared_data={SHARED_DATA}", *STAGE,
            f"reference.ckpt={ckpt}"])  # fmt: skip
    assert run_dir(given, "preference", "sasrec-dpo") == out


def copied(production: dict, tmp: Path) -> Path:
    """A copy of the production bundle."""
    return Path(shutil.copytree(production["bundle"], tmp / "bundle"))


@pytest.mark.parametrize("case", ["tampered bundle", "unknown alias"])
def test_bad_sources_exit_2_naming_the_fault(production, tmp_path, case):
    if case == "tampered bundle":
        bundle = copied(production, tmp_path)
        changed = bundle / "item_embeddings.npy"
        data = bytearray(changed.read_bytes())
        data[-1] ^= 1  # one bit of one weight
        changed.write_bytes(bytes(data))
        source, fault = str(bundle), f"{changed}: sha256 differs"
    else:
        source, fault = f"models:/{NAME}@staging", "has no alias 'staging'"
    done = train_preference(tmp_path, production, "job", f"reference.source={source}",
                            f"tracking.uri={production['uri']}")  # fmt: skip
    message = bad_input_message(done)
    assert message.startswith(f"error: reference.source={source}: ") and fault in message
    assert not (tmp_path / "runs").exists()


def test_refusals_name_the_setting(production, tmp_path):
    uri, cache = production["uri"], tmp_path / "cache"
    cases = {
        "models:/nobody@production": f"has no registered model 'nobody' (it has: {NAME})",
        f"models:/{NAME}/7": f"the registered model '{NAME}' has no version 7",
        f"models:/{NAME}": "a registry source is models:/<name>@<alias> or models:/<name>/<version>",
        str(tmp_path / "nothing.ckpt"): "no such checkpoint file or bundle directory",
    }
    for source, fault in cases.items():
        with pytest.raises(DataError) as err:
            resolve(source, uri, cache)
        assert str(err.value).startswith(f"reference.source={source}: ") and fault in str(err.value)
    with pytest.raises(DataError, match="does not answer"):
        resolve(f"models:/{NAME}@production", f"http://127.0.0.1:{free_port()}", cache)
    missing = f"sqlite:///{tmp_path / 'no.db'}"
    with pytest.raises(DataError, match="no such MLflow store"):
        resolve(f"models:/{NAME}@production", missing, cache)
    assert not (tmp_path / "no.db").exists()
    assert not cache.exists()  # nothing downloaded for any of them


def test_a_bundle_without_its_checkpoint_falls_back_to_the_one_it_names(production, tmp_path):
    """Bundles exported before they carried policy.ckpt: the manifest's policy_ckpt, checked
    against policy_sha256; gone, it is refused."""
    bundle = copied(production, tmp_path)
    manifest = read_manifest(bundle)
    (bundle / "policy.ckpt").unlink()
    del manifest["files"]["policy.ckpt"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert resolve(str(bundle), "unused", tmp_path).ckpt == production["policy_ckpt"]
    manifest["policy_ckpt"] = str(tmp_path / "gone.ckpt")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"has no policy\.ckpt .*gone\.ckpt, is not here"):
        resolve(str(bundle), "unused", tmp_path)


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_a_source_and_a_ckpt_are_refused_and_an_unset_source_changes_no_hash(tmp_path):
    from recsys_dpo.settings import TrainPreference
    from recsys_dpo.stage import preflight

    both = compose_config("reference.source=a.ckpt", "reference.ckpt=b.ckpt",
                          "tracking.enabled=false")  # fmt: skip
    with pytest.raises(DataError, match="reference.source=a.ckpt reference.ckpt=b.ckpt: both"):
        preflight(both, TrainPreference)
    with pytest.raises(DataError, match="set one of them"):
        from_config(both)
    cfg = compose_config("reference.ckpt=r.ckpt")
    before = compose_config("reference.ckpt=r.ckpt")  # as composed before the key existed
    with open_dict(before):
        del before.reference["source"]
    assert run_dir(cfg, "preference", "x") == run_dir(before, "preference", "x")
    # Resolved, the config is the one given reference.ckpt, plus the lineage tags.
    ckpt = tmp_path / "r.ckpt"
    ckpt.write_bytes(b"not read here")
    applied = apply(compose_config(f"reference.source={ckpt}"), from_config(
        compose_config(f"reference.source={ckpt}")))  # fmt: skip
    assert applied.reference.ckpt == str(ckpt) and applied.reference.source is None
    assert applied.tracking.tags["lineage.reference_sha256"] == file_sha256(ckpt)
    assert run_dir(applied, "preference", "x") == run_dir(
        compose_config(f"reference.ckpt={ckpt}"), "preference", "x")


def test_evaluate_takes_a_source_as_its_reference(production, tmp_path):
    """recsys-dpo evaluate reference.source=<bundle>: the bundle's own policy against itself,
    so every delta and the KL are exactly 0."""
    from recsys_dpo.commands import evaluate

    cfg = compose_config(f"paths.artifacts={tmp_path}", f"paths.prepared={production['prepared']}",
                         *STAGE, "eval.n_resamples=100", "eval.ope.enabled=false",
                         f"eval.ckpt={production['policy_ckpt']}",
                         f"reference.source={production['bundle']}")  # fmt: skip
    metrics = json.loads((evaluate.run(cfg) / "metrics.json").read_text())
    assert metrics["config"]["reference_ckpt"] == str(Path(production["bundle"]) / "policy.ckpt")
    assert metrics["comparison"]["kl"] == pytest.approx(0, abs=1e-6)
    assert {d["mean"] for d in metrics["deltas"].values()} == {0.0}
