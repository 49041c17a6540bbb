"""The seen-item policy (`eval.seen`): which of a user's earlier items a ranking leaves out.

- `remove` (the default; the leave-one-out protocol of SASRec, Kang & McAuley, ICDM 2018, on
  ML-1M): every item the user interacted with before the ranked event is removed, the target
  included. A target the user had already consumed is then a guaranteed miss; the evaluator
  counts those (`targets_removed_as_seen` in metrics.json). On logs without repeat
  consumption (ML-1M rates each movie once) no target is ever removed.
- `keep`: nothing is removed; re-consumed items stay rankable (repeat-consumption logs).

`removed_items` is the one rule that evaluation (topk.parquet and the metrics), training-time
validation, hard-negative mining and serving (`Bundle.recommend`) all apply, so the list that
is evaluated is the list that is served.
"""

from __future__ import annotations

import numpy as np

from recsys_dpo.errors import DataError

SEEN_POLICIES = ("remove", "keep")
DEFAULT_SEEN = "remove"


def check_seen_policy(policy: str, setting: str = "eval.seen") -> str:
    """The policy itself; DataError naming `setting` unless it is one of SEEN_POLICIES."""
    if policy not in SEEN_POLICIES:
        raise DataError(f"{setting}={policy!r}: expected one of {', '.join(SEEN_POLICIES)}")
    return policy


def removed_items(history: np.ndarray, policy: str) -> np.ndarray:
    """The items (sorted, distinct, int64) a ranking after `history`, the user's earlier
    items, leaves out under `policy`: all of them (`remove`) or none (`keep`)."""
    history = np.asarray(history, dtype=np.int64)
    return np.unique(history) if check_seen_policy(policy) == "remove" else history[:0]
