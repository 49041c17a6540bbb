"""Readers: a click log on disk -> a `pl.LazyFrame` with canonical column names.

Each reader only maps a file format onto the names of `recsys_dpo.data.schema` (user_id,
item_id, timestamp, and the optional columns the format has); checking values and dtypes is
`validate.py`'s job. A CSV is read as text, every column, so that "007" stays "007" and a value
that does not fit the type polars would guess from the first rows reaches validation, which
names its row, instead of failing the scan at a byte offset. A path that does not exist, a
format that cannot be read, a CSV split with another delimiter, a bad file among a directory's
parquet files, or a column mapping that does not fit the file raises `DataError`.
"""

import glob
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import polars as pl

from recsys_dpo.data.schema import OPTIONAL, REQUIRED
from recsys_dpo.data.validate import MAPPING_HINT
from recsys_dpo.errors import DataError

CANONICAL = (*REQUIRED, *OPTIONAL)
_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv"}
_GLOB_CHARS = frozenset("*?[")
_PARQUET_SUFFIXES = tuple(s for s, f in _FORMATS.items() if f == "parquet")
# Delimiters a CSV header split with another one than configured is checked for.
_SEPARATORS = (",", ";", "\t", "|")
# MIND behaviors.tsv stamps impressions like "11/12/2019 2:14:46 PM" (no time zone: read as UTC).
MIND_TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"


def _existing(path: str | Path) -> Path:
    """`path` as a Path, or DataError when nothing is there (a glob must match something)."""
    path = Path(path)
    is_glob = any(ch in _GLOB_CHARS for ch in str(path))
    if not (glob.glob(str(path)) if is_glob else path.exists()):
        raise DataError(f"{path}: no such file or directory")
    return path


def _format_of(path: Path, format: str | None) -> str:
    """'parquet', 'csv' or 'tsv': `format` if given, else parquet for a directory, else by suffix."""
    if format is not None:
        if format not in ("parquet", "csv", "tsv"):
            raise DataError(f"{path}: unknown format {format!r}; expected parquet, csv or tsv")
        return format
    if path.is_dir():
        return "parquet"
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise DataError(
            f"{path}: cannot tell the format from the suffix {suffix!r}; expected one of "
            f"{sorted(_FORMATS)} or a directory of parquet files (or set the reader's `format`)"
        )
    return _FORMATS[suffix]


def _schema(lf: pl.LazyFrame, path: Path) -> list[str]:
    """The column names of a scan, turning a polars read failure into a DataError."""
    try:
        return lf.collect_schema().names()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(f"{path}: cannot read it as a table: {exc}") from exc


