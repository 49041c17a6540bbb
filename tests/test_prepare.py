"""The prepare stage end to end: CLI, files on disk, manifest, and failure on bad input."""

import json
from pathlib import Path

import polars as pl
import pytest

from recsys_dpo.artifacts import read_manifest
from recsys_dpo.errors import DataError
from tests.conftest import run_pipeline

MAPPING = "+data.reader.columns={user_id: uid, item_id: sku, timestamp: ts}"


def write_log(path: Path, n_users: int = 6, per_user: int = 6) -> Path:
    rows = [
        {"uid": f"user{u}", "sku": f"sku{(u * 3 + t) % 11}", "ts": 1_700_000_000 + 60 * t}
        for u in range(n_users)
        for t in range(per_user)
    ]
    pl.DataFrame(rows).write_csv(path)
    return path


def prepare_cli(tmp_path: Path, log: Path, *extra: str):
    return run_pipeline(
        "prepare.py",
        "data=table",
        f"data.reader.path={log}",
        MAPPING,
        f"paths.artifacts={tmp_path / 'artifacts'}",
        "progress=false",
        *extra,
        cwd=tmp_path,
    )


def test_cli_writes_complete_dataset(tmp_path):
    log = write_log(tmp_path / "clicks.csv")
    result = prepare_cli(tmp_path, log)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "artifacts" / "prepared" / "table"
    manifest = read_manifest(out)
    expected = {
        "vocab_items.parquet", "vocab_users.parquet", "train.parquet", "valid.parquet",
        "test.parquet", "pairs_train.parquet", "pairs_valid.parquet", "pairs_test.parquet",
    }
    assert set(manifest["files"]) == expected
    assert manifest["n_users"] == 6
    assert manifest["n_items"] == 11 + 1  # padding row
    # leave-one-out: one valid and one test event per user, the rest train
    assert manifest["events"] == {"train": 24, "valid": 6, "test": 6}
    test = pl.read_parquet(out / "test.parquet")
    assert test.height == 6 and test["user_idx"].n_unique() == 6
    pairs = pl.read_parquet(out / "pairs_test.parquet")
    assert pairs.height == 6
    assert manifest["pairs"]["test"] == {"next_item": 6}
    assert manifest["config"]["data"]["reader"]["columns"]["user_id"] == "uid"
    # nothing but the finished dataset is left in the output folder
    assert sorted(p.name for p in out.parent.iterdir()) == ["table"]


def test_manifest_hashes_match_files(tmp_path):
    log = write_log(tmp_path / "clicks.csv")
    assert prepare_cli(tmp_path, log).returncode == 0
    out = tmp_path / "artifacts" / "prepared" / "table"
    manifest = json.loads((out / "manifest.json").read_text())
    from recsys_dpo.artifacts import file_sha256

    for name, meta in manifest["files"].items():
        assert file_sha256(out / name) == meta["sha256"]


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    missing_col = tmp_path / "missing_col.csv"
    pl.DataFrame({"uid": ["a"], "item": ["x"], "ts": [1]}).write_csv(missing_col)
    null_ids = tmp_path / "null_ids.csv"
    null_ids.write_text("uid,sku,ts\na,x,1\n,y,2\nb,z,3\n")
    bad_ts = tmp_path / "bad_ts.csv"
    bad_ts.write_text("uid,sku,ts\na,x,2024-01-01\na,y,not-a-date\nb,z,2024-01-03\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("uid,sku,ts\n")
    return {
        "no such file": (tmp_path / "nope.csv", "nope.csv"),
        "missing column": (missing_col, "sku"),
        "null ids": (null_ids, "user_id"),
        "unparsable timestamps": (bad_ts, "not-a-date"),
        "empty input": (empty, "no rows"),
    }


@pytest.mark.parametrize(
    "case", ["no such file", "missing column", "null ids", "unparsable timestamps", "empty input"]
)
def test_cli_bad_input_fails_cleanly(tmp_path, case):
    log, needle = _bad_inputs(tmp_path)[case]
    result = prepare_cli(tmp_path, log)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    prepared = tmp_path / "artifacts" / "prepared"
    assert not prepared.exists() or list(prepared.iterdir()) == []


def test_failure_keeps_previous_good_dataset(tmp_path):
    log = write_log(tmp_path / "clicks.csv")
    assert prepare_cli(tmp_path, log).returncode == 0
    out = tmp_path / "artifacts" / "prepared" / "table"
    before = (out / "manifest.json").read_text()
    # the split step fails after validation: the old dataset must survive untouched
    result = prepare_cli(tmp_path, log, "data.split.kind=nonsense")
    assert result.returncode == 2
    assert "nonsense" in result.stderr
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["table"]


def test_incomplete_directory_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="incomplete"):
        read_manifest(tmp_path / "half")
