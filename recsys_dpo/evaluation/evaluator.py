"""Offline evaluation of one model, and of a policy against its reference (DESIGN.md, "Evaluation").

Protocol, for split S in {valid, test} of a prepared dataset:

- the queries are the users with a positive in S; their targets are those positives (under
  leave-one-out the held-out event's item, or every click of the held-out request; every
  positive of the window under a temporal split);
- a user's history is their positives in the splits before S (train; train + valid for test), in
  event order; the model's query context is its last `max_len` items, so nothing at or after the
  held-out event is ever seen by the model;
- the whole catalog is ranked by faiss inner-product search over `item_embeddings()` (exact by
  default) into the top-K lists (topk.parquet, what is served; equal scores by item id), the
  items of the seen policy removed (`eval.seen`, `recsys_dpo/retrieval/seen.py`: `remove`
  takes out every history item, a target too, which is then a guaranteed miss counted as
  `targets_removed_as_seen`; `keep` takes out nothing). Never sampled metrics;
- ranking metrics read each target's rank from the exact scores with the training-time
  validation's tie policy (`training.ranking_eval.target_ranks`): PESSIMISTIC, a target ranks
  below every candidate with the same score, so a tie never earns a hit and the figure does
  not depend on the item-id order. With an approximate index a target it did not retrieve is
  a miss.

Per user: HR@K, Recall@K, NDCG@K for every K, MRR within the top max(K) list, and the entropy of
pi(.|u) = softmax s(u, .) over the catalog; on the synthetic log also the exact true utility,
click-through rate and utility regret of the top-K (`truth/*`, `recsys_dpo.evaluation.truth`). Aggregates add coverage, average popularity, Gini and
tail share of the top-K lists (popularity = train positives); impression-level AUC / MRR /
nDCG@5/10 when S has request_id, or, for a dataset split by the `mcar` kind (Coat), the
random-exposure metrics mcar/auc, mcar/ndcg_at_5, mcar/recall_at_5 of each user's ranking of
their own random test items (`metrics.mcar_metrics`; the valid split's requests are the
held-out MNAR items, measured alike) and, beside them, the same split under the protocol of the
published Coat tables: coat_paper/auc over all the split's (user, item) rows pooled
(`metrics.global_auc`) and coat_paper/ndcg_at_5, coat_paper/recall_at_5 over every user, those
without a relevant item too (`metrics.coat_paper_ranking`); preference accuracy on the split's
pairs.

`compare` evaluates policy and reference on the same queries and adds per-user deltas with paired
bootstrap CIs, the exact KL(policy || reference) per user, and `log_ratio_margin`, the mean
UNSCALED implicit-reward margin (s_pol - s_ref)(chosen) - (s_pol - s_ref)(rejected) on the pairs (no
beta; the log-partitions cancel within a context, so score differences are log-probability
differences).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from rich import get_console
from rich.progress import track
from torch import Tensor

from recsys_dpo.data.datamodule import PreparedDataset, Ragged, load_prepared
from recsys_dpo.data.schema import ITEM_IDX, PAD_ITEM, USER_IDX
from recsys_dpo.data.sequences import EVENT_ORDER
from recsys_dpo.errors import DataError
from recsys_dpo.evaluation import metrics
from recsys_dpo.evaluation.truth import synthetic_truth, topk_truth_metrics
from recsys_dpo.models.base import Recommender
from recsys_dpo.objectives.catalog import chunked_kl_entropy
from recsys_dpo.objectives.rlhf import distill_loss, rlhf_optimum_logits
from recsys_dpo.retrieval.index import build_index, search
from recsys_dpo.retrieval.seen import DEFAULT_SEEN, removed_items
from recsys_dpo.training.guards import NonFinite, require_finite
from recsys_dpo.training.ranking_eval import target_ranks

SPLITS_BEFORE = {"valid": ("train",), "test": ("train", "valid")}
IMPRESSION_NDCG_K = (5, 10)
MCAR_K = 5


@dataclass(frozen=True)
class RetrievalConfig:
    """How the catalog is searched (`recsys_dpo.retrieval.index.build_index` arguments)."""

    index: str = "flat"
    nlist: int | None = None
    nprobe: int = 16
    use_gpu: bool | None = None


@dataclass(frozen=True)
class Queries:
    """The ranking queries of one split, one row per user with a positive in it, by user_idx."""

    split: str
    user_idx: np.ndarray  # [U] int64
    history: Ragged  # each user's positives before the split, event order, all of them
    targets: list[np.ndarray]  # [U] distinct positives in the split
    seen: list[np.ndarray]  # [U] the history items the seen policy removes (sorted, distinct)

    def __len__(self) -> int:
        return len(self.user_idx)

    @property
    def n_no_history(self) -> int:
        return int(((self.history.ends - self.history.starts) == 0).sum())

    def batch(self, rows: slice, max_len: int) -> dict[str, Tensor]:
        """The model batch of rows: user_idx and the left-padded last `max_len` history items."""
        index = torch.arange(len(self))[rows]
        context = Ragged(self.history.values, self.history.starts, self.history.ends, max_len, True)
        return {"user_idx": torch.from_numpy(self.user_idx[rows]), "context": context.take(index)}


def _positives(data: PreparedDataset, splits: Sequence[str]) -> pl.DataFrame:
    """user_idx, item_idx of the positives of `splits`, in (user, event) order."""
    frames = [data.events(s).filter(pl.col("clicked")) for s in splits]
    return (
        pl.concat([f.select(USER_IDX, ITEM_IDX, *EVENT_ORDER) for f in frames])
        .sort(USER_IDX, *EVENT_ORDER)
        .select(pl.col(USER_IDX).cast(pl.Int64), pl.col(ITEM_IDX).cast(pl.Int64))
    )


def build_queries(data: PreparedDataset, split: str, seen: str = DEFAULT_SEEN) -> Queries:
    """The queries of `split` (see the module docstring), `seen` the policy's removed items;
    DataError if the split has no positive."""
    if split not in SPLITS_BEFORE:
        raise DataError(f"eval.split={split!r}: expected one of {sorted(SPLITS_BEFORE)}")
    targets = (
        _positives(data, [split])
        .group_by(USER_IDX, maintain_order=True)
        .agg(pl.col(ITEM_IDX).unique(maintain_order=True).alias("targets"))
    )
    if targets.height == 0:
        n_rows = data.events(split).height
        raise DataError(
            f"{data.path / f'{split}.parquet'}: the {split} split has no positive event "
            f"(column clicked is never true in its {n_rows} rows): nothing to evaluate"
        )
    return queries_of(data, split, targets, seen)


def queries_of(data: PreparedDataset, split: str, targets: pl.DataFrame,
               seen: str = DEFAULT_SEEN) -> Queries:
    """Queries of the users in `targets` (user_idx, targets: a list of item_idx each), by
    user_idx, each with their positives before `split` as history."""
    histories = (
        _positives(data, SPLITS_BEFORE[split])
        .group_by(USER_IDX, maintain_order=True)
        .agg(pl.col(ITEM_IDX).alias("history"))
    )
    rows = targets.join(histories, on=USER_IDX, how="left").sort(USER_IDX).with_columns(
        pl.col("history").fill_null(pl.lit([], dtype=pl.List(pl.Int64)))
    )
    return Queries(
        split=split,
        user_idx=rows[USER_IDX].to_numpy().astype(np.int64),
        history=Ragged.from_lists(rows["history"], None, left=True),
        targets=[np.asarray(t, dtype=np.int64) for t in rows["targets"].to_list()],
        seen=[removed_items(h, seen) for h in rows["history"].to_list()],
    )


def check_model(model: Recommender, data: PreparedDataset, queries: Queries, what: str) -> None:
    """DataError when the model was built for another catalog, or cannot embed some users."""
    if model.n_items != data.n_items:
        raise DataError(
            f"{what} was trained with n_items={model.n_items}, but the dataset {data.path} has "
            f"n_items={data.n_items} (manifest.json): evaluate it on the dataset it was trained on"
        )
    if model.embeds_user_ids:
        n_users = int(model.config["n_users"])
        unknown = queries.user_idx[queries.user_idx >= n_users]
        if len(unknown):
            raise DataError(
                f"{what} knows user_idx 0..{n_users - 1} (n_users={n_users}), but the "
                f"{queries.split} split of {data.path} has {len(unknown)} user(s) beyond it "
                f"(e.g. user_idx {unknown[:5].tolist()}; the dataset has n_users={data.n_users})"
            )


def check_k(k: Sequence[int], n_items: int) -> list[int]:
    """The sorted distinct cut-offs; DataError unless 1 <= k <= the number of real items."""
    ks = sorted({int(x) for x in k})
    if not ks or ks[0] < 1 or ks[-1] > n_items - 1:
        raise DataError(
            f"eval.k={list(k)}: every k must lie in [1, {n_items - 1}] (the catalog has "
            f"{n_items - 1} real items), got max k={max(k, default=None)}"
        )
    return ks


def _batches(n: int, batch_size: int, progress: bool, what: str) -> Iterator[slice]:
    starts = range(0, n, batch_size)
    # A transient bar shows nothing in a log file but leaves a blank line there.
    shown = progress and get_console().is_terminal
    for start in track(starts, description=what, disable=not shown, transient=True):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def embed_users(
    model: Recommender, queries: Queries, batch_size: int = 1024, progress: bool = False
) -> Tensor:
    """User vectors [U, d] (float32, CPU) of the queries at their history context."""
    device = next(model.parameters()).device
    max_len = int(model.config["max_len"])
    parts = []
    for rows in _batches(len(queries), batch_size, progress, f"embedding users ({model.name})"):
        batch = {k: v.to(device) for k, v in queries.batch(rows, max_len).items()}
        parts.append(model.user_embeddings(batch).float().cpu())
    return torch.cat(parts)


@torch.no_grad()
def item_vectors(model: Recommender) -> Tensor:
    """The catalog's vectors [N, d] (float32, CPU; row 0 padding)."""
    return model.item_embeddings().float().cpu()


