"""The one interface every recommender implements (DESIGN.md, "Models").

A model maps a batch to user vectors and the catalog to item vectors; every score is their inner
product, so faiss inner-product search over `item_embeddings()` retrieves exactly what the model
ranks. Batches are dicts of tensors: `user_idx` [B] and `context` [B, L], the user's item history,
left-padded with PAD_ITEM (0), most recent item in the last column.

Item index 0 is padding: `embed_items` returns a zero vector for it, so row 0 of
`item_embeddings()` is zero, and `full_scores` sets column 0 to -inf so padding never ranks.

A growing catalog (`Recommender.grow_state`): a model trained on a vocabulary is used with an
extension of it (new items and users appended, `recsys_dpo.data.vocab`) by appending rows to
its id tables, each new row the mean of the table's existing real rows (items 1..N0-1, users
0..U0-1), and to its attribute buffers the data's own attributes of the new ids. Existing rows
are kept bit for bit, so every known item and user scores as before, and a new item scores as
the model's "average item" would (its content, where the model has item attributes).
"""

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from recsys_dpo.data.schema import PAD_ITEM

Batch = dict[str, Tensor]


class Recommender(nn.Module, ABC):
    """Abstract recommender: subclasses give user vectors and raw item vectors.

    Subclasses set `name` (the registry key) and, in `__init__`, `n_items` and `config`: the
    constructor kwargs as plain values, so `type(model)(**model.config)` rebuilds the model and a
    checkpoint can be checked against the data (`config["n_items"]`).
    """

    name: ClassVar[str]
    n_items: int
    config: dict[str, Any]
    # state_dict keys of the tables with one row per item index (row 0 padding) and per user
    # index, and of the attribute buffers (key -> "item" / "user"): what `grow_state` grows.
    item_rows: ClassVar[tuple[str, ...]] = ()
    user_rows: ClassVar[tuple[str, ...]] = ()
    attribute_rows: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def grow_state(
        cls,
        config: Mapping[str, Any],
        state: Mapping[str, Tensor],
        n_items: int,
        n_users: int,
        attributes: Mapping[str, Tensor] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The constructor config and state_dict of a model of `config` grown to n_items /
        n_users (an extended vocabulary; module docstring): every `item_rows` / `user_rows`
        table gets the mean of its existing real rows (computed in float64) appended for each
        new index; every `attribute_rows` buffer gets the new rows of the full matrix
        `attributes[side]` [n_items or n_users, f] of the extended vocabulary. The old rows
        and every other tensor are the input's own. ValueError when the sizes shrink or a
        needed attribute matrix is missing or of another shape."""
        old = {"item": int(config["n_items"]), "user": int(config["n_users"])}
        new = {"item": n_items, "user": n_users}
        if n_items < old["item"] or n_users < old["user"]:
            raise ValueError(f"cannot grow a model of n_items={old['item']}, n_users="
                             f"{old['user']} to n_items={n_items}, n_users={n_users}")  # fmt: skip
        grown = dict(state)
        tables = [(key, "item", PAD_ITEM + 1) for key in cls.item_rows]
        tables += [(key, "user", 0) for key in cls.user_rows]
        for key, side, first in tables:
            if key in grown:
                table = grown[key]
                mean = table[first:].double().mean(dim=0).to(table.dtype)
                extra = mean.expand(new[side] - len(table), -1)
                grown[key] = torch.cat([table, extra])
        for key, side in cls.attribute_rows.items():
            if key not in grown:
                continue
            table, full = grown[key], (attributes or {}).get(side)
            if full is None or tuple(full.shape) != (new[side], table.shape[1]):
                want = (new[side], table.shape[1])
                got = None if full is None else tuple(full.shape)
                raise ValueError(f"its {side} attributes for the grown vocabulary: need a "
                                 f"matrix of shape {want}, got {got}")  # fmt: skip
            grown[key] = torch.cat([table, full[len(table) :].to(table.dtype)])
        return {**config, "n_items": n_items, "n_users": n_users}, grown

    @abstractmethod
    def user_embeddings(self, batch: Batch) -> Tensor:
        """User vectors [B, d] for the batch's users and contexts."""

    @abstractmethod
    def _item_vectors(self, items: Tensor) -> Tensor:
        """Raw item vectors [..., d] for item indices of any shape (padding not yet zeroed)."""

    @property
    def embeds_user_ids(self) -> bool:
        """The user vector reads `user_idx` (an unknown user cannot be scored)."""
        return bool(self.config.get("use_user_id", False))

    def embed_items(self, items: Tensor) -> Tensor:
        """Item vectors [..., d] for item indices [...]; padding (index 0) maps to zeros."""
        return self._item_vectors(items) * (items != PAD_ITEM).unsqueeze(-1)

    def item_embeddings(self) -> Tensor:
        """Vectors of the whole catalog [n_items, d]; row 0 (padding) is zero."""
        device = next(self.parameters()).device
        return self.embed_items(torch.arange(self.n_items, device=device))

    def score(self, batch: Batch, items: Tensor) -> Tensor:
        """Scores [B, K] of items [B, K] (per user) or [K] (shared): s(u, i) = <u, v_i>."""
        users = self.user_embeddings(batch)
        vectors = self.embed_items(items)
        if items.dim() == 1:
            return users @ vectors.T
        return torch.einsum("bd,bkd->bk", users, vectors)

    def full_scores(self, batch: Batch) -> Tensor:
        """Scores [B, n_items] over the whole catalog; column 0 (padding) is -inf.

        The -inf keeps padding out of softmax and top-K; callers computing sum(p * log p)
        must mask that column themselves (0 * -inf is NaN).
        """
        scores = self.user_embeddings(batch) @ self.item_embeddings().T
        is_pad = torch.arange(scores.shape[-1], device=scores.device) == PAD_ITEM
        return scores.masked_fill(is_pad, float("-inf"))


def init_weights(module: nn.Module) -> None:
    """Shared init, applied with `model.apply`: xavier Linear, N(0, 0.02) embeddings, zero bias.

    Draws from torch's global RNG, so the caller's `torch.manual_seed` fixes the weights.
    The padding row of an embedding is re-zeroed (nn.Embedding also keeps its gradient zero).
    """
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
