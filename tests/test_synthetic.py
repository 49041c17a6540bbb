"""The synthetic click log: determinism, structure, the click model, chunking, files, truth."""

import hashlib
import itertools
import json
import tracemalloc
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_dpo.data import synthetic
from recsys_dpo.data.synthetic import (
    EVENT_COLUMNS,
    SyntheticConfig,
    generate,
    load_truth,
    read_synthetic,
    true_preference_accuracy,
    true_utility,
)
from recsys_dpo.errors import DataError

SMALL = {"n_users": 150, "n_items": 80, "mean_requests": 4}


def events(path: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted((path / "events").glob("chunk=*/*.parquet")))


def file_digests(path: Path) -> dict[str, str]:
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*.parquet"))
    }


@pytest.fixture(scope="module")
def default_log(tmp_path_factory) -> tuple[Path, pl.DataFrame]:
    """The default config (2000 users, ~160k events): large enough for the statistical checks."""
    path = tmp_path_factory.mktemp("default") / "log"
    return path, read_synthetic(path).collect()


def test_same_seed_is_byte_identical_and_another_seed_differs(tmp_path):
    a = generate(tmp_path / "a", SyntheticConfig(**SMALL, seed=3))
    b = generate(tmp_path / "b", SyntheticConfig(**SMALL, seed=3))
    c = generate(tmp_path / "c", SyntheticConfig(**SMALL, seed=4))
    assert file_digests(a) == file_digests(b)
    assert events(a).equals(events(b))
    assert not events(a).equals(events(c))
    assert load_truth(a).user_vectors.tobytes() != load_truth(c).user_vectors.tobytes()


def test_event_frame_structure(default_log):
    path, df = default_log
    manifest = json.loads((path / "manifest.json").read_text())
    k = manifest["config"]["slate_size"]
    assert df.columns == list(EVENT_COLUMNS)
    assert df.schema["timestamp"] == pl.Int64 and df.schema["position"] == pl.Int32
    assert df.schema["clicked"] == pl.Boolean and df.schema["user_id"] == pl.Utf8
    assert set(df["event"].unique()) == {"impression"}
    n_requests = df["request_id"].n_unique()
    assert df.height == n_requests * k == manifest["n_events"]
    assert manifest["n_requests"] == n_requests
    assert manifest["n_clicks"] == df["clicked"].sum()
    per_request = df.group_by("request_id").agg(
        pl.col("position").sort().alias("positions"),
        pl.col("item_id").n_unique().alias("distinct_items"),
        pl.col("timestamp").n_unique().alias("times"),
        pl.col("user_id").n_unique().alias("users"),
    )
    assert (per_request["positions"].to_list() == [list(range(k))] * n_requests)
    assert (per_request["distinct_items"] == k).all()
    assert (per_request["times"] == 1).all() and (per_request["users"] == 1).all()
    assert df.group_by("user_id", maintain_order=True).agg(
        (pl.col("timestamp").diff().drop_nulls() >= 0).all().alias("ordered")
    )["ordered"].all()
    assert df["timestamp"].min() > synthetic.START_TIMESTAMP
    assert df["user_id"].n_unique() == manifest["n_users"]


def test_default_log_is_a_usable_quickstart(default_log):
    _, df = default_log
    assert 0.10 <= df["clicked"].mean() <= 0.20
    clicks = df.group_by("user_id").agg(pl.col("clicked").sum())["clicked"]
    assert (clicks >= 3).mean() >= 0.95


def test_click_through_falls_with_position(default_log):
    _, df = default_log
    top = df.filter(pl.col("position") == 0)["clicked"].mean()
    low = df.filter(pl.col("position") >= 5)["clicked"].mean()
    assert top > 2 * low + 0.1


def test_clicked_items_have_higher_true_utility(default_log):
    path, df = default_log
    utility = true_utility(path, df["user_id"].to_list(), df["item_id"].to_list())
    clicked = df["clicked"].to_numpy()
    assert utility[clicked].mean() > utility[~clicked].mean() + 0.3


def test_logging_policy_is_informed_but_not_oracle(default_log):
    """Shown items beat a random item on true utility, yet stay below each user's best items."""
    path, df = default_log
    truth = load_truth(path)
    shown = true_utility(truth, df["user_id"].to_list(), df["item_id"].to_list()).mean()
    every = (truth.utility_scale * truth.user_vectors.astype(np.float64)
             @ truth.item_vectors.T.astype(np.float64) + truth.item_bias)
    assert every.mean() + 0.3 < shown < np.sort(every, axis=1)[:, -10:].mean() - 0.3