def retrieve(
    user_emb: Tensor,
    item_emb: Tensor,
    seen: Sequence[np.ndarray],
    k: int,
    retrieval: RetrievalConfig = RetrievalConfig(),
    batch_size: int = 4096,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores [U, k], item ids [U, k]) of the full catalog by faiss, seen items removed."""
    index = build_index(
        item_emb.numpy(), kind=retrieval.index, nlist=retrieval.nlist,
        nprobe=retrieval.nprobe, use_gpu=retrieval.use_gpu,
    )  # fmt: skip
    users = user_emb.numpy()
    scores = np.empty((len(users), k), dtype=np.float32)
    items = np.empty((len(users), k), dtype=np.int64)
    for rows in _batches(len(users), batch_size, progress, "retrieving top-k"):
        scores[rows], items[rows] = search(index, users[rows], k, seen[rows])
    return scores, items


def check_finite(
    user_emb: Tensor, item_emb: Tensor, topk_scores: np.ndarray, queries: Queries, what: str
) -> None:
    """DataError naming `what` when its user or item vectors, its top-k scores (the -inf of
    padded rows aside) or its targets' scores hold a NaN or an infinity: faiss would rank them
    arbitrarily and every metric would be silently wrong."""
    rows = np.repeat(np.arange(len(queries)), [len(t) for t in queries.targets])
    try:
        require_finite(user_emb, "its user vectors")
        require_finite(item_emb, "its item vectors")
        require_finite(np.where(topk_scores == -np.inf, 0.0, topk_scores), "its top-k scores")
        targets = _gather_scores(user_emb, item_emb, rows, np.concatenate(queries.targets))
        require_finite(targets, "its scores of the held-out items")
    except NonFinite as err:
        raise DataError(
            f"{what} cannot be evaluated: {err} (its training diverged; re-train it with a "
            "lower train.lr)"
        ) from err


@torch.no_grad()
def exact_target_ranks(
    user_emb: Tensor, item_emb: Tensor, queries: Queries, batch_size: int = 1024
) -> list[np.ndarray]:
    """Each user's target ranks [T_u] among the exact scores <u, v_i> of the whole catalog,
    the seen items removed, ties against the target (`ranking_eval.target_ranks`; a removed
    target ranks n_items, a miss)."""
    # Equal-length arrays would make a fixed-width Array column: cast to List.
    as_lists = pl.List(pl.Int64)
    targets = Ragged.from_lists(pl.Series(queries.targets).cast(as_lists), None, left=False)
    seen = Ragged.from_lists(pl.Series(queries.seen).cast(as_lists), None, left=False)
    out = []
    for rows in _batches(len(queries), batch_size, False, ""):
        index = torch.arange(len(queries))[rows]
        scores = user_emb[rows] @ item_emb.T
        scores[:, PAD_ITEM] = float("-inf")
        batch_targets = targets.take(index)
        ranks = target_ranks(scores, batch_targets, seen.take(index), batch_targets != PAD_ITEM)
        out += [r[: len(t)].numpy() for r, t in zip(ranks, queries.targets[rows], strict=True)]
    return out


def listed_targets(
    ranks: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    k: int,
    retrieved: np.ndarray | None = None,
) -> np.ndarray:
    """[U, k]: each target at its rank where that is < k, -1 elsewhere: the ranked list the
    ranking metrics read, so they count the tie-exact ranks. With `retrieved` [U, >= k] (an
    approximate index's lists) a target it did not return is left out: a miss."""
    lengths = [len(t) for t in targets]
    owner = np.repeat(np.arange(len(targets)), lengths)
    rank = np.concatenate([np.empty(0, dtype=np.int64), *ranks]).astype(np.int64)
    item = np.concatenate([np.empty(0, dtype=np.int64), *targets]).astype(np.int64)
    keep = rank < k
    if retrieved is not None:
        width = int(max(retrieved.max(initial=0), item.max(initial=0))) + 1
        row, col = np.nonzero(retrieved >= 0)  # -1: an empty slot
        keep &= np.isin(owner * width + item, row * width + retrieved[row, col])
    out = np.full((len(targets), k), -1, dtype=np.int64)
    out[owner[keep], rank[keep]] = item[keep]
    return out


def per_user_ranking(ranked: np.ndarray, targets: Sequence[np.ndarray], ks: Sequence[int]) -> dict:
    """Per-user hr_at_k, recall_at_k, ndcg_at_k for each k, and mrr_at_<K_max> (within the ranked
    list of width K_max) [U]."""
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"hr_at_{k}"] = metrics.hit_rate_at_k(ranked, targets, k)
        out[f"recall_at_{k}"] = metrics.recall_at_k(ranked, targets, k)
        out[f"ndcg_at_{k}"] = metrics.ndcg_at_k(ranked, targets, k)
    out[f"mrr_at_{ranked.shape[1]}"] = metrics.mrr(ranked, targets)
    return out


