"""Tests for recsys_dpo.models: the Recommender interface, TwoTower and SASRec."""

import json
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_dpo.models import MODELS, Recommender, SASRec, TwoTower, build_model
from recsys_dpo.models.sasrec import attention_mask

N_ITEMS, N_USERS, DIM = 30, 24, 16


def make(name: str, **overrides) -> Recommender:
    """A small seeded model in eval mode (dropout off)."""
    torch.manual_seed(0)
    defaults = {"n_items": N_ITEMS, "n_users": N_USERS, "dim": DIM}
    if name == "sasrec":
        defaults["max_len"] = 12
    return build_model(name, **(defaults | overrides)).eval()


@cache
def sasrec() -> SASRec:
    return make("sasrec")


@cache
def two_tower() -> TwoTower:
    return make("two_tower")


def left_pad(history: list[int], length: int) -> torch.Tensor:
    """One context row [1, length]: history left-padded with 0."""
    return torch.tensor([[0] * (length - len(history)) + history])


def random_batch(batch_size: int = 5, length: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    """Contexts with varied left padding, including one empty history."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.randint(1, N_ITEMS, (batch_size, length), generator=gen)
    for row in range(batch_size):
        context[row, : row * 2] = 0  # row 0 is full, later rows are shorter
    context[-1] = 0
    user_idx = torch.randint(0, N_USERS, (batch_size,), generator=gen)
    return {"user_idx": user_idx, "context": context}


MODEL_NAMES = sorted(MODELS)


# ---- the interface, both models ----


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shapes(name):
    model = make(name)
    batch = random_batch()
    B = len(batch["user_idx"])
    assert model.user_embeddings(batch).shape == (B, DIM)
    assert model.item_embeddings().shape == (N_ITEMS, DIM)
    assert model.score(batch, torch.tensor([1, 2, 3])).shape == (B, 3)
    assert model.score(batch, torch.randint(1, N_ITEMS, (B, 4))).shape == (B, 4)
    assert model.full_scores(batch).shape == (B, N_ITEMS)
    assert model.embed_items(torch.ones(B, 2, 3, dtype=torch.long)).shape == (B, 2, 3, DIM)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_padding_item_is_zero_and_never_ranks(name):
    model = make(name)
    batch = random_batch()
    items = model.item_embeddings()
    assert torch.equal(items[0], torch.zeros(DIM))
    assert items[1:].abs().sum(dim=1).min() > 0
    full = model.full_scores(batch)
    assert torch.isneginf(full[:, 0]).all()
    assert torch.isfinite(full[:, 1:]).all()
    assert (full.argmax(dim=1) != 0).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_scores_are_inner_products(name):
    model = make(name)
    batch = random_batch()
    with torch.no_grad():
        users = model.user_embeddings(batch)
        table = model.item_embeddings()
        shared = torch.tensor([5, 1, 29, 0])
        per_user = torch.randint(
            0, N_ITEMS, (len(users), 6), generator=torch.Generator().manual_seed(3)
        )
        brute_shared = torch.tensor([[float(u @ table[i]) for i in shared] for u in users])
        brute_per_user = torch.tensor(
            [[float(users[b] @ table[i]) for i in per_user[b]] for b in range(len(users))]
        )
        assert torch.allclose(model.score(batch, shared), brute_shared, atol=1e-5)
        assert torch.allclose(model.score(batch, per_user), brute_per_user, atol=1e-5)
        assert torch.allclose(model.full_scores(batch)[:, 1:], (users @ table.T)[:, 1:], atol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_rebuild_from_config_and_state_dict(name, tmp_path):
    model = make(name)
    config = json.loads(json.dumps(model.config))  # plain values: survives JSON
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(123)  # different init, so equality below comes from the state dict
    rebuilt = build_model(model.name, **config)
    rebuilt.load_state_dict(torch.load(path, weights_only=True))
    rebuilt.eval()
    batch = random_batch()
    assert rebuilt.config == model.config
    with torch.no_grad():
        assert torch.equal(rebuilt.full_scores(batch), model.full_scores(batch))
        assert torch.equal(rebuilt.item_embeddings(), model.item_embeddings())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_init_is_seeded_by_caller(name):
    first, second = make(name), make(name)
    torch.manual_seed(7)
    third = build_model(name, n_items=N_ITEMS, n_users=N_USERS, dim=DIM)
    assert torch.equal(first.item_embeddings(), second.item_embeddings())
    assert not torch.equal(first.item_embeddings(), third.item_embeddings())


def test_build_model_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("gru4rec", n_items=N_ITEMS)


def overfit_data(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One row per user, left-padded histories; the next item is a fixed function of the last one
    and of the user, so either tower input alone determines it."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.randint(1, N_ITEMS, (N_USERS, 6), generator=gen)
    context[::3, :3] = 0
    user_idx = torch.arange(N_USERS)
    target = (context[:, -1] * 7) % (N_ITEMS - 1) + 1
    return {"user_idx": user_idx, "context": context}, target


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("sasrec", {}),
        ("two_tower", {}),
        ("two_tower", {"use_user_id": False}),
        ("two_tower", {"use_history": False}),
        ("mf", {}),
    ],
)
def test_overfits_tiny_dataset_with_full_catalog_ce(name, overrides):
    batch, target = overfit_data()
    model = make(name, **overrides).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(120):
        loss = F.cross_entropy(model.full_scores(batch), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = F.cross_entropy(model.full_scores(batch), target).item()
    assert losses[0] > 2.5  # ~log(29): starts near uniform
    assert final < 0.1 * losses[0]
    assert torch.equal(model.item_embeddings()[0], torch.zeros(DIM))


# ---- SASRec ----


@settings(max_examples=30, deadline=None)
@given(
    history=st.lists(st.integers(1, N_ITEMS - 1), min_size=1, max_size=8),
    pad=st.integers(0, 4),
    t=st.integers(0, 11),
    seed=st.integers(0, 2**16),
)
def test_sasrec_is_causal(history, pad, t, seed):
    model = sasrec()
    length = len(history) + pad
    t = t % length
    context = left_pad(history, length)
    changed = context.clone()
    gen = torch.Generator().manual_seed(seed)
    changed[0, t + 1 :] = torch.randint(1, N_ITEMS, (length - t - 1,), generator=gen)
    with torch.no_grad():
        before = model.sequence_hidden(context)[0, : t + 1]
        after = model.sequence_hidden(changed)[0, : t + 1]
    assert torch.allclose(before, after, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    history=st.lists(st.integers(1, N_ITEMS - 1), min_size=1, max_size=8),
    extra=st.integers(1, 4),
)
def test_sasrec_is_invariant_to_left_padding(history, extra):
    model = sasrec()
    short, long = left_pad(history, len(history)), left_pad(history, len(history) + extra)
    with torch.no_grad():
        hidden_short = model.sequence_hidden(short)[0]
        hidden_long = model.sequence_hidden(long)[0, extra:]
        user_short = model.user_embeddings({"context": short})
        user_long = model.user_embeddings({"context": long})
    # every real position, not only the last, sees the same inputs
    assert torch.allclose(hidden_short, hidden_long, atol=1e-5)
    assert torch.allclose(user_short, user_long, atol=1e-5)


def test_sasrec_all_padding_context_has_no_nan():
    model = sasrec()
    batch = {"context": torch.zeros(3, 7, dtype=torch.long)}
    for mode in (model.eval, model.train):
        mode()
        full = model.full_scores(batch)
        assert torch.isfinite(full[:, 1:]).all()
        full[:, 1:].sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.zero_grad()
    model.eval()


def test_attention_mask_matches_definition():
    context = torch.tensor([[0, 0, 0, 0], [0, 0, 5, 6], [1, 2, 3, 4]])
    mask = attention_mask(context)
    assert mask.shape == (3, 1, 4, 4)
    for b, row in enumerate(context.tolist()):
        for t in range(4):
            for s in range(4):
                expected = s == t or (s <= t and row[s] != 0)
                assert bool(mask[b, 0, t, s]) == expected, (b, t, s)
    # no query row is fully masked: SDPA would return NaN there on some backends
    assert mask.any(dim=-1).all()


def test_sasrec_keeps_last_max_len_items():
    model = sasrec()  # max_len = 12
    context = torch.randint(1, N_ITEMS, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden = model.sequence_hidden(context)
        assert hidden.shape == (2, 12, DIM)
        assert torch.allclose(hidden, model.sequence_hidden(context[:, -12:]), atol=1e-6)


def test_sasrec_user_embedding_is_last_hidden_state_and_output_is_tied():
    model = sasrec()
    batch = random_batch()
    with torch.no_grad():
        assert torch.equal(
            model.user_embeddings(batch), model.sequence_hidden(batch["context"])[:, -1]
        )
        assert torch.equal(model.item_embeddings()[1:], model.item_emb.weight[1:])


def test_sasrec_depends_on_order_and_content():
    model = sasrec()
    with torch.no_grad():
        forward = model.user_embeddings({"context": torch.tensor([[3, 4, 5]])})
        reversed_ = model.user_embeddings({"context": torch.tensor([[5, 4, 3]])})
        other = model.user_embeddings({"context": torch.tensor([[3, 4, 6]])})
    assert not torch.allclose(forward, reversed_, atol=1e-4)
    assert not torch.allclose(forward, other, atol=1e-4)


def test_sasrec_rejects_heads_not_dividing_dim():
    with pytest.raises(ValueError, match="divisible"):
        SASRec(n_items=N_ITEMS, dim=10, n_heads=3)


# ---- TwoTower ----


def test_two_tower_history_pooling_is_masked_mean():
    model = two_tower()
    context = torch.tensor([[0, 0, 3, 7, 7], [0, 0, 0, 0, 0], [1, 2, 3, 4, 5]])
    with torch.no_grad():
        pooled = model.pool_history(context)
        table = model.item_emb.weight
        assert torch.allclose(pooled[0], (table[3] + 2 * table[7]) / 3, atol=1e-6)
        assert torch.equal(pooled[1], torch.zeros(DIM))
        assert torch.allclose(pooled[2], table[1:6].mean(dim=0), atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    history=st.lists(st.integers(1, N_ITEMS - 1), min_size=0, max_size=8),
    extra=st.integers(1, 5),
    user=st.integers(0, N_USERS - 1),
)
def test_two_tower_ignores_padding(history, extra, user):
    model = two_tower()
    short = left_pad(history, max(len(history), 1))
    long = left_pad(history, max(len(history), 1) + extra)
    user_idx = torch.tensor([user])
    with torch.no_grad():
        a = model.user_embeddings({"user_idx": user_idx, "context": short})
        b = model.user_embeddings({"user_idx": user_idx, "context": long})
    assert torch.allclose(a, b, atol=1e-6)


def test_two_tower_pools_only_last_max_len_items():
    model = make("two_tower", max_len=3)
    with torch.no_grad():
        a = model.pool_history(torch.tensor([[9, 8, 1, 2, 3]]))
        b = model.pool_history(torch.tensor([[0, 0, 1, 2, 3]]))
    assert torch.allclose(a, b, atol=1e-6)


def test_two_tower_variants_use_only_their_inputs():
    batch = random_batch()
    other_users = {**batch, "user_idx": (batch["user_idx"] + 1) % N_USERS}
    other_context = {**batch, "context": torch.roll(batch["context"], 1, dims=0)}
    id_only = make("two_tower", use_history=False)
    history_only = make("two_tower", use_user_id=False)
    both = make("two_tower")
    with torch.no_grad():
        assert torch.equal(id_only.user_embeddings(batch), id_only.user_embeddings(other_context))
        assert not torch.allclose(
            id_only.user_embeddings(batch), id_only.user_embeddings(other_users)
        )
        assert torch.equal(
            history_only.user_embeddings(batch), history_only.user_embeddings(other_users)
        )
        assert not torch.allclose(
            history_only.user_embeddings(batch), history_only.user_embeddings(other_context)
        )
        assert not torch.allclose(both.user_embeddings(batch), both.user_embeddings(other_users))
        assert not torch.allclose(both.user_embeddings(batch), both.user_embeddings(other_context))


def test_two_tower_needs_a_user_input():
    with pytest.raises(ValueError, match="use_user_id or use_history"):
        TwoTower(n_items=N_ITEMS, n_users=N_USERS, use_user_id=False, use_history=False)


def test_two_tower_item_features(tmp_path):
    model = make("two_tower", item_features_dim=4)
    before = model.item_embeddings().detach()
    features = torch.randn(N_ITEMS, 4, generator=torch.Generator().manual_seed(5))
    model.set_item_features(features)
    after = model.item_embeddings().detach()
    assert not torch.allclose(before[1:], after[1:])
    assert torch.equal(after[0], torch.zeros(DIM))
    # the features travel with the state dict
    torch.save(model.state_dict(), tmp_path / "m.pt")
    rebuilt = build_model(model.name, **model.config).eval()
    rebuilt.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert torch.equal(rebuilt.item_embeddings(), model.item_embeddings())
    with pytest.raises(ValueError, match="shape"):
        model.set_item_features(torch.zeros(N_ITEMS, 3))
    with pytest.raises(ValueError, match="item_features_dim"):
        two_tower().set_item_features(features)


# ---- MF ----


def test_mf_score_is_factor_product_plus_item_bias():
    model = make("mf")
    with torch.no_grad():
        model.item_bias.weight.normal_()
        model.item_bias.weight[0] = 0.0
    batch = random_batch()
    items = torch.tensor([1, 7, 29])
    p, q = model.user_emb(batch["user_idx"]), model.item_emb(items)
    expected = p @ q.T + model.item_bias(items).squeeze(-1)
    with torch.no_grad():
        assert torch.allclose(model.score(batch, items), expected, atol=1e-6)
    # the user is their id: the history does not move the scores
    other = {**batch, "context": torch.zeros_like(batch["context"])}
    assert torch.equal(model.user_embeddings(batch), model.user_embeddings(other))
    assert model.embeds_user_ids
