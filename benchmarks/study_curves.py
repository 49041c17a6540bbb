"""Training curves of a study's preference rows from MLflow: `logps/chosen`, `rewards/margins`,
`kl/policy_ref` and `rewards/accuracies` against the step, one line per row, in one PNG.

    python benchmarks/study_curves.py artifacts/study-ml1m --out benchmarks/results/x.png

Each row's run is found through its `runs/<row>/*/*/result.json` (`mlflow_run_id`), so the
tracking URI must be the one the study logged to (default: the config's sqlite:///mlflow.db).
Also prints each row's first and last logged value of every curve.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

CURVES = ("logps/chosen", "rewards/margins", "kl/policy_ref", "rewards/accuracies")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("art", type=Path, help="the study's paths.artifacts directory")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    client = MlflowClient(tracking_uri=args.tracking_uri)
    results = sorted(args.art.glob("runs/*/preference/*/result.json"))
    if not results:
        raise SystemExit(f"no runs/*/preference/*/result.json under {args.art}")
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 4))
    for ax in axes:  # up to 20 rows, each its own colour
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for result in results:
        row = result.parent.parent.parent.name
        run_id = json.loads(result.read_text())["mlflow_run_id"]
        for ax, key in zip(axes, CURVES, strict=True):
            history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            if not history:
                continue
            ax.plot([m.step for m in history], [m.value for m in history], label=row)
            print(f"{row:<28} {key:<20} {history[0].value:+9.3f} -> {history[-1].value:+9.3f}")
    for ax, key in zip(axes, CURVES, strict=True):
        ax.set_title(key)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
