"""SASRec: causal self-attention over the user's item history (Kang & McAuley, ICDM 2018).

    x_t = sqrt(d) * E[item_t] + P[pos_t]          E: item table (row 0 padding), P: positions
    h   = LayerNorm(Block_n(... Block_1(x)))      pre-LN blocks, causal attention
    s(u, i) = <h_last, E[i]>                      output tied to the input item table

The blocks are written out nanoGPT-style (LayerNorm -> causal multi-head attention -> residual;
LayerNorm -> GELU MLP -> residual).

Positions count from the RIGHT: the most recent item (last column) has position id 0, the one
before it 1, and so on. Contexts are left-padded, so this gives an item the same position id
however much padding precedes it; together with the key-padding mask (no position attends to
padding) the user vector does not depend on the amount of left padding.

A padded position attends only to itself, so fully padded query rows never see an all-masked
softmax (NaN). An empty history thus gets a learned vector (the last position's embedding
through the blocks) instead of NaN. Contexts longer than max_len keep their last max_len items.

Grown for new items (`Recommender.grow_state`), a new item's row of the tied table is the mean
row of the known items: s(u, new) = <h_last, mean_j E[j]>, and the same vector stands for it in
a history. SASRec has no user table; a new user is their history.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_dpo.data.schema import PAD_ITEM
from recsys_dpo.models.base import Batch, Recommender, init_weights


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention under a boolean mask (True = may attend)."""

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x [B, L, d], mask [B, 1, L, L] -> [B, L, d]."""
        B, L, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        # [B, L, d] -> [B, heads, L, d / heads]
        q, k, v = (t.view(B, L, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(B, L, d)
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, n_heads, dropout)
        self.ln_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.ln_attn(x), mask)
        return x + self.mlp(self.ln_mlp(x))


def attention_mask(context: Tensor, segments: Tensor | None = None) -> Tensor:
    """Boolean mask [B, 1, L, L]: query t may attend key s iff s <= t, s is a real item and
    (for packed rows, `segments` [B, L]) both are in the same window; or s == t (so a padded
    query row is never fully masked)."""
    L = context.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=context.device).tril()
    diagonal = torch.eye(L, dtype=torch.bool, device=context.device)
    real_key = (context != PAD_ITEM)[:, None, None, :]
    if segments is not None:
        real_key = real_key & (segments[:, None, :, None] == segments[:, None, None, :])
    return causal & (real_key | diagonal)


def first_fit_decreasing(lengths: list[int], capacity: int) -> tuple[list[int], list[int]]:
    """Pack items of the given lengths into bins of `capacity`: (bin, offset) of each item.

    First-fit decreasing: longest first, each into the first bin with room. It uses at most
    11/9 of the optimal number of bins plus 6/9 (Dósa, 2007)."""
    bins, offsets = [0] * len(lengths), [0] * len(lengths)
    used: list[int] = []
    for item in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[item]
        if length > capacity:
            raise ValueError(f"cannot pack length {length} into bins of {capacity}")
        slot = next((b for b, u in enumerate(used) if u + length <= capacity), len(used))
        if slot == len(used):
            used.append(0)
        bins[item], offsets[item] = slot, used[slot]
        used[slot] += length
    return bins, offsets


@dataclass(frozen=True)
class Packing:
    """Left-padded rows laid end to end in as few rows of the same width as fit.

    Row b's span (its columns from the first one in use to the last) becomes one segment of a
    packed row. context, positions, segments: [R, L] (unused slots: PAD_ITEM, 0, -1); index:
    for every column of the original [B, L], its slot in the flattened [R * L] packed rows
    (-1 outside the spans).
    """

    context: Tensor
    positions: Tensor
    segments: Tensor
    index: Tensor

    @classmethod
    def of(cls, context: Tensor, used: Tensor) -> "Packing":
        """Pack the spans of `used` [B, L] (True where a row's state is needed) of context."""
        B, L = context.shape
        device = context.device
        columns = torch.arange(L, device=device)
        span = L - torch.where(used, columns, L).min(dim=1).values
        bins, offsets = (
            torch.tensor(v, dtype=torch.long, device=device)
            for v in first_fit_decreasing(span.tolist(), L)
        )
        # Column c of row b goes to column offsets[b] + c - (L - span[b]) of packed row bins[b].
        packed_col = columns + (offsets - L + span).unsqueeze(1)
        in_span = packed_col >= offsets.unsqueeze(1)
        index = torch.where(in_span, bins.unsqueeze(1) * L + packed_col, -1)
        shape = (int(bins.max()) + 1 if B else 1, L)
        flat = index[in_span]
        packed = context.new_full((shape[0] * L,), PAD_ITEM)
        packed[flat] = context[in_span]
        segments = torch.full_like(packed, -1)
        segments[flat] = torch.arange(B, device=device).unsqueeze(1).expand(B, L)[in_span]
        # Right-aligned positions within each segment, as in the unpacked rows.
        positions = torch.zeros_like(packed)
        positions[flat] = (L - 1 - columns).expand(B, L)[in_span]
        return cls(packed.view(shape), positions.view(shape), segments.view(shape), index)


class SASRec(Recommender):
    """SASRec; see the module docstring.

    Args:
        n_items: catalog size including the padding row 0.
        dim: hidden size d (item and position embeddings, blocks).
        n_layers: number of transformer blocks.
        n_heads: attention heads per block (must divide dim).
        max_len: longest history attended to (size of the position table).
        dropout: dropout on the embeddings, attention weights and residual branches.
        n_users: unused; accepted so every model takes the same data-derived kwargs.
    """

    name = "sasrec"
    item_rows = ("item_emb.weight",)

    def __init__(
        self,
        n_items: int,
        dim: int = 64,
        n_layers: int = 2,
        n_heads: int = 2,
        max_len: int = 200,
        dropout: float = 0.2,
        n_users: int = 0,
    ) -> None:
        super().__init__()
        if n_items < 2:
            raise ValueError(f"SASRec needs n_items >= 2 (padding + 1 item), got {n_items}")
        self.n_items = n_items
        self.max_len = max_len
        self.config = dict(
            n_items=n_items, dim=dim, n_layers=n_layers, n_heads=n_heads, max_len=max_len,
            dropout=dropout, n_users=n_users,
        )  # fmt: skip

        self.item_emb = nn.Embedding(n_items, dim, padding_idx=PAD_ITEM)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, n_heads, dropout) for _ in range(n_layers))
        self.ln_final = nn.LayerNorm(dim)
        self.apply(init_weights)

    def sequence_hidden(self, context: Tensor) -> Tensor:
        """Hidden states [B, L', d] for a left-padded context [B, L], L' = min(L, max_len).

        Position t's state depends only on items at positions <= t, so it predicts item t+1:
        this is what the stage-1 next-item loss scores at every position. States at padded
        positions carry no information and should be masked out of any loss.
        """
        context = context[:, -self.max_len :]
        L = context.shape[1]
        # Right-aligned positions: the last column is 0 whatever the padding (module docstring).
        positions = torch.arange(L - 1, -1, -1, device=context.device)
        return self._encode(context, positions, attention_mask(context))

    def hidden_at(self, context: Tensor, where: Tensor) -> Tensor:
        """`sequence_hidden(context)[where]` [M, d], computed on packed rows.

        context, where: [B, L] with L <= max_len. Each row's span from its first needed column
        (where, or a real item) is packed end to end with other rows' (`Packing`): no state is
        computed for the left padding, which is nearly half of the positions of ML-1M's
        200-item windows. Attention stays within a segment and positions count from its end,
        so the states equal the unpacked ones up to float rounding.
        """
        if context.shape != where.shape or context.shape[1] > self.max_len:
            raise ValueError(
                f"hidden_at: need context and where of one shape [B, L <= {self.max_len}], "
                f"got {tuple(context.shape)} and {tuple(where.shape)}"
            )
        packing = Packing.of(context, where | (context != PAD_ITEM))
        mask = attention_mask(packing.context, packing.segments)
        hidden = self._encode(packing.context, packing.positions, mask)
        return hidden.flatten(0, 1)[packing.index[where]]

    def _encode(self, context: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        """Embeddings -> blocks -> final LayerNorm: [B, L, d] under an attention mask."""
        scale = math.sqrt(self.item_emb.embedding_dim)
        x = self.emb_dropout(self.item_emb(context) * scale + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_final(x)

    def user_embeddings(self, batch: Batch) -> Tensor:
        """Hidden state at the last position (the most recent item) [B, d]."""
        return self.sequence_hidden(batch["context"])[:, -1]

    def _item_vectors(self, items: Tensor) -> Tensor:
        """Rows of the tied item table [..., d]."""
        return self.item_emb(items)