def test_events_do_not_depend_on_chunk_size(tmp_path):
    # 20_000 items -> 52-user random blocks, so both chunkings cut across several blocks.
    base = {"n_users": 130, "n_items": 20_000, "mean_requests": 2, "seed": 7}
    fine = generate(tmp_path / "fine", SyntheticConfig(**base, chunk_users=7))
    coarse = generate(tmp_path / "coarse", SyntheticConfig(**base, chunk_users=10_000))
    assert len(list((fine / "events").glob("chunk=*/part-0.parquet"))) == 19
    assert len(list((coarse / "events").glob("chunk=*/part-0.parquet"))) == 1
    assert events(fine).equals(events(coarse))
    fine_truth, coarse_truth = load_truth(fine), load_truth(coarse)
    np.testing.assert_array_equal(fine_truth.user_vectors, coarse_truth.user_vectors)
    assert fine_truth.user_index == coarse_truth.user_index


def test_manifest_is_written_last_and_lists_the_files(tmp_path):
    path = generate(tmp_path / "log", SyntheticConfig(**SMALL, chunk_users=40))
    manifest_time = (path / "manifest.json").stat().st_mtime_ns
    data = sorted(p for p in path.rglob("*.parquet"))
    assert all(p.stat().st_mtime_ns <= manifest_time for p in data)
    listed = json.loads((path / "manifest.json").read_text())["files"]
    assert sorted(listed) == sorted(p.relative_to(path).as_posix() for p in data)
    assert len(listed) == 2 + 4  # two truth files, ceil(150 / 40) chunks


def test_failed_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = itertools.count()
    real = synthetic._events_frame

    def fail_on_second_chunk(requests):
        if next(calls) == 1:
            raise RuntimeError("disk full")
        return real(requests)

    monkeypatch.setattr(synthetic, "_events_frame", fail_on_second_chunk)
    with pytest.raises(RuntimeError, match="disk full"):
        generate(tmp_path / "log", SyntheticConfig(**SMALL, chunk_users=40))
    assert list(tmp_path.iterdir()) == []


def test_read_synthetic_regenerates_only_when_needed(tmp_path):
    path = tmp_path / "log"
    first = read_synthetic(path, **SMALL).collect()
    manifest = path / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert read_synthetic(path, **SMALL).collect().equals(first)
    assert manifest.stat().st_mtime_ns == stamp  # same config: read, not rewritten
    read_synthetic(path, **SMALL, chunk_users=30).collect()
    assert manifest.stat().st_mtime_ns == stamp  # chunking does not change the events

    manifest.unlink()  # an incomplete directory is never read
    assert read_synthetic(path, **SMALL).collect().equals(first)
    assert manifest.exists()

    reseeded = read_synthetic(path, **SMALL, seed=1).collect()
    assert json.loads(manifest.read_text())["config"]["seed"] == 1
    assert not reseeded.equals(first)
    assert "chunk" not in reseeded.columns


