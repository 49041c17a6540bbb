"""`PYTHONPATH=$PWD python benchmarks/reward_tiny_synthetic.py` (about a minute on one core).

The tiny exposure-biased synthetic log of tests/test_reward.py, per seed 0-2: a two-tower
reference, then `train-reward` on it. Held-out (valid + test impression pairs) pair accuracy
and true-utility agreement of the reference's scores vs the reward model's, and the reward
run's val/accuracy, val/ece, val/margin -> benchmarks/results/reward_tiny_synthetic.json.
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, "tests")  # the tiny fixtures' settings and helpers

import mlflow  # noqa: E402
from conftest import run_pipeline  # noqa: E402
from test_reward import REWARD, accuracies  # noqa: E402
from test_train_cli import BIASED, config, result, small_model  # noqa: E402

from recsys_dpo.training.run import train_reference, train_reward  # noqa: E402

OUT = Path("benchmarks/results/reward_tiny_synthetic.json")


def one_seed(root: Path, seed: int) -> dict:
    root.mkdir()
    done = run_pipeline("prepare.py", f"paths.artifacts={root}", "progress=false", *BIASED,
                        f"seed={seed}", cwd=root)  # fmt: skip
    assert done.returncode == 0, done.stderr
    ref_cfg = config("train_reference", root, *BIASED, *small_model("two_tower"),
                     "model.dim=16", *REWARD, f"seed={seed}")  # fmt: skip
    ref = Path(result(train_reference(ref_cfg))["last_ckpt"])
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run = result(train_reward(config("train_reward", root, f"reference.ckpt={ref}", *BIASED,
                                     *REWARD, f"seed={seed}", "tracking.enabled=true",
                                     f"tracking.uri={uri}", "tracking.experiment=r")))  # fmt: skip
    last = mlflow.MlflowClient(uri).get_run(run["mlflow_run_id"]).data.metrics
    ref_observed, ref_true = accuracies(root, ref)
    observed, true = accuracies(root, Path(run["best_ckpt"]))
    return {
        "seed": seed,
        "reference": {"heldout_pair_accuracy": ref_observed, "true_agreement": ref_true},
        "reward": {"heldout_pair_accuracy": observed, "true_agreement": true,
                   "val/accuracy": run["val/accuracy"], "best_epoch": run["best_epoch"],
                   "val/ece_last": last["val/ece"], "val/margin_last": last["val/margin"]},
    }  # fmt: skip


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runs = [one_seed(Path(tmp) / f"s{seed}", seed) for seed in (0, 1, 2)]
    OUT.write_text(json.dumps({"what": __doc__, "data": list(BIASED), "reward": list(REWARD),
                               "runs": runs}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