def beyond_accuracy(
    ranked: np.ndarray, ks: Sequence[int], item_counts: np.ndarray, head_fraction: float
) -> dict[str, float]:
    """coverage_at_k, avg_popularity_at_k, gini_at_k and tail_share_at_k of the top-k lists, each k."""
    n_items = len(item_counts)
    out = {}
    for k in ks:
        out[f"coverage_at_{k}"] = metrics.coverage_at_k(ranked, k, n_items)
        out[f"avg_popularity_at_{k}"] = metrics.average_popularity(ranked, k, item_counts)
        out[f"gini_at_{k}"] = metrics.gini_index(ranked, k, n_items)
        out[f"tail_share_at_{k}"] = metrics.tail_share(ranked, k, item_counts, head_fraction)
    return out


def train_popularity(data: PreparedDataset) -> np.ndarray:
    """Positives per item idx 0..n_items-1 in the train split (the popularity the model saw)."""
    items = data.events("train").filter(pl.col("clicked"))[ITEM_IDX].to_numpy()
    return np.bincount(items.astype(np.int64), minlength=data.n_items)[: data.n_items]


def _gather_scores(
    user_emb: Tensor, item_emb: Tensor, rows: np.ndarray, items: np.ndarray
) -> np.ndarray:
    """s(u, i) = <user_emb[row], item_emb[item]> for aligned rows and items (Recommender.score)."""
    u, v = user_emb[torch.tensor(rows)], item_emb[torch.tensor(items)]
    return (u * v).sum(-1).numpy().astype(np.float64)


