"""The A/B candidate bundle: everything serving needs, in one directory (DESIGN.md, "Tracking
and export").

    model.safetensors    the policy's weights
    model.json           registry name + constructor config (`recsys_dpo.models.build_model`)
    vocab_items.parquet  item_id <-> item_idx (0 is padding)
    vocab_users.parquet  user_id <-> user_idx
    histories.parquet    user_id, history: each known user's positives (original ids, event
                         order), so a user can be served by id
    index.faiss          inner-product index over the item embeddings, rows 1..N-1 (padding
                         excluded): faiss position p is item idx p + 1
    topk.parquet         the evaluator's top-K lists (user_id, rank, item_id, score)
    MODEL_CARD.md        data, objective, metrics against the reference with CIs, KL, popularity
    manifest.json        written last; a directory without it is incomplete. It holds every
                         file's sha256 (checked by `load_bundle`), the policy checkpoint's
                         sha256 and the dataset hash. Directories 0755, files 0644, so a
                         serving process under another user can read them

`load_bundle(path)` rebuilds the model from these files alone; `Bundle.recommend` ranks the
whole catalog for a user id or a raw history, the history's items removed, in original ids.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import mlflow.pyfunc
import numpy as np
import pandas as pd
import polars as pl
import torch
from safetensors.torch import load_model, save_model

from recsys_dpo.artifacts import atomic_dir, read_manifest, verify_files, write_manifest
from recsys_dpo.data.schema import ITEM_IDX, USER_IDX
from recsys_dpo.data.vocab import Vocab
from recsys_dpo.errors import DataError
from recsys_dpo.models import Recommender, build_model
from recsys_dpo.retrieval.index import EMPTY_ITEM, build_index, load_index, save_index, search
from recsys_dpo.retrieval.seen import DEFAULT_SEEN, removed_items

HISTORIES_FILE = "histories.parquet"


def write_bundle(
    out_dir: str | Path,
    model: Recommender,
    vocab: Vocab,
    histories: pl.DataFrame,
    topk_path: str | Path,
    card: str,
    manifest: Mapping[str, Any],
) -> Path:
    """Write the bundle atomically (manifest last). `histories`: user_id, history (list of
    item_id); `manifest` is stored with the file hashes (put a config_hash in it)."""
    out_dir = Path(out_dir)
    model = model.eval()
    with atomic_dir(out_dir) as tmp:
        # save_model (not save_file) because SASRec ties its output layer to the item table.
        save_model(model, str(tmp / "model.safetensors"))
        spec = {"name": model.name, "config": dict(model.config)}
        (tmp / "model.json").write_text(json.dumps(spec, indent=2))
        vocab.save(tmp)
        histories.select("user_id", "history").write_parquet(tmp / HISTORIES_FILE)
        with torch.no_grad():
            items = model.item_embeddings().float().cpu().numpy()
        save_index(build_index(items, kind="flat", use_gpu=False), tmp / "index.faiss")
        shutil.copyfile(topk_path, tmp / "topk.parquet")
        (tmp / "MODEL_CARD.md").write_text(card)
        write_manifest(tmp, {"stage": "export", **manifest})
    return out_dir


@dataclass
class Bundle:
    """A loaded bundle: the model (eval mode, CPU), its vocab, item index and user histories."""

    path: Path
    model: Recommender
    vocab: Vocab
    index: faiss.Index
    histories: dict[str, list[str]]

    def __post_init__(self) -> None:
        items = self.vocab.items
        self._item_idx = dict(zip(items["item_id"], items[ITEM_IDX].to_list(), strict=True))
        ids = np.empty(self.vocab.n_items, dtype=object)
        ids[items[ITEM_IDX].to_numpy()] = items["item_id"].to_numpy()
        self._item_id = ids
        users = self.vocab.users
        self._user_idx = dict(zip(users["user_id"], users[USER_IDX].to_list(), strict=True))

    def _query(self, query: str | int | Sequence[str]) -> tuple[int, list[str]]:
        """(user_idx, history item ids) of a user id or a raw history."""
        if isinstance(query, (str, int)):
            user = str(query)
            if user not in self._user_idx:
                raise DataError(f"{self.path}: unknown user_id {user!r} (not in vocab_users)")
            return self._user_idx[user], self.histories.get(user, [])
        if self.model.config.get("use_user_id", False):
            raise DataError(
                f"{self.path}: this {self.model.name} embeds user ids, so it cannot score an "
                "anonymous history: pass a known user_id"
            )
        return 0, [str(i) for i in query]

    @torch.no_grad()
    def recommend(self, query: str | int | Sequence[str], k: int = 10) -> list[tuple[str, float]]:
        """Top-k (item_id, score) over the whole catalog for a user_id (their stored history)
        or a history of item ids (oldest first; unknown ids are ignored), the history's items
        left out as the seen policy the evaluation ranked topk.parquet under says (the
        manifest's `seen`, `recsys_dpo/retrieval/seen.py`; bundles without it removed the
        whole history: `remove`)."""
        seen = read_manifest(self.path).get("seen", DEFAULT_SEEN)
        user_idx, history = self._query(query)
        known = [self._item_idx[i] for i in history if i in self._item_idx]
        max_len = int(self.model.config["max_len"])
        context = torch.zeros(1, max_len, dtype=torch.long)
        tail = known[-max_len:]
        if tail:
            context[0, -len(tail) :] = torch.tensor(tail)
        batch = {"user_idx": torch.tensor([user_idx]), "context": context}
        user = self.model.user_embeddings(batch).float().numpy()
        k = min(k, self.index.ntotal)
        scores, items = search(self.index, user, k, [removed_items(np.asarray(known), seen)])
        keep = items[0] != EMPTY_ITEM
        return [
            (str(self._item_id[i]), float(s))
            for i, s in zip(items[0][keep], scores[0][keep], strict=True)
        ]


def load_bundle(path: str | Path) -> Bundle:
    """Rebuild a bundle from its directory alone; DataError if it is incomplete or a file's
    sha256 is not the manifest's (a corrupt or replaced file is never served)."""
    path = Path(path)
    verify_files(path, read_manifest(path))
    spec = json.loads((path / "model.json").read_text())
    model = build_model(spec["name"], **{**spec["config"], "dropout": 0.0})
    load_model(model, str(path / "model.safetensors"))
    histories = pl.read_parquet(path / HISTORIES_FILE)
    return Bundle(
        path=path,
        model=model.eval(),
        vocab=Vocab.load(path),
        index=load_index(path / "index.faiss"),
        histories=dict(zip(histories["user_id"], histories["history"].to_list(), strict=True)),
    )


