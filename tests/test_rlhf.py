"""The RLHF maths of recsys_dpo.objectives.rlhf against closed forms and brute force.

Issue 13's acceptance: the closed-form optimum is the maximiser that gradient ascent finds;
the RLOO gradient is unbiased for the exact gradient; DPO on Bradley-Terry pairs converges
to the same optimum as its pairs grow. Expected numbers come from numpy / loops, never from
the function under test. Catalogs are tiny and in float64, so the whole file runs in seconds.
"""

import math

import numpy as np
import pytest
import torch

from recsys_dpo.objectives import preference
from recsys_dpo.objectives.catalog import exact_kl, log_softmax_catalog
from recsys_dpo.objectives.rlhf import (
    distill_loss,
    rlhf_metrics,
    rlhf_objective,
    rlhf_optimum_logits,
    rloo_loss,
)

F64 = torch.float64


def _problem(seed: int, batch: int = 3, items: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference logits and rewards [batch, items + 1]; the padding column holds large junk
    values, which must not count anywhere."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(batch, items + 1, generator=g, dtype=F64)
    reward = torch.randn(batch, items + 1, generator=g, dtype=F64)
    ref[:, 0] = 40.0
    reward[:, 0] = 100.0
    return ref, reward


def _probs_np(logits: torch.Tensor) -> np.ndarray:
    """softmax over the real items (columns 1..), by hand."""
    x = logits[:, 1:].detach().numpy()
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _maximise(ref: torch.Tensor, reward: torch.Tensor, beta: float) -> torch.Tensor:
    """Gradient ascent on free logits of rlhf_objective (LBFGS, float64)."""
    theta = torch.zeros_like(ref, requires_grad=True)
    opt = torch.optim.LBFGS(
        [theta],
        max_iter=200,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = rlhf_objective(theta, ref, reward, beta).loss
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()


# ------------------------------------------------------------------------ the exact optimum


@pytest.mark.parametrize("beta", [0.2, 1.0, 5.0])
def test_rlhf_optimum_is_the_maximiser_found_by_gradient_ascent(beta):
    ref, reward = _problem(0)
    optimum = rlhf_optimum_logits(ref, reward, beta)
    assert torch.isneginf(optimum[:, 0]).all()
    # closed form pi* = pi_ref exp(r / beta) / Z, by hand
    q = _probs_np(ref)
    unnorm = q * np.exp(reward[:, 1:].numpy() / beta)
    closed = unnorm / unnorm.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(_probs_np(optimum), closed, rtol=0, atol=1e-12)

    found = _probs_np(_maximise(ref, reward, beta))
    assert np.abs(found - closed).max() < 1e-4
    # and the maximum is beta * log E_{pi_ref}[exp(r / beta)]
    best = rlhf_objective(optimum, ref, reward, beta)
    np.testing.assert_allclose(
        best.rlhf_reward.numpy(), beta * np.log(unnorm.sum(axis=1)), rtol=0, atol=1e-10
    )


def test_rlhf_objective_closed_form_and_logs():
    ref, reward = _problem(1)
    policy = ref + torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    beta = 0.7
    out = rlhf_objective(policy, ref, reward, beta)
    p, q = _probs_np(policy), _probs_np(ref)
    score = (p * reward[:, 1:].numpy()).sum(axis=1)
    kl = (p * np.log(p / q)).sum(axis=1)
    np.testing.assert_allclose(out.score.numpy(), score, atol=1e-12)
    np.testing.assert_allclose(out.kl.numpy(), kl, atol=1e-12)
    np.testing.assert_allclose(out.entropy.numpy(), -(p * np.log(p)).sum(axis=1), atol=1e-12)
    np.testing.assert_allclose(out.rlhf_reward.numpy(), score - beta * kl, atol=1e-12)
    assert out.loss.item() == pytest.approx(-(score - beta * kl).mean(), abs=1e-12)
    assert not (out.score.requires_grad or out.kl.requires_grad or out.entropy.requires_grad)
    metrics = rlhf_metrics(out)
    assert set(metrics) == {
        "objective/scores",
        "objective/rlhf_reward",
        "objective/kl",
        "objective/entropy",
    }
    assert metrics["objective/kl"].item() == pytest.approx(kl.mean(), abs=1e-12)


def test_rlhf_objective_trains_neither_reference_nor_reward():
    ref, reward = _problem(2)
    ref.requires_grad_(True)
    reward.requires_grad_(True)
    policy = torch.zeros_like(ref, requires_grad=True)
    rlhf_objective(policy, ref, reward, 0.5).loss.backward()
    assert ref.grad is None and reward.grad is None
    assert policy.grad[:, 0].abs().max() == 0  # padding gets no gradient


# ----------------------------------------------------------------------------- distillation


def test_distill_loss_is_zero_iff_the_policy_is_the_target():
    ref, reward = _problem(3)
    target = rlhf_optimum_logits(ref, reward, 0.5)
    shift = torch.tensor([[0.0], [3.0], [-7.0]], dtype=F64)  # a per-row shift is the same policy
    same = target[:, 1:] + shift
    same = torch.cat([torch.zeros(3, 1, dtype=F64), same], dim=1)
    assert distill_loss(same, target).abs().max() < 1e-12
    other = same.clone()
    other[:, 2] += 0.1  # one item's logit moved a little: a different policy
    loss = distill_loss(other, target)
    assert (loss > 0).all()
    p, p_theta = _probs_np(target), _probs_np(other)  # forward KL(pi* || pi_theta), by hand
    np.testing.assert_allclose(loss.numpy(), (p * np.log(p / p_theta)).sum(axis=1), atol=1e-12)


def test_distill_loss_gradient_descent_reaches_the_target():
    ref, reward = _problem(4)
    target = rlhf_optimum_logits(ref, reward, 0.3)
    theta = ref.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.1)
    for _ in range(1000):
        opt.zero_grad()
        distill_loss(theta, target).mean().backward()
        opt.step()
    assert target.grad is None
    assert np.abs(_probs_np(theta) - _probs_np(target)).max() < 1e-4
    assert distill_loss(theta, target).max() < 1e-6


# ----------------------------------------------------------------------------------- RLOO


def test_rloo_loss_matches_a_loop_over_the_same_samples():
    ref, reward = _problem(5, batch=2)
    policy = ref + 0.5
    policy[:, 3] += 1.0
    beta, k = 0.4, 5
    out = rloo_loss(policy, ref, reward, beta, k, torch.Generator().manual_seed(11))
    # the same draws, re-made from the same stream and the same probabilities
    probs = log_softmax_catalog(policy)[:, 1:].exp()
    samples = torch.multinomial(
        probs, k, replacement=True, generator=torch.Generator().manual_seed(11)
    )
    log_p = np.log(_probs_np(policy))
    log_q = np.log(_probs_np(ref))
    total = 0.0
    for b in range(2):
        shaped = [
            reward[b, 1 + i].item() - beta * (log_p[b, i] - log_q[b, i])
            for i in samples[b].tolist()
        ]
        for s, i in enumerate(samples[b].tolist()):
            baseline = sum(shaped[:s] + shaped[s + 1 :]) / (k - 1)
            total += -(shaped[s] - baseline) * log_p[b, i]
        assert out.rlhf_reward[b].item() == pytest.approx(sum(shaped) / k, abs=1e-12)
    assert out.loss.item() == pytest.approx(total / (2 * k), abs=1e-12)
    exact = rlhf_objective(policy, ref, reward, beta)  # logged kl / entropy are exact
    torch.testing.assert_close(out.kl, exact.kl)
    torch.testing.assert_close(out.entropy, exact.entropy)


def test_rloo_gradient_is_unbiased_for_the_exact_gradient():
    ref, reward = _problem(6)
    policy = ref + torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    beta, k, draws = 0.5, 4, 4000
    batch, n = ref.shape
    # `draws` independent copies of the batch in one call: one multinomial, one backward.
    theta = policy.expand(draws, batch, n).clone().requires_grad_(True)
    out = rloo_loss(
        theta.reshape(draws * batch, n),
        ref.repeat(draws, 1),
        reward.repeat(draws, 1),
        beta,
        k,
        torch.Generator().manual_seed(0),
    )
    out.loss.backward()
    per_draw = theta.grad * draws  # the gradient each draw's [B, N] loss would have
    mean = per_draw.mean(0)
    se = per_draw.std(0) / math.sqrt(draws)

    def exact_grad(b: float) -> torch.Tensor:
        leaf = policy.clone().requires_grad_(True)
        rlhf_objective(leaf, ref, reward, b).loss.backward()
        return leaf.grad

    assert mean[:, 0].abs().max() == 0 and exact_grad(beta)[:, 0].abs().max() == 0
    z = ((mean - exact_grad(beta)) / se)[:, 1:]
    assert z.abs().max() < 4, z
    # the test can see the KL term: against the objective without it, it fails
    z_no_kl = ((mean - exact_grad(1e-9 * beta)) / se)[:, 1:]
    assert z_no_kl.abs().max() > 4
    # the logged rlhf_reward is an unbiased sample estimate of the exact objective too
    logged = out.rlhf_reward.reshape(draws, batch)
    exact = rlhf_objective(policy, ref, reward, beta).rlhf_reward
    assert ((logged.mean(0) - exact).abs() < 4 * logged.std(0) / math.sqrt(draws)).all()


# ------------------------------------------------------------ DPO reaches the RLHF optimum


def _dpo_policy(
    ref: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, weight: torch.Tensor, beta
) -> torch.Tensor:
    """Tabular DPO for one user: free logits [N] trained on (chosen, rejected) pairs."""
    theta = ref.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.05)
    for _ in range(500):
        opt.zero_grad()
        preference.dpo(
            theta[chosen],
            theta[rejected].unsqueeze(1),
            ref[chosen],
            ref[rejected].unsqueeze(1),
            weight=weight,
            beta=beta,
        ).loss.backward()
        opt.step()
    return theta.detach()