@dataclass(frozen=True)
class Impressions:
    """The shown items of the split's requests that have a click: one row per shown item."""

    request_id: np.ndarray  # [R] the request of each row
    query_row: np.ndarray  # [R] the row of its user in `Queries`
    item_idx: np.ndarray  # [R]
    clicked: np.ndarray  # [R] bool

    def __len__(self) -> int:
        return len(self.item_idx)


def build_impressions(
    data: PreparedDataset, queries: Queries, unclicked: bool = False
) -> Impressions | None:
    """The impression rows of the split (None without request_id), those of requests without
    a click only when `unclicked` (`queries` must then hold their users: `request_queries`).
    The user's context is the query context: their positives before the split, so no click of
    the split leaks in."""
    events = data.events(queries.split)
    if "request_id" not in events.columns:
        return None
    rows = events.filter(pl.col("request_id").is_not_null())
    rows = (
        rows.filter(pl.lit(unclicked) | pl.col("clicked").any().over("request_id"))
        .select("request_id", pl.col(USER_IDX).cast(pl.Int64), pl.col(ITEM_IDX).cast(pl.Int64),
                "clicked")  # fmt: skip
    )
    if rows.height == 0:
        return None
    query_row = np.searchsorted(queries.user_idx, rows[USER_IDX].to_numpy())
    return Impressions(
        request_id=rows["request_id"].to_numpy(),
        query_row=query_row,
        item_idx=rows[ITEM_IDX].to_numpy(),
        clicked=rows["clicked"].to_numpy().astype(bool),
    )


