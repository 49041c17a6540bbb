"""faiss retrieval: exact search with seen-item removal against torch and a brute force,
approximate indexes against exact, persistence, and the guards."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_dpo.retrieval.index import (
    build_index,
    exact_topk_torch,
    load_index,
    save_index,
    search,
)


def random_seen(rng: np.random.Generator, n_users: int, n_items: int, most: int) -> list:
    """Per user, up to `most` distinct real item ids (1..n_items-1)."""
    return [
        rng.choice(np.arange(1, n_items), size=rng.integers(0, most + 1), replace=False)
        for _ in range(n_users)
    ]


def clustered(rng: np.random.Generator, n: int, d: int, n_clusters: int) -> np.ndarray:
    centers = 3.0 * rng.standard_normal((n_clusters, d))
    return (centers[rng.integers(0, n_clusters, n)] + rng.standard_normal((n, d))).astype(
        np.float32
    )


def brute_topk(user: np.ndarray, items: np.ndarray, k: int, seen) -> tuple[list, list]:
    """Pure-Python top-k over items 1..N-1 not seen, by (score desc, item id asc)."""
    scores = {i: float(user @ items[i]) for i in range(1, len(items)) if i not in set(seen)}
    ranked = sorted(scores, key=lambda i: (-scores[i], i))[:k]
    pad = k - len(ranked)
    return ranked + [-1] * pad, [scores[i] for i in ranked] + [-np.inf] * pad


@pytest.fixture(scope="module")
def catalog():
    rng = np.random.default_rng(0)
    items = rng.standard_normal((1001, 16)).astype(np.float32)
    users = rng.standard_normal((257, 16)).astype(np.float32)
    return items, users, random_seen(rng, len(users), len(items), 60)


@pytest.mark.parametrize("k", [1, 5, 10, 50])
def test_exact_search_equals_torch_reference(catalog, k):
    items, users, seen = catalog
    scores, ids = search(build_index(items, "flat"), users, k, seen, batch_size=100)
    ref_scores, ref_ids = exact_topk_torch(
        torch.from_numpy(users), torch.from_numpy(items), k, seen
    )
    np.testing.assert_array_equal(ids, ref_ids.numpy())
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-5, atol=1e-5)
    for row, user_seen in zip(ids, seen, strict=True):
        assert not set(row) & set(user_seen)
        assert 0 not in row


@settings(max_examples=60, deadline=None)
@given(
    n_items=st.integers(2, 25),
    n_users=st.integers(1, 8),
    d=st.integers(1, 4),
    k_frac=st.floats(0.0, 1.0),
    batch_size=st.integers(1, 5),
    seed=st.integers(0, 10_000),
)
def test_search_and_torch_match_brute_force_with_ties(
    n_items, n_users, d, k_frac, batch_size, seed
):
    # Small-integer embeddings: many exactly tied scores, all exact in float32.
    rng = np.random.default_rng(seed)
    items = rng.integers(-1, 2, (n_items, d)).astype(np.float32)
    users = rng.integers(-1, 2, (n_users, d)).astype(np.float32)
    seen = random_seen(rng, n_users, n_items, n_items - 1)
    k = 1 + int(k_frac * (n_items - 2))
    scores, ids = search(build_index(items, "flat"), users, k, seen, batch_size=batch_size)
    ref_scores, ref_ids = exact_topk_torch(users, items, k, seen)
    for u in range(n_users):
        expected_ids, expected_scores = brute_topk(users[u], items, k, seen[u])
        assert ids[u].tolist() == expected_ids
        assert ref_ids[u].tolist() == expected_ids
        assert scores[u].tolist() == expected_scores
        assert ref_scores[u].tolist() == expected_scores


def test_padding_item_is_never_returned():
    rng = np.random.default_rng(1)
    items = rng.standard_normal((50, 8)).astype(np.float32)
    users = rng.standard_normal((20, 8)).astype(np.float32)
    items[0] = 1000.0 * users.mean(axis=0)  # row 0 would win every query if it were indexed
    for kind in ("flat", "hnsw"):
        _, ids = search(build_index(items, kind), users, 49)
        assert (ids > 0).all()
    _, ref_ids = exact_topk_torch(users, items, 49)
    assert (ref_ids > 0).all()


def test_user_who_has_seen_almost_everything_gets_padding():
    rng = np.random.default_rng(2)
    items = rng.standard_normal((11, 4)).astype(np.float32)
    users = rng.standard_normal((2, 4)).astype(np.float32)
    seen = [np.arange(1, 9), np.array([], dtype=np.int64)]  # user 0: only items 9, 10 unseen
    scores, ids = search(build_index(items), users, 5, seen)
    assert sorted(ids[0, :2].tolist()) == [9, 10]
    assert ids[0, 2:].tolist() == [-1, -1, -1]
    assert np.isneginf(scores[0, 2:]).all() and np.isfinite(scores[1]).all()


def test_k_outside_catalog_raises():
    items = np.random.default_rng(3).standard_normal((6, 4)).astype(np.float32)
    index = build_index(items)
    users = np.ones((1, 4), dtype=np.float32)
    for bad_k in (0, 6):
        with pytest.raises(ValueError, match="number of real items"):
            search(index, users, bad_k)
        with pytest.raises(ValueError, match="number of real items"):
            exact_topk_torch(users, items, bad_k)
    assert search(index, users, 5)[1].shape == (1, 5)


def test_bad_arguments_raise():
    items = np.random.default_rng(4).standard_normal((6, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="kind"):
        build_index(items, "lsh")
    with pytest.raises(ValueError, match="seen has"):
        search(build_index(items), np.ones((2, 4), dtype=np.float32), 1, seen=[np.array([1])])


@pytest.mark.skipif(__import__("faiss").get_num_gpus() > 0, reason="a GPU is present")
def test_gpu_demanded_without_gpu_raises():
    items = np.random.default_rng(5).standard_normal((6, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="no GPU"):
        build_index(items, use_gpu=True)


@pytest.fixture(scope="module")
def clustered_catalog():
    rng = np.random.default_rng(6)
    items = clustered(rng, 3001, 16, 30)
    users = clustered(rng, 200, 16, 30)
    seen = random_seen(rng, len(users), len(items), 20)
    _, exact = search(build_index(items, "flat"), users, 10, seen)
    return items, users, seen, exact


def recall_vs_exact(got: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(e)) / len(e) for g, e in zip(got, exact, strict=True)]))


@pytest.mark.parametrize("kind", ["ivf_flat", "hnsw"])
def test_approximate_index_recall(clustered_catalog, kind):
    items, users, seen, exact = clustered_catalog
    _, got = search(build_index(items, kind), users, 10, seen)
    assert recall_vs_exact(got, exact) >= 0.8
    for row, user_seen in zip(got, seen, strict=True):
        assert not set(row) & set(user_seen) and 0 not in row


def test_ivf_pq_returns_valid_unseen_items_far_above_chance(clustered_catalog):
    items, users, seen, exact = clustered_catalog
    _, got = search(build_index(items[:1201], "ivf_pq"), users, 10, seen)
    valid = got[got >= 0]
    assert ((valid >= 1) & (valid <= 1200)).all() and (got >= 0).mean() > 0.9
    _, exact_small = search(build_index(items[:1201]), users, 10, seen)
    # Chance is 10/1200; 4-dim sub-quantizers on clustered data do far better.
    assert recall_vs_exact(got, exact_small) > 0.15


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "hnsw"])
def test_save_load_round_trip(clustered_catalog, tmp_path, kind):
    items, users, seen, _ = clustered_catalog
    index = build_index(items, kind, nprobe=4, ef_search=40)
    path = tmp_path / "sub" / "items.faiss"
    save_index(index, path)
    assert [p.name for p in path.parent.iterdir()] == ["items.faiss"]  # no temp file left
    before = search(index, users, 10, seen)
    after = search(load_index(path), users, 10, seen)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])


def test_load_missing_index_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_index(tmp_path / "nope.faiss")
