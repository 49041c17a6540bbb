"""The A/B candidate bundle: everything serving needs, in one directory (DESIGN.md, "Tracking
and export"), servable with torch, numpy and faiss alone (serve.py) or as an MLflow pyfunc.

    user_tower.pt2       the user tower, torch.export'ed: (user_idx [B] int64, context
                         [B, max_len] int64, left-padded with 0, most recent item last) ->
                         user vectors [B, d] float32; B is dynamic
    item_embeddings.npy  the catalog's vectors [n_items, d] float32 (row 0 padding, zeros)
    index.faiss          exact inner-product index over rows 1..n_items-1: faiss position p is
                         item idx p + 1
    vocab.json           {"items": item_id by item_idx (0: null, padding), "users": user_id
                         by user_idx}; ids are strings
    histories.json       {user_id: [item_id, ...]}: each test user's positives before the test
                         split (event order), the context the evaluator ranked them with
    serve.py             the standalone server (recsys_dpo/export/serve.py)
    requirements.txt     the exact versions of torch, numpy, faiss-cpu, pandas and mlflow that
                         wrote it (serve.py needs the first three; the pyfunc all five)
    model.safetensors    the policy's weights, and model.json its registry name and
                         constructor config (`recsys_dpo.models.build_model`): to rebuild the
                         model in recsys_dpo (fine-tuning, another export)
    policy.ckpt          the policy checkpoint itself (its sha256 is the manifest's
                         policy_sha256), so the bundle, or its registered version, can be
                         the reference of the next fine-tuning with nothing else at hand
                         (`reference.source`, recsys_dpo/reference_source.py)
    topk.parquet         the evaluator's top-K lists (user_id, rank, item_id, score): what the
                         evaluation measured, and what serve.py answers
    MODEL_CARD.md        how to load it, its input contract, data, metrics with CIs, seen
                         policy, versions, limitations
    manifest.json        written last; a directory without it is incomplete. It holds every
                         file's sha256 (checked by `load_bundle` and serve.py), `seen` (the
                         seen-item policy topk.parquet was ranked under), `serving` (max_len,
                         whether the tower embeds user ids), the policy checkpoint's sha256
                         and the dataset hash, and, for a policy fine-tuned from a
                         `reference.source`, that source's lineage (`reference_source`).
                         Directories 0755, files 0644, so a serving process under another
                         user can read them

`load_bundle(path)` checks every file and serves through the bundle's own serving code
(`recsys_dpo.export.serve`), so `Bundle.recommend` answers exactly what serve.py and the MLflow
pyfunc (`log_pyfunc`, recsys_dpo/export/pyfunc_model.py) answer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import faiss
import mlflow.pyfunc
import numpy as np
import pandas as pd
import polars as pl
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array
from safetensors.torch import save_model
from torch import Tensor, nn

from recsys_dpo.artifacts import atomic_dir, read_manifest, verify_files, write_manifest
from recsys_dpo.data.schema import ITEM_IDX, USER_IDX
from recsys_dpo.data.vocab import Vocab
from recsys_dpo.errors import DataError
from recsys_dpo.export import serve
from recsys_dpo.models import Recommender
from recsys_dpo.retrieval.index import build_index, save_index

SERVE_FILE = Path(serve.__file__)
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
# What serve.py (torch, numpy, faiss) and the pyfunc (also pandas, mlflow) import.
SERVING_PACKAGES = ("torch", "numpy", "faiss-cpu", "pandas", "mlflow")


def requirements() -> list[str]:
    """Exact pins of SERVING_PACKAGES as installed here. A local version label (torch's
    "+cpu") is dropped, so the pin resolves on any index; faiss is pinned as faiss-cpu at the
    version of the faiss installed (a faiss-gpu install has no faiss-cpu distribution)."""
    installed = {name: version(name) for name in SERVING_PACKAGES if name != "faiss-cpu"}
    installed["faiss-cpu"] = faiss.__version__
    return [f"{name}=={installed[name].split('+')[0]}" for name in SERVING_PACKAGES]


class UserTower(nn.Module):
    """`model.user_embeddings` as a function of two tensors, the form torch.export takes."""

    def __init__(self, model: Recommender) -> None:
        super().__init__()
        self.model = model

    def forward(self, user_idx: Tensor, context: Tensor) -> Tensor:
        return self.model.user_embeddings({"user_idx": user_idx, "context": context}).float()


def export_user_tower(model: Recommender, path: Path) -> None:
    """torch.export the user tower (batch dimension dynamic) into `path` (.pt2). Traced at a
    batch of 2: an example batch of 1 would specialise the graph to it."""
    max_len = int(model.config["max_len"])
    example = (torch.zeros(2, dtype=torch.long), torch.ones(2, max_len, dtype=torch.long))
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        program = torch.export.export(UserTower(model.eval()).cpu(), example,
                                      dynamic_shapes={"user_idx": {0: batch},
                                                      "context": {0: batch}})  # fmt: skip
    torch.export.save(program, path)


def write_bundle(
    out_dir: str | Path,
    model: Recommender,
    vocab: Vocab,
    histories: pl.DataFrame,
    topk_path: str | Path,
    card: str,
    manifest: Mapping[str, Any],
    checkpoint: str | Path | None = None,
) -> Path:
    """Write the bundle atomically (manifest last). `histories`: user_id, history (list of
    item_id); `manifest` is stored with the file hashes (put a config_hash and the `seen`
    policy of topk_path in it); `checkpoint`, the model's checkpoint, is copied in as
    policy.ckpt."""
    out_dir = Path(out_dir)
    model = model.eval().cpu()
    with atomic_dir(out_dir) as tmp:
        export_user_tower(model, tmp / "user_tower.pt2")
        with torch.no_grad():
            items = model.item_embeddings().float().numpy()
        np.save(tmp / "item_embeddings.npy", items)
        save_index(build_index(items, kind="flat", use_gpu=False), tmp / "index.faiss")
        item_ids = [None, *vocab.items.sort(ITEM_IDX)["item_id"].to_list()]
        user_ids = vocab.users.sort(USER_IDX)["user_id"].to_list()
        (tmp / "vocab.json").write_text(json.dumps({"items": item_ids, "users": user_ids}))
        rows = histories.select("user_id", "history").iter_rows()
        (tmp / "histories.json").write_text(json.dumps(dict(rows)))
        shutil.copyfile(SERVE_FILE, tmp / "serve.py")
        (tmp / "requirements.txt").write_text("\n".join(requirements()) + "\n")
        # save_model (not save_file) because SASRec ties its output layer to the item table.
        save_model(model, str(tmp / "model.safetensors"))
        spec = {"name": model.name, "config": dict(model.config)}
        (tmp / "model.json").write_text(json.dumps(spec, indent=2))
        shutil.copyfile(topk_path, tmp / "topk.parquet")
        if checkpoint is not None:
            shutil.copyfile(checkpoint, tmp / "policy.ckpt")
        (tmp / "MODEL_CARD.md").write_text(card)
        write_manifest(tmp, {"stage": "export", **manifest, "serving": serving_spec(model)})
    return out_dir


def serving_spec(model: Recommender) -> dict[str, Any]:
    """What serve.py needs to know of the model: its context width and whether the tower
    embeds user ids (then a bare history cannot be scored)."""
    return {"model": model.name, "max_len": int(model.config["max_len"]),
            "embeds_user_ids": model.embeds_user_ids}  # fmt: skip


@dataclass
class Bundle:
    """A loaded bundle, served by its serving code (`recsys_dpo.export.serve.Recommender`)."""

    path: Path
    served: serve.Recommender

    @property
    def histories(self) -> dict[str, list[str]]:
        return self.served.histories

    def recommend(self, query: str | int | Sequence[str], k: int = 10) -> list[tuple[str, float]]:
        """Top-k (item_id, score) over the whole catalog for a user_id (their stored history)
        or a history of item ids (oldest first; unknown ids are ignored), the history's items
        left out as the seen policy the evaluation ranked topk.parquet under says (the
        manifest's `seen`, `recsys_dpo/retrieval/seen.py`): topk.parquet's lists exactly.
        DataError for an unknown user, or a bare history for a model that embeds user ids."""
        query = str(query) if isinstance(query, (str, int)) else [str(i) for i in query]
        try:
            return self.served.recommend(query, k)
        except serve.BundleError as err:
            raise DataError(f"{self.path}: {err}") from None


def load_bundle(path: str | Path) -> Bundle:
    """A bundle from its directory alone; DataError if it is incomplete or a file's sha256 is
    not the manifest's (a corrupt or replaced file is never served)."""
    path = Path(path)
    verify_files(path, read_manifest(path))
    return Bundle(path=path, served=serve.Recommender(path, check=False))


SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, "user_id", required=False),
                   ColSpec(Array(DataType.string), "history", required=False),
                   ColSpec(DataType.long, "k", required=False)]),
    outputs=Schema([ColSpec(DataType.long, "row"), ColSpec(DataType.string, "user_id"),
                    ColSpec(DataType.long, "rank"), ColSpec(DataType.string, "item_id"),
                    ColSpec(DataType.double, "score")]),
)  # fmt: skip