def request_queries(data: PreparedDataset, split: str, seen: str = DEFAULT_SEEN) -> Queries:
    """Queries of every user with a request in `split`, clicked or not (targets empty): the
    users the Coat paper protocol scores, its NDCG and pooled AUC counting users without a
    relevant test item too."""
    users = (data.events(split).filter(pl.col("request_id").is_not_null())
             .select(pl.col(USER_IDX).cast(pl.Int64)).unique())  # fmt: skip
    targets = users.with_columns(pl.lit([], dtype=pl.List(pl.Int64)).alias("targets"))
    return queries_of(data, split, targets, seen)


def request_metric_name(kind: str, column: str) -> str:
    """The aggregate / per-user name of a per-request column: `<kind>/<column>`, unless the
    column names its own protocol (`coat_paper/ndcg_at_5`)."""
    return column if "/" in column else f"{kind}/{column}"


def request_metrics_kind(data: PreparedDataset) -> str:
    """"mcar" for a dataset split by the `mcar` kind, whose requests are each user's random
    test items (or held-out valid items), else "impression": the prefix of the metrics."""
    split = data.manifest.get("config", {}).get("data", {}).get("split", {})
    return "mcar" if split.get("kind") == "mcar" else "impression"


def per_request_metrics(
    scores: np.ndarray, imp: Impressions, kind: str = "impression"
) -> dict[str, np.ndarray]:
    """Per request, in np.unique(request_id) order: auc, mrr, ndcg_at_5, ndcg_at_10
    (impression logs), or auc, ndcg_at_5, recall_at_5 (kind "mcar", `metrics.mcar_metrics`)
    and coat_paper/ndcg_at_5, coat_paper/recall_at_5 (`metrics.coat_paper_ranking`)."""
    if kind == "mcar":
        paper = metrics.coat_paper_ranking(scores, imp.clicked, imp.request_id, MCAR_K)
        return metrics.mcar_metrics(scores, imp.clicked, imp.request_id, MCAR_K) | {
            f"coat_paper/{name}": v for name, v in paper.items()
        }
    out = {
        "auc": metrics.impression_auc(scores, imp.clicked, imp.request_id),
        "mrr": metrics.impression_mrr(scores, imp.clicked, imp.request_id),
    }
    for k in IMPRESSION_NDCG_K:
        out[f"ndcg_at_{k}"] = metrics.impression_ndcg_at_k(scores, imp.clicked, imp.request_id, k)
    return out


@dataclass(frozen=True)
class PairScores:
    """A model's scores of the split's pairs: chosen [P], rejected [P, K] with mask [P, K]."""

    chosen: np.ndarray
    rejected: np.ndarray
    mask: np.ndarray


@torch.no_grad()
def score_pairs(
    model: Recommender, pairs: pl.DataFrame, batch_size: int = 1024, progress: bool = False
) -> PairScores:
    """Each pair's chosen and rejected items scored by the model at the pair's own context."""
    device = next(model.parameters()).device
    context = Ragged.from_lists(pairs["context"], int(model.config["max_len"]), left=True)
    width = int(pairs["rejected"].list.len().max())
    rejected = Ragged.from_lists(pairs["rejected"], width, left=False)
    users = torch.from_numpy(pairs[USER_IDX].to_numpy().astype(np.int64))
    chosen = torch.from_numpy(pairs["chosen"].to_numpy().astype(np.int64))
    out_c = np.empty(len(users))
    out_r = np.zeros((len(users), width))
    mask = np.zeros((len(users), width), dtype=bool)
    for rows in _batches(len(users), batch_size, progress, f"scoring pairs ({model.name})"):
        index = torch.arange(len(users))[rows]
        rej = rejected.take(index)
        batch = {"user_idx": users[rows].to(device), "context": context.take(index).to(device)}
        items = torch.cat([chosen[rows].unsqueeze(1), rej], dim=1).to(device)
        scores = model.score(batch, items).double().cpu().numpy()
        out_c[rows], out_r[rows], mask[rows] = scores[:, 0], scores[:, 1:], rej.numpy() != PAD_ITEM
    return PairScores(out_c, out_r, mask)


