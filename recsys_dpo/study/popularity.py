"""The most-popular-unseen baseline as a Recommender, so the evaluator ranks it exactly as it
ranks every model (same queries, same seen-item removal, same tie rule, full catalog).

Its score of item i is i's number of train positives (`evaluator.train_popularity`), the same
for every user: a one-dimensional user vector of 1 and item vector of the count. Nothing of
valid or test enters the counts.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from recsys_dpo.models.base import Batch, Recommender


class MostPopular(Recommender):
    name = "most_popular"

    def __init__(self, counts: np.ndarray) -> None:
        super().__init__()
        self.n_items = len(counts)
        # max_len: the evaluator cuts the query context to it; this model never reads it.
        self.config = {"n_items": self.n_items, "max_len": 1}
        self.counts = nn.Parameter(torch.as_tensor(counts, dtype=torch.float32),
                                   requires_grad=False)  # fmt: skip

    def user_embeddings(self, batch: Batch) -> Tensor:
        return torch.ones(len(batch["user_idx"]), 1, device=self.counts.device)

    def _item_vectors(self, items: Tensor) -> Tensor:
        return self.counts[items].unsqueeze(-1)
