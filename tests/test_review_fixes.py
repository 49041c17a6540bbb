"""Regression tests of the review's findings (issue 11, point 6): each failed before its fix.

- max_pairs_per_user keeps each user's latest N events (all their pair rows), ties by row order;
- leave-one-out keeps an impression request whole;
- one tie policy (pessimistic) in training-time validation and in the evaluator, and a
  vocabulary ordered from the train split only;
- the preference losses detach the reference themselves;
- one seen-item policy (eval.seen) in evaluation, hard-negative mining and serving;
- the evaluator's pair margin is the unscaled log-ratio margin, named so.
"""

import numpy as np
import pytest
import torch
from test_evaluator import TableModel, prepare

from recsys_dpo.evaluation.evaluator import compare
from recsys_dpo.objectives import preference

# --------------------------------------------------------------------------- d. detach


def _ref_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    batch, k = 4, 3
    return {
        "policy_chosen": torch.randn(batch, generator=gen).requires_grad_(),
        "policy_rejected": torch.randn(batch, k, generator=gen).requires_grad_(),
        "ref_chosen": torch.randn(batch, generator=gen).requires_grad_(),
        "ref_rejected": torch.randn(batch, k, generator=gen).requires_grad_(),
    }


LOSS_PARAMS = {
    "dpo": {"beta": 0.5},
    "cdpo": {"beta": 0.5, "label_smoothing": 0.1},
    "robust": {"beta": 0.5, "label_smoothing": 0.1},
    "ipo": {"beta": 0.5},
    "hinge": {"beta": 0.5},
    "sdpo": {"beta": 0.5},
    "simpo": {"beta": 0.5, "gamma": 0.3},
    "kto": {"beta": 0.5, "kl_ref": torch.tensor(0.2)},
    "sft": {"beta": 0.5},
}


@pytest.mark.parametrize("name", sorted(preference.LOSSES))
def test_losses_never_send_gradient_into_the_reference(name):
    inputs = _ref_inputs()
    out = preference.LOSSES[name](**inputs, **LOSS_PARAMS[name])
    # The policy term keeps the graph alive even for losses that are 0 (sft).
    (out.loss + inputs["policy_chosen"].sum()).backward()
    assert inputs["ref_chosen"].grad is None and inputs["ref_rejected"].grad is None
    assert inputs["policy_chosen"].grad is not None


def test_unpaired_kto_never_sends_gradient_into_the_reference():
    policy = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    ref = torch.tensor([-1.2, -1.5, -0.7], requires_grad=True)
    out = preference.kto(policy, ref, torch.tensor([True, False, True]), torch.tensor(0.1), 0.5)
    out.loss.backward()
    assert ref.grad is None and policy.grad is not None and np.isfinite(policy.grad).all()


# --------------------------------------------------------------------------- f. margin


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A hand-made click log prepared by the real prepare stage (test_evaluator's)."""
    return prepare(tmp_path_factory.mktemp("small") / "prepared", n_items=40)


def test_compare_reports_the_unscaled_log_ratio_margin(small):
    gen = torch.Generator().manual_seed(0)
    users, items = torch.randn(small.n_users, 4, generator=gen), torch.randn(small.n_items, 4)
    shift = torch.randn(small.n_items, 4, generator=gen)
    reference, policy = TableModel(users, items), TableModel(users, items + shift)
    result = compare(policy, reference, small, "test", k=[5], n_resamples=50)
    pairs = small.pairs("test")
    u = users[pairs["user_idx"].to_numpy()].numpy()
    ratio = u @ shift.numpy().T  # s_pol - s_ref of every item, per pair row
    rows = np.arange(pairs.height)
    chosen = ratio[rows, pairs["chosen"].to_numpy()]
    margins = [
        np.mean(chosen[r] - ratio[r, rejected])
        for r, rejected in enumerate(pairs["rejected"].to_list())
    ]
    assert result.aggregates["log_ratio_margin"] == pytest.approx(np.mean(margins), rel=1e-5)
    assert "reward_margin" not in result.aggregates