@dataclass
class EvalResult:
    """One model on one split. `per_user` has user_idx and one column per per-user metric,
    `per_request` (impression logs) request_id and its metrics; `topk_*` [U, max k]."""

    split: str
    ks: list[int]
    per_user: pl.DataFrame
    aggregates: dict[str, float]
    counts: dict[str, int]
    topk_items: np.ndarray
    topk_scores: np.ndarray
    user_emb: Tensor
    item_emb: Tensor
    per_request: pl.DataFrame | None = None
    pairs: PairScores | None = None
    request_metrics: str = "impression"  # the prefix of the per-request metrics
    ope: dict | None = None  # the off-policy section (recsys_dpo.evaluation.counterfactual)


def _kl(pol_user: Tensor, pol_item: Tensor, ref_user: Tensor, ref_item: Tensor, chunk: int,
        batch_size: int) -> np.ndarray:  # fmt: skip
    """Per user, the exact full-catalog KL(policy || reference) of the two softmaxes."""
    return torch.cat([
        chunked_kl_entropy(pol_user[r], pol_item, ref_user[r], ref_item, chunk)[0]
        for r in _batches(len(pol_user), batch_size, False, "")
    ]).numpy().astype(np.float64)  # fmt: skip


def policy_kl(policy: Recommender, reference: Recommender, data: PreparedDataset, split: str,
              *, reward: Recommender | None = None, beta: float | None = None,
              seen: str = DEFAULT_SEEN, batch_size: int = 1024,
              kl_chunk: int = 65536) -> pl.DataFrame:  # fmt: skip
    """Each user's exact KL(policy || reference) over the full catalog on `split`'s queries
    (`user_idx`, `kl`): the x axis of a reward-KL frontier, without the ranking metrics
    `compare` also computes. With a `reward` model r, also `reward_gain`:
    E_{i~policy}[r(u, i)] - E_{i~reference}[r(u, i)], both expectations exact over the catalog
    (a difference: a Bradley-Terry reward is defined up to a per-user offset); with `beta`
    too, `kl_to_optimum`: KL(pi* || policy), pi* the RLHF optimum of r at beta,
    pi_ref exp(r / beta) / Z (`rlhf.rlhf_optimum_logits`): how far the policy is from the
    policy the RLHF route targets at that beta (0 for a perfect distillation of pi*). Memory
    O(batch_size x catalog)."""
    queries = build_queries(data, split, seen)
    models = {"policy": policy, "reference": reference, "reward": reward}
    users, items = {}, {}
    for name, model in models.items():
        if model is not None:
            model.eval()
            users[name], items[name] = embed_users(model, queries, batch_size), item_vectors(model)
    kl = _kl(users["policy"], items["policy"], users["reference"], items["reference"], kl_chunk,
             batch_size)  # fmt: skip
    table = pl.DataFrame({USER_IDX: queries.user_idx, "kl": kl})
    if reward is None:
        return table
    gain, to_optimum = [], []
    for rows in _batches(len(queries), batch_size, False, ""):
        # Padding (column 0) excluded, as in the KL.
        logits = {m: users[m][rows] @ items[m].T for m in models if m in users}
        p, q = (logits[m][:, 1:].softmax(-1) for m in ("policy", "reference"))
        gain.append(((p - q) * logits["reward"][:, 1:]).sum(-1))
        if beta is not None:
            optimum = rlhf_optimum_logits(logits["reference"], logits["reward"], beta)
            to_optimum.append(distill_loss(logits["policy"], optimum))
    table = table.with_columns(pl.Series("reward_gain", torch.cat(gain).double().numpy()))
    if beta is None:
        return table
    return table.with_columns(pl.Series("kl_to_optimum", torch.cat(to_optimum).double().numpy()))


def _entropy(user_emb: Tensor, item_emb: Tensor, chunk: int, batch_size: int) -> np.ndarray:
    """Entropy of softmax_i <u, v_i> over the real items, per user, streamed over the catalog."""
    parts = [
        chunked_kl_entropy(user_emb[r], item_emb, user_emb[r], item_emb, chunk)[1]
        for r in _batches(len(user_emb), batch_size, False, "")
    ]
    return torch.cat(parts).numpy().astype(np.float64)


