"""A growing catalog (issue 17, point 2): a model trained on one vocabulary grows to an
extension of it.

The growth rule per model, in closed form: old rows bit for bit, new rows the mean of the known
ones (a two-tower's attribute rows the data's own).
"""

import pytest
import torch

from recsys_dpo.models import MF, SASRec, TwoTower

N0, U0, N1, U1 = 7, 5, 11, 8  # tables of the base (padding row included) and of the extension


def grown(model: torch.nn.Module, **attributes: torch.Tensor) -> torch.nn.Module:
    """`model` grown to N1 / U1 rows through grow_state, rebuilt like a loaded checkpoint."""
    config, state = type(model).grow_state(model.config, model.state_dict(), N1, U1,
                                           attributes or None)  # fmt: skip
    bigger = type(model)(**config)
    bigger.load_state_dict(state)
    return bigger.eval()


def test_mf_grows_mean_rows_and_scores_a_new_item_in_closed_form():
    torch.manual_seed(0)
    model = MF(N0, U0, dim=5).eval()
    with torch.no_grad():
        model.item_bias.weight[1:].normal_()
    big = grown(model)
    for name in ("user_emb.weight", "item_emb.weight", "item_bias.weight"):
        old, new = model.state_dict()[name], big.state_dict()[name]
        assert torch.equal(new[: len(old)], old)  # bit for bit
    q, b, p = model.item_emb.weight[1:], model.item_bias.weight[1:, 0], model.user_emb.weight
    users = {"user_idx": torch.arange(U1), "context": torch.zeros(U1, 1, dtype=torch.long)}
    with torch.no_grad():
        scores = big.full_scores(users)
        mean_p = p.double().mean(0).float()
        # s(u, new) = <p_u, mean q> + mean b for a known user; a new user is the mean user
        expected = p @ q.double().mean(0).float() + b.double().mean().float()
        torch.testing.assert_close(scores[:U0, N0:], expected[:, None].expand(U0, N1 - N0))
        torch.testing.assert_close(scores[U0:, 1:N0], (mean_p @ q.T + b).expand(U1 - U0, -1))
        # known pairs score as before (up to the matmul's blocking over a larger catalog)
        torch.testing.assert_close(scores[:U0, :N0], model.full_scores({"user_idx":
                                                                        torch.arange(U0)}))  # fmt: skip


def test_sasrec_grows_its_tied_table_and_keeps_every_known_score():
    torch.manual_seed(0)
    model = SASRec(N0, dim=8, n_layers=1, n_heads=1, max_len=4, dropout=0.0).eval()
    big = grown(model)
    old = model.item_emb.weight
    assert torch.equal(big.item_emb.weight[:N0], old)
    torch.testing.assert_close(big.item_emb.weight[N0:], old[1:].mean(0).expand(N1 - N0, -1))
    history = {"user_idx": torch.zeros(2, dtype=torch.long),
               "context": torch.tensor([[0, 1, 2, 3], [4, 5, 6, 1]])}  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(big.full_scores(history)[:, :N0], model.full_scores(history))


def test_two_tower_takes_the_new_ids_attributes_from_the_data():
    torch.manual_seed(0)
    model = TwoTower(N0, U0, dim=8, hidden=[8], dropout=0.0, item_features_dim=3,
                     user_features_dim=2, features="ids_and_features").eval()  # fmt: skip
    items, users = torch.randn(N1, 3), torch.randn(U1, 2)
    items[0] = 0.0
    model.set_features(users[:U0], items[:N0])
    with pytest.raises(ValueError, match="item attributes for the grown vocabulary"):
        grown(model, user=users)
    big = grown(model, item=items, user=users)
    assert torch.equal(big.item_features, items) and torch.equal(big.user_features, users)
    assert torch.equal(big.item_emb.weight[:N0], model.item_emb.weight)
    with torch.no_grad():
        mean_e = model.item_emb.weight[1:].double().mean(0).float()
        content = model.item_tower(mean_e + model.feature_proj(items[N0:]))
        torch.testing.assert_close(big.item_embeddings()[N0:], content)
        torch.testing.assert_close(big.item_embeddings()[:N0], model.item_embeddings())


def test_a_model_does_not_shrink():
    with pytest.raises(ValueError, match="cannot grow"):
        MF.grow_state(MF(N1, U1).config, MF(N1, U1).state_dict(), N0, U1)
