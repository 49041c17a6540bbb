"""The reward-model stage's loss and metrics: Bradley-Terry on (chosen, rejected) items.

A reward model r_phi(u, i) scores every item of the catalog (the model's logits s_phi(u, i),
`Recommender.full_scores`); the Bradley-Terry model (Bradley & Terry, Biometrika 1952) says

    P(chosen > rejected | u) = sigma(r_phi(u, chosen) - r_phi(u, rejected)),

and the reward model is fit by its negative log-likelihood, the reward-model loss of
InstructGPT (Ouyang et al., NeurIPS 2022) and TRL's RewardTrainer. Inputs, as the DPO losses
take them (`recsys_dpo.objectives.preference`): r_chosen [B], r_rejected [B, K],
rejected_mask [B, K] bool (True = a real negative; None = all real), weight [B] or [B, K]
(None = all 1). A reward is identified up to a per-user constant only (the loss sees
differences), which the KL-regularised optimum pi_ref exp(r / beta) / Z ignores as well.

Metrics, over real pairs only: `pair_accuracy` and `mean_margin` (TRL's `accuracy` and
`margin`), and the symmetrised calibration error `calibration_bins` ->
`expected_calibration_error` (see there why symmetrised).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from recsys_dpo.objectives.preference import _pairwise, _prepare

# Reliability bins of P(chosen > rejected) in [0, 1] (the usual 10 equal-width ones).
N_BINS = 10


def bradley_terry(
    r_chosen: Tensor,
    r_rejected: Tensor,
    rejected_mask: Tensor | None = None,
    weight: Tensor | None = None,
) -> Tensor:
    """The Bradley-Terry loss l = -log sigma(r_c - r_j) (Bradley & Terry 1952; Ouyang et al.
    2022), averaged as every pairwise DPO loss is: over each row's real negatives, then the
    w-weighted mean over rows (per-pair weights w_bk: the weighted mean over pairs). The same
    weighting as `dpo`, which it equals at beta = 1 against a zero reference, so the reward
    model and DPO fit one Bradley-Terry likelihood of the same pairs."""
    pairs = _prepare("bradley_terry", 1.0, r_chosen, r_rejected, None, None, rejected_mask,
                     weight, reference_free=True)  # fmt: skip
    return _pairwise(lambda m: -F.logsigmoid(m), pairs, 1.0).loss


def _margins(r_chosen: Tensor, r_rejected: Tensor, rejected_mask: Tensor | None) -> Tensor:
    """r_c - r_j of the real pairs, flattened [P], in >= fp32."""
    margin = r_chosen.unsqueeze(1).double() - r_rejected.double()
    return margin.flatten() if rejected_mask is None else margin[rejected_mask]


def pair_accuracy(
    r_chosen: Tensor, r_rejected: Tensor, rejected_mask: Tensor | None = None
) -> Tensor:
    """The share of real pairs with r_c > r_j, ties counted as wrong (TRL's `accuracy`:
    `(rewards_chosen > rewards_rejected).float().mean()`), so a constant reward scores 0."""
    return (_margins(r_chosen, r_rejected, rejected_mask) > 0).double().mean()


def mean_margin(
    r_chosen: Tensor, r_rejected: Tensor, rejected_mask: Tensor | None = None
) -> Tensor:
    """The mean of r_c - r_j over real pairs (TRL's `margin`)."""
    return _margins(r_chosen, r_rejected, rejected_mask).mean()


def calibration_bins(
    r_chosen: Tensor,
    r_rejected: Tensor,
    rejected_mask: Tensor | None = None,
    n_bins: int = N_BINS,
) -> Tensor:
    """[n_bins, 3] sums (count, sum of predicted P, sum of labels) of the symmetrised pairs.

    Every observed pair has label 1 (the chosen item won), so the reliability of
    p = sigma(r_c - r_j) against its labels would reward any p near 1. Each pair is therefore
    counted in both orders: (c, j) with p and label 1, (j, c) with 1 - p and label 0. A bin
    at P ~ 0.8 then holds the pairs the model gives 0.8 to the chosen item and those it gives
    0.8 to the rejected one, and its label mean is how often the favoured item won: the
    reliability diagram of the model's pairwise forecasts (symmetric about 0.5). Bins are
    [b/n, (b+1)/n), the last closed. Sums, not means, so batches (and ranks) add up.
    """
    p = torch.sigmoid(_margins(r_chosen, r_rejected, rejected_mask))
    prob = torch.cat([p, 1 - p])
    label = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    index = (prob * n_bins).long().clamp(0, n_bins - 1)
    bins = torch.zeros(n_bins, 3, dtype=torch.float64, device=p.device)
    bins.index_add_(0, index, torch.stack([torch.ones_like(prob), prob, label], dim=1))
    return bins


def expected_calibration_error(bins: Tensor) -> Tensor:
    """ECE = sum_b (n_b / N) |mean p_b - mean y_b| = sum_b |sum p_b - sum y_b| / N (Naeini et
    al., AAAI 2015; Guo et al., ICML 2017) of `calibration_bins`' sums; 0 is calibrated, and a
    reward that puts every pair at p = 1/2 also scores 0 (calibrated, uninformative: read it
    beside `pair_accuracy`)."""
    count, prob, label = bins.unbind(dim=1)
    return (prob - label).abs().sum() / count.sum().clamp_min(1)
