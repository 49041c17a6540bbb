"""A finished retraining replay's windows, broken down: each window's test NDCG@k of the
production model it was compared with, of its candidate and of the most-popular-unseen
baseline (train popularity of the window), over all test users and over the new users (no
event before the test periods: ranked from an empty history) and the known ones apart, with
the candidate - production paired bootstrap CI within each group (95%, seed 0, as the
replay's own with the default `eval.ci` and `seed`); a group of fewer than 2 users gets its
count only.

    python benchmarks/retrain_breakdown.py benchmarks/results/retrain_ml100k.json \\
        artifacts/prepared/ml100k_monthly --out benchmarks/results/retrain_ml100k_breakdown.json

Reads the replay's table (`retrain.json`: each window's candidate checkpoint and the version
of production) and its prepared windows (`<prepared>/window-<w>`); scores the checkpoints again
on each window's test split with the replay's evaluator (same seen policy, ties, full catalog).
"""

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl

from recsys_dpo.data.datamodule import load_prepared
from recsys_dpo.data.schema import USER_IDX
from recsys_dpo.evaluation.evaluator import evaluate, train_popularity
from recsys_dpo.evaluation.metrics import paired_bootstrap_ci
from recsys_dpo.retrain import new_users
from recsys_dpo.study.popularity import MostPopular
from recsys_dpo.training.reference_module import load_model, trained_on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("replay", type=Path, help="the replay's retrain.json")
    parser.add_argument("prepared", type=Path, help="the replay's prepared dir (window-<w> in it)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--n-resamples", type=int, default=1000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = json.loads(args.replay.read_text())
    ckpt = {r["candidate"]: r["ckpt"] for r in rows}
    metric = f"ndcg_at_{args.k}"
    out = []
    for row in rows:
        data = load_prepared(args.prepared / f"window-{row['window']}")
        models = {"candidate": load_model(row["ckpt"], trained_on(data)),
                  "most_popular": MostPopular(train_popularity(data))}  # fmt: skip
        if row["production"] is not None:
            models["production"] = load_model(ckpt[row["production"]], trained_on(data))
        # one row per test user, the models side by side (joined on the user, not by position)
        table = None
        for name, model in models.items():
            scored = evaluate(model, data, "test", [args.k]).per_user.select(
                USER_IDX, pl.col(metric).alias(name))
            table = scored if table is None else table.join(scored, on=USER_IDX, how="full",
                                                            coalesce=True)  # fmt: skip
        if table.null_count().sum_horizontal().item():
            raise SystemExit(f"window {row['window']}: the models were scored on different users")
        new = table[USER_IDX].is_in(sorted(new_users(data))).to_numpy()
        window = {"window": row["window"], "test_periods": row["test_periods"],
                  "production": row["production"], "candidate": row["candidate"]}  # fmt: skip
        for group, mask in (("all", np.ones_like(new)), ("new_users", new), ("known_users", ~new)):
            scores = {n: table[n].to_numpy()[mask] for n in models}
            cell = {"users": int(mask.sum())}
            if mask.sum() < 2:  # no mean, or no CI, to speak of
                window[group] = cell
                continue
            cell |= {n: float(v.mean()) for n, v in scores.items()}
            if "production" in scores:
                mean, lo, hi = paired_bootstrap_ci(scores["production"], scores["candidate"],
                                                   args.n_resamples, seed=0)  # fmt: skip
                cell["lift"] = {"mean": float(mean), "lo": float(lo), "hi": float(hi)}
            window[group] = cell
        out.append(window)
        print(json.dumps(window))
    args.out.write_text(json.dumps({"replay": str(args.replay), "metric": metric,
                                    "windows": out}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
