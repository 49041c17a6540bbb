"""False negatives among the preference negatives: how often a train pair row's rejected items
hold that user's held-out (valid or test) item, for the prepared dataset's own negatives and
for `reference_hard` negatives at several skips.

    python benchmarks/hard_negative_hits.py artifacts/study-ml1m/prepared/ml1m_sas <ref.ckpt> \\
        --skips 0 10 50 --out benchmarks/results/hard_negative_hits_ml1m.json

A diagnostic, not a training input: it reads the held-out splits only to count. The pair rows
are those the study fine-tunes on (each user's latest --max-pairs-per-user train events), with
--num negatives each. Also reports the rate per negative slot (slot 0 = the reference's top
unchosen item after the skip), which shows how the false negatives crowd the top ranks.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl
import torch

from recsys_dpo.data.datamodule import PairDataModule
from recsys_dpo.data.schema import ITEM_IDX, USER_IDX
from recsys_dpo.training.reference_module import load_model, trained_on
from recsys_dpo.training.run import use_reference_hard_negatives


def held_out_items(data: PairDataModule) -> torch.Tensor:
    """[n_users, h] item indices of each user's valid and test events, -1 padded."""
    events = pl.concat([data.dataset.events("valid"), data.dataset.events("test")])
    lists = events.group_by(USER_IDX).agg(pl.col(ITEM_IDX))
    width = int(lists[ITEM_IDX].list.len().max() or 1)
    out = torch.full((data.n_users, width), -1, dtype=torch.long)
    for user, items in lists.iter_rows():
        out[user, : len(items)] = torch.tensor(items)
    return out


def hit_rates(rejected: torch.Tensor, users: torch.Tensor, held_out: torch.Tensor) -> dict:
    """Share of rows whose negatives hold a held-out item, overall and per negative slot."""
    per_slot = (rejected.unsqueeze(-1) == held_out[users].unsqueeze(1)).any(-1)  # [R, N]
    return {
        "rows_with_held_out": float(per_slot.any(-1).float().mean()),
        "per_slot": [round(float(v), 4) for v in per_slot.float().mean(0)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prepared", type=Path)
    parser.add_argument("reference", type=Path)
    parser.add_argument("--num", type=int, default=16, help="negatives per pair row")
    parser.add_argument("--skips", type=int, nargs="+", default=[0, 10])
    parser.add_argument("--max-pairs-per-user", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    data = PairDataModule(
        args.prepared, args.max_len, max_negatives=args.num, batch_size=1024,
        max_pairs_per_user=args.max_pairs_per_user,
    )  # fmt: skip
    data.setup()
    held_out = held_out_items(data)
    users = data.train_set.columns[USER_IDX]
    rejected = data.train_set.columns["rejected"].take(torch.arange(len(users)))
    result = {"rows": len(users), "num_negatives": args.num,
              "dataset_negatives": hit_rates(rejected, users, held_out)}  # fmt: skip
    reference = load_model(args.reference, trained_on(data.dataset), str(args.reference),
                           dropout=0.0)  # fmt: skip
    for skip in args.skips:
        use_reference_hard_negatives(data, reference, args.num, skip, progress=True)
        result[f"reference_hard_skip{skip}"] = hit_rates(
            data.train_set.columns["rejected"], users, held_out
        )
    for name, value in result.items():
        if isinstance(value, dict):
            print(f"{name}: {100 * value['rows_with_held_out']:.1f}% of rows; per slot "
                  f"{np.round(100 * np.array(value['per_slot']), 1).tolist()}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
