"""How much of the gap to the published Coat tables is protocol: the coat_paper/* metrics of a
study's trained models, re-scored with the published code's relevance threshold (rating >= 3,
`binarize`) besides ours (>= 4), and with the global AUC computed on log pi(i|u) (the model's
own log-probability, comparable across users) besides the raw score s(u, i) (a softmax model's
score carries a per-user offset that a pooled AUC reads as signal).

    PYTHONPATH=. python benchmarks/coat_protocol.py benchmarks/results/study_coat_mf.json \
        artifacts/prepared/coat reference dpo sft

Prints a markdown table: entry, threshold, score, coat_paper/auc, ndcg_at_5, recall_at_5 (mean
± sd over the study's references). No test read selects anything: the models are the study's.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

from recsys_dpo.data.datamodule import load_prepared
from recsys_dpo.data.schema import ITEM_IDX, USER_IDX
from recsys_dpo.evaluation.evaluator import embed_users, item_vectors, request_queries
from recsys_dpo.evaluation.metrics import coat_paper_ranking, global_auc
from recsys_dpo.training.reference_module import load_model


def scores(run: str, data, test) -> dict[str, np.ndarray]:
    """raw s(u, i) and log-softmax log pi(i|u) over the catalog, at each test row."""
    result = json.loads((Path(run) / "result.json").read_text())
    model = load_model(result["best_ckpt"] or result["last_ckpt"])
    queries = request_queries(data, "test")
    with torch.no_grad():
        users, items = embed_users(model, queries), item_vectors(model)
        logits = (users @ items.T).double()
        logits[:, 0] = -torch.inf  # the padding item is no candidate
        logp = torch.log_softmax(logits, dim=1)
    row = np.searchsorted(queries.user_idx, test[USER_IDX].to_numpy())
    col = test[ITEM_IDX].to_numpy()
    return {"raw": logits.numpy()[row, col], "log_pi": logp.numpy()[row, col]}


def main(study: str, prepared: str, *entries: str) -> None:
    data = load_prepared(prepared)
    test = data.events("test")
    rating, users = test["rating"].to_numpy(), test[USER_IDX].to_numpy()
    rows = {e["name"]: e for e in json.loads(Path(study).read_text())["rows"]}
    print("| entry | relevant | score | coat_paper/auc | coat_paper/ndcg_at_5 | "
          "coat_paper/recall_at_5 |\n|---|---|---|---:|---:|---:|")
    for name in entries:
        per_ref = [scores(seeds[0], data, test) for seeds in rows[name]["runs"]]
        for threshold in (4, 3):
            relevant = rating >= threshold
            for kind in ("raw", "log_pi"):
                auc = [global_auc(s[kind], relevant) for s in per_ref]
                rank = [coat_paper_ranking(s[kind], relevant, users, 5) for s in per_ref]
                ndcg = [r["ndcg_at_5"].mean() for r in rank]
                recall = [r["recall_at_5"].mean() for r in rank]
                cells = [f"{np.mean(v):.4f} ± {np.std(v, ddof=1):.4f}" for v in (auc, ndcg, recall)]
                print(f"| {name} | rating >= {threshold} | {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
