"""Two-tower recommender: a user tower and an item tower meet in an inner product.

    user tower:  [user-id embedding] ‖ [mean of the history's item embeddings] -> MLP -> d
    item tower:  item-id embedding (+ Linear(item features)) -> MLP -> d
    s(u, i) = <user_tower(u), item_tower(i)>

(Covington et al., "Deep Neural Networks for YouTube Recommendations", RecSys 2016; Yi et al.,
"Sampling-Bias-Corrected Neural Modeling", RecSys 2019.) One item-id table feeds both the
history pooling and the item tower, so a user's history and the items it predicts share one
space. Both towers are pure functions of their inputs, so the item tower's output for the whole
catalog can be indexed by faiss once and served.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from recsys_dpo.data.schema import PAD_ITEM
from recsys_dpo.models.base import Batch, Recommender, init_weights


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, dropout: float) -> nn.Sequential:
    """Linear -> ReLU -> Dropout for each hidden width, then a final Linear to out_dim."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class TwoTower(Recommender):
    """Two-tower model; see the module docstring.

    Args:
        n_items: catalog size including the padding row 0.
        n_users: number of user indices (embedding rows) for the user-id feature.
        dim: output dimension d of both towers (and of the id embeddings).
        hidden: hidden widths of each tower's MLP; () makes each tower one Linear.
        use_user_id: feed the user-id embedding to the user tower.
        use_history: feed the mean-pooled history to the user tower (padding excluded; an
            empty history pools to zeros).
        max_len: only the last max_len history items are pooled.
        dropout: dropout after every hidden MLP layer.
        item_features_dim: width f of an optional per-item feature matrix, held in the buffer
            `item_features` [n_items, f] (zeros until `set_item_features`); 0 disables it.
    """

    name = "two_tower"

    def __init__(
        self,
        n_items: int,
        n_users: int,
        dim: int = 64,
        hidden: Sequence[int] = (128,),
        use_user_id: bool = True,
        use_history: bool = True,
        max_len: int = 50,
        dropout: float = 0.1,
        item_features_dim: int = 0,
    ) -> None:
        super().__init__()
        if not (use_user_id or use_history):
            raise ValueError("TwoTower needs use_user_id or use_history (both are False)")
        if n_items < 2:
            raise ValueError(f"TwoTower needs n_items >= 2 (padding + 1 item), got {n_items}")
        if use_user_id and n_users < 1:
            raise ValueError(f"TwoTower with use_user_id needs n_users >= 1, got {n_users}")
        hidden = [int(width) for width in hidden]
        self.n_items = n_items
        self.max_len = max_len
        self.config = dict(
            n_items=n_items, n_users=n_users, dim=dim, hidden=hidden, use_user_id=use_user_id,
            use_history=use_history, max_len=max_len, dropout=dropout,
            item_features_dim=item_features_dim,
        )  # fmt: skip

        self.item_emb = nn.Embedding(n_items, dim, padding_idx=PAD_ITEM)
        self.user_emb = nn.Embedding(n_users, dim) if use_user_id else None
        self.use_history = use_history
        if item_features_dim > 0:
            self.register_buffer("item_features", torch.zeros(n_items, item_features_dim))
            self.feature_proj = nn.Linear(item_features_dim, dim)
        else:
            self.item_features = None
            self.feature_proj = None
        user_in = dim * (int(use_user_id) + int(use_history))
        self.user_tower = mlp(user_in, hidden, dim, dropout)
        self.item_tower = mlp(dim, hidden, dim, dropout)
        self.apply(init_weights)

    def set_item_features(self, features: Tensor) -> None:
        """Copy an item feature matrix [n_items, f] (row 0 = padding) into the buffer."""
        if self.item_features is None:
            raise ValueError("set_item_features needs a model built with item_features_dim > 0")
        if features.shape != self.item_features.shape:
            raise ValueError(
                f"item features must have shape {tuple(self.item_features.shape)} "
                f"(n_items, item_features_dim), got {tuple(features.shape)}"
            )
        self.item_features.copy_(features)

    def pool_history(self, context: Tensor) -> Tensor:
        """Mean of the item embeddings of the last max_len non-padding items [B, d]."""
        context = context[:, -self.max_len :]
        real = (context != PAD_ITEM).unsqueeze(-1)
        total = (self.item_emb(context) * real).sum(dim=1)
        return total / real.sum(dim=1).clamp(min=1)

    def user_embeddings(self, batch: Batch) -> Tensor:
        """User tower output [B, d]."""
        parts = []
        if self.user_emb is not None:
            parts.append(self.user_emb(batch["user_idx"]))
        if self.use_history:
            parts.append(self.pool_history(batch["context"]))
        return self.user_tower(torch.cat(parts, dim=-1))

    def _item_vectors(self, items: Tensor) -> Tensor:
        """Item tower output [..., d] for item indices [...]."""
        x = self.item_emb(items)
        if self.feature_proj is not None:
            x = x + self.feature_proj(self.item_features[items])
        return self.item_tower(x)
