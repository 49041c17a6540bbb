"""validate(): every error message names what is at fault; dtypes, clicks, drops and counts."""

from datetime import UTC, date, datetime

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from recsys_dpo.artifacts import read_manifest
from recsys_dpo.data.schema import CANONICAL_DTYPES
from recsys_dpo.data.splits import SPLITS
from recsys_dpo.data.validate import ValidationReport, validate
from recsys_dpo.errors import DataError
from tests.conftest import bad_input_message
from tests.test_prepare import prepare_cli

SRC = "clicks.csv"


def log(**columns) -> pl.LazyFrame:
    """A lazy log with user/item/timestamp defaults of the right length."""
    n = len(next(iter(columns.values())))
    base = {
        "user_id": ["u"] * n,
        "item_id": [f"i{k}" for k in range(n)],
        "timestamp": list(range(n)),
    }
    return pl.LazyFrame({**base, **columns})


def run(lf: pl.LazyFrame, **kwargs) -> pl.DataFrame:
    return validate(lf, SRC, **kwargs)[0]


# --- errors -----------------------------------------------------------------------------------


def test_missing_columns_one_error_naming_each_and_present_columns():
    lf = pl.LazyFrame({"uid": [1], "item_id": [2]})
    with pytest.raises(DataError) as err:
        validate(lf, SRC)
    msg = str(err.value)
    assert msg.startswith(f"{SRC}: missing required column(s) ['user_id', 'timestamp']")
    assert "['uid', 'item_id']" in msg
    assert "data.reader.columns" in msg


def test_empty_input():
    with pytest.raises(DataError, match=f"^{SRC}: no rows$"):
        validate(log(user_id=[]).cast({"user_id": pl.Utf8, "item_id": pl.Utf8}), SRC)


def test_null_ids_report_column_count_and_first_rows():
    users = ["a", None, "b", None, None, None, None, None, "c"]
    items = ["x"] * 8 + [None]
    with pytest.raises(DataError) as err:
        validate(log(user_id=users, item_id=items), SRC)
    msg = str(err.value)
    assert "column 'user_id' has 6 null value(s), first at row(s) [1, 3, 4, 5, 6]" in msg
    assert "column 'item_id' has 1 null value(s), first at row(s) [8]" in msg


def test_null_timestamp():
    with pytest.raises(
        DataError, match=r"'timestamp' has 1 null value\(s\), first at row\(s\) \[2\]"
    ):
        validate(log(timestamp=[1, 2, None]), SRC)


def test_unparsable_timestamp_strings_show_rows_and_values():
    stamps = ["2020-01-01 00:00:00", "yesterday", "2020-01-03 00:00:00", "soon"]
    with pytest.raises(DataError) as err:
        validate(log(timestamp=stamps), SRC)
    msg = str(err.value)
    assert "column 'timestamp' has 2 value(s)" in msg
    assert "row 1: 'yesterday'" in msg and "row 3: 'soon'" in msg


def test_timestamp_format_mismatch_is_reported():
    with pytest.raises(DataError, match=r"not dates in format '%d\.%m\.%Y'.*row 1: '2020-01-02'"):
        validate(log(timestamp=["01.01.2020", "2020-01-02"]), SRC, timestamp_format="%d.%m.%Y")


def test_unusable_timestamp_format_is_a_data_error():
    with pytest.raises(DataError, match=r"timestamp_format='%Y %H': Invalid format string"):
        validate(log(timestamp=["2020 01"]), SRC, timestamp_format="%Y %H")


def test_uninferable_timestamp_strings():
    with pytest.raises(DataError, match=r"2 value\(s\).*timestamp_format.*row 0: 'banana'"):
        validate(log(timestamp=["banana", "apple"]), SRC)


def test_float_timestamps_are_refused_by_dtype():
    with pytest.raises(DataError, match="'timestamp' has dtype Float64"):
        validate(log(timestamp=[1.5, 2.0]), SRC)


def test_bad_clicked_values():
    with pytest.raises(
        DataError, match=r"'clicked' has 1 value\(s\) that are not a boolean.*row 2: 2"
    ):
        validate(log(clicked=[0, 1, 2]), SRC)
    with pytest.raises(DataError, match=r"'clicked' has 1 value\(s\).*row 0: 'maybe'"):
        validate(log(clicked=["maybe", "true"]), SRC)
    with pytest.raises(
        DataError, match=r"'clicked' has 1 null value\(s\), first at row\(s\) \[1\]"
    ):
        validate(log(clicked=[True, None]), SRC)


