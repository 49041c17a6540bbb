"""The false-negative share of preference pairs, measured on the train split alone.

A rejected item is a false negative of a pair row when the same user clicks it later: the
"rejection" was only "not yet". On the held-out splits that share is what hurts (26-42% of the
reference's hard negatives on ML-1M, benchmarks/hard_negative_hits.py), but reading them to set
a training setting would leak the test. So `objective.label_smoothing=auto` sets conservative
DPO's flip rate (Mitchell, 2023) to the share measured on the train split's own future: of the
real rejected items of the train pair rows, those the user clicks in a LATER train event, in
(timestamp, seq) order.

Read it with its blind spot: with `reference.hard_negatives` and `eval.seen=remove` the miner
already drops every train positive of the user, later ones included, so the share is 0 by
construction, and the false negatives left are the held-out ones it cannot see. It measures
dataset negatives (impression skips, inferred negatives) and `eval.seen=keep` mining.

`not_future_weights` is the soft alternative (`objective.rejected_weight_horizon`): each
(chosen, rejected) pair weighted by the reference's own probability that the rejected item is
not among the user's next events, so the pairs it expects to be false negatives count less.
"""

import polars as pl
import torch
from torch import Tensor

from recsys_dpo.data.schema import ITEM_IDX, PAD_ITEM, USER_IDX
from recsys_dpo.objectives.catalog import at_least_fp32


def later_positive_hits(pairs: pl.DataFrame, rejected: Tensor, events: pl.DataFrame) -> Tensor:
    """[R, K] bool: rejected[r, k] is an item row r's user clicks in `events` strictly after the
    row's chosen event, in (timestamp, seq) order; padding (item 0) never is.

    pairs: the R pair rows `rejected` [R, K] belongs to, in order, with user_idx, timestamp and
    seq (the chosen event's). events: the split's events (user_idx, item_idx, clicked,
    timestamp, seq), the train split for a measurement that leaks nothing.
    """
    rows, width = rejected.shape
    if pairs.height != rows:
        raise ValueError(f"false negatives: {pairs.height} pair rows for {rows} rejected rows")
    last_click = (
        events.filter(pl.col("clicked"))
        .sort(USER_IDX, ITEM_IDX, "timestamp", "seq")
        .group_by(USER_IDX, ITEM_IDX)
        .agg(pl.col("timestamp").last().alias("last_ts"), pl.col("seq").last().alias("last_seq"))
    )
    flat = pl.DataFrame(
        {
            USER_IDX: pairs[USER_IDX].cast(pl.Int64).to_numpy().repeat(width),
            "timestamp": pairs["timestamp"].to_numpy().repeat(width),
            "seq": pairs["seq"].to_numpy().repeat(width),
            ITEM_IDX: rejected.reshape(-1).numpy(),
        }
    )
    joined = flat.join(
        last_click.with_columns(pl.col(USER_IDX).cast(pl.Int64), pl.col(ITEM_IDX).cast(pl.Int64)),
        on=[USER_IDX, ITEM_IDX],
        how="left",
        maintain_order="left",
    )
    later = (pl.col("last_ts") > pl.col("timestamp")) | (
        (pl.col("last_ts") == pl.col("timestamp")) & (pl.col("last_seq") > pl.col("seq"))
    )
    hits = joined.select(later.fill_null(False) & (pl.col(ITEM_IDX) != PAD_ITEM))
    return torch.from_numpy(hits.to_series().to_numpy().copy()).reshape(rows, width)


def false_negative_share(hits: Tensor, rejected: Tensor) -> float:
    """Share of the real (non-padding) rejected items that `hits` marks; 0 when there are none."""
    real = rejected != PAD_ITEM
    return float(hits[real].sum()) / max(int(real.sum()), 1)


def not_future_weights(
    ref_logits: Tensor, rejected: Tensor, removed: Tensor, horizon: float
) -> Tensor:
    """[R, K] pair weights w = P_ref(rejected item is not among the user's next H events):

        pi(j|u) = exp s(u,j) / sum_{i in C} exp s(u,i),   w(u, j) = (1 - pi(j|u))^H

    C: the candidates the hard-negative miner ranks, real items that `removed` [R, N] (bool:
    the chosen item and those the seen policy leaves out) does not mark; a removed rejected
    item (a dataset negative the user also clicked) takes pi over C plus itself. The H events
    are taken as H independent draws from pi, so P(j in them) = 1 - (1 - pi)^H: the
    reference's next-item distribution standing in for each later event (a stated
    approximation; it treats the chosen event's successors as alike). H = 0 gives w = 1,
    the unweighted loss, exactly; padding (item 0) gets 1 (the loss masks it anyway).

    ref_logits [R, N] (column 0 padding), rejected [R, K] item indices.
    """
    if horizon < 0:
        raise ValueError(f"not_future_weights: horizon must be >= 0, got {horizon}")
    pad = rejected == PAD_ITEM
    if horizon == 0:
        return torch.ones(rejected.shape, dtype=torch.float32)
    logits = at_least_fp32(ref_logits)
    candidates = ~removed.clone()
    candidates[:, PAD_ITEM] = False
    log_z = torch.where(candidates, logits, float("-inf")).logsumexp(dim=1, keepdim=True)
    score = logits.gather(1, rejected)
    outside = ~candidates.gather(1, rejected)
    log_pi = score - torch.where(outside, torch.logaddexp(log_z, score), log_z)
    # log(1 - pi) as log(-expm1(log pi)): exact for the tiny pi most items have.
    weight = torch.exp(horizon * torch.log(-torch.expm1(log_pi)))
    return torch.where(pad, 1.0, weight).float()
