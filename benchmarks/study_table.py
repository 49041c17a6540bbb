"""The study table from an evaluation directory: each `<name>-vs-ref` / `<name>-vs-control`
pair of `pipelines/evaluate.py` outputs becomes one row (test metrics, paired-bootstrap 95% CIs
of the differences, exact KL to the compared model, popularity shift).

    python benchmarks/study_table.py artifacts/study-ml1m/eval --out benchmarks/results/x.json
"""

import argparse
import json
from pathlib import Path

METRICS = ("ndcg@10", "hr@10")


def ci(delta: dict) -> str:
    mark = "*" if delta["significant"] else ""
    return f"{delta['mean']:+.4f} [{delta['lo']:+.4f}, {delta['hi']:+.4f}]{mark}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows, reference = [], None
    for vs_ref in sorted(args.eval_dir.glob("*-vs-ref/metrics.json")):
        name = vs_ref.parent.name.removesuffix("-vs-ref")
        a = json.loads(vs_ref.read_text())
        control = vs_ref.parent.parent / f"{name}-vs-control" / "metrics.json"
        b = json.loads(control.read_text()) if control.exists() else None
        reference = a["models"]["reference"]
        policy = a["models"]["policy"]
        rows.append({
            "name": name,
            **{m: policy[m] for m in METRICS},
            **{f"{m} vs reference": a["deltas"][m] for m in METRICS},
            **({f"{m} vs control": b["deltas"][m] for m in METRICS} if b else {}),
            "kl_to_reference": a["comparison"].get("kl"),
            "coverage@10": policy["coverage@10"],
            "avg_popularity@10": policy["avg_popularity@10"],
        })  # fmt: skip
    if reference is None:
        raise SystemExit(f"no *-vs-ref/metrics.json under {args.eval_dir}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"reference": reference, "rows": rows}, indent=2))
    print("| model | NDCG@10 | HR@10 | dNDCG@10 vs reference [95% CI] | dNDCG@10 vs control "
          "[95% CI] | KL to ref | coverage@10 | avg pop@10 |")  # fmt: skip
    print("|---|---:|---:|---|---|---:|---:|---:|")
    print(f"| reference | {reference['ndcg@10']:.4f} | {reference['hr@10']:.4f} | | | 0 | "
          f"{reference['coverage@10']:.3f} | {reference['avg_popularity@10']:.0f} |")  # fmt: skip
    for r in rows:
        vs_control = ci(r["ndcg@10 vs control"]) if "ndcg@10 vs control" in r else ""
        kl = "" if r["kl_to_reference"] is None else f"{r['kl_to_reference']:.3f}"
        print(f"| {r['name']} | {r['ndcg@10']:.4f} | {r['hr@10']:.4f} | "
              f"{ci(r['ndcg@10 vs reference'])} | {vs_control} | {kl} | "
              f"{r['coverage@10']:.3f} | {r['avg_popularity@10']:.0f} |")  # fmt: skip
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
