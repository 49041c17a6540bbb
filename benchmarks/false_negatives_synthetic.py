"""False negatives of hard, rank-band and weighted hard negatives on the synthetic log, where the
truth is known.

    python benchmarks/false_negatives_synthetic.py --out benchmarks/results/false_negatives_synthetic.json

Prepares the embedded synthetic log (defaults: 2000 users x 500 items, seed 0), trains a small
SASRec reference (full-catalog CE, a few epochs), and mines the rejected items of the train pair
rows (each user's latest --max-pairs-per-user events) three ways: the reference's top-K unchosen
items (`reference.hard_negatives=K`), K drawn from its ranks --band (`hard_negatives_band`), and
the same top-K with the pair weights w = (1 - pi_ref)^H of `objective.rejected_weight_horizon`.
For each it reports, over the real rejected items:

- future: the share the user clicks in a later event (train, valid or test; under eval.seen=remove
  the miner already drops every train positive, so these are the held-out clicks);
- better: the share whose true utility exceeds the chosen item's (`synthetic.true_utility`);
- for the weights: the same shares weight-averaged, and the mean weight on false negatives vs the
  rest (does w down-weight the false negatives?).

A diagnostic: it reads the held-out splits and the truth only to count. One core, a few minutes.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from hydra import compose, initialize_config_module

from recsys_dpo.data.datamodule import PairDataModule, latest_events
from recsys_dpo.data.schema import ITEM_IDX, PAD_ITEM, USER_IDX
from recsys_dpo.data.synthetic import load_truth, true_utility
from recsys_dpo.training.false_negatives import later_positive_hits
from recsys_dpo.training.reference_module import load_model
from recsys_dpo.training.run import (
    attach_rejected_weights,
    train_reference,
    use_reference_hard_negatives,
)


def shares(future: torch.Tensor, better: torch.Tensor, real: torch.Tensor) -> dict:
    return {
        "rejected_items": int(real.sum()),
        "future_positive_share": round(float(future[real].float().mean()), 4),
        "truly_better_share": round(float(better[real].float().mean()), 4),
    }


def weighted(future: torch.Tensor, better: torch.Tensor, real: torch.Tensor, w: torch.Tensor):
    w, future, better = w[real].double(), future[real], better[real]
    mean = lambda mask: round(float(w[mask].mean()), 4) if mask.any() else None  # noqa: E731
    return {
        "weighted_future_positive_share": round(float((w * future).sum() / w.sum()), 4),
        "weighted_truly_better_share": round(float((w * better).sum() / w.sum()), 4),
        "mean_weight": round(float(w.mean()), 4),
        "mean_weight_future_positive": mean(future),
        "mean_weight_not_future_positive": mean(~future),
        "mean_weight_truly_better": mean(better),
        "mean_weight_truly_worse": mean(~better),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=16, help="negatives per pair row")
    parser.add_argument("--band", type=int, nargs=2, default=[20, 100])
    parser.add_argument("--horizons", type=float, nargs="+", default=[2.0, 10.0, 50.0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--max-pairs-per-user", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--artifacts", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.time()
    root = args.artifacts or Path(tempfile.mkdtemp(prefix="fn-synthetic-"))
    root.mkdir(parents=True, exist_ok=True)
    overrides = [f"paths.artifacts={root}", f"seed={args.seed}", "progress=false",
                 "tracking.enabled=false", "model=sasrec", "model.dim=32", "model.n_layers=1",
                 "model.n_heads=1", "data.max_len=50", "train.batch_size=128", "train.lr=3e-3",
                 f"trainer.max_epochs={args.epochs}"]  # fmt: skip
    with initialize_config_module("recsys_dpo.conf", version_base="1.3"):
        cfg = compose("train_reference", overrides=overrides)
    prepared = Path(cfg.paths.prepared)
    subprocess.run([sys.executable, str(Path(__file__).parents[1] / "pipelines" / "prepare.py"),
                    *overrides[:3]],
                   check=True, cwd=root)  # fmt: skip
    run = json.loads((train_reference(cfg) / "result.json").read_text())
    reference = load_model(run["best_ckpt"] or run["last_ckpt"], dropout=0.0)

    data = PairDataModule(prepared, max_len=50, max_pairs_per_user=args.max_pairs_per_user)
    data.setup()
    pairs = latest_events(data.dataset.pairs("train"), args.max_pairs_per_user)
    events = pl.concat([data.dataset.events(s) for s in ("train", "valid", "test")])
    truth = load_truth(root / "raw" / "synthetic")
    users = pl.read_parquet(prepared / "vocab_users.parquet").sort(USER_IDX)["user_id"]
    items = pl.read_parquet(prepared / "vocab_items.parquet").sort(ITEM_IDX)["item_id"]
    rows = data.train_set
    chosen = rows.columns["chosen"]
    user_ids = users.gather(rows.columns[USER_IDX].numpy()).to_list()
    chosen_utility = true_utility(truth, user_ids, items.gather(chosen.numpy() - 1).to_list())

    def judge(rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        real = rejected != PAD_ITEM
        future = later_positive_hits(pairs, rejected, events)
        width = rejected.shape[1]
        utility = true_utility(truth, np.repeat(user_ids, width).tolist(),
                               items.gather(rejected.clamp_min(1).reshape(-1).numpy() - 1)
                               .to_list()).reshape(-1, width)  # fmt: skip
        better = torch.from_numpy(utility > chosen_utility[:, None])
        return future, better, real

    dataset_rejected = rows.columns["rejected"].take(torch.arange(len(rows)))
    result = {"rows": len(rows), "num_negatives": args.num, "band": args.band,
              "reference": {"epochs": args.epochs, "best_epoch": run.get("best_epoch"), "val_ndcg_at_10": run.get("val/ndcg_at_10")},
              "dataset_impression_negatives": shares(*judge(dataset_rejected))}  # fmt: skip
    use_reference_hard_negatives(data, reference, args.num, 0, progress=False)
    hard = judge(rows.columns["rejected"])
    result["hard_top_k"] = shares(*hard)
    result["hard_top_k_weighted"] = {}
    for horizon in args.horizons:
        attach_rejected_weights(data, reference, horizon, batch_size=512)
        result["hard_top_k_weighted"][f"H={horizon:g}"] = weighted(
            *hard, rows.columns["rejected_weight"]
        )
    use_reference_hard_negatives(data, reference, args.num, 0, progress=False,
                                 band=tuple(args.band), seed=args.seed)  # fmt: skip
    result[f"band_{args.band[0]}_{args.band[1]}"] = shares(*judge(rows.columns["rejected"]))
    result["seconds"] = round(time.time() - started, 1)
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