def _parquet_files(path: Path) -> list[Path]:
    """The files polars reads for a directory (all files below it) or a glob, sorted."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())


def _check_parquet_files(path: Path) -> None:
    """DataError naming the first of a directory's / glob's files that polars cannot read with
    the others: not parquet (or truncated), or with other columns or types than the first.

    Only footers are read. polars skips empty files, so an empty `.parquet` (a write cut short)
    is refused, an empty marker such as Spark's `_SUCCESS` is not.
    """
    first: tuple[Path, dict[str, pl.DataType]] | None = None
    for file in _parquet_files(path):
        if file.stat().st_size == 0 and not file.name.endswith(_PARQUET_SUFFIXES):
            continue
        try:
            schema = dict(pl.read_parquet_schema(file))
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise DataError(
                f"{file}: not a readable parquet file ({exc}); it is one of the files of {path}"
            ) from exc
        if first is None:
            first = (file, schema)
        elif schema != first[1]:
            shown = ", ".join(f"{k}: {v}" for k, v in schema.items())
            expected = ", ".join(f"{k}: {v}" for k, v in first[1].items())
            raise DataError(
                f"{file}: its columns ({shown}) differ from those of {first[0]} ({expected}); "
                f"every file must have the same columns and types, it is one of the files of "
                f"{path}"
            )


def _check_separator(path: Path, fmt: str, separator: str, available: list[str]) -> None:
    """DataError when a CSV's header is one column holding another delimiter than `separator`,
    showing the real header line and the setting to use (a tab or a comma is the format's)."""
    if len(available) != 1:
        return
    with path.open(errors="replace") as fh:
        header = fh.readline().rstrip("\r\n")
    counts = {sep: header.count(sep) for sep in _SEPARATORS if sep != separator}
    found = max(counts, key=counts.__getitem__)
    if not counts[found]:
        return
    if found == "\t":
        setting = "data.reader.format=tsv"  # a tab cannot be typed in a hydra override
    elif found == "," and fmt == "tsv":
        setting = "data.reader.format=csv"
    else:
        # quoted twice: the shell keeps the inner quotes, which hydra needs around ; and |
        setting = f"\"data.reader.separator='{found}'\""
    raise DataError(
        f"{path}: the header line {header!r} has no {separator!r} (the separator in use) but "
        f"{counts[found]} {found!r}: set {setting}"
    )


def _scan(path: Path, fmt: str, separator: str) -> pl.LazyFrame:
    """Lazy scan of a parquet file / directory / glob, or of a CSV/TSV with every column text."""
    if fmt == "parquet":
        return pl.scan_parquet(str(path), hive_partitioning=True)
    return pl.scan_csv(path, separator=separator, infer_schema=False)


def _column_plan(available: list[str], columns: Mapping[str, str], path: Path) -> dict[str, str]:
    """canonical name -> source column: the mapping, then columns already named canonically."""
    unknown = sorted(set(columns) - set(CANONICAL))
    if unknown:
        raise DataError(
            f"{path}: column mapping {dict(columns)} has keys {unknown} that are not canonical "
            f"columns; the keys must be among {list(CANONICAL)}"
        )
    missing = {canon: src for canon, src in columns.items() if src not in available}
    if missing:
        detail = ", ".join(f"{src!r} (for {canon})" for canon, src in missing.items())
        raise DataError(
            f"{path}: mapped column(s) {detail} not found; mapping {dict(columns)}; "
            f"the file has columns {available}"
        )
    used = set(columns.values())
    plan = dict(columns)
    for name in CANONICAL:
        if name in available and name not in plan and name not in used:
            plan[name] = name
    unmapped = [c for c in REQUIRED if c not in plan]
    if unmapped:
        raise DataError(
            f"{path}: missing required column(s) {unmapped}; the file has columns {available}; "
            f"{MAPPING_HINT}, e.g. '+data.reader.columns={{{unmapped[0]}: <your column>}}'"
        )
    return plan


def read_table(
    path: str | Path,
    columns: Mapping[str, str] | None = None,
    format: str | None = None,
    separator: str = ",",
) -> pl.LazyFrame:
    """A parquet file, directory (hive-partitioned too) or glob, or a CSV/TSV, as a canonical scan.

    `columns` maps canonical name -> the file's column name, e.g. {"user_id": "uid"}; columns
    neither mapped nor canonically named are dropped. `format` ("parquet", "csv", "tsv")
    overrides the suffix; `separator` is the CSV delimiter (a .tsv defaults to tab). CSV
    columns come out as text, parquet columns with their stored types; `validate` converts.
    """
    path = _existing(path)
    fmt = _format_of(path, format)
    if fmt == "tsv" and separator == ",":
        separator = "\t"
    if fmt == "parquet" and (path.is_dir() or not path.exists()):
        _check_parquet_files(path)
    lf = _scan(path, fmt, separator)
    available = _schema(lf, path)
    if fmt != "parquet":
        _check_separator(path, fmt, separator, available)
    plan = _column_plan(available, dict(columns or {}), path)
    return lf.select(pl.col(src).alias(canon) for canon, src in plan.items())


def read_movielens(path: str | Path) -> pl.LazyFrame:
    """MovieLens ratings: `u.data` (tab, no header) or `ratings.dat` (`::`), by the first line.

    Both are `user item rating unix_ts`; output user_id, item_id, rating, timestamp, as text:
    `validate` converts them and names a row that does not convert (a cast here would turn it
    into a silent null, or fail the scan at a byte offset).
    """
    path = _existing(path)
    with path.open() as fh:
        first = fh.readline()
    names = ("user_id", "item_id", "rating", "timestamp")
    if "::" in first:
        # polars' CSV separator is a single byte, so split whole lines on the two-char "::"
        parts = pl.scan_lines(path).select(pl.col("line").str.split("::").alias("p"))
        lf = parts.select(
            pl.col("p").list.get(k, null_on_oob=True).alias(n) for k, n in enumerate(names)
        )
    elif "\t" in first:
        lf = pl.scan_csv(
            path,
            separator="\t",
            has_header=False,
            schema=dict.fromkeys(names, pl.Utf8),
        )
    else:
        raise DataError(
            f"{path}: not a MovieLens ratings file: the first line {first.strip()!r} is neither "
            "tab-separated (u.data) nor '::'-separated (ratings.dat)"
        )
    return lf


def read_sasrec_txt(path: str | Path) -> pl.LazyFrame:
    """SASRec's `<user> <item>` lines; timestamp = 0-based position among the user's lines.

    The SASRec preprocessing writes each user's interactions in time order, so the row order
    within a user is the only clock there is.
    """
    path = _existing(path)
    lf = pl.scan_csv(
        path,
        separator=" ",
        has_header=False,
        new_columns=["user_id", "item_id"],
        schema={"user_id": pl.Utf8, "item_id": pl.Utf8},
    )
    return lf.with_columns(timestamp=pl.int_range(pl.len(), dtype=pl.Int64).over("user_id"))


def _mind_impressions(behaviors: pl.LazyFrame) -> pl.LazyFrame:
    """One row per shown item: `NEWSID-LABEL` tokens exploded with their 0-based position."""
    tokens = pl.col("impressions").str.split(" ")
    shown = behaviors.with_columns(
        token=tokens, position=pl.int_ranges(0, tokens.list.len(), dtype=pl.Int32)
    ).explode("token", "position")
    # a malformed token leaves item_id null, which validate() reports with its row number
    parsed = pl.col("token").str.extract_groups(r"^(?<item>.+)-(?<label>[01])$")
    return shown.filter(pl.col("token") != "").select(
        pl.col("impression_id").alias("request_id"),
        "user_id",
        parsed.struct.field("item").alias("item_id"),
        "timestamp",
        "position",
        (parsed.struct.field("label") == "1").alias("clicked"),
        pl.lit("impression").alias("event"),
    )


def _mind_history(behaviors: pl.LazyFrame) -> pl.LazyFrame:
    """Prior clicks from each user's earliest impression, one row per (user, item), before it.

    The j-th of n history items gets timestamp t0 - (n - j): strictly before the impression
    at t0 and in the listed order. A repeated item keeps its first occurrence.
    """
    earliest = behaviors.sort("timestamp", "row", maintain_order=True).unique(
        "user_id", keep="first", maintain_order=True
    )
    items = pl.col("history").str.split(" ")
    listed = earliest.with_columns(
        item_id=items, j=pl.int_ranges(0, items.list.len()), n=items.list.len()
    ).explode("item_id", "j")
    return (
        listed.filter(pl.col("item_id").is_not_null() & (pl.col("item_id") != ""))
        .unique(["user_id", "item_id"], keep="first", maintain_order=True)
        .select(
            pl.lit(None, pl.Utf8).alias("request_id"),
            "user_id",
            "item_id",
            (pl.col("timestamp") - (pl.col("n") - pl.col("j"))).cast(pl.Int64).alias("timestamp"),
            pl.lit(None, pl.Int32).alias("position"),
            pl.lit(True).alias("clicked"),
            pl.lit("history").alias("event"),
        )
    )


def read_mind_behaviors(path: str | Path) -> pl.LazyFrame:
    """MIND `behaviors.tsv`: shown items as impression rows, the click history as prior clicks.

    Output columns request_id, user_id, item_id, timestamp (unix s), position, clicked, event
    ("history" rows first, then "impression" rows in file order). Format: Wu et al., "MIND: A
    Large-scale Dataset for News Recommendation", ACL 2020.
    """
    path = _existing(path)
    names = ["impression_id", "user_id", "time", "history", "impressions"]
    behaviors = pl.scan_csv(
        path,
        separator="\t",
        has_header=False,
        new_columns=names,
        quote_char=None,
        schema=dict.fromkeys(names, pl.Utf8),
        row_index_name="row",
    ).with_columns(
        timestamp=pl.col("time").str.to_datetime(MIND_TIME_FORMAT, strict=False).dt.epoch("s")
    )
    return pl.concat([_mind_history(behaviors), _mind_impressions(behaviors)], how="vertical")


# Coat's two rating matrices and what their rows become (the `event` the `mcar` split reads).
COAT_FILES = {"train.ascii": "mnar", "test.ascii": "mcar"}
COAT_RATINGS = range(6)  # 0 = unrated, else 1-5 stars
# A Coat rating has no time: MNAR ratings are stamped 0, the MCAR ones 2, so a test event comes
# after every train one (the `mcar` split stamps its valid slice 1, in between).
COAT_TIME = {"mnar": 0, "mcar": 2}


def _coat_matrix(path: Path, shape: tuple[int, ...] | None) -> np.ndarray:
    """One Coat rating matrix (users x items, integers 0-5); DataError naming the file."""
    try:
        matrix = np.loadtxt(_existing(path), dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise DataError(f"{path}: not a Coat rating matrix of integers: {exc}") from exc
    if shape is not None and matrix.shape != shape:
        raise DataError(
            f"{path}: {matrix.shape[0]} users x {matrix.shape[1]} items, but the train matrix "
            f"is {shape[0]} x {shape[1]}"
        )
    bad = ~np.isin(matrix, COAT_RATINGS)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(
            f"{path}: line {row + 1}, column {col + 1} holds {matrix[row, col]}; a Coat rating "
            "is 0 (unrated) or 1-5"
        )
    return matrix


def read_coat(path: str | Path, relevant: float = 4.0) -> pl.LazyFrame:
    """Coat (Schnabel et al., "Recommendations as Treatments", ICML 2016): `path` is the
    directory holding `train.ascii` and `test.ascii`, users x items matrices, 0 = unrated.

    Every nonzero cell is one row: user_id / item_id = its 0-based row / column, rating, and
    event "mnar" (train.ascii: items the users chose to rate, missing not at random) or "mcar"
    (test.ascii: 16 items per user drawn uniformly at random). An MNAR rating is an exposure,
    clicked = True whatever its value (as for MovieLens: the reference learns what users rate,
    the feedback pairs what they like). An MCAR row is one item of the user's random test set,
    request_id "mcar-<user>", clicked = rating >= `relevant`: the relevance the Coat metrics
    and the full-catalog targets read. Timestamps: `COAT_TIME` (Coat has none); within a file
    the rows follow the matrix (user, then item id), an order nothing should rely on.
    """
    root = _existing(path)
    frames = []
    shape = None
    for name, event in COAT_FILES.items():
        matrix = _coat_matrix(root / name, shape)
        shape = matrix.shape
        user, item = np.nonzero(matrix)
        rating = matrix[user, item].astype(np.float64)
        mcar = event == "mcar"
        frames.append(pl.DataFrame({
            "user_id": user.astype(str),
            "item_id": item.astype(str),
            "timestamp": np.full(len(user), COAT_TIME[event], dtype=np.int64),
            "rating": rating,
            "clicked": rating >= relevant if mcar else np.ones(len(user), dtype=bool),
            "request_id": pl.Series([f"mcar-{u}" for u in user] if mcar else [None] * len(user),
                                    dtype=pl.Utf8),
            "event": np.full(len(user), event),
        }))  # fmt: skip
    return pl.concat(frames).lazy()


# Coat's one-hot side information: matrix file and attribute names (`group:value`, one a line).
COAT_FEATURES = {"user": ("user_features.ascii", "user_features_map.txt"),
                 "item": ("item_features.ascii", "item_features_map.txt")}  # fmt: skip


def read_coat_features(path: str | Path) -> dict[str, pl.DataFrame]:
    """Coat's user and item attributes: {"user": user_id + one column per attribute, "item":
    item_id + ...}, ids as `read_coat` spells them (the 0-based row), columns named by the map
    files (`gender:men`, ...), values 0/1 (float32). Each row is one-hot within each attribute
    group, so it sums to the number of groups (4 for users and items). DataError naming the
    file when a matrix is not 0/1 or its width differs from its map."""
    root = _existing(path)
    out = {}
    for side, (matrix_file, map_file) in COAT_FEATURES.items():
        names = [n.strip() for n in _existing(root / map_file).read_text().splitlines() if n.strip()]
        try:
            matrix = np.loadtxt(_existing(root / matrix_file), dtype=np.float32, ndmin=2)
        except ValueError as exc:
            raise DataError(f"{root / matrix_file}: not a matrix of numbers: {exc}") from exc
        if matrix.shape[1] != len(names):
            raise DataError(f"{root / matrix_file}: {matrix.shape[1]} columns, but {map_file} "
                            f"names {len(names)} attributes")  # fmt: skip
        if not np.isin(matrix, (0.0, 1.0)).all():
            raise DataError(f"{root / matrix_file}: a one-hot matrix holds only 0 and 1")
        ids = np.arange(len(matrix)).astype(str)
        out[side] = pl.DataFrame({f"{side}_id": ids}).hstack(pl.DataFrame(matrix, schema=names))
    return out


READERS: dict[str, Callable[..., pl.LazyFrame]] = {
    "table": read_table,
    "movielens": read_movielens,
    "sasrec_txt": read_sasrec_txt,
    "mind": read_mind_behaviors,
    "coat": read_coat,
}
