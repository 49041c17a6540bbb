"""The fast stage-1 paths compute the same loss and gradients as the plain ones.

`catalog_softmax_ce` (chunked, fused gradients) against `full_softmax_ce` on the materialised
logits; `SASRec.hidden_at` (packed windows) against `sequence_hidden`; and the ReferenceModule
CE step against the code it replaced. Small random inputs, so any difference is rounding.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_dpo.models.sasrec import Packing, SASRec, first_fit_decreasing
from recsys_dpo.objectives import reference as losses
from recsys_dpo.objectives.reference import catalog_softmax_ce, full_softmax_ce
from recsys_dpo.training.reference_module import ReferenceModule


def _grads(loss_fn, query, table, target):
    query = query.clone().requires_grad_()
    table = table.clone().requires_grad_()
    loss = loss_fn(query, table, target)
    loss.backward()
    return loss.detach(), query.grad, table.grad


def _materialised(query, table, target):
    return full_softmax_ce(query @ table.T, target)


@pytest.mark.parametrize("chunk_logits", [7, 1 << 22])  # many small chunks, and one
def test_catalog_softmax_ce_matches_the_materialised_loss_and_gradients(monkeypatch, chunk_logits):
    monkeypatch.setattr(losses, "_CHUNK_LOGITS", chunk_logits)
    gen = torch.Generator().manual_seed(0)
    query, table = torch.randn(37, 8, generator=gen), torch.randn(11, 8, generator=gen)
    target = torch.randint(0, 11, (37,), generator=gen)  # includes padding targets (ignored)
    target[0] = 0
    got = _grads(catalog_softmax_ce, query, table, target)
    want = _grads(_materialised, query, table, target)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # The padding row takes no part in the softmax, so it gets no gradient.
    assert torch.equal(got[2][0], torch.zeros(8))


def test_catalog_softmax_ce_with_only_padding_targets_is_zero_with_zero_gradients():
    loss, query_grad, table_grad = _grads(
        catalog_softmax_ce, torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)
    )
    assert loss.item() == 0.0
    assert torch.equal(query_grad, torch.zeros(3, 4)) and torch.equal(table_grad, torch.zeros(5, 4))


def test_catalog_softmax_ce_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="catalog_softmax_ce: need query"):
        catalog_softmax_ce(torch.randn(3, 4), torch.randn(5, 4), torch.ones(2, dtype=torch.long))


# ---- packed SASRec windows ----


def _sasrec(max_len: int = 12) -> SASRec:
    torch.manual_seed(0)
    return SASRec(n_items=30, dim=16, n_layers=2, n_heads=2, max_len=max_len).eval()


def _windows(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded contexts of every length 0..length and their next items (targets_seq)."""
    gen = torch.Generator().manual_seed(seed)
    items = torch.randint(1, 30, (batch, length + 1), generator=gen)
    lengths = torch.randint(0, length + 1, (batch,), generator=gen)
    lengths[:2] = torch.tensor([length, 0])  # one full window, one empty
    padding = torch.arange(length) < (length - lengths).unsqueeze(1)
    return items[:, :-1].masked_fill(padding, 0), items[:, 1:].masked_fill(padding, 0)


@pytest.mark.parametrize("seed", range(3))
def test_packed_hidden_states_equal_the_unpacked_ones(seed):
    model = _sasrec()
    context, targets = _windows(9, 12, seed)
    real = targets != 0
    real[3, 0] = True  # a needed state over padding: its span starts there
    want = model.sequence_hidden(context)[real]
    torch.testing.assert_close(model.hidden_at(context, real), want, rtol=1e-5, atol=1e-5)


@given(st.lists(st.integers(0, 10), max_size=30))
@settings(max_examples=200, deadline=None)
def test_first_fit_decreasing_packs_without_overlap_or_overflow(lengths):
    bins, offsets = first_fit_decreasing(lengths, 10)
    taken: set[tuple[int, int]] = set()
    for b, o, n in zip(bins, offsets, lengths, strict=True):
        cells = {(b, o + i) for i in range(n)}
        assert o + n <= 10 and not cells & taken
        taken |= cells
    # First fit never leaves two bins that together could have been one.
    used = [sum(n for b, n in zip(bins, lengths, strict=True) if b == k) for k in set(bins)]
    assert all(a + c > 10 for i, a in enumerate(used) for c in used[i + 1 :])


def test_packing_a_batch_uses_fewer_rows_than_the_padded_batch():
    context, targets = _windows(16, 12, seed=0)
    packing = Packing.of(context, targets != 0)
    assert packing.context.shape[0] < 16
    assert int((packing.context != 0).sum()) == int((context != 0).sum())


def test_reference_ce_step_equals_the_unpacked_materialised_loss_and_gradients():
    """ReferenceModule's CE loss (packed windows, chunked softmax) vs the code it replaced:
    sequence_hidden at real targets, then full_softmax_ce over the whole logit matrix."""
    context, targets = _windows(9, 12, seed=5)
    batch = {"context": context, "targets_seq": targets}
    module = ReferenceModule("sasrec", {"dim": 16, "n_heads": 2, "max_len": 12}, 30, 4)
    module.eval()  # dropout off: both paths must see the same network

    def gradients(loss: torch.Tensor) -> list[torch.Tensor]:
        module.zero_grad()
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in module.parameters()]

    new = gradients(module.reference_loss(batch))
    model, real = module.model, targets != 0
    logits = model.sequence_hidden(context)[real] @ model.item_embeddings().T
    old = gradients(full_softmax_ce(logits, targets[real]))
    for a, b in zip(new, old, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
