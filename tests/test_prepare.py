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
        "vocab_items.parquet",
        "vocab_users.parquet",
        "train.parquet",
        "valid.parquet",
        "test.parquet",
        "pairs_train.parquet",
        "pairs_valid.parquet",
        "pairs_test.parquet",
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


def _prepare(log: pl.LazyFrame, out: Path, n_buckets: int, split=None, pairs=None):
    from recsys_dpo.data.prepare import prepare_dataset

    return prepare_dataset(
        log,
        "test-log",
        out,
        validation={"drop_duplicates": True, "min_events_per_user": 2},
        split=split or {"kind": "loo"},
        pairs=pairs
        or {"impressions": {}, "next_item": {"num_negatives": 3, "sampler": "popularity"}},
        n_buckets=n_buckets,
        progress=False,
    )


def test_a_pair_strategy_set_to_null_is_off(tmp_path):
    """`data.pairs.<name>: null` drops a preset's strategy (conf/study/ml100k_feedback.yaml)."""
    from recsys_dpo.data.synthetic import read_synthetic

    log = read_synthetic(tmp_path / "raw", n_users=40, n_items=30, seed=3)
    both = _prepare(log, tmp_path / "both", 1)
    one = _prepare(log, tmp_path / "one", 1, pairs={"impressions": None, "next_item": {
        "num_negatives": 3, "sampler": "popularity"}})  # fmt: skip
    assert {s for by in both.pairs.values() for s in by} == {"impressions", "next_item"}
    assert {s for by in one.pairs.values() for s in by} == {"next_item"}
    assert all(one.pairs[s]["next_item"] == both.pairs[s]["next_item"] for s in one.pairs)
    assert set(pl.read_parquet(tmp_path / "one" / "pairs_train.parquet")["source"]) == {
        "next_item"}  # fmt: skip


@pytest.mark.parametrize("split", [
    {"kind": "loo"}, {"kind": "temporal", "test_frac": 0.2},
    {"kind": "window", "train_end": 3, "valid_periods": 1, "test_periods": 2},
])  # fmt: skip
def test_user_buckets_give_the_same_dataset(tmp_path, split):
    """The bounded-memory path (n_buckets > 1) writes the same events and pairs."""
    from recsys_dpo.data.synthetic import read_synthetic

    log = read_synthetic(tmp_path / "raw", n_users=150, n_items=80, seed=3)
    one = _prepare(log, tmp_path / "one", 1, split)
    four = _prepare(log, tmp_path / "four", 4, split)
    assert one.events == four.events and one.pairs == four.pairs
    assert one.report == four.report
    for name in ("vocab_items", "vocab_users", "train", "valid", "test"):
        a = pl.read_parquet(tmp_path / "one" / f"{name}.parquet")
        b = pl.read_parquet(tmp_path / "four" / f"{name}.parquet")
        key = "seq" if "seq" in a.columns else a.columns[1]
        assert a.sort(key).equals(b.sort(key)), name
    key = ["user_idx", "chosen", "context", "source", "timestamp"]
    for s in ("train", "valid", "test"):
        a = pl.read_parquet(tmp_path / "one" / f"pairs_{s}.parquet")
        b = pl.read_parquet(tmp_path / "four" / f"pairs_{s}.parquet")
        assert a.select(key).sort(key).equals(b.select(key).sort(key))
        impressions = pl.col("source") == "impressions"  # nothing sampled: identical rows
        assert a.filter(impressions).sort(key).equals(b.filter(impressions).sort(key))


def test_bucketed_errors_name_rows_of_the_whole_log(tmp_path):
    rows = [{"user_id": f"u{i % 7}", "item_id": f"i{i % 5}", "timestamp": i} for i in range(40)]
    rows[23]["item_id"] = None
    log = pl.LazyFrame(rows)
    with pytest.raises(DataError, match=r"'item_id' has 1 null.*\[23\]"):
        _prepare(log, tmp_path / "out", 3)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no temp directory left behind either


def test_bucketed_empty_log_is_refused(tmp_path):
    log = pl.LazyFrame(schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "timestamp": pl.Int64})
    with pytest.raises(DataError, match="no rows"):
        _prepare(log, tmp_path / "out", 3)
    assert list(tmp_path.iterdir()) == []


def test_cli_on_real_movielens_100k(tmp_path):
    from tests.conftest import shared_file

    shared_file("ml-100k", "u.data")
    result = run_pipeline(
        "prepare.py", "data=ml100k", f"paths.artifacts={tmp_path}", "progress=false", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path / "prepared" / "ml100k")
    assert manifest["n_users"] == 943 and manifest["n_items"] == 1682 + 1
    assert sum(manifest["events"].values()) == 100_000
    # leave-one-out: every user (all have >= 20 ratings) has one valid and one test event
    assert manifest["events"]["valid"] == manifest["events"]["test"] == 943
    assert set(manifest["pairs"]["train"]) == {"next_item", "feedback"}
    assert manifest["pairs"]["test"]["next_item"] == 943


def test_cli_on_real_mind_impressions(tmp_path):
    from tests.conftest import shared_file

    shared_file("mind-small-subset", "behaviors.tsv")
    result = run_pipeline(
        "prepare.py",
        "data=mind",
        "data.n_buckets=4",
        f"paths.artifacts={tmp_path}",
        "progress=false",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "prepared" / "mind"
    manifest = read_manifest(out)
    assert manifest["validation"]["rows in"] == 189_359 + 136_952  # impressions + history rows
    events = pl.concat([pl.read_parquet(out / f"{s}.parquet") for s in ("train", "valid", "test")])
    shown = events.filter(pl.col("request_id").is_not_null())
    assert shown.height == 189_359 and shown["clicked"].sum() == 7_542
    # temporal: a request never straddles splits, and the splits are ordered in time
    assert shown.group_by("request_id").agg(pl.col("split").n_unique())["split"].max() == 1
    pairs = pl.read_parquet(out / "pairs_train.parquet")
    assert pairs.height > 0 and set(pairs["source"]) == {"impressions"}
    assert not pairs.select(pl.col("rejected").list.contains(pl.col("chosen")).any()).item()
