"""A finished study's cached aggregate metrics that its table does not show (e.g.
`preference_accuracy`: the share of a split's (chosen, rejected) pairs scored in the right order),
per entry on valid and test, mean ± sd across references; with --by-rating, also the test
`ndcg_at_10` of the users whose test event was rated >= 4, 3, or <= 2 (a rating pair model
is trained to rank the first above the last).

    python benchmarks/study_aggregates.py benchmarks/results/study_ml100k_feedback.json \\
        artifacts/study_evals --metrics preference_accuracy \\
        --by-rating artifacts/prepared/ml100k \\
        --out benchmarks/results/study_ml100k_feedback_aggregates.json

Reads only the evaluations the study itself wrote (`<eval_cache>/*/manifest.json`, matched by
checkpoint path and split): no model is scored again and no test figure is read that the study
did not read. A per-user CI needs per-pair scores, which the cache does not keep, so none is
given.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl

from recsys_dpo.study.runner import POPULARITY
from recsys_dpo.study.stats import mean_sd


def cached(eval_cache: Path) -> dict[tuple[str, str], dict[str, float]]:
    """(model, split) -> the aggregates of every evaluation in the cache."""
    out = {}
    for manifest in eval_cache.glob("*/manifest.json"):
        m = json.loads(manifest.read_text())
        out[(m["model"], m["split"])] = json.loads((manifest.parent / "metrics.json").read_text())
    return out


def per_user(eval_cache: Path) -> dict[tuple[str, str], Path]:
    """(model, split) -> the per-user table of every evaluation in the cache."""
    out = {}
    for manifest in eval_cache.glob("*/manifest.json"):
        m = json.loads(manifest.read_text())
        out[(m["model"], m["split"])] = manifest.parent / "per_user.parquet"
    return out


# Bands of the test event's rating (MovieLens 1-5).
BANDS = {"rated>=4": pl.col("rating") >= 4, "rated3": pl.col("rating") == 3,
         "rated<=2": pl.col("rating") <= 2}  # fmt: skip


def by_rating(tables: list[list[Path]], test: pl.DataFrame, metric: str) -> dict[str, dict]:
    """Per band of the test event's rating: the users' mean `metric`, mean ± sd across
    references (each reference's figure the mean over its seeds)."""
    out = {}
    for band, where in BANDS.items():
        users = test.filter(where)["user_idx"].to_list()
        per_ref = [float(np.mean([pl.read_parquet(t).filter(pl.col("user_idx").is_in(users))
                                  [metric].mean() for t in seeds])) for seeds in tables]  # fmt: skip
        mean, sd = mean_sd(per_ref)
        out[f"test/{metric}/{band}"] = {"mean": mean, "sd": sd, "per_reference": per_ref,
                                        "n_users": len(users)}  # fmt: skip
    return out


def checkpoint(run_dir: str) -> str:
    """The checkpoint a study evaluates of a run: its best on valid, else its last."""
    result = json.loads((Path(run_dir) / "result.json").read_text())
    return result["best_ckpt"] or result["last_ckpt"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="the study's study.json")
    parser.add_argument("eval_cache", type=Path, help="its study.eval_cache directory")
    parser.add_argument("--metrics", nargs="+", default=["preference_accuracy"])
    parser.add_argument(
        "--by-rating",
        type=Path,
        metavar="PREPARED",
        help="the prepared dataset (its test.parquet has the ratings)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    study = json.loads(args.study.read_text())
    n_refs = len(study["reference_seeds"])
    evals, tables = cached(args.eval_cache), per_user(args.eval_cache)
    test = None if args.by_rating is None else pl.read_parquet(args.by_rating / "test.parquet")
    rows = []
    for entry in study["rows"]:
        runs = entry["runs"] or [[None]] * n_refs  # the popularity baseline has no runs
        models = [[POPULARITY if r is None else checkpoint(r) for r in seeds] for seeds in runs]
        figures = {}
        for split in ("valid", "test"):
            for metric in args.metrics:
                per_ref = [sum(evals[(m, split)][metric] for m in seeds) / len(seeds)
                           for seeds in models]  # fmt: skip
                mean, sd = mean_sd(per_ref)
                figures[f"{split}/{metric}"] = {"mean": mean, "sd": sd, "per_reference": per_ref}
        if test is not None:
            figures |= by_rating([[tables[(m, "test")] for m in s] for s in models], test,
                                 "ndcg_at_10")  # fmt: skip
        rows.append({"name": entry["name"], "kind": entry["kind"], **figures})
        print(entry["name"], {k: f"{v['mean']:.4f} ± {v['sd']:.4f}" for k, v in figures.items()})
    args.out.write_text(json.dumps({"study": study["study"], "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
