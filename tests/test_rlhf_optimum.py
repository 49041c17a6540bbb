"""The RLHF optimum served as it is (recsys_dpo/models/rlhf_optimum.py): its scores are the
closed form s_ref + r / beta, its softmax the brute-force pi_ref exp(r / beta) / Z, its faiss
top-K the top-K of those scores, and it rebuilds from its config."""

import numpy as np
import pytest
import torch

from recsys_dpo.evaluation.evaluator import retrieve
from recsys_dpo.models import MF, SASRec
from recsys_dpo.models.rlhf_optimum import RLHFOptimum
from recsys_dpo.objectives.rlhf import rlhf_optimum_logits

N_ITEMS, N_USERS = 40, 12


def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {"user_idx": torch.arange(N_USERS),
            "context": torch.randint(0, N_ITEMS, (N_USERS, 6), generator=gen)}  # fmt: skip


def models(seed: int = 0) -> tuple[MF, SASRec]:
    torch.manual_seed(seed)
    reference = MF(N_ITEMS, N_USERS, dim=6).eval()
    reward = SASRec(N_ITEMS, dim=8, n_layers=1, n_heads=1, max_len=6, dropout=0.0).eval()
    with torch.no_grad():  # a non-zero item bias, so the bias coordinate is exercised
        reference.item_bias.weight[1:] = torch.randn(N_ITEMS - 1, 1)
    return reference, reward


@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
def test_scores_are_the_closed_form_and_its_softmax_is_pi_star(beta):
    reference, reward = models()
    optimum = RLHFOptimum(reference, reward, beta)
    with torch.no_grad():
        got = optimum.full_scores(batch())
        s_ref, r = reference.full_scores(batch()), reward.full_scores(batch())
    assert torch.isneginf(got[:, 0]).all()
    want = rlhf_optimum_logits(s_ref, r, beta)
    assert torch.allclose(got[:, 1:], want[:, 1:], atol=1e-5)
    # pi* by brute force in float64: pi_ref(i|u) exp(r(u, i) / beta), normalised.
    pi_ref = s_ref[:, 1:].double().softmax(-1)
    unnormalised = pi_ref * torch.exp(r[:, 1:].double() / beta)
    pi_star = unnormalised / unnormalised.sum(-1, keepdim=True)
    assert torch.allclose(got[:, 1:].double().softmax(-1), pi_star, atol=1e-6)


def test_faiss_serves_the_top_k_of_the_closed_form():
    reference, reward = models(1)
    optimum = RLHFOptimum(reference, reward, 0.5)
    with torch.no_grad():
        users, items = optimum.user_embeddings(batch()), optimum.item_embeddings()
        scores = optimum.full_scores(batch())
    _, top = retrieve(users, items, [np.array([0])] * N_USERS, k=5)  # padding removed
    want = torch.topk(scores, 5, dim=-1).indices.numpy()
    assert (top == want).all()


def test_it_rebuilds_from_its_config_and_refuses_bad_settings():
    reference, reward = models(2)
    optimum = RLHFOptimum(reference, reward, 2.0)
    again = RLHFOptimum(**optimum.config)
    again.load_state_dict(optimum.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval().full_scores(batch()), optimum.full_scores(batch()))
    assert optimum.embeds_user_ids  # MF reads user ids: an unknown user cannot be scored
    # the evaluator checks a model's sizes against the data from its config
    assert (optimum.config["n_items"], optimum.config["n_users"]) == (N_ITEMS, N_USERS)
    with pytest.raises(ValueError, match="n_users=3, but the reference has"):
        RLHFOptimum(reference, reward, 1.0, n_users=3)
    with pytest.raises(ValueError, match="beta must be > 0"):
        RLHFOptimum(reference, reward, 0.0)
    with pytest.raises(ValueError, match="the reference scores 40 items, the reward model 41"):
        RLHFOptimum(reference, MF(N_ITEMS + 1, N_USERS, dim=4), 1.0)
