"""The synthetic log's day axis: catalog growth, user arrival and popularity drift (off by
default, leaving the log as it was), on tiny configs."""

import hashlib
import json

import numpy as np
import polars as pl
import pytest

from recsys_dpo.data import synthetic
from recsys_dpo.data.synthetic import (
    DAY_SECONDS,
    START_TIMESTAMP,
    SyntheticConfig,
    generate,
    load_truth,
    read_synthetic,
    simulate,
)
from recsys_dpo.errors import DataError
from recsys_dpo.ranking_policy import plackett_luce_marginals
from tests.conftest import report, run_pipeline

SMALL = {"n_users": 150, "n_items": 80, "mean_requests": 4}
DRIFT = {"n_days": 6, "item_arrival": 0.25, "user_arrival": 0.3, "popularity_drift": 0.5}
TINY = {"n_users": 80, "n_items": 40, "mean_requests": 5, "slate_size": 5, "seed": 2}


def digest(frame: pl.DataFrame) -> str:
    """A content hash of a frame that does not depend on the parquet writer's version."""
    h = hashlib.sha256()
    for name in frame.columns:
        column = frame[name]
        h.update(name.encode())
        if column.dtype == pl.Utf8:
            h.update("\n".join(column.to_list()).encode())
        else:
            h.update(np.ascontiguousarray(column.to_numpy()).tobytes())
    return h.hexdigest()[:16]


def events(path) -> pl.DataFrame:
    return pl.read_parquet(sorted((path / "events").glob("chunk=*/*.parquet")))


# Recorded with the generator before the drift settings existed (commit 0850472): events,
# truth items, truth users (content hashes), manifest.json (bytes). The default log of
# test_synthetic's 2000-user fixture also matched: events e76273e18087a95f.
BEFORE_DRIFT = [
    ({**SMALL, "seed": 3},
     ("bd63b4538a5d4c4a", "6d94b433b3af2141", "f87c58770341311f", "5bc8f51de62823fe")),
    ({**SMALL, "seed": 5, "chunk_users": 40, "popularity_exponent": 0.5},
     ("be7b00273dd2ce0d", "7517242c7dadedf5", "45486f121d72c088", "098d9d4343a9381c")),
]  # fmt: skip


@pytest.mark.parametrize(("config", "expected"), BEFORE_DRIFT)
def test_without_drift_the_log_is_the_one_before_drift_existed(tmp_path, config, expected):
    path = generate(tmp_path / "log", SyntheticConfig(**config))
    got = (
        digest(events(path)),
        digest(pl.read_parquet(path / "truth" / "items.parquet")),
        digest(pl.read_parquet(path / "truth" / "users.parquet")),
        hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()[:16],
    )
    assert got == expected
    assert not set(synthetic.DRIFT_FIELDS) & set(json.loads((path / "manifest.json").read_text())
                                                  ["config"])  # fmt: skip


