"""Open Bandit Dataset sample: each logging policy's click-through rate estimated from the
other policy's log, against its own on-policy CTR (the relative estimation error protocol of
Saito et al. 2021, "Open Bandit Dataset and Pipeline: Towards Realistic and Reproducible
Off-Policy Evaluation", NeurIPS Datasets and Benchmarks).

Data: ../shared/data/open-bandit/<policy>/<campaign>/<campaign>.csv, 10,000 rows per policy and
campaign, one shown item per row: timestamp, item_id, position 1-3, click, propensity_score
(the logging policy's probability of this item at this position). Each row is one round with
one slot (K = 1); the position is its context.

- Random from the BTS log: pi_random(a | p) = 1 / n_items (uniform: the random log's own
  propensity), mu = the BTS propensities.
- BTS from the random log: mu = 1 / n_items; pi_BTS(a | p, t), Thompson sampling's probability
  of item a at position p at time t, is reconstructed from the BTS log: for every item, the
  propensity of its BTS-log row at position p nearest in time to t (the BTS posterior moved
  during the week: up to 541 distinct propensities per item and position), normalised over the
  items at (p, t). obp computes it instead by simulating the policy from its ZOZOTOWN prior
  parameters, which are not used here; with 10,000 BTS rows, ~42 per (item, position), the
  reconstruction is itself an estimate.
- Reward model of DM / DR: a logistic regression of the click on item and position one-hot,
  cross-fitted over two halves of the log (the hashed user features are not used).
- Ground truth: the evaluated policy's on-policy CTR in its own log (bootstrap CI over rows);
  relative error |V_hat - V_on| / V_on.

    python benchmarks/ope_obd.py        # ~1 min; writes benchmarks/results/ope_obd.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl
from scipy import stats
from scipy.special import expit
from sklearn.linear_model import LogisticRegression

from recsys_dpo.evaluation import ope

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "open-bandit"
RESULTS = Path(__file__).parent / "results" / "ope_obd.json"
CAMPAIGNS = ("all", "men", "women")


def read(policy: str, campaign: str) -> pl.DataFrame:
    path = DATA / policy / campaign / f"{campaign}.csv"
    return (
        pl.read_csv(path, columns=["timestamp", "item_id", "position", "click",
                                   "propensity_score"])  # fmt: skip
        .with_columns(pl.col("timestamp").str.to_datetime(time_zone="UTC"),
                      (pl.col("position") - 1).alias("position"))  # fmt: skip
        .sort("timestamp")
    )


def bts_probabilities(bts: pl.DataFrame, at: pl.DataFrame, n_items: int) -> np.ndarray:
    """[rows of `at`, n_items]: pi_BTS(a | position, time) of each row of `at`, from the BTS
    log's propensity nearest in time for each (item, position), normalised over items."""
    grid = at.select("timestamp", "position").with_row_index("_row").join(
        pl.DataFrame({"item_id": np.arange(n_items)}), how="cross"
    ).sort("timestamp")
    logged = bts.select("timestamp", "item_id", "position", "propensity_score").sort("timestamp")
    # Both sides are sorted by timestamp above; polars cannot check that within `by` groups.
    near = grid.join_asof(logged, on="timestamp", by=["item_id", "position"], strategy="nearest",
                          check_sortedness=False)
    table = near.sort("_row", "item_id")["propensity_score"].fill_null(0.0).to_numpy()
    table = table.reshape(at.height, n_items)
    return table / table.sum(axis=1, keepdims=True)


def reward_model(log: pl.DataFrame, n_items: int, seed: int) -> np.ndarray:
    """[rows, n_items]: cross-fitted click probability of every item at each row's position."""
    n = log.height
    items, positions = log["item_id"].to_numpy(), log["position"].to_numpy()
    clicks = log["click"].to_numpy()

    def features(item: np.ndarray, position: np.ndarray) -> np.ndarray:
        return np.concatenate([np.eye(n_items)[item], np.eye(3)[position]], axis=-1)

    fold = np.random.default_rng(seed).permutation(n) % 2
    out = np.empty((n, n_items))
    for part in (0, 1):
        fit, rows = fold != part, fold == part
        model = LogisticRegression(max_iter=2000).fit(features(items[fit], positions[fit]),
                                                      clicks[fit])  # fmt: skip
        coef = model.coef_[0]
        out[rows] = expit(coef[:n_items][None, :] + coef[n_items:][positions[rows]][:, None]
                          + model.intercept_[0])  # fmt: skip
    return out


def on_policy(log: pl.DataFrame, n_resamples: int, seed: int) -> ope.Estimate:
    clicks = log["click"].to_numpy().astype(np.float64)
    ci = stats.bootstrap((clicks,), np.mean, n_resamples=n_resamples, method="percentile",
                         rng=np.random.default_rng(seed)).confidence_interval  # fmt: skip
    return ope.Estimate(float(clicks.mean()), float(ci.low), float(ci.high))


def evaluate(behaviour: pl.DataFrame, target_probs: np.ndarray, truth: ope.Estimate,
             n_resamples: int, seed: int) -> dict:
    """Every estimator on the behaviour log for the target's probabilities [rows, items]."""
    n_items = target_probs.shape[1]
    rows = np.arange(behaviour.height)
    items = behaviour["item_id"].to_numpy()
    qhat = reward_model(behaviour, n_items, seed)
    log = ope.SlateLog(
        target=target_probs[rows, items][:, None],
        logging=behaviour["propensity_score"].to_numpy()[:, None],
        clicks=behaviour["click"].to_numpy()[:, None],
        q=qhat[rows, items][:, None],
        dm=(target_probs * qhat).sum(axis=1),
    )
    estimates = ope.estimate(log, n_resamples=n_resamples, seed=seed)
    return {
        "on_policy_ctr": vars(truth),
        "estimates": {
            name: {**vars(e), "relative_error": abs(e.value - truth.value) / truth.value}
            for name, e in estimates.items()
        },
        "diagnostics": ope.diagnostics(log),
        "behaviour_clicks": int(behaviour["click"].sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    out = {"command": f"python benchmarks/ope_obd.py --resamples {args.resamples}",
           "data": "OBD small sample, 10,000 rows per policy and campaign", "campaigns": {}}
    for campaign in CAMPAIGNS:
        random, bts = read("random", campaign), read("bts", campaign)
        n_items = int(max(random["item_id"].max(), bts["item_id"].max())) + 1
        truth_random = on_policy(random, args.resamples, args.seed)
        truth_bts = on_policy(bts, args.resamples, args.seed)
        uniform = np.full((bts.height, n_items), 1.0 / n_items)
        out["campaigns"][campaign] = {
            "n_items": n_items,
            "bts_from_random": evaluate(random, bts_probabilities(bts, random, n_items),
                                        truth_bts, args.resamples, args.seed),
            "random_from_bts": evaluate(bts, uniform, truth_random, args.resamples, args.seed),
        }
        for direction, r in out["campaigns"][campaign].items():
            if direction == "n_items":
                continue
            t = r["on_policy_ctr"]
            print(f"{campaign:>5} {direction:>15}: on-policy {t['value']:.5f} "
                  f"[{t['lo']:.5f}, {t['hi']:.5f}]  ESS {r['diagnostics']['ess']:.0f}")
            for name, e in r["estimates"].items():
                print(f"{'':>23}{name:>15} {e['value']:.5f} [{e['lo']:.5f}, {e['hi']:.5f}] "
                      f"rel.err {e['relative_error']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