def _means(table: pl.DataFrame, key: str) -> dict[str, float]:
    """Mean of each metric column over the rows that have it (NaN rows skipped)."""
    return {c: metrics.user_mean(table[c].to_numpy())[0] for c in table.columns if c != key}


def evaluate(
    model: Recommender,
    data: PreparedDataset | str | Path,
    split: str = "test",
    k: Sequence[int] = (10, 20, 50),
    *,
    retrieval: RetrievalConfig = RetrievalConfig(),
    head_fraction: float = 0.2,
    batch_size: int = 1024,
    kl_chunk: int = 65536,
    progress: bool = False,
    queries: Queries | None = None,
    what: str = "the model",
    seen: str = DEFAULT_SEEN,
) -> EvalResult:
    """Evaluate `model` on `split` of a prepared dataset (protocol: module docstring), `seen`
    the seen-item policy (ignored when `queries` are given: they carry theirs).

    Raises DataError (naming the model `what`) for k outside [1, real items], a model of
    another catalog, users the model cannot embed, non-finite scores, or a split without
    positives.
    """
    data = data if isinstance(data, PreparedDataset) else load_prepared(data)
    queries = queries if queries is not None else build_queries(data, split, seen)
    check_model(model, data, queries, what)
    ks = check_k(k, data.n_items)
    model.eval()
    user_emb = embed_users(model, queries, batch_size, progress)
    item_emb = item_vectors(model)
    scores, ranked = retrieve(user_emb, item_emb, queries.seen, ks[-1], retrieval,
                              batch_size, progress)  # fmt: skip
    check_finite(user_emb, item_emb, scores, queries, what)
    ranks = exact_target_ranks(user_emb, item_emb, queries, batch_size)
    approximate = ranked if retrieval.index != "flat" else None
    listed = listed_targets(ranks, queries.targets, ks[-1], approximate)
    per_user = pl.DataFrame(
        {USER_IDX: queries.user_idx, **per_user_ranking(listed, queries.targets, ks),
         "entropy": _entropy(user_emb, item_emb, kl_chunk, batch_size)}  # fmt: skip
    )
    if (truth := synthetic_truth(data)) is not None:
        per_user = per_user.with_columns(
            pl.Series(name, values) for name, values in
            topk_truth_metrics(data, truth, queries.user_idx, ranked, queries.seen, ks).items()
        )  # fmt: skip
    aggregates = _means(per_user, USER_IDX)
    aggregates |= beyond_accuracy(ranked, ks, train_popularity(data), head_fraction)
    counts = {
        "users": len(queries),
        "users_no_history": queries.n_no_history,
        "targets": int(sum(len(t) for t in queries.targets)),
        # seen=remove: targets the user had consumed before, removed, so guaranteed misses
        "targets_removed_as_seen": int(
            sum(np.isin(t, s).sum() for t, s in zip(queries.targets, queries.seen, strict=True))
        ),
        "catalog_items": data.n_items - 1,
    }
    per_request = None
    kind = request_metrics_kind(data)
    # The Coat paper protocol scores every user's random items, liked or not.
    imp_queries = request_queries(data, split, seen) if kind == "mcar" else queries
    imp = build_impressions(data, imp_queries, unclicked=kind == "mcar")
    if imp is not None:
        imp_users = user_emb if imp_queries is queries else embed_users(
            model, imp_queries, batch_size, False)  # fmt: skip
        imp_scores = _gather_scores(imp_users, item_emb, imp.query_row, imp.item_idx)
        per_request = pl.DataFrame(
            {"request_id": np.unique(imp.request_id),
             **per_request_metrics(imp_scores, imp, kind)}  # fmt: skip
        )
        aggregates |= {request_metric_name(kind, c): v
                       for c, v in _means(per_request, "request_id").items()}  # fmt: skip
        if kind == "mcar":
            aggregates["coat_paper/auc"] = metrics.global_auc(imp_scores, imp.clicked)
        counts["requests"] = per_request.height
    pair_scores = None
    if data.has_pairs(split) and (pairs := data.pairs(split)).height:
        pair_scores = score_pairs(model, pairs, batch_size, progress)
        aggregates["preference_accuracy"] = metrics.preference_accuracy(
            pair_scores.chosen, pair_scores.rejected, pair_scores.mask
        )
        counts["pairs"] = pairs.height
    return EvalResult(split, ks, per_user, aggregates, counts, ranked, scores, user_emb,
                      item_emb, per_request, pair_scores, request_metrics=kind)  # fmt: skip