@pytest.fixture(scope="module")
def drift_log(tmp_path_factory) -> tuple:
    path = generate(tmp_path_factory.mktemp("drift") / "log", SyntheticConfig(**TINY, **DRIFT))
    df = events(path).with_columns(
        ((pl.col("timestamp") - START_TIMESTAMP) // DAY_SECONDS).alias("day")
    )
    return path, load_truth(path), df


def test_requests_fall_on_the_days_after_the_user_arrives(drift_log):
    path, truth, df = drift_log
    n_days = DRIFT["n_days"]
    assert df["day"].min() == 0 and df["day"].max() == n_days - 1
    assert set(df["day"].unique()) == set(range(n_days))
    arrival = dict(zip(truth.user_index, truth.user_arrival_day.tolist(), strict=True))
    per_request = df.group_by("request_id", maintain_order=True).agg(
        pl.col("user_id").first(), pl.col("timestamp").first(), pl.col("day").first()
    )
    arrived = per_request["user_id"].replace_strict(arrival, return_dtype=pl.Int64)
    assert (per_request["day"] >= arrived).all()
    assert per_request.group_by("user_id", maintain_order=True).agg(
        (pl.col("timestamp").diff().drop_nulls() > 0).all().alias("increasing")
    )["increasing"].all()
    late_share = float(np.mean(truth.user_arrival_day > 0))
    sd = np.sqrt(0.3 * 0.7 / TINY["n_users"])
    assert abs(late_share - DRIFT["user_arrival"]) < 5 * sd
    assert set(truth.user_arrival_day.tolist()) <= set(range(n_days))
    users = pl.read_parquet(path / "truth" / "users.parquet")
    np.testing.assert_array_equal(users["arrival_day"].to_numpy(), truth.user_arrival_day)


def test_an_item_is_never_shown_before_it_arrives(drift_log):
    path, truth, df = drift_log
    arrival = truth.item_arrival_day
    new = arrival > 0
    assert new.sum() == round(DRIFT["item_arrival"] * TINY["n_items"])
    assert arrival[new].min() >= 1 and arrival.max() <= DRIFT["n_days"] - 1
    shown_day = df["item_id"].replace_strict(
        dict(zip(truth.item_index, arrival.tolist(), strict=True)), return_dtype=pl.Int64)
    assert (df["day"] >= shown_day).all()
    # ... and a new item is shown once it is there: the catalog grows in the log.
    shown_new = df.filter(shown_day > 0)["item_id"].n_unique()
    assert shown_new >= new.sum() // 2
    items = pl.read_parquet(path / "truth" / "items.parquet")
    np.testing.assert_array_equal(items["arrival_day"].to_numpy(), arrival)


def test_propensities_are_the_logging_policy_of_the_request_day(drift_log):
    """Each shown item's recorded propensity is P(item at its position) under the
    Plackett-Luce policy of `Truth.logging_logits(user, day)`, unarrived items excluded."""
    _, truth, df = drift_log
    k = TINY["slate_size"]
    sample = df.sample(60, seed=0)
    users = np.array([truth.user_index[u] for u in sample["user_id"]])
    items = np.array([truth.item_index[i] for i in sample["item_id"]])
    for user, item, day, position, recorded in zip(users, items, sample["day"],
                                                   sample["position"], sample["propensity"],
                                                   strict=True):
        logits = truth.logging_logits(np.array([user]), day=day)
        assert np.isneginf(logits[0, truth.item_arrival_day > day]).all()
        exact = plackett_luce_marginals(logits, k, np.array([[item]]))[0, 0, position]
        assert recorded == pytest.approx(exact, rel=1e-6)


def test_popularity_is_a_random_walk_of_log_popularity_from_the_arrival_day():
    cfg = SyntheticConfig(n_users=10, n_items=4000, n_days=5, item_arrival=0.5,
                          popularity_drift=0.3)
    arrival = synthetic._item_arrival(cfg)
    walk = synthetic._popularity_walk(cfg, arrival)
    assert walk.shape == (5, 4000)
    np.testing.assert_array_equal(walk[arrival, np.arange(4000)], 0.0)
    steps = np.diff(walk, axis=0)  # sigma * z, z ~ N(0, 1) iid over days and items
    assert abs(steps.std() - 0.3) < 0.01 and abs(steps.mean()) < 0.01
    assert abs(np.corrcoef(steps[0], steps[1])[0, 1]) < 0.05
    # The logging logits move by w_pop times the walk, the true utility not at all.
    truth, _ = simulate(SyntheticConfig(**TINY, **DRIFT, logging_pop_weight=2.0))
    users = np.arange(5)
    old = truth.item_arrival_day == 0
    moved = truth.logging_logits(users, day=3)[:, old] - truth.logging_logits(users)[:, old]
    np.testing.assert_allclose(moved, np.broadcast_to(
        2.0 * (truth.popularity_walk[3] - truth.popularity_walk[0])[old], (5, old.sum())))
    still, _ = simulate(SyntheticConfig(**TINY, logging_pop_weight=2.0))
    np.testing.assert_array_equal(truth.utility(users[:, None], np.arange(40)[None, :]),
                                  still.utility(users[:, None], np.arange(40)[None, :]))


def test_the_drift_leaves_users_items_and_slates_of_the_same_seed(tmp_path):
    """The drift draws from streams of its own: users, items and request counts are those of
    the log without drift; with only days and user arrival (logits the user's whatever the
    day) the slates, clicks and propensities are too, and only the times move."""
    plain_truth, plain = simulate(SyntheticConfig(**TINY))
    days_truth, days = simulate(SyntheticConfig(**TINY, n_days=6, user_arrival=0.5))
    drift_truth, drift = simulate(SyntheticConfig(**TINY, **DRIFT))
    for truth in (days_truth, drift_truth):
        np.testing.assert_array_equal(truth.user_vectors, plain_truth.user_vectors)
        np.testing.assert_array_equal(truth.item_vectors, plain_truth.item_vectors)
        np.testing.assert_array_equal(truth.item_popularity, plain_truth.item_popularity)
    assert drift["request_id"].unique().sort().equals(plain["request_id"].unique().sort())
    assert days.drop("timestamp").equals(plain.drop("timestamp"))
    assert not days["timestamp"].equals(plain["timestamp"])


def test_read_synthetic_regenerates_when_a_drift_setting_changes(tmp_path):
    path = tmp_path / "log"
    read_synthetic(path, **SMALL).collect()
    manifest = path / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    read_synthetic(path, **SMALL, n_days=0).collect()  # off: the same config
    assert manifest.stat().st_mtime_ns == stamp
    read_synthetic(path, **SMALL, n_days=3).collect()
    assert json.loads(manifest.read_text())["config"]["n_days"] == 3
    assert "arrival_day" in pl.read_parquet(path / "truth" / "users.parquet").columns
    read_synthetic(path, **SMALL).collect()
    assert "n_days" not in json.loads(manifest.read_text())["config"]
    assert (load_truth(path).item_arrival_day == 0).all()  # no column: every item from day 0


@pytest.mark.parametrize(("settings", "message"), [
    ({"item_arrival": 0.2}, r"\['item_arrival'\] need n_days >= 2"),
    ({"n_days": 1, "popularity_drift": 0.1}, r"\['popularity_drift'\] need n_days >= 2"),
    ({"n_days": 3, "item_arrival": 0.9}, "leaves 4 of 40 items on day 0, fewer than slate_size=5"),
    ({"n_days": 3, "user_arrival": 1.5}, r"must lie in \[0, 1\]"),
    ({"n_days": -1}, "n_days=-1 and popularity_drift=0.0 must be >= 0"),
])  # fmt: skip
def test_bad_drift_settings_are_refused(settings, message):
    with pytest.raises(DataError, match=message):
        SyntheticConfig(**TINY, **settings)


def test_the_drift_preset_prepares_a_rolling_window_with_new_items_and_users(tmp_path,
                                                                             pytestconfig):
    """`data=synthetic_drift` (small): train days 0..9, valid 10..11, test 12..13; items and
    users that arrive later are in the held-out days only, told apart by the truth's
    arrival days."""
    result = run_pipeline(
        "prepare.py", "data=synthetic_drift", "data.reader.n_users=150",
        "data.reader.n_items=60", f"paths.artifacts={tmp_path}", "progress=false", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "prepared" / "synthetic_drift"
    day = {s: pl.read_parquet(out / f"{s}.parquet").with_columns(
        ((pl.col("timestamp") - START_TIMESTAMP) // DAY_SECONDS).alias("day"))
        for s in ("train", "valid", "test")}  # fmt: skip
    assert day["train"]["day"].max() == 9
    assert set(day["valid"]["day"]) == {10, 11} and set(day["test"]["day"]) == {12, 13}
    truth = load_truth(tmp_path / "raw" / "synthetic_drift")
    arrival = dict(zip(truth.item_index, truth.item_arrival_day.tolist(), strict=True))
    test_items = day["test"]["item_id"].replace_strict(arrival, return_dtype=pl.Int64)
    assert (test_items <= 13).all()
    unseen = ~day["test"]["item_id"].is_in(day["train"]["item_id"].implode())
    late = test_items >= 10  # arrived after the train window: never in train
    assert late.any() and not (late & ~unseen).any()
    users = dict(zip(truth.user_index, truth.user_arrival_day.tolist(), strict=True))
    late_users = day["test"]["user_id"].replace_strict(users, return_dtype=pl.Int64) >= 10
    assert late_users.any()
    train_users = day["train"]["user_id"].implode()
    assert not day["test"].filter(late_users)["user_id"].is_in(train_users).any()
    report(pytestconfig, f"synthetic_drift (150 users, 60 items): test events {len(late)}, "
           f"of items arrived after day 9 {float(late.mean()):.3f}, of items unseen in train "
           f"{float(unseen.mean()):.3f}, of users arrived after day 9 "
           f"{float(late_users.mean()):.3f}")