def log_pyfunc(bundle: Path, name: str, source_run: str) -> str:
    """Log the bundle as a pyfunc model on the active run (models-from-code, pyfunc_model.py,
    with serve.py in its code_paths and the bundle's pinned requirements.txt: loading it needs
    no recsys_dpo) and register it as a version of `name` whose source run is `source_run`
    (the run holding the evaluation metrics) and whose description is MODEL_CARD.md; the
    version."""
    user = next(iter(json.loads((bundle / "histories.json").read_text())))
    info = mlflow.pyfunc.log_model(
        name="candidate", python_model=str(PYFUNC_FILE), artifacts={"bundle": str(bundle)},
        code_paths=[str(bundle / "serve.py")], signature=SIGNATURE,
        input_example=pd.DataFrame({"user_id": [user], "k": [10]}),
        pip_requirements=(bundle / "requirements.txt").read_text().split(),
    )  # fmt: skip
    client = mlflow.MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in map(ErrorCode.Name, (RESOURCE_ALREADY_EXISTS, ALREADY_EXISTS)):
            raise
    version = client.create_model_version(
        name, source=info.model_uri, run_id=source_run, model_id=info.model_id,
        description=(bundle / "MODEL_CARD.md").read_text(),
    )  # fmt: skip
    return str(version.version)