def _bt_pairs(reward: torch.Tensor, pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`pairs` Bradley-Terry comparisons: two distinct items drawn uniformly, the first
    chosen with probability sigmoid(r_a - r_b)."""
    g = torch.Generator().manual_seed(seed)
    items = reward.shape[0] - 1
    a = torch.randint(1, items + 1, (pairs,), generator=g)
    b = 1 + (a - 1 + torch.randint(1, items, (pairs,), generator=g)) % items  # b != a
    first = torch.rand(pairs, generator=g, dtype=F64) < torch.sigmoid(reward[a] - reward[b])
    return torch.where(first, a, b), torch.where(first, b, a)


def test_dpo_on_bradley_terry_pairs_reaches_the_rlhf_optimum():
    ref, reward = (x[0] for x in _problem(8, batch=1))
    beta = 0.5
    optimum = rlhf_optimum_logits(ref[None], reward[None], beta)

    def kl_to_optimum(theta: torch.Tensor) -> float:
        return exact_kl(optimum, theta[None]).item()

    # the population limit: every ordered pair, weighted by its Bradley-Terry probability
    items = torch.arange(1, ref.shape[0])
    chosen, rejected = torch.cartesian_prod(items, items).T
    keep = chosen != rejected
    chosen, rejected = chosen[keep], rejected[keep]
    weight = torch.sigmoid(reward[chosen] - reward[rejected])
    assert kl_to_optimum(_dpo_policy(ref, chosen, rejected, weight, beta)) < 1e-8

    # sampled pairs: the KL to pi* shrinks as the pairs grow 20x, on every seed
    for seed in range(3):
        few = kl_to_optimum(_dpo_policy(ref, *_bt_pairs(reward, 100, seed), None, beta))
        many = kl_to_optimum(_dpo_policy(ref, *_bt_pairs(reward, 2000, seed), None, beta))
        assert many < few / 4, (seed, few, many)


# ----------------------------------------------------------------------------- bad input

_REF, _REWARD = _problem(9)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: rlhf_optimum_logits(_REF, _REWARD[:, :5], 1.0), "reward must have the shape"),
        (lambda: rlhf_optimum_logits(_REF, _REWARD, 0.0), "beta must be > 0"),
        (lambda: rlhf_optimum_logits(_REF[0], _REWARD[0], 1.0), r"must be \[B, N\]"),
        (lambda: rlhf_optimum_logits(_REF[:, :1], _REWARD[:, :1], 1.0), "N >= 2"),
        (lambda: distill_loss(_REF, _REF[:2]), "target_logits must have the shape"),
        (lambda: rlhf_objective(_REF, _REF, _REWARD, -1.0), "beta must be > 0"),
        (lambda: rlhf_objective(_REF, _REF[:, :4], _REWARD, 1.0), "ref_logits must have"),
        (lambda: rloo_loss(_REF, _REF, _REWARD, 1.0, 1), "k must be >= 2"),
        (lambda: rloo_loss(_REF, _REF, _REWARD, 0.0, 4), "beta must be > 0"),
        (lambda: rloo_loss(_REF, _REF, _REWARD.T, 1.0, 4), "reward must have the shape"),
    ],
)
def test_invalid_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