def test_bad_optional_value():
    with pytest.raises(
        DataError, match=r"'rating' has 1 value\(s\) that are not castable.*row 1: 'five'"
    ):
        validate(log(rating=["4", "five"]), SRC)


def test_everything_dropped_says_why():
    with pytest.raises(DataError, match="no rows left: all 2 user.*min_events_per_user=3"):
        validate(log(user_id=["a", "b", "a"]), SRC, min_events_per_user=3)


def test_lazy_read_failure_becomes_data_error(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\nu,i,1\nu,i,notanumber\n")
    lf = pl.scan_csv(path, schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "timestamp": pl.Int64})
    with pytest.raises(DataError, match=f"^{SRC}: cannot read the log"):
        validate(lf, SRC)


# --- normalisation ----------------------------------------------------------------------------


def test_output_columns_order_and_dtypes():
    lf = pl.LazyFrame(
        {
            "weight": [1],
            "position": [3],
            "timestamp": [5],
            "item_id": [7],
            "request_id": [9],
            "user_id": [11],
            "rating": [4],
            "event": ["click"],
            "other": ["dropped"],
        }
    )
    df = run(lf)
    assert df.columns == [
        "user_id",
        "item_id",
        "timestamp",
        "clicked",
        "seq",
        "event",
        "request_id",
        "position",
        "rating",
        "weight",
    ]
    assert dict(df.schema) == {c: CANONICAL_DTYPES[c] for c in df.columns}
    assert df.row(0) == ("11", "7", 5, True, 0, "click", "9", 3, 4.0, 1.0)


@pytest.mark.parametrize(
    ("stamps", "kwargs", "expected"),
    [
        ([0, 86_400], {}, [0, 86_400]),
        ([datetime(2020, 1, 1), datetime(2020, 1, 2)], {}, [1_577_836_800, 1_577_923_200]),
        ([date(2020, 1, 1), date(2020, 1, 2)], {}, [1_577_836_800, 1_577_923_200]),
        (["2020-01-01T00:00:00", "2020-01-02T00:00:00"], {}, [1_577_836_800, 1_577_923_200]),
        (
            ["2020-01-01T01:00:00+01:00", "2020-01-01T19:00:00-05:00"],
            {},
            [1_577_836_800, 1_577_923_200],
        ),
        (["1577836800", "2020-01-02 00:00:00"], {}, [1_577_836_800, 1_577_923_200]),
        (
            ["01.01.2020 00:00", "02.01.2020 00:00"],
            {"timestamp_format": "%d.%m.%Y %H:%M"},
            [1_577_836_800, 1_577_923_200],
        ),
        (["01.01.2020 01:00 +0100"], {"timestamp_format": "%d.%m.%Y %H:%M %z"}, [1_577_836_800]),
    ],
)
def test_timestamps_become_unix_seconds(stamps, kwargs, expected):
    assert run(log(timestamp=stamps), **kwargs)["timestamp"].to_list() == expected


def test_timezone_aware_datetimes():
    stamps = [datetime(2020, 1, 1, 1, tzinfo=UTC)]
    lf = log(timestamp=stamps).with_columns(pl.col("timestamp").dt.convert_time_zone("Asia/Tokyo"))
    assert run(lf)["timestamp"].to_list() == [1_577_840_400]


def test_int_ids_become_decimal_strings():
    df = run(log(user_id=[1, 20, 300], item_id=[-4, 5, 6]))
    assert df["user_id"].to_list() == ["1", "20", "300"]
    assert df["item_id"].to_list() == ["-4", "5", "6"]


@pytest.mark.parametrize(
    "clicked", [[True, False, True], [1, 0, 1], ["true", "FALSE", " True "], ["1", "0", "1"]]
)
def test_clicked_column_accepted_forms(clicked):
    assert run(log(clicked=clicked))["clicked"].to_list() == [True, False, True]


def test_clicked_from_event_case_insensitive():
    events = ["Click", "impression", "PURCHASE", None, "view"]
    df = run(log(event=events))
    assert df["clicked"].to_list() == [True, False, True, False, False]
    df = run(log(event=events), positive_events=("VIEW",))
    assert df["clicked"].to_list() == [False, False, False, False, True]