def git_sha() -> str:
    """The commit of the checkout recsys_dpo runs from, flagged when its tracked files have
    uncommitted changes; "unknown" outside a git checkout (an installed package)."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10)  # fmt: skip

    try:
        head, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except OSError:  # no git
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def _metric_line(name: str, metrics: Mapping[str, Any]) -> str:
    models = metrics["models"]
    pol, ref = models["policy"].get(name), models["reference"].get(name)
    delta = metrics.get("deltas", {}).get(name)
    ci = "" if delta is None else f"{delta['mean']:+.4f} [{delta['lo']:+.4f}, {delta['hi']:+.4f}]"
    fmt = "{:.4f}".format
    return f"| {name} | {fmt(pol)} | {fmt(ref)} | {ci} |"


def model_card(
    name: str, data: Mapping[str, Any], objective: Mapping[str, Any], metrics: Mapping[str, Any],
    primary: str, better: bool, model: Recommender, seen: str,
    window: tuple[int, int] | None, lineage: str | None = None,
) -> str:  # fmt: skip
    """MODEL_CARD.md from the evaluator's metrics.json payload (both models, deltas, CIs), the
    model's serving contract, the seen policy and `window`, the (min, max) timestamp of the
    training events; `lineage`, a provenance line naming the reference it was fine-tuned from
    (`recsys_dpo.reference_source.Lineage.card_line`)."""
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
        *_serving_lines(name, model, seen),
        "## Provenance",
        "",
        f"- code: git {git_sha()}",
        f"- libraries: {', '.join(requirements() + [f'{p}=={version(p)}' for p in TRAINING])}",
        f"- data window: {_window(window)}",
        *([] if lineage is None else [lineage]),
        "",
        "## Known limitations",
        "",
        *LIMITATIONS,
        "",
    ]
    return "\n".join(lines)


# Besides SERVING_PACKAGES, what trained it (the model card's versions).
TRAINING = ("lightning", "polars")
LIMITATIONS = (
    "- histories.json is a snapshot at the test cut: a known user is served with the history "
    "the evaluation ranked them with, which does not grow. Live traffic should pass each "
    "user's current history (models that read histories).",
    "- Users of the vocabulary without a test event have no stored history: they are served "
    "as an empty history.",
    "- The index is exact (flat): search time grows with the catalog. An approximate index "
    "built from item_embeddings.npy (faiss IVF / HNSW) is faster but no longer answers "
    "topk.parquet exactly.",
    "- Offline evidence only: metrics on a held-out split of logged data; the online lift, "
    "when shown, is an off-policy estimate from logged propensities.",
    "- user_tower.pt2 is a torch.export program of torch 2.13 (CPU, float32): load it with "
    "the pinned torch (requirements.txt).",
)


def _window(window: tuple[int, int] | None) -> str:
    """The training data's timestamps: raw, and as UTC dates when they look like unix
    seconds (logs without time carry a per-user order index instead)."""
    if window is None:
        return "unknown"
    lo, hi = window
    text = f"timestamp {lo} .. {hi} (training split)"
    if lo > 10**8:  # after 1973 as unix seconds: an order index never gets that large
        dates = [np.datetime_as_string(np.datetime64(t, "s")) for t in window]
        text += f", {dates[0]}Z .. {dates[1]}Z"
    return text


def _serving_lines(name: str, model: Recommender, seen: str) -> list[str]:
    """How to load the bundle and what a query may be, for this model."""
    spec = serving_spec(model)
    if spec["embeds_user_ids"]:
        cold = ("its tower embeds the user id, so only users of vocab.json can be served: an "
                "unknown user_id is an error, and so is a bare history")  # fmt: skip
    else:
        cold = ("an unknown user_id is an error; serve a new user by their history instead "
                "(an empty history is allowed: "
                + ("the model's learned empty-history vector)" if model.name == "sasrec"
                   else "a zero pooled history)"))  # fmt: skip
    seen_rule = {"remove": "every item of the query's history is left out of its top-K",
                 "keep": "nothing is left out: items of the history can be recommended again"}
    return [
        "## How to load it",
        "",
        "```bash",
        "pip install -r requirements.txt               # torch, numpy, faiss-cpu (+ pandas, "
        "mlflow for the pyfunc)",
        "python serve.py <bundle dir> <user_id> 10     # or: --history <item_id> ...",
        f"MLFLOW_TRACKING_URI=<tracking.uri> mlflow models serve -m 'models:/{name}@candidate' "
        "--env-manager local -p 5000",
        "```",
        "",
        "In Python: `serve.Recommender(<bundle dir>).recommend(user_id or [item_id, ...], k)` "
        "(serve.py, torch + numpy + faiss only), `mlflow.pyfunc.load_model('models:/"
        f"{name}@candidate').predict(pd.DataFrame({{'user_id': [...], 'k': [10]}}))`, or "
        "`recsys_dpo.export.bundle.load_bundle(<bundle dir>).recommend(...)`. Each checks the "
        "sha256 of the files it loads against manifest.json.",
        "",
        "## Input contract",
        "",
        f"- model: {model.name}; user_tower.pt2 takes user_idx [B] int64 and context [B, "
        f"{spec['max_len']}] int64 (left-padded with 0, most recent item last) and returns "
        f"user vectors [B, {model.config.get('dim')}] float32; scores are inner products "
        "with item_embeddings.npy.",
        "- ids are strings: user_id and item_id exactly as in vocab.json (and the training log).",
        "- a query is a known user_id (served with its stored history, histories.json) or a "
        "history of item ids, oldest first; unknown item ids are ignored; the model reads the "
        f"last {spec['max_len']} known items (max history length), the seen policy all of them.",
        f"- cold start: {cold}.",
        "- k: 1 up to the catalog size; ties in score are ordered by item index (vocab.json).",
        "",
        "## Seen policy",
        "",
        f"- `{seen}` (eval.seen, manifest.json `seen`): {seen_rule[seen]}. The evaluation "
        "(topk.parquet and every metric above) and every loader of this bundle apply the same "
        "rule, so what is served is what was evaluated.",
        "",
    ]


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