def test_read_synthetic_rejects_bad_input(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a synthetic log"):
        read_synthetic(foreign, **SMALL)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(DataError, match="unknown option"):
        read_synthetic(tmp_path / "log", n_user=5)
    with pytest.raises(DataError, match="slate_size"):
        read_synthetic(tmp_path / "log", n_items=5, slate_size=10)


def test_truth_files_match_the_model(tmp_path):
    cfg = SyntheticConfig(**SMALL, popularity_exponent=0.8)
    path = generate(tmp_path / "log", cfg)
    truth = load_truth(path)
    assert truth.user_vectors.shape == (cfg.n_users, cfg.dim)
    assert truth.item_vectors.shape == (cfg.n_items, cfg.dim)
    assert truth.user_vectors.dtype == np.float32
    # Zipf-like law over a random rank order: sorted popularity is (r + 1)^-a / Z.
    ranked = np.sort(truth.item_popularity)[::-1]
    np.testing.assert_allclose(ranked / ranked[0], (np.arange(cfg.n_items) + 1.0) ** -0.8)
    assert not np.all(np.diff(truth.item_popularity) <= 0)  # ranks are shuffled over ids
    # The bias follows popularity: a monotone map of log popularity.
    order = np.argsort(truth.item_popularity)
    assert np.all(np.diff(truth.item_bias[order]) >= 0)

    # true_utility against a brute force straight from the parquet files.
    users = pl.read_parquet(path / "truth" / "users.parquet")
    items = pl.read_parquet(path / "truth" / "items.parquet")
    rng = np.random.default_rng(0)
    u = rng.integers(cfg.n_users, size=50)
    i = rng.integers(cfg.n_items, size=50)
    expected = [
        cfg.utility_scale * float(np.dot(np.asarray(users["vector"][int(a)], dtype=np.float64),
                                         np.asarray(items["vector"][int(b)], dtype=np.float64)))
        + items["bias"][int(b)]
        for a, b in zip(u, i, strict=True)
    ]
    got = true_utility(truth, [f"u{a}" for a in u], [f"i{b}" for b in i])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(DataError, match="unknown item"):
        true_utility(truth, ["u0"], ["i99999"])


def test_true_preference_accuracy_orders_by_true_utility(tmp_path):
    path = generate(tmp_path / "log", SyntheticConfig(**SMALL))
    truth = load_truth(path)
    rng = np.random.default_rng(1)
    users = [f"u{k}" for k in rng.integers(SMALL["n_users"], size=200)]
    a = [f"i{k}" for k in rng.integers(SMALL["n_items"], size=200)]
    b = [f"i{k}" for k in rng.integers(SMALL["n_items"], size=200)]
    keep = [n for n in range(200) if a[n] != b[n]]
    users, a, b = ([x[n] for n in keep] for x in (users, a, b))
    ua, ub = true_utility(truth, users, a), true_utility(truth, users, b)
    chosen = [x if ux > uy else y for x, y, ux, uy in zip(a, b, ua, ub, strict=True)]
    rejected = [y if ux > uy else x for x, y, ux, uy in zip(a, b, ua, ub, strict=True)]
    assert true_preference_accuracy(truth, users, chosen, rejected) == 1.0
    assert true_preference_accuracy(path, users, rejected, chosen) == 0.0
    half = len(users) // 2
    mixed = chosen[:half] + rejected[half:], rejected[:half] + chosen[half:]
    assert true_preference_accuracy(truth, users, *mixed) == pytest.approx(half / len(users))


def plackett_luce(p: np.ndarray, k: int) -> dict[tuple[int, ...], float]:
    """Exact probability of every ordered k-slate drawn without replacement from p."""
    out = {}
    for slate in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for item in slate:
            prob *= p[item] / left
            left -= p[item]
        out[slate] = prob
    return out


@pytest.mark.parametrize("n_draws", [2, 30])  # 2: mostly the Gumbel completion; 30: draws
def test_slates_follow_plackett_luce(n_draws):
    logits = np.log(np.array([[0.5, 0.25, 0.15, 0.10], [0.05, 0.05, 0.3, 0.6]]))
    n = 40_000
    rows = np.repeat([0, 1], n)
    slates = synthetic._sample_slates(logits, rows, 2, np.random.default_rng(5), n_draws)
    for user in (0, 1):
        drawn = slates[rows == user]
        exact = plackett_luce(np.exp(logits[user]), 2)
        for slate, prob in exact.items():
            freq = np.mean((drawn[:, 0] == slate[0]) & (drawn[:, 1] == slate[1]))
            assert abs(freq - prob) < 5 * np.sqrt(prob * (1 - prob) / n) + 1e-3, slate


@settings(max_examples=40, deadline=None)
@given(
    n_items=st.integers(1, 12),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_slates_are_distinct_catalog_items(n_items, data, seed):
    k = data.draw(st.integers(1, n_items))
    logits = np.array(data.draw(st.lists(
        st.lists(st.floats(-50, 50), min_size=n_items, max_size=n_items), min_size=1, max_size=3,
    )))
    rows = np.array(data.draw(st.lists(st.integers(0, len(logits) - 1), min_size=1, max_size=20)))
    slates = synthetic._sample_slates(logits, rows, k, np.random.default_rng(seed), 2 * k)
    assert slates.shape == (len(rows), k)
    assert slates.min() >= 0 and slates.max() < n_items
    assert all(len(set(s)) == k for s in slates.tolist())


def traced_peak(path: Path, cfg: SyntheticConfig) -> int:
    """Peak bytes numpy and Python allocate while generating `cfg` (polars' Rust side excluded)."""
    tracemalloc.start()
    try:
        generate(path, cfg)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_generation_memory_does_not_grow_with_the_log(tmp_path):
    """0.5M vs 2M events in 500-user chunks: the peak stays flat instead of growing 4x."""
    small = traced_peak(tmp_path / "small", SyntheticConfig(n_users=6_250, chunk_users=500))
    large = traced_peak(tmp_path / "large", SyntheticConfig(n_users=25_000, chunk_users=500))
    n_events = json.loads((tmp_path / "large" / "manifest.json").read_text())["n_events"]
    assert n_events > 1_900_000
    assert large < 1.3 * small