def test_clicked_column_wins_over_event_and_default_is_all_true():
    events = log(event=["click", "impression"], clicked=[False, True])
    assert run(events)["clicked"].to_list() == [False, True]
    assert run(log(timestamp=[1, 2]))["clicked"].to_list() == [True, True]


# --- dropping ---------------------------------------------------------------------------------


def test_duplicates_dropped_keep_first_and_seq_is_original_row():
    lf = log(
        user_id=["a", "a", "a", "a", "b"],
        item_id=["x", "x", "x", "y", "x"],
        timestamp=[1, 1, 1, 1, 1],
        request_id=["r1", "r1", "r2", "r1", "r1"],
        rating=[5.0, 1.0, 2.0, 3.0, 4.0],
    )
    df, report = validate(lf, SRC)
    assert df["seq"].to_list() == [0, 2, 3, 4]
    assert df["rating"].to_list() == [5.0, 2.0, 3.0, 4.0]  # the first of the duplicates
    assert (report.rows_in, report.duplicates_dropped, report.rows_out) == (5, 1, 4)
    kept, report = validate(lf, SRC, drop_duplicates=False)
    assert kept.height == 5 and report.duplicates_dropped == 0


def test_event_distinguishes_duplicates():
    lf = log(item_id=["x", "x"], timestamp=[1, 1], event=["impression", "click"])
    assert run(lf).height == 2


def test_short_users_counted_by_positive_events_only():
    lf = log(
        user_id=["a", "a", "a", "b", "b", "b", "c", "c"],
        event=[
            "click",
            "click",
            "impression",
            "click",
            "impression",
            "impression",
            "click",
            "like",
        ],
    )
    df, report = validate(lf, SRC, min_events_per_user=2)
    assert df["user_id"].unique(maintain_order=True).to_list() == ["a", "c"]
    assert df["seq"].to_list() == [0, 1, 2, 6, 7]
    assert (report.short_users_dropped, report.short_user_rows_dropped) == (1, 3)
    assert report.rows_out == 5


def test_report_rows():
    report = ValidationReport(
        "s",
        rows_in=10,
        rows_out=6,
        non_finite_dropped=4,
        duplicates_dropped=1,
        short_users_dropped=2,
        short_user_rows_dropped=3,
    )
    assert report.as_rows() == [
        ("rows in", 10),
        ("non-finite rows dropped", 4),
        ("duplicate rows dropped", 1),
        ("short users dropped", 2),
        ("short-user rows dropped", 3),
        ("rows out", 6),
    ]


# --- invariants -------------------------------------------------------------------------------

