"""Closed forms, identities and invariants of recsys_dpo.objectives.

Expected numbers are computed by hand with `math` (or by a brute-force loop), never by the
function under test.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_dpo.objectives import catalog, preference, reference
from recsys_dpo.objectives.preference import LOSSES

torch.manual_seed(0)


def softplus(x: float) -> float:
    """-log sigma(-x) = log(1 + e^x), by hand."""
    return math.log1p(math.exp(x))


def nll_sigmoid(x: float) -> float:
    """-log sigma(x), by hand."""
    return math.log1p(math.exp(-x))


def t(values, dtype=torch.float64, **kw) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, **kw)


# Every paired loss with the extra parameters it needs.
PARAMS = {
    "dpo": {"beta": 0.5},
    "dpop": {"beta": 0.5, "lambda_": 2.0},
    "cdpo": {"beta": 0.5, "label_smoothing": 0.1},
    "robust": {"beta": 0.5, "label_smoothing": 0.1},
    "ipo": {"beta": 0.5},
    "hinge": {"beta": 0.5},
    "sdpo": {"beta": 0.5},
    "simpo": {"beta": 0.5, "gamma": 0.3},
    "kto": {"beta": 0.5, "kl_ref": t(0.2)},
    "sft": {"beta": 0.5},
}


def test_params_cover_the_registry():
    assert set(PARAMS) == set(LOSSES)


# ----------------------------------------------------------------------------- reference.py


def test_full_softmax_ce_closed_form_and_padding_column_excluded():
    logits = t([[100.0, 1.0, 2.0, 0.0]])  # column 0 is padding: its huge logit must not count
    expected = -(2.0 - math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.0)))
    assert reference.full_softmax_ce(logits, torch.tensor([2])).item() == pytest.approx(expected)


def test_full_softmax_ce_matches_torch_over_real_columns_and_ignores_padded_targets():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    target = torch.tensor([1, 8, 0, 3, 0, 5])
    keep = target != 0
    expected = F.cross_entropy(logits[keep][:, 1:], target[keep] - 1)
    got = reference.full_softmax_ce(logits, target)
    assert got.item() == pytest.approx(expected.item())


def test_full_softmax_ce_sequence_shape_and_all_padding_gives_zero_with_finite_grad():
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    target = torch.tensor([[1, 2, 0], [4, 0, 0]])
    keep = target != 0
    expected = F.cross_entropy(logits[keep][:, 1:], target[keep] - 1)
    assert reference.full_softmax_ce(logits, target).item() == pytest.approx(expected.item())

    leaf = torch.randn(2, 5, requires_grad=True)
    loss = reference.full_softmax_ce(leaf, torch.zeros(2, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(leaf.grad).all()


def test_sampled_softmax_logq_closed_form():
    pos, neg = t([1.0]), t([[0.0, 2.0]])
    pos_q, neg_q = t([math.log(0.5)]), t([[math.log(0.25), math.log(0.25)]])
    o = [1.0 - math.log(0.5), 0.0 - math.log(0.25), 2.0 - math.log(0.25)]
    expected = -o[0] + math.log(sum(math.exp(v) for v in o))
    got = reference.sampled_softmax_logq(pos, neg, pos_q, neg_q)
    assert got.item() == pytest.approx(expected)


def test_sampled_softmax_with_every_item_sampled_uniformly_is_the_full_softmax():
    gen = torch.Generator().manual_seed(2)
    batch, n = 5, 12
    logits = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    target = torch.randint(1, n, (batch,), generator=gen)
    items = torch.arange(1, n).expand(batch, -1)  # every real item, positive included
    log_q = math.log(1.0 / (n - 1))
    got = reference.sampled_softmax_logq(
        logits.gather(1, target[:, None]).squeeze(1),
        logits[:, 1:],
        torch.full((batch,), log_q, dtype=torch.float64),
        torch.full((batch, n - 1), log_q, dtype=torch.float64),
        accidental_hits_mask=items == target[:, None],
    )
    assert got.item() == pytest.approx(reference.full_softmax_ce(logits, target).item())


def test_sampled_softmax_accidental_hits_are_left_out():
    zero = t([[0.0, 0.0]])
    with_hit = reference.sampled_softmax_logq(
        t([1.0]), t([[0.5, 50.0]]), t([0.0]), zero, torch.tensor([[False, True]])
    )
    without = reference.sampled_softmax_logq(t([1.0]), t([[0.5]]), t([0.0]), t([[0.0]]))
    assert with_hit.item() == pytest.approx(without.item())


def test_bce_closed_form():
    got = reference.bce(t([0.3, -1.0]), t([[-0.2, 0.5], [0.0, 1.0]]))
    row0 = (nll_sigmoid(0.3) + softplus(-0.2) + softplus(0.5)) / 3
    row1 = (nll_sigmoid(-1.0) + softplus(0.0) + softplus(1.0)) / 3
    assert got.item() == pytest.approx((row0 + row1) / 2)


def test_gbce_closed_form_and_limits():
    # N = 11 items, K = 2: alpha = 2/10 = 0.2; t = 0.5: beta = 0.2 * (0.5 * (1 - 5) + 5) = 0.6
    assert reference.gbce_beta(2, 11, 0.5) == pytest.approx(0.6)
    assert reference.gbce_beta(2, 11, 1.0) == pytest.approx(0.2)  # beta = alpha
    assert reference.gbce_beta(2, 11, 0.0) == pytest.approx(1.0)  # plain BCE
    pos, neg = t([0.3]), t([[-0.2, 0.5]])
    expected = (0.6 * nll_sigmoid(0.3) + softplus(-0.2) + softplus(0.5)) / 3
    assert reference.gbce(pos, neg, num_items=11, t=0.5).item() == pytest.approx(expected)
    assert reference.gbce(pos, neg, 11, 0.0).item() == pytest.approx(reference.bce(pos, neg).item())


def test_bpr_closed_form():
    got = reference.bpr(t([1.0, 0.0]), t([[0.5, 2.0], [-1.0, 0.0]]))
    pairs = [nll_sigmoid(0.5), nll_sigmoid(-1.0), nll_sigmoid(1.0), nll_sigmoid(0.0)]
    assert got.item() == pytest.approx(sum(pairs) / 4)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: reference.gbce(t([0.0]), t([[0.0]]), 11, 1.5), "gbce: t must be in"),
        (lambda: reference.gbce(t([0.0]), t([[0.0, 0.0]]), 2, 0.5), "need num_items >= K"),
        (lambda: reference.bce(t([0.0]), torch.zeros(1, 0)), "bce: need at least one"),
        (lambda: reference.bpr(t([0.0, 1.0]), t([[0.0]])), "bpr: negatives must have shape"),
        (
            lambda: reference.full_softmax_ce(torch.zeros(2, 4), torch.tensor([1])),
            "full_softmax_ce: target shape",
        ),
    ],
)
def test_reference_invalid_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------- preference.py

BETA = 0.5
# One row, K = 2. Log ratios: r_c = 1.0 - 0.2 = 0.8; r_r = [0.5 - 0.4, -0.3 - 0.0] = [0.1, -0.3]
ROW = {
    "policy_chosen": t([1.0]),
    "policy_rejected": t([[0.5, -0.3]]),
    "ref_chosen": t([0.2]),
    "ref_rejected": t([[0.4, 0.0]]),
}
MARGINS = [0.8 - 0.1, 0.8 + 0.3]  # m = r_c - r_r


def call(name: str, inputs: dict, **params) -> preference.PreferenceLoss:
    return LOSSES[name](
        inputs["policy_chosen"],
        inputs["policy_rejected"],
        inputs["ref_chosen"],
        inputs["ref_rejected"],
        inputs.get("rejected_mask"),
        inputs.get("weight"),
        **(params or PARAMS[name]),
    )


EPS = 0.1
HAND = {
    "dpo": lambda m: nll_sigmoid(BETA * m),
    "cdpo": lambda m: (1 - EPS) * nll_sigmoid(BETA * m) + EPS * nll_sigmoid(-BETA * m),
    "robust": lambda m: (
        ((1 - EPS) * nll_sigmoid(BETA * m) - EPS * nll_sigmoid(-BETA * m)) / (1 - 2 * EPS)
    ),
    "ipo": lambda m: (m - 1 / (2 * BETA)) ** 2,
    "hinge": lambda m: max(0.0, 1 - BETA * m),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_pairwise_losses_closed_form_mean_over_negatives(name):
    expected = sum(HAND[name](m) for m in MARGINS) / len(MARGINS)
    assert call(name, ROW).loss.item() == pytest.approx(expected)


def test_dpop_closed_form_penalises_chosen_below_reference():
    """Eq. 3 of Pal et al. (2024): -log sigma(beta * (m - lambda * max(0, ref_c - pi_c)))."""
    lam = 2.0
    # ROW's chosen is above the reference (r_c = 0.8): no penalty, DPOP is DPO.
    assert call("dpop", ROW).loss.item() == pytest.approx(call("dpo", ROW).loss.item())
    # Chosen 0.3 below the reference: every margin loses lambda * 0.3 inside the sigmoid.
    below = {**ROW, "policy_chosen": t([-0.1])}  # r_c = -0.3; r_r = [0.1, -0.3]
    margins = [-0.3 - 0.1, -0.3 + 0.3]
    expected = sum(nll_sigmoid(BETA * (m - lam * 0.3)) for m in margins) / 2
    out = call("dpop", below)
    assert out.loss.item() == pytest.approx(expected)
    assert out.chosen_rewards.tolist() == pytest.approx([BETA * -0.3])  # rewards unpenalised
    assert call("dpop", below, beta=BETA, lambda_=0.0).loss.item() == pytest.approx(
        call("dpo", below).loss.item()
    )


def test_dpop_gradient_on_chosen_grows_with_lambda_below_the_reference():
    grads = []
    for lam in (0.0, 5.0):
        chosen = t([-0.5], requires_grad=True)  # below its reference 0.0
        out = preference.dpop(chosen, t([[-2.0]]), t([0.0]), t([[0.0]]), beta=0.5, lambda_=lam)
        out.loss.backward()
        grads.append(chosen.grad.item())
    assert grads[1] < grads[0] < 0  # descent raises chosen, harder with the penalty


def test_sdpo_closed_form_is_listwise():
    log_sum = math.log(sum(math.exp(-BETA * m) for m in MARGINS))
    expected = nll_sigmoid(-log_sum)
    assert call("sdpo", ROW).loss.item() == pytest.approx(expected)


def test_simpo_closed_form_ignores_reference():
    # reference-free: scores s_c = 1.0, s_r = [0.5, -0.3]; gamma = 0.3
    expected = (nll_sigmoid(BETA * 0.5 - 0.3) + nll_sigmoid(BETA * 1.3 - 0.3)) / 2
    out = preference.simpo(ROW["policy_chosen"], ROW["policy_rejected"], beta=BETA, gamma=0.3)
    assert out.loss.item() == pytest.approx(expected)
    assert call("simpo", ROW).loss.item() == pytest.approx(expected)
    assert out.chosen_rewards.tolist() == pytest.approx([BETA * 1.0])


def test_sft_has_no_preference_term_but_logs_dpo_rewards():
    out = call("sft", ROW)
    assert out.loss.item() == 0.0
    assert out.chosen_rewards.tolist() == pytest.approx([BETA * 0.8])
    assert out.rejected_rewards.tolist()[0] == pytest.approx([BETA * 0.1, BETA * -0.3])


def test_rewards_are_beta_times_log_ratio_detached_and_zero_at_padding():
    inputs = {**ROW, "rejected_mask": torch.tensor([[True, False]])}
    inputs["policy_chosen"] = inputs["policy_chosen"].clone().requires_grad_()
    out = call("dpo", inputs)
    assert out.chosen_rewards.tolist() == pytest.approx([BETA * 0.8])
    assert out.rejected_rewards.tolist()[0] == pytest.approx([BETA * 0.1, 0.0])
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_reward_metrics_over_real_pairs():
    out = preference.PreferenceLoss(t(0.0), t([1.0, 0.0]), t([[0.5, 9.0], [1.0, 2.0]]))
    mask = torch.tensor([[True, False], [True, True]])
    got = {k: v.item() for k, v in preference.reward_metrics(out, mask).items()}
    assert got["rewards/chosen"] == pytest.approx(0.5)
    assert got["rewards/rejected"] == pytest.approx((0.5 + 1.0 + 2.0) / 3)
    assert got["rewards/margins"] == pytest.approx((0.5 - 1.0 - 2.0) / 3)
    assert got["rewards/accuracies"] == pytest.approx(1 / 3)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-5, 5), min_size=4, max_size=4),
    st.floats(0.05, 5.0),
)
def test_sdpo_with_one_negative_equals_dpo(values, beta):
    pc, pr, rc, rr = (t([v]) for v in values)
    args = (pc, pr[:, None], rc, rr[:, None])
    got = preference.sdpo(*args, beta=beta).loss.item()
    assert got == pytest.approx(preference.dpo(*args, beta=beta).loss.item(), rel=1e-9, abs=1e-12)


def test_dpo_at_reference_is_log2_and_gradient_raises_chosen_lowers_rejected():
    chosen = t([0.7, -1.2], requires_grad=True)
    rejected = t([[0.3], [2.0]], requires_grad=True)
    out = preference.dpo(chosen, rejected, chosen.detach(), rejected.detach(), beta=0.1)
    assert out.loss.item() == pytest.approx(math.log(2))
    out.loss.backward()
    # gradient descent moves against the gradient: a negative grad raises chosen scores
    assert (chosen.grad < 0).all()
    assert (rejected.grad > 0).all()
    # d/dm -log sigma(beta m) at m = 0 is -beta/2, shared over B = 2 rows
    assert chosen.grad.tolist() == pytest.approx([-0.1 / 2 / 2] * 2)


def test_ipo_minimum_sits_at_one_over_two_beta():
    beta = 0.25
    grid = torch.linspace(-5, 10, 3001, dtype=torch.float64)  # step 0.005, contains 2.0
    losses = torch.stack(
        [preference.ipo(t([m]), t([[0.0]]), t([0.0]), t([[0.0]]), beta=beta).loss for m in grid]
    )
    assert grid[losses.argmin()].item() == pytest.approx(1 / (2 * beta))
    at_min = t([1 / (2 * beta)], requires_grad=True)
    loss = preference.ipo(at_min, t([[0.0]]), t([0.0]), t([[0.0]]), beta=beta).loss
    loss.backward()
    assert loss.item() == pytest.approx(0.0)
    assert at_min.grad.item() == pytest.approx(0.0)


@pytest.mark.parametrize("name", ["cdpo", "robust"])
def test_label_smoothing_zero_is_dpo(name):
    got = call(name, ROW, beta=BETA, label_smoothing=0.0).loss.item()
    assert got == pytest.approx(call("dpo", ROW).loss.item())


def _random_batch(seed: int, batch: int, k: int) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {
        "policy_chosen": randn(batch),
        "policy_rejected": randn(batch, k),
        "ref_chosen": randn(batch),
        "ref_rejected": randn(batch, k),
        "weight": torch.rand(batch, generator=gen, dtype=torch.float64) + 0.1,
    }


def _with_padding(inputs: dict, pad: int, fill: float) -> dict:
    """Append `pad` padded negatives holding `fill` (garbage) to every row."""
    batch = inputs["policy_chosen"].shape[0]
    k = inputs["policy_rejected"].shape[1]
    garbage = torch.full((batch, pad), fill, dtype=torch.float64)
    mask = torch.cat([torch.ones(batch, k), torch.zeros(batch, pad)], dim=1).bool()
    return {
        **inputs,
        "policy_rejected": torch.cat([inputs["policy_rejected"], garbage], dim=1),
        "ref_rejected": torch.cat([inputs["ref_rejected"], garbage], dim=1),
        "rejected_mask": mask,
    }


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(sorted(PARAMS)),
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 4),
    k=st.integers(1, 3),
    pad=st.integers(1, 3),
    fill=st.sampled_from([0.0, 1e6, -1e6, math.inf, math.nan]),
)
def test_padded_negatives_change_neither_loss_nor_gradient(name, seed, batch, k, pad, fill):
    plain = _random_batch(seed, batch, k)
    padded = _with_padding(plain, pad, fill)
    for inputs in (plain, padded):
        inputs["policy_chosen"] = inputs["policy_chosen"].clone().requires_grad_()
        inputs["policy_rejected"] = inputs["policy_rejected"].clone().requires_grad_()
    loss_plain, loss_padded = call(name, plain).loss, call(name, padded).loss
    loss_plain.backward()
    loss_padded.backward()
    assert loss_padded.item() == pytest.approx(loss_plain.item(), rel=1e-9)
    assert torch.allclose(plain["policy_chosen"].grad, padded["policy_chosen"].grad)
    grad_rejected = padded["policy_rejected"].grad
    assert torch.allclose(plain["policy_rejected"].grad, grad_rejected[:, :k])
    assert (grad_rejected[:, k:] == 0).all()


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_weights_are_a_weighted_mean_and_zero_weight_rows_do_not_count(name):
    both = _random_batch(3, 2, 2)
    rows = [{key: value[i : i + 1] for key, value in both.items()} for i in range(2)]
    single = [call(name, {**row, "weight": None}).loss.item() for row in rows]
    weighted = call(name, {**both, "weight": t([2.0, 1.0])}).loss.item()
    assert weighted == pytest.approx((2 * single[0] + single[1]) / 3)
    dropped = call(name, {**both, "weight": t([1.0, 0.0])}).loss.item()
    assert dropped == pytest.approx(single[0])


PAIRWISE = sorted(set(PARAMS) - {"sdpo", "kto"})


def test_pair_weights_closed_form_self_normalised_over_pairs():
    """Two rows: row 0 with pairs weighted 0.25 and 0.75 (margins MARGINS), row 1 with one
    real pair weighted 0.5 and a padded slot: sum_bk w l / K_b over sum_bk w / K_b."""
    batch = {
        "policy_chosen": t([1.0, 0.0]),
        "policy_rejected": t([[0.5, -0.3], [0.2, 9.0]]),
        "ref_chosen": t([0.2, 0.0]),
        "ref_rejected": t([[0.4, 0.0], [0.0, 9.0]]),
        "rejected_mask": torch.tensor([[True, True], [True, False]]),
        "weight": t([[0.25, 0.75], [0.5, 123.0]]),
    }
    l00, l01, l10 = (nll_sigmoid(BETA * m) for m in (*MARGINS, -0.2))
    expected = ((0.25 * l00 + 0.75 * l01) / 2 + 0.5 * l10) / ((0.25 + 0.75) / 2 + 0.5)
    assert call("dpo", batch).loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", PAIRWISE)
def test_unit_pair_weights_are_the_unweighted_loss_exactly(name):
    inputs = {**_with_padding(_random_batch(5, 3, 2), 1, 0.0), "weight": None}
    ones = torch.ones(3, 3, dtype=torch.float64)
    assert torch.equal(call(name, {**inputs, "weight": ones}).loss, call(name, inputs).loss)


@pytest.mark.parametrize("name", PAIRWISE)
def test_row_weights_spread_over_pairs_give_the_row_weighted_loss(name):
    inputs = _random_batch(6, 3, 2)
    rows = t([2.0, 0.5, 1.0])
    by_row = call(name, {**inputs, "weight": rows}).loss.item()
    by_pair = call(name, {**inputs, "weight": rows.unsqueeze(1).expand(3, 2)}).loss.item()
    assert by_pair == pytest.approx(by_row, rel=1e-12)


@pytest.mark.parametrize("name", ["sdpo", "kto"])
def test_pair_weights_are_refused_by_listwise_and_unpaired_losses(name):
    with pytest.raises(ValueError, match="no per-pair weights"):
        call(name, {**ROW, "weight": t([[1.0, 0.5]])})


def test_all_zero_weights_give_zero_loss_and_finite_gradient():
    inputs = {**_random_batch(4, 3, 2), "weight": torch.zeros(3, dtype=torch.float64)}
    inputs["policy_chosen"] = inputs["policy_chosen"].clone().requires_grad_()
    loss = call("dpo", inputs).loss
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(inputs["policy_chosen"].grad).all()


def test_kto_closed_form_and_reference_point():
    policy, ref = t([-1.0, -2.0]), t([-1.5, -1.0])  # r = [0.5, -1.0]
    label = torch.tensor([True, False])
    kl = t(0.1, requires_grad=True)
    out = preference.kto(policy, ref, label, kl, beta=0.5, lambda_d=1.0, lambda_u=2.0)
    desirable = 1.0 - 1 / (1 + math.exp(-0.5 * (0.5 - 0.1)))
    undesirable = 2.0 * (1.0 - 1 / (1 + math.exp(-0.5 * (0.1 + 1.0))))
    assert out.loss.item() == pytest.approx((desirable + undesirable) / 2)
    assert out.rewards.tolist() == pytest.approx([0.25, -0.5])
    negative_kl = preference.kto(policy, ref, label, t(-3.0), beta=0.5, lambda_u=2.0).loss
    zero_kl = preference.kto(policy, ref, label, t(0.0), beta=0.5, lambda_u=2.0).loss
    assert negative_kl.item() == pytest.approx(zero_kl.item())  # z0 clamped at 0
    assert not out.loss.requires_grad  # z0 is detached and nothing else needs grad


def test_kto_gradient_pushes_desirable_up_and_undesirable_down():
    policy = t([-1.0, -1.0], requires_grad=True)
    preference.kto(
        policy, t([-1.0, -1.0]), torch.tensor([True, False]), t(0.0), 1.0
    ).loss.backward()
    assert policy.grad[0] < 0 < policy.grad[1]


def test_kto_pairs_is_kto_on_click_and_no_click_rows_sharing_the_row_weight():
    """Row 0: chosen + 2 real rejected (one padded slot), weight 2; row 1: chosen + 1, weight 1.
    By hand: 5 unpaired rows, the rejected ones weighted w_b / K_b."""
    out = preference.kto_pairs(
        t([-1.0, -2.0]),
        t([[-2.0, -3.0, 9.0], [-1.5, 9.0, 9.0]]),
        t([-1.2, -2.5]),
        t([[-2.2, -2.0, 9.0], [-1.0, 9.0, 9.0]]),
        torch.tensor([[True, True, False], [True, False, False]]),
        t([2.0, 1.0]),
        beta=0.5,
        kl_ref=t(0.1),
        lambda_u=2.0,
    )
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # r: chosen [0.2, 0.5], rejected [[0.2, -1.0], [-0.5]]
    rows = [  # (weight, loss)
        (2.0, 1 - sig(0.5 * (0.2 - 0.1))),
        (1.0, 1 - sig(0.5 * (0.5 - 0.1))),
        (1.0, 2 * (1 - sig(0.5 * (0.1 - 0.2)))),
        (1.0, 2 * (1 - sig(0.5 * (0.1 + 1.0)))),
        (1.0, 2 * (1 - sig(0.5 * (0.1 + 0.5)))),
    ]
    expected = sum(w * v for w, v in rows) / sum(w for w, _ in rows)
    assert out.loss.item() == pytest.approx(expected)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, 0.25])
    assert torch.allclose(out.rejected_rewards, t([[0.1, -0.5, 0.0], [-0.25, 0.0, 0.0]]))


def test_sft_term_is_full_catalog_cross_entropy_on_chosen():
    logits = torch.randn(4, 7, dtype=torch.float64)
    chosen = torch.tensor([1, 6, 3, 2])
    expected = F.cross_entropy(logits[:, 1:], chosen - 1)
    assert preference.sft_term(logits, chosen).item() == pytest.approx(expected.item())


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("dpo", {"beta": -0.1}, "dpo: beta must be > 0, got -0.1"),
        ("ipo", {"beta": 0.0}, "ipo: beta must be > 0, got 0.0"),
        (
            "cdpo",
            {"beta": 0.1, "label_smoothing": 0.5},
            r"cdpo: label_smoothing must be in \[0, 0.5\)",
        ),
        ("robust", {"beta": 0.1, "label_smoothing": -0.1}, "robust: label_smoothing must be in"),
        ("simpo", {"beta": 0.1, "gamma": -1.0}, "simpo: gamma must be >= 0, got -1.0"),
        ("dpop", {"beta": 0.1, "lambda_": -1.0}, "dpop: lambda_ must be >= 0, got -1.0"),
    ],
)
def test_invalid_hyperparameters_raise(name, params, message):
    with pytest.raises(ValueError, match=message):
        call(name, ROW, **params)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"policy_rejected": torch.zeros(1, 0), "ref_rejected": torch.zeros(1, 0)}, "K >= 1"),
        ({"policy_chosen": t([1.0, 2.0])}, r"policy_rejected must be \[B=2, K\]"),
        ({"ref_rejected": t([[0.0, 0.0, 0.0]])}, r"ref_rejected must have shape \[1, 2\]"),
        ({"weight": t([1.0, 1.0])}, r"weight must have shape \[1\]"),
        ({"rejected_mask": torch.tensor([[False, False]])}, r"rows \[0\] have none"),
        ({"rejected_mask": torch.ones(1, 2)}, "rejected_mask must be bool"),
        ({"ref_chosen": None}, "ref_chosen is required"),
    ],
)
def test_invalid_batches_raise(change, message):
    with pytest.raises(ValueError, match=message):
        call("dpo", {**ROW, **change})


def test_kto_invalid_inputs_raise():
    one = t([0.0])
    with pytest.raises(ValueError, match="kto: beta must be > 0"):
        preference.kto(one, one, torch.tensor([True]), t(0.0), 0.0)
    with pytest.raises(ValueError, match="kto: label must be bool"):
        preference.kto(one, one, torch.tensor([1]), t(0.0), 0.1)
    with pytest.raises(ValueError, match="kto: kl_ref must be a scalar"):
        preference.kto(one, one, torch.tensor([True]), t([0.0, 1.0]), 0.1)


# ------------------------------------------------------------------------------- catalog.py


def brute_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> list[float]:
    """sum_i p_i log(p_i / q_i) over columns 1.., with plain python loops."""
    out = []
    for p_row, q_row in zip(p_logits.tolist(), q_logits.tolist(), strict=True):
        zp = sum(math.exp(v) for v in p_row[1:])
        zq = sum(math.exp(v) for v in q_row[1:])
        total = 0.0
        for a, b in zip(p_row[1:], q_row[1:], strict=True):
            p, q = math.exp(a) / zp, math.exp(b) / zq
            total += p * math.log(p / q)
        out.append(total)
    return out


def test_log_softmax_catalog_gives_padding_zero_probability():
    logp = catalog.log_softmax_catalog(t([[5.0, 0.0, math.log(3.0)]]))
    assert logp[0, 0].item() == -math.inf
    assert logp.exp()[0, 1:].tolist() == pytest.approx([0.25, 0.75])


def test_logps_gathers_chosen_and_rejected():
    logits = t([[9.0, 0.0, math.log(3.0)], [9.0, math.log(4.0), 0.0]])
    assert catalog.logps(logits, torch.tensor([2, 2])).tolist() == pytest.approx(
        [math.log(0.75), math.log(0.2)]
    )
    got = catalog.logps(logits, torch.tensor([[1, 2], [1, 1]]))
    assert got.flatten().tolist() == pytest.approx(
        [math.log(0.25), math.log(0.75), math.log(0.8), math.log(0.8)]
    )


def test_exact_kl_matches_brute_force_and_ignores_padding_column():
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(3, 8, generator=gen, dtype=torch.float64) * 2
    q = torch.randn(3, 8, generator=gen, dtype=torch.float64) * 2
    assert catalog.exact_kl(p, q).tolist() == pytest.approx(brute_kl(p.numpy(), q.numpy()))
    q_other_pad = q.clone()
    q_other_pad[:, 0] = 1e4
    assert torch.allclose(catalog.exact_kl(p, q_other_pad), catalog.exact_kl(p, q))


def test_entropy_closed_form():
    uniform = torch.zeros(2, 6, dtype=torch.float64)
    assert catalog.entropy(uniform).tolist() == pytest.approx([math.log(5)] * 2)
    two = catalog.entropy(t([[0.0, 0.0, math.log(3.0)]])).item()
    assert two == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(2, 30),
    scale=st.floats(0.01, 20.0),
)
def test_exact_kl_is_nonnegative_and_zero_at_reference(seed, n, scale):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(4, n, generator=gen, dtype=torch.float64) * scale
    q = torch.randn(4, n, generator=gen, dtype=torch.float64) * scale
    assert (catalog.exact_kl(p, q) >= -1e-12).all()
    assert torch.allclose(catalog.exact_kl(p, p), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    # shifting a row's logits leaves pi unchanged
    assert torch.allclose(
        catalog.exact_kl(p + 3.0, p), torch.zeros(4, dtype=torch.float64), atol=1e-9
    )


@pytest.mark.parametrize("chunk", [1, 7, 50, 65536])
def test_chunked_kl_entropy_equals_unchunked(chunk):
    gen = torch.Generator().manual_seed(6)
    users, items, users_ref, items_ref = (
        torch.randn(*shape, generator=gen, dtype=torch.float64)
        for shape in [(4, 8), (50, 8), (4, 8), (50, 8)]
    )
    kl, ent = catalog.chunked_kl_entropy(users, items, users_ref, items_ref, chunk=chunk)
    logits, ref_logits = users @ items.T, users_ref @ items_ref.T
    assert torch.allclose(kl, catalog.exact_kl(logits, ref_logits))
    assert torch.allclose(ent, catalog.entropy(logits))


def test_chunked_kl_entropy_upcasts_half_precision_embeddings():
    gen = torch.Generator().manual_seed(7)
    users, items = torch.randn(3, 4, generator=gen), torch.randn(20, 4, generator=gen)
    kl, ent = catalog.chunked_kl_entropy(users.bfloat16(), items.bfloat16(), users, items, chunk=6)
    assert kl.dtype == torch.float32
    assert (kl >= 0).all()
    assert torch.allclose(ent, catalog.entropy(users @ items.T), atol=0.1)


def test_catalog_invalid_inputs_raise():
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        catalog.chunked_kl_entropy(
            torch.ones(1, 2), torch.ones(3, 2), torch.ones(1, 2), torch.ones(3, 2), 0
        )
    with pytest.raises(ValueError, match="catalogs differ in size"):
        catalog.chunked_kl_entropy(
            torch.ones(1, 2), torch.ones(3, 2), torch.ones(1, 2), torch.ones(4, 2)
        )
    with pytest.raises(ValueError, match="differ in shape"):
        catalog.exact_kl(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least one item"):
        catalog.entropy(torch.zeros(2, 1))
