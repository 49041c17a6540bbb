"""Matrix factorisation: a user vector and an item vector meet in an inner product.

    s(u, i) = <p_u, q_i> + b_i

(Koren, Bell and Volinsky, "Matrix Factorization Techniques for Recommender Systems", IEEE
Computer 2009; the MF baseline of the Coat debiasing literature, e.g. Schnabel et al., ICML
2016.) The user bias of a rating model is left out: it shifts every item of a user alike, so
it changes no ranking and no softmax over items. The item bias rides in the last coordinate,
user vector [p_u, 1] and item vector [q_i, b_i] (d = dim - 1 factors), so faiss inner-product search over
`item_embeddings()` ranks exactly by s(u, i). The user is their id alone: the history in a
batch's `context` is not read.

Grown for new items and users (`Recommender.grow_state`), a new item gets the mean factor and
the mean bias of the known items, a new user the mean factor of the known users:
s(u, new) = <p_u, mean_j q_j> + mean_j b_j, and s(new user, i) = <mean_v p_v, q_i> + b_i.
"""

import torch
from torch import Tensor, nn

from recsys_dpo.data.schema import PAD_ITEM
from recsys_dpo.models.base import Batch, Recommender, init_weights


class MF(Recommender):
    """Matrix factorisation with an item bias; see the module docstring.

    Args:
        n_items: catalog size including the padding row 0.
        n_users: number of user indices (embedding rows).
        dim: width of the user and item vectors: dim - 1 factors, then the bias coordinate.
        max_len: the context length batches are cut to (unused by the scores; the evaluator
            and the export read it from every model's config).
    """

    name = "mf"
    embeds_user_ids = True
    item_rows = ("item_emb.weight", "item_bias.weight")
    user_rows = ("user_emb.weight",)

    def __init__(self, n_items: int, n_users: int, dim: int = 32, max_len: int = 50) -> None:
        super().__init__()
        if n_items < 2:
            raise ValueError(f"MF needs n_items >= 2 (padding + 1 item), got {n_items}")
        if dim < 2:
            raise ValueError(f"MF needs dim >= 2 (one factor and the bias), got {dim}")
        if n_users < 1:
            raise ValueError(f"MF needs n_users >= 1, got {n_users}")
        self.n_items = n_items
        self.config = dict(n_items=n_items, n_users=n_users, dim=dim, max_len=max_len)
        self.user_emb = nn.Embedding(n_users, dim - 1)
        self.item_emb = nn.Embedding(n_items, dim - 1, padding_idx=PAD_ITEM)
        self.item_bias = nn.Embedding(n_items, 1, padding_idx=PAD_ITEM)
        self.apply(init_weights)
        nn.init.zeros_(self.item_bias.weight)

    def user_embeddings(self, batch: Batch) -> Tensor:
        """[p_u, 1] for the batch's users [B, dim]."""
        p = self.user_emb(batch["user_idx"])
        return torch.cat([p, torch.ones_like(p[:, :1])], dim=-1)

    def _item_vectors(self, items: Tensor) -> Tensor:
        """[q_i, b_i] for item indices of any shape [..., dim]."""
        return torch.cat([self.item_emb(items), self.item_bias(items)], dim=-1)