events = st.lists(
    st.tuples(st.integers(0, 5), st.integers(-3, 20), st.integers(0, 1_000), st.booleans()),
    min_size=1,
    max_size=40,
    unique_by=lambda row: row[:3],
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(rows=events)
def test_without_duplicates_validate_keeps_every_row_and_is_idempotent(rows):
    lf = pl.LazyFrame(rows, schema=["user_id", "item_id", "timestamp", "clicked"], orient="row")
    # every user needs one positive to survive min_events_per_user=1: brute-force who remains
    keep_users = {u for u, _, _, c in rows if c}
    expected = [r for r in rows if r[0] in keep_users]
    if not expected:
        with pytest.raises(DataError, match="no rows left"):
            validate(lf, SRC)
        return
    df, report = validate(lf, SRC)
    assert report.duplicates_dropped == 0
    assert df["clicked"].sum() == sum(c for _, _, _, c in rows)
    assert df.select("user_id", "item_id").rows() == [(str(u), str(i)) for u, i, _, _ in expected]
    assert df["seq"].to_list() == [k for k, r in enumerate(rows) if r[0] in keep_users]
    again, report2 = validate(df.lazy(), SRC)
    assert report2.rows_out == df.height
    assert_frame_equal(again.drop("seq"), df.drop("seq"))


# --- non-finite and out-of-range numbers (issue 15, item 4) ----------------------------------


@pytest.mark.parametrize("column", ["rating", "weight"])
def test_non_finite_numbers_are_refused_with_rows_and_values(column):
    values = [4.0, float("nan"), 1.0, float("inf"), float("-inf"), None]
    with pytest.raises(DataError) as err:
        validate(log(**{column: values}), SRC)
    msg = str(err.value)
    assert msg.startswith(f"{SRC}: column {column!r} has 3 value(s) that are NaN or inf")
    assert "(row 1: nan, row 3: inf, row 4: -inf) (rows are 0-based)" in msg
    assert "data.validation.non_finite=drop" in msg


def test_non_finite_rows_dropped_when_configured_and_counted():
    lf = log(rating=[5.0, float("nan"), 1.0, 4.0], weight=[1.0, 1.0, float("inf"), 2.0])
    df, report = validate(lf, SRC, non_finite="drop")
    assert df["seq"].to_list() == [0, 3]
    assert report.non_finite_dropped == 2 and report.rows_in == 4 and report.rows_out == 2
    assert ("non-finite rows dropped", 2) in report.as_rows()
    with pytest.raises(DataError, match=r"non_finite must be one of \['error', 'drop'\]"):
        validate(lf, SRC, non_finite="ignore")


def test_nan_text_in_a_csv_column_is_non_finite(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp,rating\nu,a,1,5\nu,b,2,NaN\n")
    with pytest.raises(
        DataError, match=r"'rating' has 1 value\(s\) that are NaN or inf \(row 1: nan\)"
    ):
        validate(pl.scan_csv(path), str(path))


def test_out_of_range_position_and_weight_are_refused():
    with pytest.raises(
        DataError, match=r"'position' has 1 value\(s\) that are below 0 \(row 2: -1\)"
    ):
        validate(log(position=[0, 1, -1]), SRC)
    with pytest.raises(
        DataError, match=r"'weight' has 2 value\(s\) that are below 0 \(row 0: -0.5, row 2: -2.0\)"
    ):
        validate(log(weight=[-0.5, 0.0, -2.0]), SRC, non_finite="drop")


def _rated_log(path):
    """User a's third event (row 2) is rated NaN between 5-star and 1-star events."""
    rows = ["uid,sku,ts,rating"]
    rows += [f"a,x{k},{k},{r}" for k, r in enumerate(["5", "1", "NaN", "5", "5", "4"])]
    rows += [f"b,x{k},{k},{r}" for k, r in enumerate(["5", "1", "4", "5", "5"])]
    path.write_text("\n".join(rows) + "\n")
    return path


FEEDBACK = "+data.pairs.feedback={high: 4.0, low: 2.0}"


def test_cli_nan_rating_is_refused_not_a_chosen_item(tmp_path):
    result = prepare_cli(tmp_path, _rated_log(tmp_path / "rated.csv"), FEEDBACK)
    msg = bad_input_message(result)
    assert "rated.csv: column 'rating' has 1 value(s) that are NaN or inf" in msg
    assert "row 2: nan" in msg and "data.validation.non_finite=drop" in msg
    assert not (tmp_path / "artifacts" / "prepared" / "table").exists()


def test_cli_nan_rating_dropped_when_configured(tmp_path):
    result = prepare_cli(
        tmp_path, _rated_log(tmp_path / "rated.csv"), FEEDBACK, "data.validation.non_finite=drop"
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "artifacts" / "prepared" / "table"
    manifest = read_manifest(out)
    assert manifest["validation"]["non-finite rows dropped"] == 1
    assert manifest["validation"]["rows out"] == 10
    users = pl.read_parquet(out / "vocab_users.parquet").filter(user_id="a")["user_idx"]
    x2 = pl.read_parquet(out / "vocab_items.parquet").filter(item_id="x2")["item_idx"]
    pairs = pl.concat(pl.read_parquet(out / f"pairs_{s}.parquet") for s in SPLITS)
    feedback = pairs.filter(source="feedback")
    assert feedback.height > 0
    assert feedback.filter(user_idx=users[0], chosen=x2[0]).height == 0
    events = pl.concat(pl.read_parquet(out / f"{s}.parquet") for s in SPLITS)
    assert events.height == 10 and not events["rating"].is_nan().any()


def test_propensity_must_be_a_probability_above_zero():
    validate(log(propensity=[1.0, 0.5, 1e-9]), SRC)
    with pytest.raises(
        DataError, match=r"'propensity' has 2 value\(s\) outside \(0, 1\] \(row 0: 0.0, row 2: 1.5\)"
    ):
        validate(log(propensity=[0.0, 0.5, 1.5]), SRC)
