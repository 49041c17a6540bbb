"""Off-policy estimators against the truth on the simulator: bias, sd, RMSE and CI coverage.

The synthetic log's logging policy is Plackett-Luce with known propensities and its click model
gives the exact click-through rate of any policy, so every estimate can be compared with the
value it estimates. For each seed (a new world and log), log size and candidate:

    candidates  Plackett-Luce over (1 - a) l_logging + a u_true, a in {0.25, 0.5, 1} (near the
                logging policy to far from it), and epsilon-greedy (eps 0.3) around the true
                top-K; distance: the users' mean KL(pi || mu) of the first slot
    exact       mean over the logged requests of 1/K sum_p sum_i pi(i at p | u) P(click | u, i, p)
    estimators  recsys_dpo.evaluation.ope (DM / DR with the evaluate stage's cross-fitted
                logistic reward model on the candidate's scores and the slot)

    python benchmarks/ope_validation.py                     # 30 seeds, ~10 min on one core
    python benchmarks/ope_validation.py --seeds 5 --users 200 800
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from recsys_dpo.data.synthetic import SyntheticConfig, simulate
from recsys_dpo.evaluation import ope
from recsys_dpo.evaluation.counterfactual import LoggedSlates, reward_model
from recsys_dpo.ranking_policy import RankingPolicy

RESULTS = Path(__file__).parent / "results" / "ope_validation.json"
WORLD = dict(n_items=100, slate_size=5, dim=8, mean_requests=8.0)
# name: (the weight a of the true utilities in the candidate's scores, its policy)
CANDIDATES = {
    "pl_a0.25": (0.25, RankingPolicy("plackett_luce")),
    "pl_a0.5": (0.5, RankingPolicy("plackett_luce")),
    "pl_a1": (1.0, RankingPolicy("plackett_luce")),
    "greedy_eps0.3": (1.0, RankingPolicy("epsilon_greedy", epsilon=0.3)),
}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def one_log(seed: int, n_users: int, n_resamples: int) -> list[dict]:
    """Every candidate's estimates, CIs and exact value on one simulated log."""
    cfg = SyntheticConfig(seed=seed, n_users=n_users, **WORLD)
    truth, events = simulate(cfg)
    k = cfg.slate_size
    users = np.array([truth.user_index[u] for u in events["user_id"]]).reshape(-1, k)[:, 0]
    items = np.array([truth.item_index[i] for i in events["item_id"]]).reshape(-1, k)
    every_user = np.arange(n_users)
    slot = np.arange(k)
    utility = (truth.utility_scale * truth.user_vectors.astype(np.float64)
               @ truth.item_vectors.T.astype(np.float64) + truth.item_bias)
    p_click = truth.click_probability(every_user[:, None, None],
                                      np.arange(cfg.n_items)[None, :, None], slot[None, None, :])
    logging_logits = truth.logging_logits(every_user)
    logging_first = _softmax(logging_logits)
    slates = LoggedSlates(
        queries=None, request_user=users, items=items,
        clicks=events["clicked"].to_numpy().reshape(-1, k),
        propensity=events["propensity"].to_numpy().reshape(-1, k), skipped=0,
    )  # fmt: skip
    rows = []
    for name, (a, policy) in CANDIDATES.items():
        scores = (1 - a) * logging_logits + a * utility
        marginals = policy.slot_probabilities(scores, k)  # [users, items, k]
        exact = float(((marginals * p_click).sum(axis=(1, 2)) / k)[users].mean())
        first = np.clip(marginals[:, :, 0], 1e-300, None)
        kl = float((first * (np.log(first) - np.log(logging_first))).sum(axis=1).mean())
        q, dm = reward_model(slates, scores, marginals, seed)
        log = ope.SlateLog(marginals[users[:, None], items, slot], slates.propensity,
                           slates.clicks, q, dm)
        estimates = ope.estimate(log, n_resamples=n_resamples, seed=seed)
        rows.append({
            "seed": seed, "n_users": n_users, "requests": len(items), "candidate": name,
            "kl_first_slot": kl, "exact": exact, "logged_ctr": float(slates.clicks.mean()),
            **{f"{e}/{part}": getattr(v, part) for e, v in estimates.items()
               for part in ("value", "lo", "hi")},
            **{f"diag/{d}": v for d, v in ope.diagnostics(log).items()},
        })  # fmt: skip
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per (log size, candidate, estimator): bias, sd, RMSE, relative RMSE, CI coverage."""
    out = []
    keys = sorted({(r["n_users"], r["candidate"]) for r in rows})
    for n_users, candidate in keys:
        group = [r for r in rows if r["n_users"] == n_users and r["candidate"] == candidate]
        exact = np.array([r["exact"] for r in group])
        for estimator in ope.ESTIMATORS:
            value = np.array([r[f"{estimator}/value"] for r in group])
            err = value - exact
            covered = [r[f"{estimator}/lo"] <= r["exact"] <= r[f"{estimator}/hi"] for r in group]
            out.append({
                "n_users": n_users, "requests": int(np.mean([r["requests"] for r in group])),
                "candidate": candidate, "estimator": estimator, "seeds": len(group),
                "kl_first_slot": float(np.mean([r["kl_first_slot"] for r in group])),
                "exact_mean": float(exact.mean()),
                "bias": float(err.mean()), "bias_se": float(err.std(ddof=1) / np.sqrt(len(err))),
                "sd": float(err.std(ddof=1)), "rmse": float(np.sqrt((err**2).mean())),
                "relative_rmse": float(np.sqrt((err**2).mean()) / exact.mean()),
                "coverage_95": float(np.mean(covered)),
                "ess_share": float(np.mean([r["diag/ess_share"] for r in group])),
            })  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--users", type=int, nargs="+", default=[200, 800, 3200])
    parser.add_argument("--resamples", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    start = time.perf_counter()
    rows = [row for seed in range(args.seeds) for n in args.users
            for row in one_log(seed, n, args.resamples)]
    table = summarise(rows)
    for t in table:
        print(f"{t['n_users']:>5} users {t['candidate']:>14} KL {t['kl_first_slot']:.2f} "
              f"{t['estimator']:>15}: bias {t['bias']:+.5f} (se {t['bias_se']:.5f}) "
              f"sd {t['sd']:.5f} rel.RMSE {t['relative_rmse']:.3f} cover {t['coverage_95']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python benchmarks/ope_validation.py " + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in (("seeds", args.seeds), ("users", args.users),
                         ("resamples", args.resamples))),
        "world": WORLD, "ci": 0.95, "seconds": time.perf_counter() - start,
        "table": table,
    }, indent=2) + "\n")  # fmt: skip
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