class BundleModel(mlflow.pyfunc.PythonModel):
    """The bundle as an MLflow pyfunc: input rows with `user_id` (and optional `k`), output
    one row per recommendation (user_id, rank, item_id, score)."""

    def load_context(self, context: Any) -> None:
        self.bundle = load_bundle(context.artifacts["bundle"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        rows = []
        for record in model_input.to_dict("records"):
            recs = self.bundle.recommend(str(record["user_id"]), int(record.get("k", 10)))
            rows += [(record["user_id"], r, i, s) for r, (i, s) in enumerate(recs, start=1)]
        return pd.DataFrame(rows, columns=["user_id", "rank", "item_id", "score"])


def _metric_line(name: str, metrics: Mapping[str, Any]) -> str:
    models = metrics["models"]
    pol, ref = models["policy"].get(name), models["reference"].get(name)
    delta = metrics.get("deltas", {}).get(name)
    ci = "" if delta is None else f"{delta['mean']:+.4f} [{delta['lo']:+.4f}, {delta['hi']:+.4f}]"
    fmt = "{:.4f}".format
    return f"| {name} | {fmt(pol)} | {fmt(ref)} | {ci} |"


def model_card(
    name: str, data: Mapping[str, Any], objective: Mapping[str, Any], metrics: Mapping[str, Any],
    primary: str, better: bool,
) -> str:  # fmt: skip
    """MODEL_CARD.md from the evaluator's metrics.json payload (both models, deltas, CIs)."""
    pol = metrics["models"]["policy"]
    names = [n for n in metrics["models"]["reference"] if n in pol and not n.startswith("imp")]
    k = min(metrics["k"])
    comparison = metrics.get("comparison", {})
    verdict = "beats" if better else "does not beat"
    lines = [
        f"# {name}",
        "",
        f"- data: {data.get('name')} ({data.get('reader', {}).get('path')}), split "
        f"{data.get('split', {}).get('kind')}; evaluated on {metrics['split']} "
        f"({metrics['counts'].get('users')} users, full catalog of "
        f"{metrics['counts'].get('catalog_items')} items)",
        f"- objective: {objective.get('name')}, beta = {objective.get('beta')}",
        f"- verdict: the candidate {verdict} the reference on {primary} "
        f"(paired bootstrap {metrics.get('ci', 0.95):.0%} CI lower bound > 0 required)",
        f"- KL(candidate || reference), mean per user: {comparison.get('kl', float('nan')):.4f} "
        "nats",
        f"- popularity shift @{k}: average popularity {pol.get(f'avg_popularity_at_{k}', 0):.2f} vs "
        f"{metrics['models']['reference'].get(f'avg_popularity_at_{k}', 0):.2f} (reference); tail "
        f"share {pol.get(f'tail_share_at_{k}', 0):.3f} vs "
        f"{metrics['models']['reference'].get(f'tail_share_at_{k}', 0):.3f}",
        "",
        _online_line(metrics),
        "",
        "| metric | candidate | reference | delta [CI] |",
        "|---|---:|---:|---|",
        *(_metric_line(n, metrics) for n in names),
        "",
    ]
    return "\n".join(lines)


def _online_line(metrics: Mapping[str, Any]) -> str:
    """The estimated online lift (off-policy, SNIPS) with its CI and diagnostics, or why the
    log gave none."""
    section = metrics.get("ope")
    if section is None:
        return "- estimated online lift: none, off-policy evaluation was off (eval.ope.enabled)"
    if "skipped" in section:
        return f"- estimated online lift: none, {section['skipped']}"
    lift, diag = section["lift"]["snips"], section["models"]["policy"]["diagnostics"]
    exact = section.get("exact_lift")
    return (f"- estimated online lift in click-through rate (SNIPS, off-policy on "
            f"{section['counts']['requests']:,} logged requests): {lift['value']:+.4f} "
            f"[{lift['lo']:+.4f}, {lift['hi']:+.4f}]; candidate ESS {diag['ess']:,.0f} "
            f"({diag['ess_share']:.1%}), max weight {diag['max_weight']:.1f}"
            + (f"; true lift on the simulator {exact:+.4f}" if exact is not None else ""))