@dataclass(frozen=True)
class Delta:
    """policy - reference of one metric: the mean paired difference and its bootstrap CI."""

    mean: float
    lo: float
    hi: float

    @property
    def significant(self) -> bool:
        """The CI excludes 0."""
        return self.lo > 0 or self.hi < 0


@dataclass
class Comparison:
    """Policy vs reference on the same queries. `per_user` joins both models' per-user metrics
    (suffixes /policy, /reference), their deltas (/delta) and kl; `deltas` maps each per-user
    (and `impression/` or `mcar/` per-request) metric to its Delta."""

    policy: EvalResult
    reference: EvalResult
    per_user: pl.DataFrame
    deltas: dict[str, Delta]
    aggregates: dict[str, float] = field(default_factory=dict)
    ci: float = 0.95
    ope: dict | None = None  # the off-policy section (recsys_dpo.evaluation.counterfactual)


def _paired(
    ref: pl.DataFrame, pol: pl.DataFrame, key: str, n_resamples: int, seed: int, ci: float
) -> tuple[pl.DataFrame, dict[str, Delta]]:
    """Both tables side by side with /delta columns, and the bootstrap Delta of each metric."""
    names = [c for c in pol.columns if c != key]
    table = pl.DataFrame({key: pol[key]})
    deltas = {}
    for name in names:
        a, b = ref[name].to_numpy(), pol[name].to_numpy()
        table = table.with_columns(
            pl.Series(f"{name}/policy", b), pl.Series(f"{name}/reference", a),
            pl.Series(f"{name}/delta", b - a),
        )  # fmt: skip
        if not np.isnan(b - a).all():
            mean, lo, hi = metrics.paired_bootstrap_ci(a, b, n_resamples, seed, alpha=1 - ci)
            deltas[name] = Delta(mean, lo, hi)
    return table, deltas


def compare(
    policy: Recommender,
    reference: Recommender,
    data: PreparedDataset | str | Path,
    split: str = "test",
    k: Sequence[int] = (10, 20, 50),
    n_resamples: int = 1000,
    seed: int = 0,
    *,
    ci: float = 0.95,
    names: tuple[str, str] = ("the policy", "the reference"),
    **evaluate_kwargs: Any,
) -> Comparison:
    """Evaluate policy and reference on identical queries; paired bootstrap CIs of every
    per-user (and per-request) metric difference, exact KL(policy || reference) per user, and
    the mean unscaled log-ratio margin on the split's pairs (`log_ratio_margin`). `names`
    (policy, reference) name the models in errors, e.g. by their checkpoints;
    `evaluate_kwargs` go to `evaluate`."""
    data = data if isinstance(data, PreparedDataset) else load_prepared(data)
    if policy.n_items != reference.n_items:
        raise DataError(
            f"the policy has n_items={policy.n_items} but the reference n_items="
            f"{reference.n_items}: they were trained on different datasets"
        )
    queries = build_queries(data, split, evaluate_kwargs.pop("seen", DEFAULT_SEEN))
    run = dict(data=data, split=split, k=k, queries=queries, **evaluate_kwargs)
    ref = evaluate(reference, what=names[1], **run)
    pol = evaluate(policy, what=names[0], **run)
    per_user, deltas = _paired(ref.per_user, pol.per_user, USER_IDX, n_resamples, seed, ci)
    chunk = evaluate_kwargs.get("kl_chunk", 65536)
    batch_size = evaluate_kwargs.get("batch_size", 1024)
    kl = _kl(pol.user_emb, pol.item_emb, ref.user_emb, ref.item_emb, chunk, batch_size)
    per_user = per_user.with_columns(pl.Series("kl", kl))
    aggregates = {"kl": float(kl.mean())}
    if pol.per_request is not None and ref.per_request is not None:
        _, request_deltas = _paired(ref.per_request, pol.per_request, "request_id",
                                    n_resamples, seed, ci)  # fmt: skip
        deltas |= {request_metric_name(pol.request_metrics, name): d
                   for name, d in request_deltas.items()}  # fmt: skip
    if pol.pairs is not None and ref.pairs is not None:
        aggregates["log_ratio_margin"] = metrics.reward_margin_mean(
            pol.pairs.chosen - ref.pairs.chosen, pol.pairs.rejected - ref.pairs.rejected,
            pol.pairs.mask,
        )  # fmt: skip
    return Comparison(pol, ref, per_user, deltas, aggregates, ci)
