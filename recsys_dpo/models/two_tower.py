"""Two-tower recommender: a user tower and an item tower meet in an inner product.

    user tower:  [user-id embedding] ‖ [Linear(user features)] ‖ [mean of the history's item
                 embeddings] -> MLP -> d
    item tower:  [item-id embedding] + [Linear(item features)] -> MLP -> d
    s(u, i) = <user_tower(u), item_tower(i)>

`features` picks the id and attribute inputs: "none" (ids only), "ids_and_features" or
"features_only" (no user-id input, and the item tower sees the attributes alone; the history
is still pooled over item-id embeddings when use_history). The attribute matrices are buffers
(`set_features`), so they travel with the weights in every checkpoint.

(Covington et al., "Deep Neural Networks for YouTube Recommendations", RecSys 2016; Yi et al.,
"Sampling-Bias-Corrected Neural Modeling", RecSys 2019.) One item-id table feeds both the
history pooling and the item tower, so a user's history and the items it predicts share one
space. Both towers are pure functions of their inputs, so the item tower's output for the whole
catalog can be indexed by faiss once and served.

Grown for new items and users (`Recommender.grow_state`), a new id's embedding row is the mean
row of the known ones, and its attribute rows are the data's own attributes of it (the content
tower): s(u, new) = <user_tower(u), item_tower(mean_j e_j + W x_new)> with attributes
(ids_and_features), item_tower(W x_new) with features_only (its content alone), and
item_tower(mean_j e_j) with ids only (the tower of the mean embedding, not the mean of the
towers' outputs). A new user likewise gets the mean user-id row and their own attributes.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from recsys_dpo.data.schema import PAD_ITEM
from recsys_dpo.models.base import Batch, Recommender, init_weights

FEATURE_MODES = ("none", "ids_and_features", "features_only")


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
        user_features_dim: width g of the per-user matrix, buffer `user_features`
            [n_users, g] (zeros until `set_features`); 0 disables it.
        features: "none", "ids_and_features" or "features_only" (module docstring); with
            features, both dims must be > 0.
    """

    name = "two_tower"
    item_rows = ("item_emb.weight",)
    user_rows = ("user_emb.weight",)
    attribute_rows = {"item_features": "item", "user_features": "user"}

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
        user_features_dim: int = 0,
        features: str = "none",
    ) -> None:
        super().__init__()
        if features not in FEATURE_MODES:
            raise ValueError(f"unknown features {features!r}; expected one of {FEATURE_MODES}")
        if features != "none" and min(item_features_dim, user_features_dim) < 1:
            raise ValueError(
                f"features={features!r} needs user and item feature matrices (the dataset's "
                f"data.features), got widths {user_features_dim} and {item_features_dim}"
            )
        ids = features != "features_only"
        use_user_id = use_user_id and ids
        if not (use_user_id or use_history or user_features_dim):
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
            item_features_dim=item_features_dim, user_features_dim=user_features_dim,
            features=features,
        )  # fmt: skip
        self.item_ids = ids

        self.item_emb = nn.Embedding(n_items, dim, padding_idx=PAD_ITEM)
        self.user_emb = nn.Embedding(n_users, dim) if use_user_id else None
        self.use_history = use_history
        if item_features_dim > 0:
            self.register_buffer("item_features", torch.zeros(n_items, item_features_dim))
            self.feature_proj = nn.Linear(item_features_dim, dim)
        else:
            self.item_features = None
            self.feature_proj = None
        if user_features_dim > 0:
            self.register_buffer("user_features", torch.zeros(n_users, user_features_dim))
            self.user_feature_proj = nn.Linear(user_features_dim, dim)
        else:
            self.user_features = None
            self.user_feature_proj = None
        user_in = dim * (int(use_user_id) + int(use_history) + int(user_features_dim > 0))
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

    def set_features(self, user: Tensor, item: Tensor) -> None:
        """Copy the user [n_users, g] and item [n_items, f] attribute matrices into the
        buffers."""
        if self.user_features is None or user.shape != self.user_features.shape:
            want = None if self.user_features is None else tuple(self.user_features.shape)
            raise ValueError(f"user features must have shape {want} (n_users, "
                             f"user_features_dim), got {tuple(user.shape)}")  # fmt: skip
        self.user_features.copy_(user)
        self.set_item_features(item)

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
        if self.user_feature_proj is not None:
            parts.append(self.user_feature_proj(self.user_features[batch["user_idx"]]))
        if self.use_history:
            parts.append(self.pool_history(batch["context"]))
        return self.user_tower(torch.cat(parts, dim=-1))

    def _item_vectors(self, items: Tensor) -> Tensor:
        """Item tower output [..., d] for item indices [...]."""
        x = self.item_emb(items) if self.item_ids else 0.0
        if self.feature_proj is not None:
            x = x + self.feature_proj(self.item_features[items])
        return self.item_tower(x)
