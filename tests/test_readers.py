"""Readers: hand-written files of each format -> the exact canonical rows; real files -> counts."""

from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from recsys_dpo.data.readers import (
    READERS,
    read_coat,
    read_mind_behaviors,
    read_movielens,
    read_sasrec_txt,
    read_table,
)
from recsys_dpo.data.validate import validate
from recsys_dpo.errors import DataError
from tests.conftest import bad_input_message, shared_file
from tests.test_prepare import prepare_cli

MAPPING = {"user_id": "uid", "item_id": "sku", "timestamp": "ts"}


def unix(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- read_table -----------------------------------------------------------------------------


def test_csv_with_mapping_renames_keeps_canonical_and_drops_the_rest(tmp_path):
    path = write_text(
        tmp_path / "log.csv",
        "uid,sku,ts,rating,page\n007,42,100,4.5,home\n8,043,200,1.0,cart\n",
    )
    df = read_table(path, columns=MAPPING).collect()
    assert df.columns == ["user_id", "item_id", "timestamp", "rating"]
    # id columns are read as text: leading zeros survive
    assert df["user_id"].to_list() == ["007", "8"]
    assert df["item_id"].to_list() == ["42", "043"]
    # every CSV column is text; validate() converts (and names the rows that do not convert)
    assert df["timestamp"].to_list() == ["100", "200"]
    assert df["rating"].to_list() == ["4.5", "1.0"]


def test_tsv_by_suffix_and_format_override(tmp_path):
    tsv = write_text(tmp_path / "log.tsv", "user_id\titem_id\ttimestamp\nu\ti\t5\n")
    assert read_table(tsv).collect().rows() == [("u", "i", "5")]
    txt = write_text(tmp_path / "log.txt", "user_id;item_id;timestamp\nu;i;5\n")
    assert read_table(txt, format="csv", separator=";").collect().rows() == [("u", "i", "5")]


def test_mapped_column_replaces_a_canonically_named_one(tmp_path):
    path = write_text(tmp_path / "log.csv", "user_id,uid,item_id,timestamp\nold,new,i,1\n")
    df = read_table(path, columns={"user_id": "uid"}).collect()
    assert df["user_id"].to_list() == ["new"]
    assert df.columns.count("user_id") == 1


def test_missing_mapped_column_names_file_column_mapping_and_available(tmp_path):
    path = write_text(tmp_path / "log.csv", "uid,item,ts\n1,2,3\n")
    with pytest.raises(DataError) as err:
        read_table(path, columns=MAPPING)
    msg = str(err.value)
    assert str(path) in msg
    assert "'sku'" in msg and "item_id" in msg
    assert str(MAPPING) in msg
    assert "['uid', 'item', 'ts']" in msg


def test_mapping_key_that_is_not_canonical(tmp_path):
    path = write_text(tmp_path / "log.csv", "uid,item,ts\n1,2,3\n")
    with pytest.raises(DataError, match=r"\['usr'\] that are not canonical"):
        read_table(path, columns={"usr": "uid"})


def test_hive_partitioned_directory_by_hand_and_glob(tmp_path):
    root = tmp_path / "clicks"
    for day, users in ((1, ["a", "b"]), (2, ["c"])):
        (root / f"day={day}").mkdir(parents=True)
        pl.DataFrame(
            {"uid": users, "sku": ["x"] * len(users), "junk": [0] * len(users)}
        ).write_parquet(root / f"day={day}" / "part.parquet")
    mapping = {"user_id": "uid", "item_id": "sku", "timestamp": "day"}
    df = read_table(root, columns=mapping).collect().sort("user_id")
    assert df.columns == ["user_id", "item_id", "timestamp"]
    assert df.rows() == [("a", "x", 1), ("b", "x", 1), ("c", "x", 2)]
    globbed = read_table(root / "*" / "*.parquet", columns=mapping).collect().sort("user_id")
    assert_frame_equal(globbed, df)


def test_partition_by_written_directory(tmp_path):
    src = pl.DataFrame(
        {
            "user_id": [1, 2, 3, 4],
            "item_id": [5, 6, 7, 8],
            "timestamp": [9, 8, 7, 6],
            "shard": [0, 1, 0, 1],
        }
    )
    src.write_parquet(tmp_path / "log", partition_by="shard")
    df = read_table(tmp_path / "log").collect().sort("user_id")
    assert_frame_equal(df, src.drop("shard"), check_dtypes=False)


def test_missing_path_and_unknown_suffix_and_corrupt_file(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match=f"{missing}: no such file or directory"):
        read_table(missing)
    with pytest.raises(DataError, match="no such file or directory"):
        read_table(tmp_path / "*.parquet")
    odd = write_text(tmp_path / "log.xlsx", "x")
    with pytest.raises(DataError, match=r"cannot tell the format.*'\.xlsx'"):
        read_table(odd)
    with pytest.raises(DataError, match="unknown format 'json'"):
        read_table(odd, format="json")
    corrupt = write_text(tmp_path / "log.parquet", "this is not parquet")
    with pytest.raises(DataError, match=f"{corrupt}: cannot read it as a table"):
        read_table(corrupt)


# --- MovieLens, SASRec ------------------------------------------------------------------------


def test_movielens_u_data_and_ratings_dat_give_the_same_frame(tmp_path):
    rows = [("196", "242", 3.0, 881250949), ("22", "377", 1.0, 878887116)]
    udata = write_text(
        tmp_path / "u.data", "".join(f"{u}\t{i}\t{int(r)}\t{t}\n" for u, i, r, t in rows)
    )
    dat = write_text(
        tmp_path / "ratings.dat", "".join(f"{u}::{i}::{int(r)}::{t}\n" for u, i, r, t in rows)
    )
    expected = pl.DataFrame(
        rows,
        schema={
            "user_id": pl.Utf8,
            "item_id": pl.Utf8,
            "rating": pl.Float64,
            "timestamp": pl.Int64,
        },
        orient="row",
    )
    for path in (udata, dat):  # text from the reader, typed by validate
        df = validate(read_movielens(path), str(path))[0]
        assert_frame_equal(df.select(expected.columns), expected)


def test_movielens_rejects_other_files(tmp_path):
    path = write_text(tmp_path / "u.item", "1|Toy Story (1995)|01-Jan-1995\n")
    with pytest.raises(DataError, match="not a MovieLens ratings file"):
        read_movielens(path)


def test_sasrec_txt_timestamp_is_order_within_user(tmp_path):
    path = write_text(tmp_path / "seq.txt", "1 10\n1 11\n2 10\n1 12\n2 13\n")
    df = read_sasrec_txt(path).collect()
    assert df.rows() == [
        ("1", "10", 0),
        ("1", "11", 1),
        ("2", "10", 0),
        ("1", "12", 2),
        ("2", "13", 1),
    ]


# --- MIND -----------------------------------------------------------------------------------

MIND_LINES = [
    "1\tU1\t11/12/2019 2:14:46 PM\tN1 N2\tN10-1 N11-0",
    "2\tU2\t11/11/2019 9:00:00 AM\t\tN10-0 N12-1 N13-0",
    # U1's earliest impression: its history (with a repeat) is the one kept
    "3\tU1\t11/11/2019 11:30:05 PM\tN3 N1 N3\tN11-1",
]


def test_mind_behaviors_exact_rows(tmp_path):
    path = write_text(tmp_path / "behaviors.tsv", "\n".join(MIND_LINES) + "\n")
    t1, t2, t3 = (
        unix(2019, 11, 12, 14, 14, 46),
        unix(2019, 11, 11, 9, 0, 0),
        unix(2019, 11, 11, 23, 30, 5),
    )
    expected = pl.DataFrame(
        [
            (None, "U1", "N3", t3 - 3, None, True, "history"),
            (None, "U1", "N1", t3 - 2, None, True, "history"),
            ("1", "U1", "N10", t1, 0, True, "impression"),
            ("1", "U1", "N11", t1, 1, False, "impression"),
            ("2", "U2", "N10", t2, 0, False, "impression"),
            ("2", "U2", "N12", t2, 1, True, "impression"),
            ("2", "U2", "N13", t2, 2, False, "impression"),
            ("3", "U1", "N11", t3, 0, True, "impression"),
        ],
        schema={
            "request_id": pl.Utf8,
            "user_id": pl.Utf8,
            "item_id": pl.Utf8,
            "timestamp": pl.Int64,
            "position": pl.Int32,
            "clicked": pl.Boolean,
            "event": pl.Utf8,
        },
        orient="row",
    )
    df = read_mind_behaviors(path).collect()
    assert_frame_equal(df, expected)
    # history precedes every impression of the user
    u1 = df.filter(pl.col("user_id") == "U1")
    assert (
        u1.filter(event="history")["timestamp"].max()
        < u1.filter(event="impression")["timestamp"].min()
    )


def test_registry_names():
    expected = {
        "table": read_table,
        "movielens": read_movielens,
        "sasrec_txt": read_sasrec_txt,
        "mind": read_mind_behaviors,
        "coat": read_coat,
    }
    assert expected == READERS


@pytest.mark.parametrize("reader", [read_movielens, read_sasrec_txt, read_mind_behaviors])
def test_format_readers_reject_missing_path(reader, tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        reader(tmp_path / "absent")


# --- real data ------------------------------------------------------------------------------


def counts(df: pl.DataFrame) -> tuple[int, int, int]:
    return df["user_id"].n_unique(), df["item_id"].n_unique(), df.height


def test_real_ml1m_sas():
    path = shared_file("ml-1m-sas", "ml-1m.txt")
    raw = read_sasrec_txt(path).collect()
    assert counts(raw) == (6040, 3416, 999_611)
    df, report = validate(read_sasrec_txt(path), str(path))
    assert counts(df) == (6040, 3416, 999_611)
    assert report.duplicates_dropped == 0 and report.short_users_dropped == 0
    # order index restarts per user and counts up: the first user's sequence is 0..n-1
    first = df.filter(user_id="1")["timestamp"]
    assert first.to_list() == list(range(first.len()))


def test_real_ml100k():
    path = shared_file("ml-100k", "u.data")
    raw = read_movielens(path).collect()
    assert counts(raw) == (943, 1682, 100_000)
    df, report = validate(read_movielens(path), str(path))
    assert set(df["rating"].unique().to_list()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert counts(df) == (943, 1682, 100_000)
    assert report.rows_out == 100_000 and report.duplicates_dropped == 0


def test_real_mind():
    path = shared_file("mind-small-subset", "behaviors.tsv")
    for df in (
        read_mind_behaviors(path).collect(),
        validate(read_mind_behaviors(path), str(path))[0],
    ):
        shown = df.filter(event="impression")
        assert shown["request_id"].n_unique() == 5000
        assert shown.height == 189_359
        assert shown["clicked"].sum() == 7542
        assert df["user_id"].n_unique() == 4637
        history = df.filter(event="history")
        assert history["request_id"].null_count() == history.height
        assert history.select("user_id", "item_id").is_duplicated().sum() == 0


# --- a log that does not fit: real header, bad file, timestamp row (issue 15, item 12) -------


@pytest.mark.parametrize(("sep", "hint"), [(";", "separator=';'"), ("|", "separator='|'")])
def test_csv_with_another_delimiter_shows_the_header_and_the_setting(tmp_path, sep, hint):
    path = write_text(tmp_path / "log.csv", sep.join(["user_id", "item_id", "timestamp"]) + "\n")
    with pytest.raises(DataError) as err:
        read_table(path)
    msg = str(err.value)
    assert msg.startswith(
        f"{path}: the header line {sep.join(['user_id', 'item_id', 'timestamp'])!r}"
    )
    assert f"data.reader.{hint}" in msg


def test_tab_delimited_csv_suggests_the_tsv_format(tmp_path):
    path = write_text(tmp_path / "log.csv", "uid\tsku\tts\nu\ti\t1\n")
    with pytest.raises(DataError, match=r"'uid\\tsku\\tts'.*data\.reader\.format=tsv"):
        read_table(path, columns=MAPPING)


def test_unmapped_required_columns_name_the_files_columns(tmp_path):
    path = write_text(tmp_path / "log.csv", "uid,item_id,when\nu,i,1\n")
    with pytest.raises(DataError) as err:
        read_table(path)
    msg = str(err.value)
    assert "missing required column(s) ['user_id', 'timestamp']" in msg
    assert "the file has columns ['uid', 'item_id', 'when']" in msg
    assert "data.reader.columns" in msg


def _parquet_dir(root: Path) -> Path:
    for day in (1, 2):
        (root / f"day={day}").mkdir(parents=True)
        pl.DataFrame({"uid": ["a", "b"], "sku": ["x", "y"], "ts": [day, day]}).write_parquet(
            root / f"day={day}" / "part-0.parquet"
        )
    return root


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (lambda p: p.write_text("not parquet at all"), "not a readable parquet file"),
        (lambda p: p.write_bytes(b""), "not a readable parquet file"),
        (
            lambda p: pl.DataFrame({"uid": ["c"], "sku": ["z"], "ts": ["2"]}).write_parquet(p),
            "ts: String",
        ),
        (lambda p: pl.DataFrame({"uid": ["c"], "sku": ["z"]}).write_parquet(p), "columns"),
    ],
    ids=["garbage", "empty", "other dtype", "missing column"],
)
def test_bad_file_in_a_parquet_directory_is_named(tmp_path, bad, needle):
    root = _parquet_dir(tmp_path / "log")
    bad(root / "day=2" / "part-1.parquet")
    with pytest.raises(DataError) as err:
        read_table(root, columns=MAPPING).collect()
    msg = str(err.value)
    assert msg.startswith(f"{root / 'day=2' / 'part-1.parquet'}: ")
    assert needle in msg and f"one of the files of {root}" in msg


def test_inferred_csv_types_never_fail_past_the_first_rows(tmp_path):
    # polars infers types from the first 100 rows; a later misfit must reach validation as text
    rows = ["user_id,item_id,timestamp,rating", *(f"u,i{k},{k},4" for k in range(150))]
    path = write_text(tmp_path / "log.csv", "\n".join([*rows, "u,j,2024-01-01,4.5"]) + "\n")
    df = read_table(path).collect()
    assert df["timestamp"][-1] == "2024-01-01" and df["rating"][-1] == "4.5"


def test_cli_semicolon_csv_names_header_and_separator_setting(tmp_path):
    log = write_text(tmp_path / "semi.csv", "uid;sku;ts\na;x;1\na;y;2\na;z;3\n")
    msg = bad_input_message(prepare_cli(tmp_path, log))
    assert "semi.csv: the header line 'uid;sku;ts'" in msg
    assert "data.reader.separator=';'" in msg


def test_cli_bad_parquet_file_in_a_directory_is_named(tmp_path):
    root = _parquet_dir(tmp_path / "log")
    write_text(root / "day=2" / "part-1.parquet", "not parquet")
    msg = bad_input_message(prepare_cli(tmp_path, root))
    assert f"{root / 'day=2' / 'part-1.parquet'}: not a readable parquet file" in msg


def test_cli_unparsable_timestamp_gives_row_value_and_setting(tmp_path):
    rows = ["uid,sku,ts", *(f"u{k % 5},i{k % 7},{1_700_000_000 + k}" for k in range(150))]
    log = write_text(tmp_path / "late.csv", "\n".join([*rows, "u1,i2,2024-01-02 at 10:00"]) + "\n")
    msg = bad_input_message(prepare_cli(tmp_path, log))
    assert "late.csv: column 'timestamp' has 1 value(s)" in msg
    assert "row 150: '2024-01-02 at 10:00'" in msg
    assert "data.validation.timestamp_format" in msg
    assert "offset" not in msg and "infer_schema_length" not in msg
    fixed = prepare_cli(tmp_path, log, "data.validation.timestamp_format='%Y-%m-%d at %H:%M'")
    assert "row 0: '1700000000'" in bad_input_message(fixed)


@pytest.mark.parametrize("sep", ["\t", "::"])
def test_movielens_bad_rating_is_named_by_row_not_nulled_or_a_byte_offset(tmp_path, sep):
    lines = [sep.join(["1", str(k), "4", str(880_000_000 + k)]) for k in range(150)]
    path = write_text(tmp_path / "ratings", "\n".join([*lines, sep.join("12x3")]) + "\n")
    with pytest.raises(
        DataError, match=r"'rating' has 1 value\(s\) that are not.*\(row 150: 'x'\)"
    ):
        validate(read_movielens(path), str(path))
